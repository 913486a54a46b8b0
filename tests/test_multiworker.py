"""Two training workers on localhost: two real processes joined by TF_CONFIG on loopback ports,
training a tiny UNet on the CPU with MultiWorkerMirroredStrategy."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import free_ports, make_synthetic_db

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The worker process: train_unet.py's own entry point (trainer.main("unet", argv)), with
# checkpoints.save_checkpoint wrapped to copy each saved model.weights.h5 aside. A non-chief worker deletes its
# checkpoints right after writing them (only the chief keeps files), so this copy is the only way
# to look at its weights after the run; it does not change what the trainer does.
WORKER = r"""
import os, shutil, sys
import checkpoints, trainer

dump = os.environ["WEIGHTS_DUMP"]
original = checkpoints.save_checkpoint

def save_and_copy(directory, model, optimizer, state, config_dict):
    original(directory, model, optimizer, state, config_dict)
    if os.path.basename(directory) == "latest":
        os.makedirs(dump, exist_ok=True)
        shutil.copyfile(os.path.join(directory, "model.weights.h5"),
                        os.path.join(dump, "step%d.weights.h5" % state.step))

checkpoints.save_checkpoint = save_and_copy
sys.exit(trainer.main("unet", sys.argv[1:]))
"""

BATCH_SIZE, STEPS_PER_EPOCH, EPOCHS = 2, 3, 2


def read_weights(path):
    """{dataset path: array} of a Keras .weights.h5 file."""
    import h5py

    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """Run the two workers to completion; returns their folders and outputs."""
    tmp = tmp_path_factory.mktemp("multiworker")
    make_synthetic_db(tmp / "train.lmdb", num_records=8, seed=0)
    make_synthetic_db(tmp / "test.lmdb", num_records=4, seed=1)
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes, workers = [], []
    for index in range(2):
        folder = tmp / f"worker{index}"
        (folder / "tmp").mkdir(parents=True)
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                   TMPDIR=str(folder / "tmp"), WEIGHTS_DUMP=str(folder / "weights"), CUDA_VISIBLE_DEVICES="",
                   PYTHONUNBUFFERED="1")
        argv = ["--train_database", str(tmp / "train.lmdb"), "--test_database", str(tmp / "test.lmdb"),
                # Each worker gets its own output folder so the test can see what each one wrote.
                "--output_dir", str(folder / "out"), "--batch_size", str(BATCH_SIZE), "--tile_size", "32",
                "--base_filters", "2", "--unet_depth", "2", "--test_every_n_steps", str(STEPS_PER_EPOCH),
                "--max_epochs", str(EPOCHS), "--gpus", "none", "--log_every_n_steps", "1",
                # Not used with several workers: the trainer says so and records what is used.
                "--gradient_update_location", "cpu"]
        processes.append(subprocess.Popen([sys.executable, "-c", WORKER, *argv], cwd=ROOT, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        workers.append({"dir": folder})
    try:
        for worker, process in zip(workers, processes):
            worker["log"] = process.communicate(timeout=400)[0]
            worker["code"] = process.returncode
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return workers


def test_both_workers_finish(two_workers):
    for index, worker in enumerate(two_workers):
        assert worker["code"] == 0, f"worker {index} exited {worker['code']}:\n{worker['log'][-4000:]}"


def is_moving_statistic(key):
    """Whether a .weights.h5 dataset is a BatchNormalization moving mean/variance (its vars 2 and 3;
    0 and 1 are the trainable gamma and beta)."""
    group, index = key.rsplit("/", 1)
    return "batch_normalization" in group and index in ("2", "3")


def checkpoint_pairs(two_workers):
    """[(chief arrays, other worker arrays)] for every checkpoint, after checking both saw the same ones."""
    chief, other = (w["dir"] / "weights" for w in two_workers)
    names = [f"step{STEPS_PER_EPOCH * e}.weights.h5" for e in range(1, EPOCHS + 1)]
    assert sorted(p.name for p in chief.iterdir()) == sorted(names)
    assert sorted(p.name for p in other.iterdir()) == sorted(names)
    return [(name, read_weights(chief / name), read_weights(other / name)) for name in names]


def test_workers_hold_identical_trainable_weights(two_workers):
    pairs = checkpoint_pairs(two_workers)
    for name, a, b in pairs:
        assert a.keys() == b.keys()
        trainable = [k for k in a if not is_moving_statistic(k)]
        assert len(trainable) > 10
        for key in trainable:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key} differs between workers")
    # Training did move the weights (so the equality is not two untouched initialisations).
    first, last = pairs[0][2], pairs[-1][2]
    assert any(not np.array_equal(first[k], last[k]) for k in first if not is_moving_statistic(k))
    # The chief's kept checkpoint is that same final state.
    final = read_weights(two_workers[0]["dir"] / "out" / "checkpoints" / "latest" / "model.weights.h5")
    for key, value in pairs[-1][1].items():
        np.testing.assert_array_equal(final[key], value)


def test_workers_hold_identical_batch_norm_statistics(two_workers):
    # The moving statistics are weights of the exported model too, and each worker evaluates its
    # share of the test set with its own copy: they must agree for the metrics to describe one model.
    for name, a, b in checkpoint_pairs(two_workers):
        moving = [k for k in a if is_moving_statistic(k)]
        assert moving, "the model has no BatchNormalization statistics to compare"
        differing = [k for k in moving if not np.array_equal(a[k], b[k])]
        assert not differing, (f"{name}: {len(differing)} of {len(moving)} BatchNormalization moving "
                               f"statistics differ between the workers, e.g. {differing[0]}")


def test_only_the_chief_writes_outputs(two_workers):
    out = two_workers[0]["dir"] / "out"
    for name in ("config.json", "train_loss.csv", "test_metrics.csv", "model.keras", "plots/loss.png",
                 "checkpoints/latest/model.weights.h5", "checkpoints/best/model.weights.h5"):
        assert (out / name).exists(), f"chief did not write {name}"
    steps = [int(line.split(",")[0]) for line in (out / "train_loss.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
    other = two_workers[1]["dir"]
    assert not (other / "out").exists() or not any((other / "out").iterdir()), \
        f"the non-chief worker wrote {sorted(p.name for p in (other / 'out').iterdir())}"
    # Its temporary checkpoints (under its TMPDIR) were removed.
    assert list((other / "tmp").iterdir()) == []
    assert "effective batch" not in two_workers[1]["log"]


def test_global_batch_is_workers_times_towers_times_batch_size(two_workers):
    config = json.loads((two_workers[0]["dir"] / "out" / "config.json").read_text())
    assert config["num_workers"] == 2
    assert config["effective_batch"] == 2 * 1 * BATCH_SIZE
    assert f"effective batch: {BATCH_SIZE} per tower x 1 tower(s) x 2 worker(s) = {2 * BATCH_SIZE}" \
        in two_workers[0]["log"]
    # Across workers the gradients are summed by a collective all-reduce (RING on CPUs), whatever
    # --gradient_update_location says; config.json records what was used.
    assert "2 worker(s), collective all-reduce across workers (RING)" in two_workers[0]["log"]
    assert config["reduction"] == "collective all-reduce (RING)"
    assert ("warning: --gradient_update_location cpu is not used with 2 workers: the gradients of all "
            "replicas are summed by a collective all-reduce (RING)") in two_workers[0]["log"]


def test_float16_overflow_on_one_worker_is_skipped_by_both():
    # tests/distributed_checks.py worker_overflow: one float16 step in which only worker 1's batch
    # overflows. Both workers must skip it and halve the loss scale; a worker that applied it would
    # wait alone in the gradient all-reduce and fail on the 60 s collective timeout.
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                   CUDA_VISIBLE_DEVICES="")
        processes.append(subprocess.Popen([sys.executable, "tests/distributed_checks.py", "worker_overflow"],
                                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    outcomes = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=600)
            assert process.returncode == 0, stderr[-4000:]
            outcomes.append(json.loads([l for l in stdout.splitlines() if l.startswith("RESULT ")][-1][7:]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert sorted(o["worker"] for o in outcomes) == [0, 1] and all(o["workers"] == 2 for o in outcomes)
    for outcome in outcomes:
        assert (outcome["scale"], outcome["weights_finite"], outcome["max_weight_change"]) == (2.0 ** 14, True, 0.0)


# Worker 1 gets SIGTERM during the last step before a test pass (step 3 of 3).
SIGNALLED_WORKER = r"""
import os, signal, sys
import trainer

