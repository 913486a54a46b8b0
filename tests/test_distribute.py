"""distribute.py and the distributed train step: flag parsing, cluster detection, and (in one
subprocess with two logical CPU towers, tests/distributed_checks.py) tower equivalence, loss
scaling, the reduction device and mixed precision."""
import json
import math
import subprocess
import sys

import pytest

import distribute

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_parse_gpus():
    assert distribute.parse_gpus(None, 2) == [0, 1]
    assert distribute.parse_gpus("all", 3) == [0, 1, 2]
    assert distribute.parse_gpus("none", 2) == []
    assert distribute.parse_gpus("1,0", 2) == [0, 1]
    with pytest.raises(distribute.DistributionError, match=r"GPU 3 does not exist.*2 GPU\(s\).*valid: 0, 1"):
        distribute.parse_gpus("3", 2)
    with pytest.raises(distribute.DistributionError, match="expected 'all', 'none' or GPU indices"):
        distribute.parse_gpus("gpu0", 2)
    with pytest.raises(distribute.DistributionError, match="listed twice"):
        distribute.parse_gpus("1,1", 2)


def test_parse_reduction_location():
    assert distribute.parse_reduction_location(None, 0) == "/cpu:0"
    assert distribute.parse_reduction_location(None, 2) == "/gpu:0"
    assert distribute.parse_reduction_location("cpu", 2) == "/cpu:0"
    assert distribute.parse_reduction_location("GPU:1", 2) == "/gpu:1"
    assert distribute.parse_reduction_location("nccl", 2) == "nccl"
    with pytest.raises(distribute.DistributionError, match=r"'gpu:3'.*2 GPU\(s\).*cpu, gpu:0, gpu:1, nccl"):
        distribute.parse_reduction_location("gpu:3", 2)
    with pytest.raises(distribute.DistributionError, match=r"'nccl'.*0 GPU\(s\).*valid choices: cpu$"):
        distribute.parse_reduction_location("nccl", 0)
    with pytest.raises(distribute.DistributionError, match="'gpu:0'"):
        distribute.parse_reduction_location("gpu:0", 0)


def test_detect_cluster_from_tf_config_and_slurm():
    assert distribute.detect_cluster({}) is None
    assert distribute.detect_cluster({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    tf_config = {"cluster": {"worker": ["localhost:1", "localhost:2", "localhost:3"]},
                 "task": {"type": "worker", "index": 2}}
    cluster = distribute.detect_cluster({"TF_CONFIG": json.dumps(tf_config)})
    assert (cluster.source, cluster.num_workers, cluster.worker_index) == ("TF_CONFIG", 3, 2)
    with_chief = {"cluster": {"chief": ["h:1"], "worker": ["h:2"]}, "task": {"type": "worker", "index": 0}}
    cluster = distribute.detect_cluster({"TF_CONFIG": json.dumps(with_chief)})
    assert (cluster.num_workers, cluster.worker_index) == (2, 1)
    single = {"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 0}}
    assert distribute.detect_cluster({"TF_CONFIG": json.dumps(single)}) is None
    with pytest.raises(distribute.DistributionError, match="TF_CONFIG is not valid"):
        distribute.detect_cluster({"TF_CONFIG": "{not json"})
    slurm = distribute.detect_cluster({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3"})
    assert (slurm.source, slurm.num_workers, slurm.worker_index) == ("slurm", 4, 3)
    # sbatch --ntasks=2 running the trainer in its batch script, without srun: no step, refused by name.
    with pytest.raises(distribute.DistributionError, match="2 tasks, but the trainer runs outside a job step: "
                                                           "start one trainer per task with srun"):
        distribute.detect_cluster({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"})
    # One task of a step of one (srun -n1 inside a larger allocation): a single worker.
    assert distribute.detect_cluster({"SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert distribute._max_tasks_per_node("2(x3),1") == 2


def test_check_xla_reads_the_model_registry(monkeypatch):
    import models.unet

    distribute.check_xla(False, "segnet")
    distribute.check_xla(True, "unet")
    with pytest.raises(distribute.DistributionError, match="--xla cannot compile segnet: .*no XLA kernel"):
        distribute.check_xla(True, "segnet")
    monkeypatch.setattr(models.unet, "XLA_PROBLEM", "a reason of this model")
    with pytest.raises(distribute.DistributionError, match="--xla cannot compile unet: a reason of this model"):
        distribute.check_xla(True, "unet")


@pytest.fixture(scope="module")
def tower_results():
    """tests/distributed_checks.py towers: every check needing two logical CPU towers, in one process."""
    process = subprocess.run([sys.executable, "tests/distributed_checks.py", "towers"], cwd=ROOT,
                             capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stderr[-4000:]
    line = [l for l in process.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_two_towers_equal_one_tower_on_the_concatenated_batch(tower_results):
    assert tower_results["max_update"] > 1e-3          # the step really changed the weights
    assert tower_results["max_weight_diff"] < 1e-5


def test_loss_scale_is_independent_of_tower_count(tower_results):
    # The reported loss is the mean over all 4 images whichever the tower count; dividing by the
    # replica count a second time would halve the two-tower value (and its gradients, caught above).
    assert tower_results["loss_one"] == pytest.approx(tower_results["expected_loss"], rel=1e-5)
    assert tower_results["loss_two"] == pytest.approx(tower_results["expected_loss"], rel=1e-5)


def test_gradient_reduction_runs_on_the_requested_device(tower_results):
    # One cross-tower sum per trainable variable on the requested device; the only other one is
    # the reported loss, which strategy.reduce sums on the current device (CPU:0).
    variables = tower_results["variables"]
    on_cpu0, on_cpu1 = tower_results["reduce /cpu:0"], tower_results["reduce /cpu:1"]
    assert set(on_cpu0) == {"CPU:0"} and on_cpu0["CPU:0"] >= variables
    assert on_cpu1["CPU:1"] >= variables and on_cpu1.get("CPU:0", 0) <= 1
    # --xla compiles each tower's forward/backward pass only, so the chosen device still sums.
    on_cpu1_xla = tower_results["reduce xla /cpu:1"]
    assert on_cpu1_xla["CPU:1"] >= variables and on_cpu1_xla.get("CPU:0", 0) <= 1


def test_batch_norm_statistics_are_averaged_over_towers(tower_results):
    # Each tower updates its own copy from its own batches; syncing sets every copy to their mean.
    assert tower_results["bn_differed_before"]
    assert tower_results["bn_max_error_after"] < 1e-6


def test_float16_step_is_skipped_on_every_tower_when_one_overflows(tower_results):
    # Whichever tower overflows, the step is skipped everywhere: weights unchanged and finite, loss
    # scale halved from Keras' initial 2**15. (Keras alone applied the step when only tower 1
    # overflowed, leaving the scale at 32768 and the weights non-finite.)
    for tower in (0, 1):
        outcome = tower_results[f"overflow on tower {tower}"]
        assert outcome == {"scale": 2.0 ** 14, "weights_finite": True, "max_weight_change": 0.0}, tower


def test_bfloat16_computes_in_bfloat16_without_loss_scaling(tower_results):
    outcome = tower_results["bfloat16"]
    assert outcome["optimizer"] == "Adam" and outcome["compute_dtype"] == "bfloat16"
    assert outcome["variable_dtype"] == "float32" and math.isfinite(outcome["loss"])
