"""The test pass (evaluation.py) scores exactly the masks inference.py writes: same normalisation,
same tiled predictor, every source pixel once, also when the train database is tiled."""
import csv
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tifffile

import build_lmdb
import inference
import metrics
import records

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_tool(*command, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_test_metrics_are_those_of_inference_masks(nist_dir, tmp_path):
    # A few real images, tiled for training with overlap: the test images must still be scored whole.
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name in sorted(os.listdir(nist_dir / "images"))[:8]:
        os.symlink(nist_dir / "images" / name, images / name)
        os.symlink(nist_dir / "masks" / name, masks / name)
    build = build_lmdb.build_databases(build_lmdb.BuildConfig(
        image_folder=str(images), mask_folder=str(masks), output_folder=str(tmp_path / "db"),
        dataset_name="nist", train_fraction=0.75, seed=0, tile_size=96, tile_overlap=16), show_progress=False)
    sources = records.read_metadata(build.paths["test"])["sources"]
    assert len(sources) == 2 and all("tile" not in source for source in sources)

    run_dir = tmp_path / "run"
    run_tool("train_unet.py", "--train_database", build.paths["train"], "--test_database", build.paths["test"],
             "--output_dir", run_dir, "--tile_size", 96, "--batch_size", 2, "--base_filters", 4, "--unet_depth", 2,
             "--test_every_n_steps", 3, "--max_epochs", 1, "--gpus", "none")
    with open(run_dir / "test_metrics.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]

    test_images = tmp_path / "test_images"
    test_images.mkdir()
    for source in sources:
        os.symlink(source["image"], test_images / pathlib.Path(source["image"]).name)
    summary = inference.run_inference(inference.InferenceConfig(
        image_folder=str(test_images), output_folder=str(tmp_path / "predicted"),
        checkpoint_filepath=str(run_dir), gpu=-1))
    assert summary.failed_count == 0
    confusion = np.zeros((2, 2), np.int64)
    for source in sources:
        truth = tifffile.imread(source["mask"])
        predicted = tifffile.imread(tmp_path / "predicted" / (pathlib.Path(source["image"]).stem + ".tif"))
        assert predicted.shape == truth.shape
        confusion += metrics.confusion_matrix(truth, predicted, 2)

    # Every source pixel counted exactly once (not the tiles' 96 x 96 pieces, not padding).
    assert int(row["test_pixels"]) == confusion.sum() == 2 * 256 * 256
    # The trainer's test metrics are those of inference.py's masks (at least 99.99 % of pixels agree:
    # float differences between the training model and the exported weights may flip a pixel or two).
    summary = metrics.summarize(confusion)
    for name in ("pixel_accuracy", "iou_0", "iou_1", "dice_0", "dice_1"):
        assert float(row[name]) == pytest.approx(summary[name], abs=1e-4), name
