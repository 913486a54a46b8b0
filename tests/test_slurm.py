"""launch_train_sbatch.sh: static checks, bad settings, and real jobs on a throw-away single-node
Slurm cluster started with ../shared/tools/local-slurm.sh (the cluster tests skip when it cannot
start). The cluster is stopped at the end of the module, whatever happened."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import free_ports

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch_train_sbatch.sh"
LOCAL_SLURM = ROOT.parent / "shared" / "tools" / "local-slurm.sh"
NIST_DIR = ROOT.parent / "shared" / "data" / "nist_colonies"
TEST_EVERY_N_STEPS = 4


# ---------------------------------------------------------------------------------------------
# Static checks and settings errors (no cluster needed)
# ---------------------------------------------------------------------------------------------

def test_script_parses_with_bash_n():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_script_is_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck; .ci/slurm_setup.sh does it)")
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_header_requests_one_node_and_an_early_sigterm():
    header = [line.split(None, 1)[1].strip() for line in SCRIPT.read_text().splitlines()
              if line.startswith("#SBATCH")]
    options = dict(option.lstrip("-").split("=", 1) for option in header)
    assert options["nodes"] == "1" and options["ntasks-per-node"] == "1"
    assert re.fullmatch(r"gpu:\d+", options["gres"])
    assert options["signal"] == "B:TERM@120"
    assert options["output"] == "%x_%N.%j.out"
    assert {"cpus-per-task", "time", "job-name"} <= options.keys()


def run_outside_slurm(tmp_path, **settings):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(OUTPUT_ROOT=str(tmp_path / "results"), SCRATCH_DIR=str(tmp_path / "scratch"), **settings)
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("settings, message", [
    ({"MODEL": "resnet"}, "MODEL=resnet: expected unet or segnet"),
    ({"BATCH_SIZE": "eight"}, "BATCH_SIZE=eight: expected a whole number"),
    ({"REQUEUE": "2"}, "REQUEUE=2: expected 0 or 1"),
    ({"TRAIN_DATABASE": "no/such.lmdb"}, "TRAIN_DATABASE=no/such.lmdb: not an LMDB database"),
    ({"PRETRAIN_DATABASE": "no/such.lmdb"}, "PRETRAIN_DATABASE=no/such.lmdb: not an LMDB database"),
    ({"PRETRAIN_DATABASE": "db", "MODEL": "segnet"},
     "MODEL=segnet: pretraining (PRETRAIN_DATABASE) is for the UNet only"),
])
def test_bad_settings_fail_before_anything_is_written(tmp_path, settings, message):
    from conftest import make_synthetic_db

    make_synthetic_db(tmp_path / "db", num_records=2)
    defaults = {"TRAIN_DATABASE": str(tmp_path / "db"), "TEST_DATABASE": str(tmp_path / "db"),
                "CODE_DIR": str(ROOT), "PYTHON": sys.executable}
    result = run_outside_slurm(tmp_path, **{**defaults, **settings})
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "scratch").exists()


def test_a_checkpoint_moved_aside_by_a_killed_save_is_resumed_not_overwritten(tmp_path):
    # A kill between the two renames of a save leaves checkpoints/.latest.<host>-<pid>.old; the
    # launcher looked for .latest.old only, so it started over in the folder, overwriting it.
    from conftest import make_synthetic_db

    make_synthetic_db(tmp_path / "db", num_records=2)
    moved = tmp_path / "results" / "exp" / "checkpoints" / ".latest.node7-4242.old"
    moved.mkdir(parents=True)
    result = run_outside_slurm(tmp_path, TRAIN_DATABASE=str(tmp_path / "db"), TEST_DATABASE=str(tmp_path / "db"),
                               EXPERIMENT_NAME="exp", CODE_DIR=str(ROOT), PYTHON=sys.executable, TIME_BUDGET="none")
    log = result.stdout + result.stderr
    assert "resuming from" in log and f"--restore_checkpoint_filepath {tmp_path / 'results' / 'exp'}" in log
    # (This folder holds no checkpoint files, so the trainer refuses it, by name, and writes nothing.)
    assert result.returncode == 2 and "no checkpoint there" in log, log[-3000:]
    assert moved.is_dir()


# ---------------------------------------------------------------------------------------------
# The cluster and the data
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Environment for Slurm client commands talking to a fresh local cluster; stopped at the end."""
    if not LOCAL_SLURM.exists():
        pytest.skip(f"{LOCAL_SLURM} is not on this machine")
    base = tmp_path_factory.mktemp("slurm")
    ctld_port, slurmd_port = free_ports(2)
    env = dict(os.environ, BASE=str(base), CTLD_PORT=str(ctld_port), SLURMD_PORT=str(slurmd_port))
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "SBATCH_", "TF_CONFIG"))}

    def down():
        subprocess.run(["bash", str(LOCAL_SLURM), "down"], env=env, capture_output=True, timeout=180)

    try:
        up = subprocess.run(["bash", str(LOCAL_SLURM), "up"], env=env, capture_output=True, text=True,
                            timeout=600)
    except subprocess.TimeoutExpired:
        down()
        pytest.skip("local Slurm cluster did not start within 10 minutes")
    if up.returncode != 0:
        down()
        pytest.skip(f"local Slurm cluster could not start: {(up.stdout + up.stderr)[-1500:]}")
    try:
        yield dict(env, SLURM_CONF=str(base / "etc" / "slurm.conf"))
    finally:
        down()


