"""launch_inference_sbatch.sh: static checks, bad settings, the array's summary, a killed inference
process, and a real 2-task job array on a throw-away single-node Slurm cluster started with
../shared/tools/local-slurm.sh (those tests skip when it cannot start)."""
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile

import image_io
import inference
import sharding
from test_sharding import random_image, run, save_tiny_unet
from test_slurm import slurm  # noqa: F401  (the module-scoped local cluster fixture)

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch_inference_sbatch.sh"


# ---------------------------------------------------------------------------------------------
# Static checks, settings errors, the summary (no cluster needed)
# ---------------------------------------------------------------------------------------------

def test_script_parses_and_is_shellcheck_clean():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck; .ci/slurm_setup.sh does it)")
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_header_is_requeue_safe_with_a_log_per_task():
    header = [line.split(None, 1)[1].strip() for line in SCRIPT.read_text().splitlines()
              if line.startswith("#SBATCH")]
    options = dict(option.lstrip("-").partition("=")[::2] for option in header)
    assert options["output"] == "%x_%A_%a.out"  # array job id and task id
    assert options["open-mode"] == "append" and "requeue" in options
    assert {"cpus-per-task", "time", "job-name", "mem"} <= options.keys()


@pytest.mark.parametrize("settings, message", [
    ({"MODEL": ""}, "MODEL is empty"),
    ({"MODEL": "no/such/model.keras"}, "MODEL=no/such/model.keras: no/such/model.keras not found"),
    ({"IMAGE_FOLDER": "no_such_folder"}, "IMAGE_FOLDER=no_such_folder: folder not found"),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "9",
      "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_JOB_ID": "7"}, "--array with gaps (tasks 1..9, 3 of them)"),
])
def test_bad_settings_fail_before_anything_is_written(tmp_path, settings, message):
    (tmp_path / "model.keras").write_bytes(b"")
    (tmp_path / "images").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(MODEL=str(tmp_path / "model.keras"), IMAGE_FOLDER=str(tmp_path / "images"),
               OUTPUT_FOLDER=str(tmp_path / "out"), SCRATCH_DIR=str(tmp_path / "scratch"),
               CODE_DIR=str(ROOT), PYTHON=sys.executable)
    env.update(settings)
    result = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "scratch").exists()


def test_summary_names_done_and_failed_images_with_the_logged_reason(tmp_path):
    # The summary lists the images inference segments by default.
    assert inference.InferenceConfig("in", "out").image_extensions == image_io.IMAGE_EXTENSIONS
    images, out = tmp_path / "images", tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    images.mkdir()
    for name in ("a.tif", "a.png", "b.png", "c.tif", "d.png", "notes.txt"):
        (images / name).write_bytes(b"")
    (out / "a.tif").write_bytes(b"")
    # A file image_io cannot read is named by its path; a.tif shares a.png's stem and a.png (first in
    # folder order) owns the outputs a.*: the a.tif in the output folder is a.png's mask.
    (out / "logs" / "part_0.log").write_text(
        "[1/2] FAILED b.png: cannot read image (truncated)\n[launcher] exit code 1\n"
        f"[2/2] FAILED {images / 'd.png'}: cannot read PNG (SyntaxError: not a PNG file)\n")
    (out / "logs" / "part_1.log").write_text("[1/2] FAILED a.tif: same stem as a.png\n")
    (out / "logs" / "run7_part0.status").write_text("1\n")
    assert sharding.main(["summary", "--image_folder", str(images), "--output_folder", str(out),
                          "--run", "7", "--parts", "2"]) == 0
    text = (out / "logs" / "summary_7.txt").read_text()
    assert text.splitlines()[0].endswith("1 done, 4 not done; exit codes: part 0: 1, part 1: not ended")
    assert "done (1): a.png\n" in text
    assert "  a.tif: same stem as a.png\n" in text
    assert "  b.png: cannot read image (truncated)\n" in text
    assert "  c.tif: no mask and no error logged (task stopped?); rerun the part\n" in text
    assert "  d.png: cannot read PNG (SyntaxError: not a PNG file)\n" in text


def test_summary_lists_the_images_of_the_tasks_image_extensions(tmp_path):
    # EXTRA_INFERENCE_ARGS="--image_extensions tif": the tasks segment only c.tif, so b.png is not
    # an image of the run; with one image left, the run split it into bands, so c.zarr alone (its
    # bands not all marked) is not done.
    images, out = tmp_path / "images", tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    images.mkdir()
    (images / "b.png").write_bytes(b"")
    (images / "c.tif").write_bytes(b"")
    (out / "c.zarr").mkdir()
    assert sharding.inference_extensions("--tta --image_extensions=TIF,png") == ("tif", "png")
    assert sharding.inference_extensions("--tta") == image_io.IMAGE_EXTENSIONS
    assert sharding.main(["summary", "--image_folder", str(images), "--output_folder", str(out),
                          "--run", "3", "--parts", "2",
                          "--inference_args=--image_extensions=tif"]) == 0  # as the launcher passes it
    text = (out / "logs" / "summary_3.txt").read_text()
    assert text.splitlines()[0].startswith(f"run 3: 1 image(s) in {images}: 0 done, 1 not done")
    assert "b.png" not in text and "  c.tif: no mask" in text
    # Without the flag both are images of the run, and c.zarr counts as c.tif's whole-image output.
    assert sharding.main(["summary", "--image_folder", str(images), "--output_folder", str(out),
                          "--run", "4", "--parts", "2"]) == 0
    assert "done (1): c.tif\n" in (out / "logs" / "summary_4.txt").read_text()