original = trainer.Run.train_one_step

def step_then_signal(self, state):
    done = original(self, state)
    if self.info.worker_index == 1 and state.step == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return done

trainer.Run.train_one_step = step_then_signal
sys.exit(trainer.main("unet", sys.argv[1:]))
"""


def test_a_signal_to_one_worker_in_the_last_step_of_an_epoch_stops_both_with_a_checkpoint(tmp_path):
    # Before, the signalled worker alone checkpointed and left; the chief went into the test pass,
    # died in its collective ("Socket closed", exit 1) and wrote no checkpoint.
    make_synthetic_db(tmp_path / "train.lmdb", num_records=8, seed=0)
    make_synthetic_db(tmp_path / "test.lmdb", num_records=4, seed=1)
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                   CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
        argv = ["--train_database", str(tmp_path / "train.lmdb"), "--test_database", str(tmp_path / "test.lmdb"),
                "--output_dir", str(tmp_path / f"out{index}"), "--batch_size", "2", "--tile_size", "32",
                "--base_filters", "2", "--unet_depth", "2", "--test_every_n_steps", "3", "--max_epochs", "2",
                "--gpus", "none"]
        processes.append(subprocess.Popen([sys.executable, "-c", SIGNALLED_WORKER, *argv], cwd=ROOT, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [process.communicate(timeout=400)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert [p.returncode for p in processes] == [143, 143], logs[0][-3000:] + logs[1][-3000:]
    state = json.loads((tmp_path / "out0" / "checkpoints" / "latest" / "state.json").read_text())
    assert (state["step"], state["epoch"]) == (3, 0)
    assert not (tmp_path / "out1" / "checkpoints").exists()  # only the chief keeps files