@pytest.fixture(scope="module")
def nist_databases(tmp_path_factory):
    """Small train (8 images) and test (4 images) LMDBs from the real nist_colonies TIFFs."""
    import tifffile

    import records

    if not (NIST_DIR / "images").is_dir():
        pytest.skip(f"real data not present at {NIST_DIR}")
    names = sorted(p.name for p in (NIST_DIR / "images").glob("*.tif"))[:12]
    folder = tmp_path_factory.mktemp("nist")

    def pairs(selected):
        for name in selected:
            image = tifffile.imread(NIST_DIR / "images" / name)
            mask = tifffile.imread(NIST_DIR / "masks" / name)
            yield image, (mask > 0).astype(np.uint8), {"image": name, "mask": name}

    fields = {"split_seed": 0, "train_fraction": 8 / 12}
    records.write_database(str(folder / "train.lmdb"), pairs(names[:8]), dict(fields, split="train"))
    records.write_database(str(folder / "test.lmdb"), pairs(names[8:]), dict(fields, split="test"))
    return folder / "train.lmdb", folder / "test.lmdb"


def job_settings(tmp_path, databases, extra_train_args="--max_epochs 2", **overrides):
    """Launcher variables for a tiny CPU training (UNet with 2 base filters, 32 px tiles)."""
    settings = {
        "TRAIN_DATABASE": str(databases[0]), "TEST_DATABASE": str(databases[1]),
        "OUTPUT_ROOT": str(tmp_path / "results"), "SCRATCH_DIR": str(tmp_path / "scratch"),
        "MODEL": "unet", "PYTHON": sys.executable, "BATCH_SIZE": "4", "TILE_SIZE": "32", "NUMBER_CLASSES": "2", "GPUS_PER_NODE": "0",
        "TEST_EVERY_N_STEPS": str(TEST_EVERY_N_STEPS),
        "EXTRA_TRAIN_ARGS": f"--base_filters 2 --unet_depth 2 --log_every_n_steps 1 --use_augmentation 0 {extra_train_args}",
        # The trainer's temporary files (a non-chief worker's checkpoints) go here, to be checked.
        "TMPDIR": str(tmp_path / "task_tmp"),
    }
    (tmp_path / "task_tmp").mkdir(exist_ok=True)
    settings.update(overrides)
    return settings


def sbatch_wait(slurm, tmp_path, settings, *options, timeout=420):
    """``sbatch --wait`` the launcher (no GPUs: the local node has none). Returns (exit code, job id)."""
    result = subprocess.run(
        ["sbatch", "--wait", "--gres=none", f"--output={tmp_path}/%x_%N.%j.out", *options, str(SCRIPT)],
        cwd=ROOT, env=dict(slurm, **settings), capture_output=True, text=True, timeout=timeout)
    match = re.search(r"Submitted batch job (\d+)", result.stdout)
    assert match, f"sbatch did not submit: {result.stdout}{result.stderr}"
    return result.returncode, match.group(1)


def experiment_folder(tmp_path):
    folders = list((tmp_path / "results").iterdir())
    assert len(folders) == 1, f"expected one experiment folder, got {folders}"
    return folders[0]


def train_steps(folder):
    return [int(line.split(",")[0]) for line in (folder / "train_loss.csv").read_text().splitlines()[1:]]


