"""plan.py and --time_budget: the documented run length from a mocked step time, a real tiny run
that ends within its budget, resume keeping the plan, refusals."""
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
    code, stdout, err = train_here(capsys, [*dbs, *TINY, "--output_dir", out, "--time_budget", f"{budget}s"])
    elapsed = time.perf_counter() - start
    assert code == 0, err[-2000:]
    assert elapsed <= budget
    config = json.loads((out / "config.json").read_text())
    planned = config["plan"]
    assert f"plan: {planned['steps']:,} steps of batch 2 at" in stdout
    assert planned["steps"] >= plan.MIN_STEPS and planned["budget_s"] == budget
    # The schedule spans exactly the planned run: poly decay to 0 at its last step, 10% warm-up.
    assert (config["max_steps"], config["run_length"]) == (planned["steps"], planned["steps"])
    assert config["lr_schedule"] == "poly" and config["warmup_steps"] == planned["steps"] // 10
    assert optim.learning_rate_at(planned["steps"], 1e-3, "poly", config["warmup_steps"], planned["steps"]) == 0
    state = json.loads((out / "checkpoints" / "latest" / "state.json").read_text())
    assert state["step"] == planned["steps"] or "--time_budget ran out" in stdout

    # Resumed with another budget: the original plan stays (nothing is left to do here).
    code, stdout, err = train_here(capsys, [*dbs, *TINY, "--output_dir", out, "--time_budget", "1h",
                                            "--restore_checkpoint_filepath", out])
    assert code == 0, err[-2000:]
    assert f"resumed run keeps its 30 s plan: {planned['steps']:,} steps" in stdout
    resumed = json.loads((out / "config.json").read_text())
    assert resumed["plan"] == planned and resumed["max_steps"] == planned["steps"]
    assert resumed["time_budget"] == "30s" and resumed["warmup_steps"] == config["warmup_steps"]


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