def test_a_killed_process_leaves_no_partial_mask_under_its_final_name(tmp_path):
    model = save_tiny_unet(tmp_path / "model")
    (tmp_path / "images").mkdir()
    side = 2112  # above writers.STREAM_PIXELS: the mask is streamed into its file tile by tile
    tifffile.imwrite(tmp_path / "images" / "big.tif", random_image((side, side), 0))
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "inference.py"), "--model", str(model), "--image_folder",
               str(tmp_path / "images"), "--output_folder", str(out), "--tile_size", "512"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob(".big.tif.*.tmp")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # as a node failure or `scancel --signal=KILL` would
    process.communicate(timeout=60)
    assert list(out.glob(".big.tif.*.tmp")), "the mask was never being written when the process was killed"
    assert not (out / "big.tif").exists()
    # --skip_existing then redoes it (no complete output): tests/test_sharding.py and the array below.


# ---------------------------------------------------------------------------------------------
# A real job array
# ---------------------------------------------------------------------------------------------

def sbatch_array(slurm, tmp_path, settings, tasks, timeout=420):
    """``sbatch --wait --array=0-(tasks-1)`` the launcher. Returns (exit code, array job id)."""
    result = subprocess.run(
        ["sbatch", "--wait", f"--array=0-{tasks - 1}", "--cpus-per-task=1", "--mem=2G", "--time=10",
         f"--output={tmp_path}/%x_%A_%a.out", str(SCRIPT)],
        cwd=ROOT, env=dict(slurm, **settings), capture_output=True, text=True, timeout=timeout)
    match = re.search(r"Submitted batch job (\d+)", result.stdout)
    assert match, f"sbatch did not submit: {result.stdout}{result.stderr}"
    return result.returncode, match.group(1)


@pytest.mark.slurm
def test_two_task_array_writes_the_masks_of_one_process_and_a_summary(slurm, tmp_path):  # noqa: F811
    model = save_tiny_unet(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    for i, shape in enumerate([(100, 90), (40, 50), (130, 60), (64, 70)]):
        tifffile.imwrite(images / f"field_{i}.tif", random_image(shape, i))
    (images / "broken.tif").write_bytes(b"not a tiff")
    one_process = run(images, tmp_path / "one_process", model)
    assert one_process.ok_count == 4
    out = tmp_path / "masks"
    settings = {"MODEL": str(model), "IMAGE_FOLDER": str(images), "OUTPUT_FOLDER": str(out),
                "SCRATCH_DIR": str(tmp_path / "scratch"), "CODE_DIR": str(ROOT), "PYTHON": sys.executable,
                "EXTRA_INFERENCE_ARGS": "--tile_size 72 --gpu -1"}
    (tmp_path / "scratch").mkdir()

    code, job = sbatch_array(slurm, tmp_path, settings, tasks=2)
    task_logs = [tmp_path / f"seginfer_{job}_{i}.out" for i in range(2)]
    assert all(log.is_file() for log in task_logs), "no Slurm output per task (%x_%A_%a.out)"
    assert code == 1, task_logs[0].read_text()[-3000:]  # broken.tif failed in its part
    for i in range(4):
        np.testing.assert_array_equal(tifffile.imread(out / f"field_{i}.tif"),
                                      tifffile.imread(tmp_path / "one_process" / f"field_{i}.tif"))
    part_logs = [(out / "logs" / f"part_{i}.log").read_text() for i in range(2)]
    assert "part 0/2: " in part_logs[0] and "part 1/2: " in part_logs[1]
    summary = (out / "logs" / f"summary_{job}.txt").read_text()
    assert f"run {job}: 5 image(s) in {images}: 4 done, 1 not done" in summary
    assert "  broken.tif: cannot read image" in summary
    assert summary in "".join(log.read_text() for log in task_logs)  # printed by the last task
    assert list((tmp_path / "scratch").iterdir()) == [], "node-local model copies not removed"

    # A rerun (as after a preemption) skips the complete masks and redoes the missing one.
    (out / "field_2.tif").unlink()
    kept = (out / "field_0.tif").stat().st_mtime_ns
    code, rerun = sbatch_array(slurm, tmp_path, settings, tasks=2)
    assert code == 1
    np.testing.assert_array_equal(tifffile.imread(out / "field_2.tif"),
                                  tifffile.imread(tmp_path / "one_process" / "field_2.tif"))
    assert (out / "field_0.tif").stat().st_mtime_ns == kept
    assert "field_0.tif: complete outputs exist, skipped" in "".join(
        (out / "logs" / f"part_{i}.log").read_text() for i in range(2))
    assert "4 done, 1 not done" in (out / "logs" / f"summary_{rerun}.txt").read_text()