def assert_scratch_removed(tmp_path):
    scratch = tmp_path / "scratch"
    assert scratch.is_dir(), "the databases were never copied to SCRATCH_DIR"
    assert list(scratch.iterdir()) == [], f"scratch not cleaned up: {list(scratch.iterdir())}"


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------

@pytest.mark.slurm
def test_one_node_job_trains_snapshots_and_cleans_up(slurm, nist_databases, tmp_path):
    code, job = sbatch_wait(slurm, tmp_path, job_settings(tmp_path, nist_databases),
                            "--cpus-per-task=2", "--time=10")
    out_files = list(tmp_path.glob(f"segtrain_*.{job}.out"))
    assert len(out_files) == 1, "no Slurm output file named after the header's %x_%N.%j.out"
    slurm_log = out_files[0].read_text()
    assert code == 0, slurm_log[-4000:]

    folder = experiment_folder(tmp_path)
    assert re.fullmatch(rf"unet_\d{{8}}-\d{{6}}_job{job}", folder.name)
    log = (folder / "train.log").read_text()
    assert "trainer exited with code 0" in log
    assert "effective batch: 4 per tower x 1 tower(s) x 1 worker(s) = 4" in log
    assert log.strip().splitlines()[-1] == slurm_log.strip().splitlines()[-1]  # the same tee'd log
    # Source snapshot: the Python files, models/ and this very script.
    source = folder / "source"
    for name in ("train_unet.py", "trainer.py", "distribute.py", "records.py", "models/unet.py"):
        assert (source / name).read_bytes() == (ROOT / name).read_bytes(), f"snapshot of {name}"
    assert (source / "launch_train_sbatch.sh").read_bytes() == SCRIPT.read_bytes()
    assert not list(source.rglob("__pycache__"))
    # Trained on the node-local copies, which are gone afterwards.
    config = json.loads((folder / "config.json").read_text())
    assert config["train_database"] == str(tmp_path / "scratch" / f"segtrain_job{job}" / "train_db")
    assert (config["tile_size"], config["base_filters"], config["num_workers"]) == (32, 2, 1)
    assert_scratch_removed(tmp_path)
    assert (folder / "model.keras").stat().st_size > 0
    assert train_steps(folder) == list(range(1, 2 * TEST_EVERY_N_STEPS + 1))


@pytest.mark.slurm
def test_two_tasks_train_as_two_workers_through_srun(slurm, nist_databases, tmp_path):
    code, job = sbatch_wait(slurm, tmp_path, job_settings(tmp_path, nist_databases),
                            "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10")
    folder = experiment_folder(tmp_path)
    log = (folder / "train.log").read_text()
    assert code == 0, log[-4000:]
    assert "running: srun" in log
    # No TF_CONFIG in the job: the trainer found its peer through Slurm (SlurmClusterResolver).
    assert "2 worker(s), collective all-reduce across workers (RING)" in log
    assert "effective batch: 4 per tower x 1 tower(s) x 2 worker(s) = 8" in log
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_workers"], config["effective_batch"]) == (2, 8)
    assert (folder / "model.keras").exists()
    assert train_steps(folder) == list(range(1, 2 * TEST_EVERY_N_STEPS + 1))
    assert list((tmp_path / "task_tmp").iterdir()) == [], "the non-chief worker left files behind"
    assert_scratch_removed(tmp_path)


@pytest.mark.slurm
def test_pretraining_job_runs_pretrain_unet_on_the_unlabelled_copy(slurm, tmp_path):
    import build_lmdb

    if not (NIST_DIR / "images").is_dir():
        pytest.skip(f"real data not present at {NIST_DIR}")
    images = tmp_path / "unlabelled"
    images.mkdir()
    for path in sorted((NIST_DIR / "images").glob("*.tif"))[:6]:
        shutil.copy(path, images / path.name)
    build_lmdb.build_databases(build_lmdb.BuildConfig(
        image_folder=str(images), mask_folder=None, output_folder=str(tmp_path / "db"), dataset_name="u",
        train_fraction=1.0, unlabelled_only=True), show_progress=False)
    database = tmp_path / "db" / "unlabelled-u.lmdb"
    settings = job_settings(tmp_path, ("unused", "unused"), PRETRAIN_DATABASE=str(database), TIME_BUDGET="none",
                            EXTRA_TRAIN_ARGS="--base_filters 2 --unet_depth 2 --log_every_n_steps 1 "
                            "--use_augmentation 0 --max_steps 4 --test_every_n_steps 2 --test_crops 2")
    code, job = sbatch_wait(slurm, tmp_path, settings, "--cpus-per-task=2", "--time=10")
    folder = experiment_folder(tmp_path)
    log = (folder / "train.log").read_text()
    assert code == 0, log[-4000:]
    assert re.fullmatch(rf"pretrain_unet_\d{{8}}-\d{{6}}_job{job}", folder.name)
    assert f"pretrain_unet.py --database {tmp_path}/scratch/segtrain_job{job}/pretrain_db" in log
    config = json.loads((folder / "config.json").read_text())
    assert config["train_database"] == str(tmp_path / "scratch" / f"segtrain_job{job}" / "pretrain_db")
    assert config["pretext"]["task"] == "blind_spot"
    assert train_steps(folder) == [1, 2, 3, 4]
    assert (folder / "model.keras").stat().st_size > 0
    assert (folder / "source" / "pretrain_unet.py").exists()
    assert_scratch_removed(tmp_path)


