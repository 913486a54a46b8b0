"""plan.py and --time_budget: the documented run length from a mocked step time, a real tiny run
that ends within its budget, resume keeping the plan, refusals."""
import dataclasses
import json
import math
import time

import pytest

import optim
import plan
import trainer
from conftest import make_synthetic_db

# A 2-level UNet with 2 filters on 32 px tiles: about 10 ms a step on one CPU core.
TINY = ["--batch_size", "2", "--tile_size", "32", "--base_filters", "2", "--unet_depth", "2",
        "--log_every_n_steps", "100"]


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dbs")
    make_synthetic_db(root / "train", num_records=12, shape=(64, 64), seed=0)
    make_synthetic_db(root / "test", num_records=2, shape=(64, 64), seed=1)
    return ["--train_database", str(root / "train"), "--test_database", str(root / "test")]


def train_here(capsys, args):
    capsys.readouterr()
    code = trainer.main("unet", [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# The rules (no training)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("90s", 90), ("45m", 2700), ("2h", 7200), ("1d", 86400),
                                           ("1h30m", 5400), ("1.5h", 5400), (" 10M ", 600)])
def test_durations_parse(text, seconds):
    assert plan.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["45", "45x", "m", "", "1h 30", "-5m", "0s", "2 hours"])
def test_bad_durations_are_refused_by_name(text):
    with pytest.raises(ValueError, match=r"--time_budget .*expected a duration"):
        plan.parse_duration(text)


def test_mocked_step_time_gives_the_documented_run_length():
    # The worked example of docs/planning.md: 45 min, 60 s spent, 20 s compiling, 10 s export,
    # 0.71 s a step, 9.3 s a test pass.
    run = plan.plan_run(2700, 60, 0.71, 9.3, 8, compile_s=20, export_s=10)
    available = (2700 - 60 - 30) * 0.95                     # 2479.5 s
    assert run.test_passes == 26 == math.floor(0.10 * available / 9.3)
    assert run.steps == 3151 == math.floor((available - 26 * 9.3) / 0.71)
    assert run.test_every == 122 == math.ceil(3151 / 26)
    assert run.total_s <= 2700
    assert run.line().startswith("plan: 3,151 steps of batch 8 at 0.71 s/step + 26 test passes of 9.3 s "
                                 "(every 122 steps) = 42.8 min of the 45.0 min budget")
    # Twice the budget buys a little more than twice the steps (the setup is paid once).
    assert plan.plan_run(5400, 60, 0.71, 9.3, 8, compile_s=20, export_s=10).steps > 2 * run.steps
    # Slow test passes: never fewer than one (the last), the rest of the time trains.
    slow = plan.plan_run(2700, 60, 0.71, 400, 8, compile_s=20, export_s=10)
    assert (slow.test_passes, slow.steps) == (1, math.floor((available - 400) / 0.71))


def test_an_explicit_test_spacing_is_kept_and_the_run_still_fits():
    run = plan.plan_run(600, 10, 0.5, 5, 4, test_every=50)
    assert run.test_every == 50
    assert run.steps * 0.5 + math.ceil(run.steps / 50) * 5 <= (600 - 10) * 0.95
    assert (run.steps + 1) * 0.5 + math.ceil((run.steps + 1) / 50) * 5 > (600 - 10) * 0.95


def test_too_short_a_budget_is_refused_with_the_estimate():
    with pytest.raises(plan.PlanError) as refused:
        plan.plan_run(60, 20, 0.71, 9.3, 8, compile_s=5, export_s=2)
    message = str(refused.value)
    # (60 - 27) x 0.95 = 31.35 s: one pass of 9.3 s leaves 22.05 s, 31 steps.
    assert "--time_budget 60 s buys about 31 training steps at 0.71 s/step" in message
    assert "at least 100: give --time_budget 2m or more" in message
    # With --test_every_n_steps 10, 100 steps take 10 passes: the budget suggested must buy them.
    with pytest.raises(plan.PlanError) as refused:
        plan.plan_run(60, 10, 0.5, 5.0, 8, compile_s=3, export_s=2, test_every=10)
    suggested = int(str(refused.value).split("give --time_budget ")[1].split("m")[0])
    assert plan.plan_run(60 * suggested, 10, 0.5, 5.0, 8, compile_s=3, export_s=2, test_every=10).steps >= 100


