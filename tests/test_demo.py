"""demo.py end to end in its --quick form: real data generation, LMDBs, training on two CPU towers,
inference.py and the figure, as a user's `python demo.py` runs them (about 40 s)."""
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import tifffile

import demo
import records

ROOT = pathlib.Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_demo(*args, timeout=240):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "demo.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo") / "out"
    result = run_demo("--quick", "--output_dir", output_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output_dir, result.stdout


def test_quick_demo_writes_figure_predictions_and_metrics(quick_run):
    output_dir, stdout = quick_run
    config = demo.DemoConfig.quick(str(output_dir))

    figure = output_dir / "demo_figure.png"
    data = figure.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert 400 <= width <= 3000 and 400 <= height <= 3000, (width, height)
    assert len(data) > 20_000  # three panels per example plus two plots, not an empty canvas

    # Every test image of the split has a mask of its size with class ids 0..2.
    sources = records.read_metadata(str(output_dir / "test-demo.lmdb"))["sources"]
    train_count = records.read_metadata(str(output_dir / "train-demo.lmdb"))["num_records"]
    assert len(sources) + train_count == config.num_images and len(sources) >= 1
    for source in sources:
        stem = pathlib.Path(source["image"]).stem
        predicted = tifffile.imread(output_dir / "predictions" / f"{stem}.tif")
        truth = tifffile.imread(source["mask"])
        assert predicted.shape == truth.shape == (config.image_size, config.image_size)
        assert predicted.dtype == np.uint8 and predicted.max() <= 2
    assert sorted(os.listdir(output_dir / "predictions")) == sorted(
        pathlib.Path(s["image"]).stem + ".tif" for s in sources)

    assert (output_dir / "training" / "model.keras").is_file()
    # The demo trains with the recipe's schedule over exactly its steps.
    import json
    trained = json.loads((output_dir / "training" / "config.json").read_text())
    assert (trained["lr_schedule"], trained["warmup_steps"]) == (config.lr_schedule, config.warmup_steps)
    assert trained["run_length"] == config.steps_per_epoch * config.max_epochs
    assert (output_dir / "training" / "plots" / "loss.png").is_file()
    assert re.search(r"^  loss \d+\.\d{4}  pixel accuracy [01]\.\d{4}  mean IoU [01]\.\d{4}$", stdout, re.M)
    match = re.search(r"^  foreground Dice ([01]\.\d{4})  pixel accuracy ([01]\.\d{4})", stdout, re.M)
    assert match, stdout[-2000:]
    assert str(figure) in stdout and str(output_dir / "predictions") in stdout
    # The console stays free of TensorFlow's C++ start-up lines; the log files keep them.
    assert not re.search(r"^\s*[IWE]0000 ", stdout, re.M)


def test_second_run_reuses_data_and_rejects_mismatched_data(quick_run):
    output_dir, _ = quick_run
    config = demo.DemoConfig.quick(str(output_dir))
    folders = demo.generate_data(config)  # the quick set is there: nothing is rewritten
    assert len(os.listdir(folders[0])) == config.num_images

    full = demo.DemoConfig(output_dir=str(output_dir))
    with pytest.raises(demo.DemoError, match=r"holds 8 images of 64x64, expected 48 images of 256x256"):
        demo.generate_data(full)
    # Same count and size, another seed: other images, so not reused silently.
    with pytest.raises(demo.DemoError, match=r"holds the demo data of --seed 0, not 1"):
        demo.generate_data(demo.DemoConfig.quick(str(output_dir), seed=1))


def test_failed_step_exits_non_zero_naming_the_log(tmp_path):
    config = demo.DemoConfig.quick(str(tmp_path / "out"))
    log = tmp_path / "fail.log"
    with pytest.raises(demo.DemoError, match=re.escape(str(log))):
        demo.run_logged([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], str(log), "child")
    assert "boom" in log.read_text()
    # A data folder that does not match the requested set stops main() with exit code 1.
    os.makedirs(os.path.join(config.data_dir, "images"))
    result = run_demo("--quick", "--output_dir", config.output_dir, timeout=60)
    assert result.returncode == 1
    assert "demo.py: error:" in result.stderr and config.data_dir in result.stderr
