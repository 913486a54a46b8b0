"""distribute.py and the distributed train step: flag parsing, cluster detection, and (in one
subprocess with two logical CPU towers) tower equivalence, loss scaling and the reduction device."""
import json
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
    slurm = distribute.detect_cluster({"SLURM_NTASKS": "4", "SLURM_PROCID": "3"})
    assert (slurm.source, slurm.num_workers, slurm.worker_index) == ("slurm", 4, 3)
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


# One TensorFlow process for every check that needs two logical CPU devices (they can only be
# configured once per process, and each start costs seconds).
TOWER_SCRIPT = r"""
import json, sys
import numpy as np
import distribute
towers = distribute.configure_devices(cpu_towers=2)
import keras, tensorflow as tf
import models, steps

def model_and_step(devices, reduce_to, learning_rate=0.5, jit_compile=False):
    strategy = distribute.build_strategy(devices, reduce_to)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = models.build_model("unet", 3, input_channels=1, base_filters=2, batch_norm=False)
        optimizer = keras.optimizers.SGD(learning_rate)   # SGD: the update is proportional to the gradient
        optimizer.build(model.trainable_variables)
    step = steps.make_train_step(strategy, model, optimizer, "ce+dice", 3, global_batch_size=4,
                                   jit_compile=jit_compile)
    return strategy, model, step

rng = np.random.default_rng(0)
images = rng.normal(size=(4, 32, 32, 1)).astype(np.float32)
masks = rng.integers(0, 3, size=(4, 32, 32)).astype(np.int32)
masks[1, :8] = -1                                      # ignored pixels
two, model2, step2 = model_and_step(towers, "/cpu:0")
one, model1, step1 = model_and_step(["/cpu:0"], "/cpu:0")
model1.set_weights(model2.get_weights())
initial = [w.copy() for w in model2.get_weights()]
expected_loss = float(tf.reduce_mean(steps.per_image_loss(model1(images), masks, "ce+dice", 3)))
loss2 = float(step2(distribute.distribute_batches(two, [(images[:2], masks[:2]), (images[2:], masks[2:])])))
loss1 = float(step1(distribute.distribute_batches(one, [(images, masks)])))
w1, w2 = model1.get_weights(), model2.get_weights()
result = {
    "loss_one": loss1, "loss_two": loss2, "expected_loss": expected_loss,
    "max_weight_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(w1, w2)),
    "max_update": max(float(np.max(np.abs(a - b))) for a, b in zip(w1, initial)),
}

def reduction_devices(reduce_to, jit_compile=False):
    strategy, model, step = model_and_step(towers, reduce_to, jit_compile=jit_compile)
    batch = distribute.distribute_batches(strategy, [(images[:2], masks[:2]), (images[2:], masks[2:])])
    graph = step.get_concrete_function(batch).graph
    found = []
    for op in graph.get_operations():
        if op.type != "AddN":
            continue
        input_devices = {tf.DeviceSpec.from_string(t.op.device or "/cpu:0").device_index for t in op.inputs}
        if input_devices == {0, 1}:                    # sums values coming from both towers
            spec = tf.DeviceSpec.from_string(op.device)
            found.append(f"{spec.device_type}:{spec.device_index}")
    return found, len(model.trainable_variables)

for name in ("/cpu:0", "/cpu:1"):
    devices, variables = reduction_devices(name)
    result["reduce " + name] = {d: devices.count(d) for d in set(devices)}
    result["variables"] = variables
devices, _ = reduction_devices("/cpu:1", jit_compile=True)
result["reduce xla /cpu:1"] = {d: devices.count(d) for d in set(devices)}
# BatchNormalization moving statistics: per tower after a step, averaged by make_sync_statistics.
strategy = distribute.build_strategy(towers, "/cpu:0")
with strategy.scope():
    bn_model = models.build_model("unet", 2, input_channels=1, base_filters=2, batch_norm=True)
    bn_optimizer = keras.optimizers.SGD(0.1)
    bn_optimizer.build(bn_model.trainable_variables)
bn_step = steps.make_train_step(strategy, bn_model, bn_optimizer, "ce", 2, global_batch_size=4)
bn_step(distribute.distribute_batches(strategy, [(images[:2], masks[:2] % 2), (images[2:] * 5 + 3, masks[2:] % 2)]))
moving = bn_model.non_trainable_variables
before = [[np.array(t) for t in strategy.experimental_local_results(v.value)] for v in moving]
distribute.make_sync_statistics(strategy, bn_model.non_trainable_variables)()
after = [[np.array(t) for t in strategy.experimental_local_results(v.value)] for v in moving]
result["bn_differed_before"] = any(not np.allclose(a, b) for a, b in before)
result["bn_max_error_after"] = max(float(np.max(np.abs(x - (a + b) / 2))) for (a, b), pair in zip(before, after)
                                   for x in pair)
print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def tower_results():
    process = subprocess.run([sys.executable, "-c", TOWER_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
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
