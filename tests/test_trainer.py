"""The trainer: metrics, losses, flag validation, and real runs of train_unet.py / train_segnet.py
(subprocesses on two logical CPU towers: early stopping, --max_epochs, resume, NaN, SIGTERM,
transfer learning, end to end on nist_colonies)."""
import csv
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import metrics
import trainer
from conftest import make_synthetic_db

ROOT = pathlib.Path(__file__).resolve().parent.parent
# A 2-level UNet: tracing the train step is most of a tiny run's cost, and depth does not matter here.
TINY = ["--batch_size", "2", "--tile_size", "32", "--base_filters", "2", "--unet_depth", "2", "--cpu_towers", "2",
        "--log_every_n_steps", "1"]


# The same in this process (one CPU device: logical towers need a process of their own), which
# saves a TensorFlow start per run where the test is about the run, not the process.
ONE_TOWER = TINY[:TINY.index("--cpu_towers")] + TINY[TINY.index("--cpu_towers") + 2:]


def train_here(capsys, args):
    """trainer.main("unet", args) in this process. Returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = trainer.main("unet", [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def run_trainer(model, args, timeout=240):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, f"train_{model}.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dbs")
    make_synthetic_db(root / "train", num_records=12, shape=(64, 64), seed=0)
    make_synthetic_db(root / "test", num_records=3, shape=(64, 64), seed=1)
    return ["--train_database", root / "train", "--test_database", root / "test"]


# ---------------------------------------------------------------------------------------------
# metrics.py and the losses (no training)
# ---------------------------------------------------------------------------------------------

def test_metrics_from_a_hand_computed_confusion_matrix():
    labels = np.array([[0, 0, 1, 1], [2, 2, -1, 1]])
    predictions = np.array([[0, 1, 1, 1], [2, 0, 0, 0]])
    confusion = metrics.confusion_matrix(labels, predictions, 3)
    # rows true, columns predicted; the -1 pixel is ignored
    np.testing.assert_array_equal(confusion, [[1, 1, 0], [1, 2, 0], [1, 0, 1]])
    assert metrics.pixel_accuracy(confusion) == pytest.approx(4 / 7)
    np.testing.assert_allclose(metrics.per_class_iou(confusion), [1 / 4, 2 / 4, 1 / 2])
    np.testing.assert_allclose(metrics.per_class_dice(confusion), [2 / 5, 4 / 6, 2 / 3])
    assert metrics.mean_iou(confusion) == pytest.approx((1 / 4 + 2 / 4 + 1 / 2) / 3)
    absent = metrics.per_class_iou(np.array([[3, 0], [0, 0]]))
    assert absent[0] == 1.0 and math.isnan(absent[1])
    row = metrics.summarize(confusion)
    assert list(row) == ["pixel_accuracy", "iou_0", "iou_1", "iou_2", "dice_0", "dice_1", "dice_2", "mean_iou"]


# ---------------------------------------------------------------------------------------------
# Flags and validation
# ---------------------------------------------------------------------------------------------

def test_bad_flags_exit_2_with_a_clear_message(dbs, tmp_path, capsys):
    # In this process: the exit code is main()'s return value (argparse's own SystemExit for a bad
    # choice); the real processes of the runs below exit with it.
    code = trainer.main("unet", list(map(str, ["--train_database", tmp_path / "nowhere", *dbs[2:],
                                               "--output_dir", tmp_path / "o"])))
    err = capsys.readouterr().err
    assert code == 2
    assert f"--train_database {tmp_path / 'nowhere'}" in err and "not an LMDB database" in err
    with pytest.raises(SystemExit) as exited:
        trainer.main("unet", list(map(str, [*dbs, "--output_dir", tmp_path / "o", "--loss", "focal"])))
    assert exited.value.code == 2 and "invalid choice: 'focal'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # A damaged database and a negative seed: exit 2 naming them (before, tracebacks with exit 1).
    damaged = tmp_path / "damaged.lmdb"
    damaged.mkdir()
    (damaged / "data.mdb").write_bytes(np.random.default_rng(0).bytes(5000))
    code = trainer.main("unet", list(map(str, ["--train_database", damaged, *dbs[2:], "--output_dir", tmp_path / "o"])))
    assert code == 2 and f"--train_database {damaged}: not a database built by build_lmdb.py" in capsys.readouterr().err
    code = trainer.main("unet", list(map(str, [*dbs, "--output_dir", tmp_path / "o", "--seed", -1])))
    assert code == 2 and "--seed -1: expected an integer from 0 to 4294967295" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_refused_runs_create_nothing(dbs, tmp_path, capsys):
    # A SegNet checkpoint given to train_unet.py is refused before the output folder exists.
    checkpoint = tmp_path / "segnet_run" / "checkpoints" / "latest"
    checkpoint.mkdir(parents=True)
    for name in trainer.CHECKPOINT_FILES:
        (checkpoint / name).write_text("{}")
    (checkpoint / "config.json").write_text(json.dumps(
        {"model": "segnet", "number_classes": 2, "input_channels": 1, "base_filters": 2, "batch_norm": True}))
    out = tmp_path / "new_run"
    code = trainer.main("unet", [*map(str, dbs), "--tile_size", "32", "--output_dir", str(out),
                                 "--restore_checkpoint_filepath", str(tmp_path / "segnet_run")])
    assert code == 2
    assert f"--restore_checkpoint_filepath {checkpoint} holds a segnet model, not unet" in capsys.readouterr().err
    assert not out.exists()

    # An --output_dir that is an existing file: a clear error, exit 2, the file untouched.
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    code = trainer.main("unet", [*map(str, dbs), "--tile_size", "32", "--output_dir", str(existing)])
    assert code == 2
    assert f"--output_dir {existing} is an existing file, not a folder" in capsys.readouterr().err
    assert existing.read_text() == "keep me"

    # A folder holding an earlier run, not resumed: refused before its CSVs are cut (they were,
    # silently, at the new run's start).
    earlier = tmp_path / "earlier"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "train_loss.csv").write_text("step,loss\n1,0.5\n")
    code = trainer.main("unet", [*map(str, dbs), "--tile_size", "32", "--output_dir", str(earlier)])
    assert code == 2
    assert (f"--output_dir {earlier} holds an earlier run (train_loss.csv, checkpoints); resume it with "
            f"--restore_checkpoint_filepath {earlier}, or give another --output_dir") in capsys.readouterr().err
    assert (earlier / "train_loss.csv").read_text() == "step,loss\n1,0.5\n"


# ---------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------

def test_max_epochs_then_resume_with_early_stopping_then_nan(dbs, tmp_path, capsys):
    out = tmp_path / "run"
    common = [*dbs, "--output_dir", out, "--test_every_n_steps", 3, "--batch_norm", 0]
    first = run_trainer("unet", [*common, *TINY, "--max_epochs", 2, "--learning_rate", 1e-3])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "effective batch: 2 per tower x 2 tower(s) x 1 worker(s) = 4" in first.stdout
    assert "--max_epochs reached" in first.stdout
    assert [r["epoch"] for r in read_csv(out / "test_metrics.csv")] == ["1", "2"]
    state = json.loads((out / "checkpoints" / "latest" / "state.json").read_text())
    assert state["step"] == 6 and len(state["history"]) == 2

    # Resume (on one tower, in this process) with a learning rate of 0: the test loss stays flat, so
    # early stopping fires after 2 epochs without improvement, counted from the restored history.
    code, stdout, stderr = train_here(capsys, [*common, *ONE_TOWER, "--learning_rate", 0, "--early_stopping", 2,
                                               "--max_epochs", 20, "--restore_checkpoint_filepath", out])
    assert code == 0, stderr[-3000:]
    assert "resumed from" in stdout and "step 6, epoch 2" in stdout
    assert "early stopping" in stdout
    tests = read_csv(out / "test_metrics.csv")
    steps = [int(r["step"]) for r in read_csv(out / "train_loss.csv")]
    assert steps == list(range(1, 3 * len(tests) + 1))
    assert [(int(r["epoch"]), int(r["step"])) for r in tests] == [(e, 3 * e) for e in range(1, len(tests) + 1)]
    losses = [float(r["loss"]) for r in tests]
    assert len(set(losses[1:])) == 1                  # weights frozen since epoch 2
    improvements_left = 1 if losses[1] < losses[0] else 0
    assert len(tests) == 2 + 1 + improvements_left    # stopped as soon as 2 epochs failed to improve
    state = json.loads((out / "checkpoints" / "latest" / "state.json").read_text())
    assert state["step"] == steps[-1] and state["epochs_without_improvement"] == 2

    # A diverging run stops with a clear message and leaves the last good checkpoint alone.
    code, _, stderr = train_here(capsys, [*common, *ONE_TOWER, "--max_epochs", 20, "--learning_rate", 1e12,
                                          "--restore_checkpoint_filepath", out])
    assert code == 1
    assert "the training loss became" in stderr and f"(step {steps[-1]})" in stderr
    assert json.loads((out / "checkpoints" / "latest" / "state.json").read_text())["step"] == steps[-1]


def _tiny_config(dbs, output_dir, **overrides):
    """A TrainConfig of a tiny in-process run: one CPU tower, 2 steps per epoch, 2 epochs."""
    values = dict(batch_size=2, tile_size=32, base_filters=2, unet_depth=2, test_every_n_steps=2, max_epochs=2,
                  log_every_n_steps=100, use_augmentation=False)
    values.update(overrides)
    return trainer.TrainConfig("unet", str(dbs[1]), str(dbs[3]), str(output_dir), **values)


def _test_steps(output_dir):
    return [(int(r["epoch"]), int(r["step"])) for r in read_csv(output_dir / "test_metrics.csv")]


def test_test_passes_stay_at_the_same_steps_whatever_the_interruptions(dbs, tmp_path, monkeypatch):
    reference = trainer.train(_tiny_config(dbs, tmp_path / "reference"))
    assert (reference["exit_code"], reference["step"]) == (0, 4)
    assert _test_steps(tmp_path / "reference") == [(1, 2), (2, 4)]

    # One run stopped by SIGTERM (a real one, to this process) after each of its steps in turn, every
    # time resumed: mid-epoch, after an epoch's last step (before its test pass), after the last step.
    original = trainer.Run.train_one_step
    out = tmp_path / "interrupted"
    for k in range(1, 5):
        def train_then_signal(self, state, k=k):
            done = original(self, state)
            if state.step == k:
                os.kill(os.getpid(), signal.SIGTERM)
            return done

        monkeypatch.setattr(trainer.Run, "train_one_step", train_then_signal)
        restore = str(out) if k > 1 else None
        stopped = trainer.train(_tiny_config(dbs, out, restore_checkpoint_filepath=restore))
        monkeypatch.undo()
        assert (stopped["exit_code"], stopped["step"]) == (143, k)
        assert _test_steps(out) == [(1, 2), (2, 4)][:(k - 1) // 2], k
    resumed = trainer.train(_tiny_config(dbs, out, restore_checkpoint_filepath=str(out)))
    assert (resumed["exit_code"], resumed["step"], resumed["epoch"]) == (0, 4, 2)
    assert _test_steps(out) == _test_steps(tmp_path / "reference")
    # Resumed again (a requeued job), the finished run trains no further epoch: before, it ran steps
    # 5-6 past --max_epochs and a third test pass that could replace the checkpoints.
    again = trainer.train(_tiny_config(dbs, out, restore_checkpoint_filepath=str(out)))
    assert (again["exit_code"], again["stop_reason"], again["step"], again["epoch"]) == (0, "max_epochs", 4, 2)
    assert _test_steps(out) == _test_steps(tmp_path / "reference")
    assert [int(r["step"]) for r in read_csv(out / "train_loss.csv")] == [1, 2, 3, 4]


def test_resuming_into_another_folder_keeps_the_best_checkpoint_also_from_copied_databases(dbs, tmp_path, capsys):
    first = tmp_path / "first"
    assert trainer.train(_tiny_config(dbs, first, max_epochs=1, batch_norm=False))["exit_code"] == 0
    # Resume into a new folder with learning rate 0 (no batch norm): the weights stay, so the new run
    # never beats the first one's best test loss, and model.keras must come from that best checkpoint.
    # A copy of a database is the same database, so this is a resume (other databases would fine-tune:
    # tests/test_sparse_labels.py).
    shutil.copytree(dbs[1], tmp_path / "train_copy")
    shutil.copytree(dbs[3], tmp_path / "test_copy")
    second = tmp_path / "second"
    capsys.readouterr()
    summary = trainer.train(_tiny_config([None, tmp_path / "train_copy", None, tmp_path / "test_copy"], second,
                                         batch_norm=False, learning_rate=0.0, restore_checkpoint_filepath=str(first)))
    err = capsys.readouterr().err
    assert summary["exit_code"] == 0 and summary["best_epoch"] == 1
    assert "is not the database the checkpoint was trained on" not in err
    best = json.loads((second / "checkpoints" / "best" / "state.json").read_text())
    assert (best["step"], best["epoch"]) == (2, 1)
    import keras
    exported = keras.saving.load_model(second / "model.keras")
    reference = trainer.build_model(_tiny_config(dbs, first, batch_norm=False), 1)
    reference.load_weights(first / "checkpoints" / "best" / "model.weights.h5")
    for a, b in zip(exported.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(a, b)


def _processes(field, value, live_only=False):
    """Pids whose /proc/<pid>/stat ``field`` (1 = parent pid, 2 = process group) equals ``value``;
    ``live_only`` leaves out zombies."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[field]) == value and not (live_only and fields[0] == "Z"):
                found.append(int(entry.name))
    return found