def wait_for_job(slurm, job, timeout):
    """Poll until ``job`` ends; returns (state, exit code) from its record."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        record = subprocess.run(["scontrol", "show", "job", "-o", job], env=slurm, capture_output=True,
                                text=True).stdout
        fields = dict(re.findall(r"(\w+)=(\S+)", record))
        state = fields.get("JobState")
        if state not in (None, "PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return state, int(fields["ExitCode"].split(":")[0])
        time.sleep(1)
    raise AssertionError(f"job {job} still {state} after {timeout} s")


@pytest.mark.slurm
def test_time_limit_checkpoints_resubmits_and_resumes(slurm, nist_databases, tmp_path):
    # A 2-minute job whose batch shell gets SIGTERM 60 s before the limit, i.e. at most ~60 s in
    # (Slurm may signal up to a minute early). The training asked for is longer: 200 epochs of 0.3 s
    # (this machine idle on a fast day: 70 epochs once took 22 s) to 2 s (busy) against the at most
    # ~45 s left after start-up, so the trainer checkpoints, exits 143 and the job resubmits itself;
    # the continuation gets a longer limit below and completes the run.
    # SBATCH_SIGNAL rather than --signal so that the continuation inherits it (see the script).
    epochs, steps_per_epoch = 200, 20
    settings = job_settings(tmp_path, nist_databases,
                            extra_train_args=f"--max_epochs {epochs} --early_stopping 1000",
                            TEST_EVERY_N_STEPS=str(steps_per_epoch), REQUEUE="1", SBATCH_SIGNAL="B:TERM@60")
    code, first = sbatch_wait(slurm, tmp_path, settings, "--cpus-per-task=2", "--time=2")
    folder = experiment_folder(tmp_path)
    log = (folder / "train.log").read_text()
    assert code == 143, f"the first job was not stopped by its time limit (exit {code}):\n{log[-3000:]}"
    assert "received SIGTERM: asking the trainer to checkpoint and stop" in log
    assert "trainer exited with code 143 after SIGTERM" in log
    match = re.search(r"resubmitted as job (\d+) \(continuation 1\)", log)
    assert match, log[-3000:]
    second = match.group(1)
    # The continuation repeats the first job's 2-minute limit; give it the time to finish here.
    subprocess.run(["scontrol", "update", f"JobId={second}", "TimeLimit=14"], env=slurm, check=True)
    state, second_code = wait_for_job(slurm, second, timeout=780)
    log = (folder / "train.log").read_text()
    assert (state, second_code) == ("COMPLETED", 0), log[-4000:]

    # Same folder, resumed from the first job's checkpoint: the step count continues.
    assert experiment_folder(tmp_path) == folder
    resumed = re.search(r"resuming from .*/checkpoints/latest \(train_loss.csv ends at step (\d+)\)", log)
    assert resumed, log[-3000:]
    checkpoint_step = int(resumed.group(1))
    assert checkpoint_step > 0
    assert f"resumed from {folder}/checkpoints/latest: step {checkpoint_step}," in log
    assert train_steps(folder) == list(range(1, epochs * steps_per_epoch + 1))
    assert checkpoint_step < epochs * steps_per_epoch
    assert "trainer exited with code 0" in log
    assert (folder / "model.keras").exists()
    assert list(tmp_path.glob(f"segtrain_*.{second}.out")), "the continuation's output went elsewhere"
    assert not list(ROOT.glob("segtrain_*.out"))
    assert_scratch_removed(tmp_path)