def test_the_replan_fits_the_rest_of_the_run_to_the_measured_speeds():
    first = plan.plan_run(300, 10, 0.17, 1.84, 8, compile_s=3, export_s=5)
    # Measured in the run: faster steps and passes than the first measurement; 200 s left.
    again = plan.replan(first, first.test_every, 200.0, 0.1, 0.4)
    more = again.steps - first.test_every
    available = 200.0 * (1 - plan.SAFETY_SHARE)
    assert more * 0.1 + math.ceil(more / first.test_every) * 0.4 <= available
    assert (more + 1) * 0.1 + math.ceil((more + 1) / first.test_every) * 0.4 > available
    assert again.steps > first.steps and again.test_every == first.test_every
    assert (again.step_s, again.test_s, again.replanned_from) == (0.1, 0.4, first.steps)
    assert again.test_passes == math.ceil(again.steps / first.test_every)
    # A machine that got slower gets a shorter run; no time left: no more steps.
    assert plan.replan(first, first.test_every, 200.0, 0.5, 2.0).steps < first.steps
    assert plan.replan(first, 50, -3.0, 0.1, 0.4).steps == 50
    # The first re-plan is always taken; a later one only when it moves the end by more than 2 %.
    assert plan.worth_replanning(first, dataclasses.replace(first, steps=first.steps + 1))
    nudged = dataclasses.replace(again, steps=int(again.steps * 1.019))
    assert not plan.worth_replanning(again, nudged)
    assert plan.worth_replanning(again, dataclasses.replace(again, steps=int(again.steps * 0.97)))
    # An old config.json (no replanned_from) still loads.
    values = first.to_dict()
    del values["replanned_from"]
    assert plan.RunPlan.from_dict(values) == first


def test_a_plan_survives_its_json_round_trip():
    run = plan.plan_run(2700, 60, 0.71, 9.3, 8, compile_s=20, export_s=10)
    assert plan.RunPlan.from_dict(json.loads(json.dumps(run.to_dict()))) == run


# ---------------------------------------------------------------------------------------------
# Real runs (in this process, one CPU device)
# ---------------------------------------------------------------------------------------------