def _children(pid):
    return _processes(1, pid)


def _group_members(pgid):
    """Live (not zombie) processes of process group ``pgid``."""
    return _processes(2, pgid, live_only=True)


def _wait_until_group_is_gone(pgid, seconds=20):
    deadline = time.time() + seconds
    while _group_members(pgid) and time.time() < deadline:
        time.sleep(0.2)
    return _group_members(pgid)


def _start_training_until(out, dbs, stderr, line_start="step", extra=("--test_every_n_steps", "100000")):
    """Popen a training run in its own process group (as Slurm runs a job step) and return it once
    it printed a line starting with ``line_start``."""
    process = subprocess.Popen(
        [sys.executable, "train_unet.py", *map(str, dbs), *TINY, "--output_dir", str(out), *map(str, extra)],
        cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), stdout=subprocess.PIPE, stderr=stderr,
        text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        line = process.stdout.readline()
        if line.startswith(line_start) or not line:
            break
    return process


def test_reader_crash_stops_training_with_exit_1(dbs, tmp_path):
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = _start_training_until(tmp_path / "crash", dbs, stderr)
        workers = [pid for pid in _children(process.pid)
                   if b"resource_tracker" not in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert workers, "the trainer should run reader processes"
        os.kill(workers[0], signal.SIGKILL)
        process.communicate(timeout=120)
    message = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 1, message[-3000:]
    assert "an image reader failed" in message and f"pid {workers[0]}" in message


def test_sigterm_to_the_process_group_checkpoints_and_exits_143_then_transfer_to_three_classes(dbs, tmp_path, capsys):
    out = tmp_path / "sig"
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = _start_training_until(out, dbs, stderr)
        assert _children(process.pid), "the trainer should run reader processes"
        # Slurm signals every process of the job step: the trainer and its readers.
        os.killpg(process.pid, signal.SIGTERM)
        remaining, _ = process.communicate(timeout=120)
    assert process.returncode == 143, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert "SIGTERM" in remaining and "resume with --restore_checkpoint_filepath" in remaining
    assert not _wait_until_group_is_gone(process.pid)
    state = json.loads((out / "checkpoints" / "latest" / "state.json").read_text())
    assert state["step"] >= 1 and state["epoch"] == 0
    assert not (out / "model.keras").exists()

    # The checkpoint restores into a 3-class model: everything but the logits layer.
    # (tile 64 = the record size, so each test record is one tile, normalised as a whole below)
    code, stdout, stderr = train_here(capsys, [*dbs, *ONE_TOWER, "--tile_size", 64, "--output_dir", tmp_path / "three",
                                               "--number_classes", 3, "--test_every_n_steps", 2, "--max_epochs", 1,
                                               "--loss", "ce", "--restore_checkpoint_filepath", out])
    assert code == 0, stderr[-3000:]
    assert "transfer learning from" in stdout and "(2 -> 3 classes)" in stdout
    assert "not restored (fresh weights): logits;" in stdout
    rows = read_csv(tmp_path / "three" / "test_metrics.csv")
    assert [r["step"] for r in rows] == ["2"] and "iou_2" in rows[0]

    # The logged test loss is exact: the mean cross-entropy (--loss ce) over every pixel of every
    # test image, recomputed here with the exported model.
    import keras
    import models
    import normalization
    import records
    models.register_layers()
    model = keras.saving.load_model(tmp_path / "three" / "model.keras")
    env = records.open_database(str(dbs[3]))
    total, pixels = 0.0, 0
    with env.begin() as txn:
        for index in range(3):
            image, mask = records.decode_record(txn.get(records.record_key(index)))
            logits = model.predict(normalization.normalize(image, normalization.channel_statistics(image))[None], verbose=0)[0].astype(np.float64)
            log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            total -= np.take_along_axis(log_probs, mask[..., None].astype(np.int64), -1).sum()
            pixels += mask.size
    env.close()
    assert float(rows[0]["loss"]) == pytest.approx(total / pixels, rel=1e-4)


def test_a_residual_encoder_run_records_it_and_a_resume_must_keep_it(dbs, tmp_path, capsys):
    import checkpoints
    import models

    out = tmp_path / "run"
    code, _, stderr = train_here(capsys, [*dbs, *ONE_TOWER, "--output_dir", out, "--max_steps", 2,
                                          "--test_every_n_steps", 2, "--encoder", "residual"])
    assert code == 0, stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["encoder"] == "residual"
    assert models.options_of(checkpoints.load_trained(out / "model.keras").model)["encoder"] == "residual"
    code, _, stderr = train_here(capsys, [*dbs, *ONE_TOWER, "--output_dir", out, "--max_steps", 4,
                                          "--test_every_n_steps", 2, "--restore_checkpoint_filepath", out])
    assert code == 2
    assert "was trained with encoder=residual but this run has encoder=plain" in stderr


def test_sigterm_during_the_final_export_waits_for_it_and_the_run_ends_complete(dbs, tmp_path, capsys,
                                                                                 monkeypatch):
    import checkpoints

    export = checkpoints.export_model

    def signalled_export(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # a job's time limit, right as the export starts
        return export(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "export_model", signalled_export)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    code, _, stderr = train_here(capsys, [*dbs, *ONE_TOWER, "--output_dir", out, "--max_steps", 2,
                                          "--test_every_n_steps", 2])
    assert code == 0, stderr[-3000:]
    assert "received SIGTERM: finishing the export of model.keras (a few seconds) first" in stderr
    assert (out / "model.keras").stat().st_size > 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no scratch left behind
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back after the export


def test_sigterm_after_the_run_ended_keeps_its_exit_code(dbs, tmp_path):
    # The last line a finished run prints, then Python and TensorFlow shut down (seconds): a job's
    # time limit arriving then must not turn a complete run into exit -15.
    out = tmp_path / "run"
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = _start_training_until(out, dbs, stderr, line_start="  best model",
                                        extra=("--max_steps", 2, "--test_every_n_steps", 2))
        os.killpg(process.pid, signal.SIGTERM)
        process.communicate(timeout=120)
    message = (tmp_path / "stderr.txt").read_text()
    # The line reaches the pipe when Python flushes stdout while shutting down, so the signal lands
    # then (without the fix: exit -15).
    assert process.returncode == 0, message[-3000:]
    assert (out / "model.keras").stat().st_size > 0


def test_sigterm_during_a_test_pass_checkpoints_and_the_resumed_run_repeats_that_pass(dbs, tmp_path, capsys,
                                                                                    monkeypatch):
    import multiprocessing

    import evaluation

    predict = evaluation.Evaluator.predict
    predicted = []

    def signalled_predict(self, *args, **kwargs):
        predicted.append(1)
        if len(predicted) == 2:  # a job's time limit, in the middle of the first pass (3 test images)
            os.kill(os.getpid(), signal.SIGTERM)
        return predict(self, *args, **kwargs)

    monkeypatch.setattr(evaluation.Evaluator, "predict", signalled_predict)
    run = list(dbs)
    out = tmp_path / "run"
    # The test pass starts right after step 3, the last of the first epoch.
    code, _, message = train_here(capsys, [*run, *ONE_TOWER, "--output_dir", out, "--test_every_n_steps", 3,
                                           "--max_epochs", 1])
    assert code == 143, message[-3000:]
    assert len(predicted) == 2  # the pass stopped at the next image, before predicting it
    assert "stopped during the test pass" in message
    assert not multiprocessing.active_children()  # the reader processes are gone
    state = json.loads((out / "checkpoints" / "latest" / "state.json").read_text())
    assert (state["step"], state["epoch"]) == (3, 0)
    assert read_csv(out / "test_metrics.csv") == []
    monkeypatch.undo()

    # The resubmitted run (same command plus the restore flag) tests first, then stops at max_epochs.
    code, _, stderr = train_here(capsys, [*run, *ONE_TOWER, "--output_dir", out, "--test_every_n_steps", 3,
                                          "--max_epochs", 1, "--restore_checkpoint_filepath", out])
    assert code == 0, stderr[-3000:]
    assert [(r["epoch"], r["step"]) for r in read_csv(out / "test_metrics.csv")] == [("1", "3")]
    assert [r["step"] for r in read_csv(out / "train_loss.csv")] == ["1", "2", "3"]


# ---------------------------------------------------------------------------------------------
# End to end on the real data
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def nist_dbs(nist_dir, tmp_path):
    import records
    import tifffile

    names = sorted(p.name for p in (nist_dir / "images").glob("*.tif"))[:30]
    root = tmp_path / "nist"

    def pairs(subset):
        for name in subset:
            mask = tifffile.imread(nist_dir / "masks" / name)
            yield tifffile.imread(nist_dir / "images" / name), mask, {"image": name, "mask": name}

    for split, subset in (("train", names[:24]), ("test", names[24:])):
        records.write_database(str(root / split), pairs(subset),
                               {"split": split, "split_seed": 0, "train_fraction": 0.8})
    return ["--train_database", root / "train", "--test_database", root / "test"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["unet", "segnet"])
def test_end_to_end_on_nist_colonies(model, nist_dbs, tmp_path):
    out = tmp_path / model
    result = run_trainer(model, [*nist_dbs, "--output_dir", out, "--batch_size", 2, "--cpu_towers", 2,
                                 "--tile_size", 64, "--base_filters", 4, "--test_every_n_steps", 15,
                                 "--max_epochs", 3, "--learning_rate", 3e-3, "--log_every_n_steps", 5],
                         timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["number_classes"], config["tile_size"], config["input_channels"],
            config["base_filters"], config["batch_norm"], config["effective_batch"]) == (model, 2, 64, 1, 4, True, 4)

    train_rows = read_csv(out / "train_loss.csv")
    assert list(train_rows[0]) == ["step", "loss", "step_time_s", "images_per_s"] and len(train_rows) == 45
    losses = [float(r["loss"]) for r in train_rows]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    test_rows = read_csv(out / "test_metrics.csv")
    assert list(test_rows[0]) == ["epoch", "step", "loss", "pixel_accuracy", "iou_0", "iou_1", "dice_0", "dice_1",
                                  "mean_iou", "test_pixels", "annotated_pixels", "test_seconds", "starvation_s",
                                  "wall_time_s"]
    assert [r["epoch"] for r in test_rows] == ["1", "2", "3"]
    if model == "unet":
        # (SegNet's test loss can rise this early: its deeper BN layers' moving statistics lag
        # far behind after 45 steps, so only its training loss is checked.)
        assert min(float(r["loss"]) for r in test_rows[1:]) < float(test_rows[0]["loss"])
    assert all(0 <= float(r["pixel_accuracy"]) <= 1 for r in test_rows)

    for plot in ("loss.png", "metrics.png"):
        assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("latest", "best"):
        folder = out / "checkpoints" / name
        assert sorted(p.name for p in folder.iterdir()) == sorted(trainer.CHECKPOINT_FILES)
        json.loads((folder / "state.json").read_text())
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]

    import tensorflow as tf
    tags = set()
    for event_file in (out / "tensorboard").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            tags.update(value.tag for value in event.summary.value)
    assert {"train/loss", "test/loss", "test/mean_iou", "test/image", "test/predicted_mask",
            "test/true_mask"} <= tags

    import keras
    import models
    models.register_layers()
    exported = keras.saving.load_model(out / "model.keras")
    assert exported.predict(np.zeros((1, 64, 96, 1), np.float32), verbose=0).shape == (1, 64, 96, 2)
    assert str(out / "model.keras") in result.stdout


def test_a_resume_cuts_the_tensorboard_history_at_the_checkpoint_like_the_csvs(tmp_path):
    # Resumed from step 3, a run logs steps 4 and 5 again: TensorBoard showed both histories there
    # (and a killed writer's torn last record stayed in the file).
    import glob

    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    import outputs

    writer = tf.summary.create_file_writer(str(tmp_path / "tensorboard"))
    with writer.as_default():
        for step in range(1, 6):
            tf.summary.scalar("train/loss", float(step), step=step)
    writer.close()
    [path] = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    with open(path, "ab") as f:
        f.write(b"\x10\x00\x00")
    outputs.Outputs(str(tmp_path), 2, True, resume_state=trainer.TrainState(step=3, epoch=1)).close()
    steps = [event_pb2.Event.FromString(r.numpy()).step
             for path in sorted(glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*")))
             for r in tf.data.TFRecordDataset(path)]
    assert sorted(s for s in steps if s > 0) == [1, 2, 3]