def test_budget_flag_errors_name_the_flag(dbs, tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = train_here(capsys, [*dbs, *TINY, "--output_dir", out, "--time_budget", "45"])
    assert code == 2 and "--time_budget '45': expected a duration with a unit" in err
    code, _, err = train_here(capsys, [*dbs, *TINY, "--output_dir", out, "--time_budget", "5m",
                                       "--max_steps", "10"])
    assert code == 2 and "--time_budget 5m and --max_steps 10 both set the run length" in err
    assert not out.exists()


def test_a_budget_too_short_is_refused_after_measuring_and_creates_nothing(dbs, tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = train_here(capsys, [*dbs, *TINY, "--output_dir", out, "--time_budget", "2s"])
    assert code == 2
    assert "--time_budget 2 s buys about 0 training steps at" in err and "a useful run needs at least 100" in err
    assert not out.exists()


def test_the_run_ends_within_its_budget_and_a_resume_keeps_the_plan(dbs, tmp_path, capsys):
    out = tmp_path / "run"
    budget = 30
    start = time.perf_counter()
    # --batch_size left out: self-configured (8 on a CPU); the flags given are kept.
    no_batch = TINY[2:]
    code, stdout, err = train_here(capsys, [*dbs, *no_batch, "--output_dir", out, "--time_budget", f"{budget}s"])
    elapsed = time.perf_counter() - start
    assert code == 0, err[-2000:]
    assert elapsed <= budget
    config = json.loads((out / "config.json").read_text())
    planned = config["plan"]
    assert f"plan: {planned['replanned_from']:,} steps of batch 8 at" in stdout
    chosen = config["self_configuration"]
    assert chosen["batch_size"]["value"] == config["batch_size"] == 8
    assert "self-configuration: --batch_size 8: 25% of" in stdout and "(the physical RAM)" in stdout
    assert {name: chosen[name] for name in ("tile_size", "unet_depth", "base_filters")} == {
        "tile_size": {"value": 32, "reason": "given on the command line"},
        "unet_depth": {"value": 2, "reason": "given on the command line"},
        "base_filters": {"value": 2, "reason": "given on the command line"}}
    assert planned["replanned_from"] >= plan.MIN_STEPS and planned["budget_s"] == budget
    # The schedule spans exactly the planned run: poly decay to 0 at its last step, 10% warm-up.
    assert (config["max_steps"], config["run_length"]) == (planned["steps"], planned["steps"])
    # After the first test pass the run fitted its length to its own speeds (the warm-up of the first
    # plan kept); config.json holds that plan.
    assert f"re-plan after the first test pass:" in stdout and planned["replanned_from"] >= plan.MIN_STEPS
    replans = [line for line in stdout.splitlines() if line.startswith("re-plan")]
    assert f"steps instead of {planned['replanned_from']:,}" in replans[0]
    assert f"{planned['steps']:,} steps instead of" in replans[-1]
    assert config["lr_schedule"] == "poly" and config["warmup_steps"] == planned["replanned_from"] // 10
    assert optim.learning_rate_at(planned["steps"], 1e-3, "poly", config["warmup_steps"], planned["steps"]) == 0
    state = json.loads((out / "checkpoints" / "latest" / "state.json").read_text())
    assert state["step"] == planned["steps"] or "--time_budget ran out" in stdout

    # Resumed with another budget: the original plan stays (nothing is left to do here).
    code, stdout, err = train_here(capsys, [*dbs, *no_batch, "--output_dir", out, "--time_budget", "1h",
                                            "--restore_checkpoint_filepath", out])
    assert code == 0, err[-2000:]
    assert f"resumed run keeps its 30 s plan: {planned['steps']:,} steps" in stdout
    resumed = json.loads((out / "config.json").read_text())
    assert resumed["plan"] == planned and resumed["max_steps"] == planned["steps"]
    assert resumed["time_budget"] is None and resumed["warmup_steps"] == config["warmup_steps"]
    assert resumed["batch_size"] == 8 and resumed["self_configuration"] == chosen

    # Fine-tuning on other databases is a new run: its own --max_steps, not the old plan, with the
    # batch the old run chose for itself.
    make_synthetic_db(tmp_path / "more", num_records=6, shape=(64, 64), seed=5)
    tuned = tmp_path / "tuned"
    code, stdout, err = train_here(capsys, ["--train_database", tmp_path / "more", *dbs[2:], *no_batch,
                                            "--output_dir", tuned, "--max_steps", 3,
                                            "--restore_checkpoint_filepath", out])
    assert code == 0, err[-2000:]
    assert "keeps its" not in stdout
    tuned_config = json.loads((tuned / "config.json").read_text())
    assert (tuned_config["max_steps"], tuned_config["batch_size"], tuned_config.get("plan")) == (3, 8, None)
    assert json.loads((tuned / "checkpoints" / "latest" / "state.json").read_text())["step"] == 3


def slow_down_after_the_first_replan(monkeypatch, seconds):
    """Every training step after the run's first re-plan takes ``seconds`` more (a busier machine)."""
    original = trainer.Run.train_one_step

    def slower(self, state):
        if self.replan_mark is not None:
            time.sleep(seconds)
        return original(self, state)

    monkeypatch.setattr(trainer.Run, "train_one_step", slower)


def test_a_run_that_slows_down_re_plans_again_and_still_ends_within_its_budget(dbs, tmp_path, capsys,
                                                                               monkeypatch):
    # After the first re-plan every step costs 20 ms more (another job took the machine): the run
    # re-plans a shorter run at a later test pass, so its schedule still ends at its last step.
    slow_down_after_the_first_replan(monkeypatch, 0.02)
    out = tmp_path / "run"
    budget = 30
    start = time.perf_counter()
    code, stdout, err = train_here(capsys, [*dbs, *TINY, "--output_dir", out, "--time_budget", f"{budget}s"])
    assert code == 0, err[-2000:]
    assert time.perf_counter() - start <= budget
    replans = [line for line in stdout.splitlines() if line.startswith("re-plan")]
    assert replans[0].startswith("re-plan after the first test pass:")
    later = [line for line in replans[1:] if line.startswith("re-plan at step ")]
    assert later, stdout[-3000:]
    first_steps = int(replans[0].split(": ")[-1].split(" steps")[0].replace(",", ""))
    last_steps = int(later[-1].split(": ")[-1].split(" steps")[0].replace(",", ""))
    assert last_steps < first_steps
    config = json.loads((out / "config.json").read_text())
    assert config["plan"]["steps"] == config["max_steps"] == last_steps
    assert config["plan"]["step_s"] > 0.02


def test_a_run_cut_by_its_deadline_says_so_and_keeps_its_plan(dbs, tmp_path, capsys, monkeypatch):
    # After the first re-plan every step costs 1 s: the deadline comes long before the next test
    # pass. Before, the re-plan after the last pass shrank the plan to the step reached, and the run
    # said "--max_steps reached" with a schedule that never decayed.
    slow_down_after_the_first_replan(monkeypatch, 1.0)
    out = tmp_path / "run"
    code, stdout, err = train_here(capsys, [*dbs, *TINY, "--output_dir", out, "--time_budget", "25s"])
    assert code == 0, err[-2000:]
    assert "--time_budget ran out before the planned steps" in stdout and "--max_steps reached" not in stdout
    config = json.loads((out / "config.json").read_text())
    step = json.loads((out / "checkpoints" / "latest" / "state.json").read_text())["step"]
    assert config["plan"]["steps"] == config["max_steps"] > step


def test_a_gpu_that_tensorflow_does_not_use_leaves_the_cpu_rules(tmp_path, monkeypatch):
    # nvidia-smi lists a 16 GB GPU, but TensorFlow sees none here (as with CUDA_VISIBLE_DEVICES="" or
    # a build without CUDA): the plan must follow the device that trains, the CPU.
    import os

    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 16384\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    device, _, why = trainer.machine_profile(trainer.TrainConfig("unet", "a", "b", "c"))
    assert (device, why) == ("cpu", "the physical RAM")


def test_a_budget_on_a_resumed_run_without_a_plan_is_refused(dbs, tmp_path, capsys):
    checkpoint = tmp_path / "old" / "checkpoints" / "latest"
    config = {"model": "unet", "number_classes": 2, "max_steps": 50}
    config, run_plan = trainer.kept_plan(trainer.TrainConfig("unet", "a", "b", "c"), config, str(checkpoint))
    assert run_plan is None and config.max_steps is None
    with pytest.raises(trainer.ConfigError, match="--time_budget 1h: the checkpoint .* is of a run without a "
                                                  "time budget; resume it without --time_budget"):
        trainer.kept_plan(trainer.TrainConfig("unet", "a", "b", "c", time_budget="1h"),
                          {"model": "unet", "number_classes": 2}, str(checkpoint))
    # Transfer learning (another number of classes) is a new run: it plans afresh.
    config, run_plan = trainer.kept_plan(trainer.TrainConfig("unet", "a", "b", "c", number_classes=3,
                                                             time_budget="1h"),
                                         {"model": "unet", "number_classes": 2}, str(checkpoint))
    assert run_plan is None and config.time_budget == "1h"


# ---------------------------------------------------------------------------------------------
# launch_train_sbatch.sh: the default budget from the job's time left
# ---------------------------------------------------------------------------------------------

def test_sbatch_reads_slurm_time_formats_as_minutes():
    import pathlib
    import subprocess

    script = pathlib.Path(__file__).resolve().parent.parent / "launch_train_sbatch.sh"
    cases = {"1-00:00:00": "1440", "2:00:00": "120", "30:00": "30", "45": "45", "1-12": "2160",
             "1-02:30": "1590", "0:59": "0", "UNLIMITED": "", "NOT_SET": ""}
    program = (f"source <(sed -n '/^slurm_minutes()/,/^}}/p' {script}); "
               + "; ".join(f"echo \"{t}=$(slurm_minutes {t})\"" for t in cases))
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
    assert result.stdout.split() == [f"{t}={m}" for t, m in cases.items()]


# ---------------------------------------------------------------------------------------------
# progress.py
# ---------------------------------------------------------------------------------------------

class FakeStream:
    def __init__(self, tty):
        self.tty, self.written = tty, []

    def isatty(self):
        return self.tty

    def write(self, text):
        self.written.append(text)

    def flush(self):
        pass


def test_progress_is_one_plain_line_per_update_in_a_log():
    import progress

    now = [100.0]
    stream = FakeStream(tty=False)
    line = progress.ProgressLine(2310, stream=stream, clock=lambda: now[0])
    assert line.interval == progress.LOG_INTERVAL_S
    assert not line.update(0)                         # the start: rates count from here
    now[0] += 10
    assert not line.update(14)                        # rate-limited: 10 s < 30 s
    now[0] += 20
    assert line.update(42, metric="test foreground dice 0.812")
    assert stream.written == ["step 42/2,310 (2%)  elapsed 30s  remaining 27m00s  1.4 step/s  "
                              "test foreground dice 0.812\n"]
    now[0] += 5
    assert line.update(2310)                          # the last step always prints
    assert all(text.count("\n") == 1 and text.endswith("\n") and "\r" not in text for text in stream.written)
    assert stream.written[-1].startswith("step 2,310/2,310 (100%)  elapsed 35s  remaining 0s")


def test_progress_redraws_one_line_on_a_terminal():
    import progress

    now = [0.0]
    stream = FakeStream(tty=True)
    line = progress.ProgressLine(100, stream=stream, clock=lambda: now[0])
    line.update(0)
    for step in range(1, 4):
        now[0] += 1
        line.update(step)
    assert len(stream.written) == 3 and all(t.startswith("\r") and "\n" not in t for t in stream.written)
    assert "step 3/100 (3%)" in stream.written[-1] and "remaining 1m37s" in stream.written[-1]
    line.end_line()
    line.end_line()                                   # once: a second call adds nothing
    assert stream.written[-1] == "\n" and stream.written.count("\n") == 1


def test_a_training_run_prints_the_progress_line(dbs, tmp_path, capsys, monkeypatch):
    import progress

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)   # every step: captured stdout is not a tty
    code, stdout, err = train_here(capsys, [*dbs, *TINY, "--output_dir", tmp_path / "run", "--max_steps", 6,
                                            "--test_every_n_steps", 3])
    assert code == 0, err[-2000:]
    lines = [line for line in stdout.splitlines() if line.startswith("step ") and "/6 (" in line]
    assert [line.split()[1] for line in lines] == ["2/6", "3/6", "4/6", "5/6", "6/6"]
    assert "remaining" in lines[0] and "test foreground dice" in lines[-1]
    assert "\r" not in stdout


# ---------------------------------------------------------------------------------------------
# Self-configuration (the table of docs/planning.md)
# ---------------------------------------------------------------------------------------------

def unet_divisor(depth):
    return 2 ** depth


def test_receptive_fields_of_the_unet_levels():
    assert [plan.receptive_field(d) for d in plan.DEPTHS] == [44, 96, 200, 408]


@pytest.mark.parametrize("extent, device, depth, tile", [
    (20, "cpu", 2, 64),       # small objects: a shallow net, the smallest tile
    (90, "cpu", 3, 96),       # RF 96 covers 90 px; the tile is their extent, a multiple of 8
    (150, "gpu", 4, 160),     # RF 200; a multiple of 16
    (256, "cpu", 4, 128),     # nist_colonies: the tile capped at a CPU's 128 px, and the RF (200) with it
    (300, "gpu", 5, 320),     # a GPU's cap is 512 px
    (1000, "gpu", 5, 384),    # cut to the smallest image side (400 px), a multiple of 32
])
def test_tile_and_depth_from_object_sizes(extent, device, depth, tile):
    metadata = {"image_shapes": [[400, 600, 1], [512, 512, 1]],
                "object_sizes": {"1": {"objects": 40, "p95_extent_px": extent, "max_extent_px": extent + 5},
                                 "2": {"objects": 3, "p95_extent_px": 5.0, "max_extent_px": 6}}}
    choices = plan.choose_shape(metadata, "unet", device, unet_divisor)
    assert (choices["unet_depth"][0], choices["tile_size"][0]) == (depth, tile)
    assert f"95th percentile extent {extent:g} px" in choices["unet_depth"][1]
    if extent == 256:
        assert "cut to 128 px: the largest crop (a CPU's 128 px tile)" in choices["unet_depth"][1]


def test_build_lmdb_measures_thin_structures_thin_and_border_objects_no_wider_than_long():
    import numpy as np

    import build_lmdb

    mask = np.zeros((200, 200), np.uint8)
    mask[100:104, 10:190] = 1    # a 4 px wide, 180 px long vessel ...
    mask[20:190, 50:53] = 1      # ... crossed by a 3 px wide branch: one object 180 px long, 5 px
                                 # wide where they cross (the largest disc fits in the crossing)
    mask[:, 195:] = 2            # a 5 px band along the border measures as if it went on beyond the
                                 # border (2 x 5 - 1 = 9 px), which is not background
    mask[0:2, 150:152] = 2       # a 2 x 2 object
    assert build_lmdb.measure_objects(mask) == {1: [(180, 5)], 2: [(2, 1), (200, 9)]}


def test_depth_covers_a_thin_structure_s_width_with_context_not_its_extent():
    # drive_vessels_dev's figures: the vessel tree spans the image (534 px), its vessels are at most
    # ~15 px wide: 4 x 15 = 60 px -> depth 3 (RF 96), while the extent alone would ask for depth 5.
    # The tile still comes from the extent (capped): one stretch of the tree with context per crop.
    vessels = {"image_shapes": [[565, 584, 3]],
               "object_sizes": {"1": {"objects": 62, "p95_extent_px": 534.0, "max_extent_px": 538,
                                      "p95_width_px": 14.8, "max_width_px": 20}}}
    choices = plan.choose_shape(vessels, "unet", "cpu", unet_divisor)
    assert (choices["unet_depth"][0], choices["tile_size"][0]) == (3, 128)
    assert "4 x the width of class 1's thin objects (95th percentile width 14.8 px" in choices["unet_depth"][1]
    # Round objects (width about the extent) keep the extent rule; the largest view over the classes wins.
    blobs = {"image_shapes": [[400, 400, 1]],
             "object_sizes": {"1": {"objects": 62, "p95_extent_px": 534.0, "max_extent_px": 538,
                                    "p95_width_px": 14.8, "max_width_px": 20},
                              "2": {"objects": 40, "p95_extent_px": 150.0, "max_extent_px": 160,
                                    "p95_width_px": 120.0, "max_width_px": 130}}}
    choices = plan.choose_shape(blobs, "unet", "cpu", unet_divisor)
    assert choices["unet_depth"][0] == 4 and "class 2, 95th percentile extent 150 px" in choices["unet_depth"][1]


def test_a_database_without_object_sizes_falls_back_with_the_reason():
    metadata = {"image_shapes": [[256, 256, 1]]}
    choices = plan.choose_shape(metadata, "unet", "cpu", unet_divisor)
    assert choices["unet_depth"][0] == 4 and "no object sizes" in choices["unet_depth"][1]
    assert choices["tile_size"][0] == 128 and "no object sizes" in choices["tile_size"][1]
    assert "rebuild it to have them" in choices["unet_depth"][1]
    segnet = plan.choose_shape(metadata, "segnet", "gpu", lambda depth: 32)
    assert "unet_depth" not in segnet and segnet["tile_size"][0] == 256  # the image side, under 512
    for extra, why in (({"annotated_pixels": 0}, "an unlabelled database has none"),
                       ({"annotated_pixels": 90, "unlabelled_pixels": 900}, "sparse masks: every annotated object "
                        "touches unlabelled pixels"),
                       ({"annotated_pixels": 900, "unlabelled_pixels": 0}, "the masks hold no foreground object")):
        choices = plan.choose_shape(dict(metadata, object_sizes={}, **extra), "unet", "cpu", unet_divisor)
        assert choices["unet_depth"][0] == 4 and why in choices["unet_depth"][1]
        assert "rebuild" not in choices["unet_depth"][1]


def test_strokes_of_sparse_masks_are_not_measured_as_objects_whole_annotated_objects_are():
    import numpy as np

    import build_lmdb

    # A 3 px stroke painted inside a nucleus (unlabelled around it) would read as a thin structure;
    # a nucleus annotated whole, with a ring of background before the unlabelled pixels, is measured.
    mask = np.full((120, 120), -1, np.int16)
    mask[20:23, 10:50] = 1
    mask[60:100, 60:100] = 0
    mask[65:95, 65:95] = 1
    mask[5:8, 100:118] = 0
    assert build_lmdb.measure_objects(mask) == {1: [(30, 29)]}
    mask[65:95, 65:95] = -1          # only the stroke left: no object of class 1 is measured
    mask[70:80, 70:80] = 2           # a class-2 object touching unlabelled pixels: not measured either
    assert build_lmdb.measure_objects(mask) == {1: [], 2: []}
    assert build_lmdb.object_sizes([build_lmdb.CheckedPair(None, (120, 120, 1), np.uint8, 2, None, [],
                                                           objects=build_lmdb.measure_objects(mask))]) == {}


def test_batch_and_filters_from_the_device_memory_and_budget():
    # CPU, 30 min: 8 filters; 128 px x 8 filters x 100 B = 12.5 MiB an image; 16 GiB x 25% holds 327.
    cpu = plan.choose_capacity("cpu", 16 * 2 ** 30, 1800, 128)
    assert cpu["base_filters"][0] == 8 and cpu["batch_size"][0] == 8
    assert cpu["batch_size"][1].startswith("25% of 16.0 GiB holds 327 images")
    assert plan.choose_capacity("cpu", 16 * 2 ** 30, 3 * 3600, 128)["base_filters"][0] == 16
    # GPU: 32 filters; 512 px x 32 x 100 B = 800 MiB an image: 8 GiB x 60% holds 6; 80 GiB caps at 32.
    assert plan.choose_capacity("gpu", 8 * 2 ** 30, 1800, 512)["batch_size"][0] == 6
    assert plan.choose_capacity("gpu", 80 * 2 ** 30, 1800, 512)["batch_size"][0] == 32
    assert plan.choose_capacity("gpu", 2 ** 30, 1800, 512)["batch_size"][0] == 2   # never under 2


def test_an_explicit_flag_always_wins(dbs, tmp_path):
    import train_config

    parser = train_config.build_parser("unet")
    common = [*dbs, "--output_dir", str(tmp_path / "o")]
    args = train_config.parse_args(parser, [*common, "--time_budget", "30m", "--tile_size", "256",
                                            "--batch_size", "4"])
    config = train_config.config_from_args("unet", args)
    # batch_size 4 is also the default: given is given, whatever the value.
    assert sorted(config.self_configure) == ["base_filters", "unet_depth"]
    assert config == train_config.TrainConfig("unet", *dbs[1::2], str(tmp_path / "o"), time_budget="30m",
                                              augmentation=config.augmentation)
    metadata = {"image_shapes": [[256, 256, 1]],
                "object_sizes": {"1": {"objects": 9, "p95_extent_px": 30.0, "max_extent_px": 31}}}
    choices = plan.choose_shape(metadata, "unet", "cpu", unet_divisor)
    choices.update(plan.choose_capacity("cpu", 16 * 2 ** 30, 1800, 256))
    configured, record = plan.apply_choices(config, choices, config.self_configure)
    assert (configured.tile_size, configured.batch_size) == (256, 4)
    assert (configured.unet_depth, configured.base_filters) == (2, 8)
    assert record["tile_size"] == {"value": 256, "reason": "given on the command line"}
    # Without --time_budget the defaults stay today's (train() configures only budget runs).
    plain = train_config.config_from_args("unet", train_config.parse_args(parser, common))
    assert (plain.tile_size, plain.base_filters, plain.batch_size, plain.unet_depth) == (256, 64, 4, 4)


def test_build_lmdb_measures_object_sizes_per_class_on_whole_images(tmp_path):
    import numpy as np
    import tifffile

    import build_lmdb
    import records

    mask = np.zeros((64, 64), np.uint8)
    mask[2:12, 3:8] = 1          # class 1: 10 x 5 -> 10
    mask[30:33, 40:60] = 1       # class 1: 3 x 20 -> 20
    mask[50, 50] = mask[51, 51] = 1   # diagonal neighbours: one object (8-connectivity) -> 2
    mask[40:62, 0:30] = 2        # class 2: 22 x 30 -> 30
    # (extent, width): width is the largest inscribed disc's diameter, 2 x distance - 1 (an even
    # width measures one less: the 22 px band's centre is 11 px from the background).
    assert build_lmdb.measure_objects(mask) == {1: [(10, 5), (20, 3), (2, 1)], 2: [(30, 21)]}

    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for i in range(4):
        tifffile.imwrite(tmp_path / "images" / f"a{i}.tif", np.full((64, 64), i, np.uint16))
        tifffile.imwrite(tmp_path / "masks" / f"a{i}.tif", mask)
    # Train tiles of 32 px would cut the 30 px object: the sizes come from the whole images.
    config = build_lmdb.BuildConfig(image_folder=str(tmp_path / "images"), mask_folder=str(tmp_path / "masks"),
                                    output_folder=str(tmp_path / "out"), dataset_name="x", train_fraction=0.5,
                                    tile_size=32)
    result = build_lmdb.build_databases(config)
    metadata = records.read_metadata(result.paths["train"])
    assert metadata["object_sizes"] == {
        "1": {"objects": 6, "p95_extent_px": float(np.percentile([10, 20, 2] * 2, 95)), "max_extent_px": 20,
              "p95_width_px": float(np.percentile([5, 3, 1] * 2, 95)), "max_width_px": 5},
        "2": {"objects": 2, "p95_extent_px": 30.0, "max_extent_px": 30, "p95_width_px": 21.0, "max_width_px": 21}}
    assert plan.object_figures(metadata) == (
        30.0, 30.0, "the largest objects (class 2, 95th percentile extent 30 px)")


def test_too_slow_a_self_configured_width_is_halved_and_measured_again(dbs, tmp_path, capsys, monkeypatch):
    # Mocked speeds: a step costs 0.02 s x base_filters^2 (1.28 s at 8 filters, 0.32 s at 4), a test
    # pass 5 s. 100 s buy under 100 steps at 8 filters, well over 100 at 4.
    measured = []

    def mocked_speed(config, *args):
        measured.append(config.base_filters)
        return 0.0, 0.02 * config.base_filters ** 2, 5.0, 0.01

    monkeypatch.setattr(trainer, "measure_speed", mocked_speed)
    # The run keeps the mocked plan: re-planning from its real (fast) steps would fill the 100 s.
    monkeypatch.setattr(trainer.Run, "replan", lambda self, state, test_s: None)
    given = ["--batch_size", "2", "--tile_size", "32", "--unet_depth", "2", "--log_every_n_steps", "1000"]
    out = tmp_path / "run"
    code, stdout, err = train_here(capsys, [*dbs, *given, "--output_dir", out, "--time_budget", "100s"])
    assert code == 0, err[-2000:]
    assert measured == [8, 4]
    config = json.loads((out / "config.json").read_text())
    assert config["base_filters"] == 4 and config["plan"]["step_s"] == pytest.approx(0.32)
    assert config["self_configuration"]["base_filters"]["reason"].startswith(
        "halved from 8: that width bought only about")
    assert "self-configuration: --base_filters 4: halved from 8" in stdout
    # A width the user gave is never changed: the budget is refused instead.
    measured.clear()
    code, _, err = train_here(capsys, [*dbs, *given, "--base_filters", "8", "--output_dir", tmp_path / "given",
                                       "--time_budget", "100s"])
    assert code == 2 and measured == [8] and "a useful run needs at least 100" in err
    assert not (tmp_path / "given").exists()
