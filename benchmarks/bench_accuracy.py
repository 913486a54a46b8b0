"""Test Dice and IoU of a UNet trained on nist_colonies within a fixed CPU budget, against Otsu.

Steps, each through the project's own command-line tools:
  1. build_lmdb.build_databases: 80/20 split of ../shared/data/nist_colonies (seed 0) into a train
     and a test LMDB in a work folder;
  2. `train_unet.py` for exactly --max_epochs x --test_every_n_steps steps (early stopping cannot
     trigger earlier), with the trainer's default augmentation;
  3. `inference.py` on the test images with the LAST checkpoint. The best checkpoint is chosen by
     the test loss, i.e. on these same images, which would flatter the figures;
  4. foreground (class 1) Dice and IoU over all test pixels pooled (one confusion matrix, as the
     trainer's test pass computes them), next to a classical baseline on the same images: Gaussian
     smoothing (--otsu_sigma) and a per-image Otsu threshold, with the polarity (foreground above or
     below the threshold) that scores better over the test set.
The default budget (base_filters 8, batch 8, 256 px tiles, 10 x 100 = 1000 steps, Adam 1e-3, about
100 epochs of the 80 training images) takes about 9 minutes of training on the 2-core development
machine under light load (about 0.5 s per step) and about 14 minutes at a load average of 4 (0.8 s
per step); reduce --max_epochs for a shorter run (the test Dice was already 0.94 after 300 steps).
Skips (exit 0) when the data is not on this machine.

Run from the repo root: .venv/bin/python benchmarks/bench_accuracy.py [--work_dir DIR]
"""
import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import build_lmdb  # noqa: E402
import metrics  # noqa: E402
import records  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "nist_colonies"


@dataclasses.dataclass
class AccuracyConfig:
    """The training budget and baseline settings (see main's flags)."""
    work_dir: str
    base_filters: int = 8
    batch_size: int = 8
    tile_size: int = 256
    learning_rate: float = 1e-3
    test_every_n_steps: int = 100
    max_epochs: int = 10
    reader_count: int = 1
    seed: int = 0
    otsu_sigma: float = 2.0


def build_databases(work_dir):
    """Train and test LMDBs (80/20, seed 0). Returns (train path, test path, test image paths)."""
    result = build_lmdb.build_databases(build_lmdb.BuildConfig(
        image_folder=str(DATA / "images"), mask_folder=str(DATA / "masks"), output_folder=str(work_dir),
        dataset_name="nist_colonies", train_fraction=0.8, seed=0), show_progress=False)
    test_images = [source["image"] for source in records.read_metadata(result.paths["test"])["sources"]]
    return result.paths["train"], result.paths["test"], test_images


def run_tool(command, log_path):
    """Run a project CLI with output to ``log_path``; SystemExit with the log's tail on failure."""
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    with open(log_path, "w") as log:
        code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=environment)
    if code != 0:
        tail = "".join(open(log_path).readlines()[-25:])
        raise SystemExit(f"{' '.join(map(str, command))} exited with {code}; end of {log_path}:\n{tail}")


def train(config, train_db, test_db, output_dir):
    """Train the UNet with train_unet.py. Returns (steps trained, wall seconds)."""
    command = [sys.executable, "train_unet.py", "--train_database", train_db, "--test_database", test_db,
               "--output_dir", output_dir, "--base_filters", config.base_filters,
               "--batch_size", config.batch_size, "--tile_size", config.tile_size,
               "--learning_rate", config.learning_rate, "--test_every_n_steps", config.test_every_n_steps,
               "--max_epochs", config.max_epochs, "--early_stopping", config.max_epochs,
               "--reader_count", config.reader_count, "--seed", config.seed, "--gpus", "none"]
    start = time.perf_counter()
    run_tool([str(c) for c in command], pathlib.Path(config.work_dir) / "train.log")
    seconds = time.perf_counter() - start
    with open(pathlib.Path(output_dir) / "checkpoints" / "latest" / "state.json") as f:
        return json.load(f)["step"], seconds


def predict(config, output_dir, test_images):
    """Masks of the test images from inference.py with the last checkpoint, by file name."""
    import tifffile

    image_folder = pathlib.Path(config.work_dir) / "test_images"
    prediction_folder = pathlib.Path(config.work_dir) / "predictions"
    image_folder.mkdir(exist_ok=True)
    for path in test_images:
        link = image_folder / pathlib.Path(path).name
        if not link.exists():
            link.symlink_to(path)
    run_tool([sys.executable, "inference.py", "--checkpoint_filepath",
              str(pathlib.Path(output_dir) / "checkpoints" / "latest"), "--image_folder", str(image_folder),
              "--output_folder", str(prediction_folder), "--gpu", "-1"],
             pathlib.Path(config.work_dir) / "inference.log")
    return {pathlib.Path(p).name: tifffile.imread(prediction_folder / (pathlib.Path(p).stem + ".tif"))
            for p in test_images}


def foreground_scores(truths, predictions):
    """(Dice, IoU) of class 1 over all pixels of all image pairs together."""
    confusion = sum(metrics.confusion_matrix(t, p, 2) for t, p in zip(truths, predictions))
    return float(metrics.per_class_dice(confusion)[1]), float(metrics.per_class_iou(confusion)[1])


def otsu_predictions(images, sigma):
    """Per-image Otsu masks of the Gaussian-smoothed images: (foreground above, foreground below)."""
    from skimage.filters import gaussian, threshold_otsu

    above, below = [], []
    for image in images:
        smooth = gaussian(image.astype(np.float64), sigma=sigma, preserve_range=True)
        foreground = smooth > threshold_otsu(smooth)
        above.append(foreground.astype(np.uint8))
        below.append((~foreground).astype(np.uint8))
    return above, below


def run(config):
    """Build, train, predict and score. Returns the figures as a dict."""
    import tifffile

    work = pathlib.Path(config.work_dir)
    train_db, test_db, test_images = build_databases(work)
    output_dir = str(work / "unet")
    steps, seconds = train(config, train_db, test_db, output_dir)
    predicted = predict(config, output_dir, test_images)
    names = [pathlib.Path(p).name for p in test_images]
    images = [tifffile.imread(DATA / "images" / n) for n in names]
    truths = [tifffile.imread(DATA / "masks" / n) for n in names]
    unet = foreground_scores(truths, [predicted[n] for n in names])
    otsu = max((foreground_scores(truths, candidate) + (polarity,)
                for candidate, polarity in zip(otsu_predictions(images, config.otsu_sigma), ("bright", "dark"))))
    return {"unet": unet, "otsu": otsu, "test_images": len(names), "steps": steps, "seconds": seconds}


def main(argv=None):
    defaults = AccuracyConfig(work_dir="")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default=None, help="keep the databases, run and predictions here "
                        "(default: a temporary folder, deleted afterwards)")
    for name in ("base_filters", "batch_size", "tile_size", "test_every_n_steps", "max_epochs",
                 "reader_count", "seed"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name),
                            help=f"default {getattr(defaults, name)}")
    parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate,
                        help=f"default {defaults.learning_rate}")
    parser.add_argument("--otsu_sigma", type=float, default=defaults.otsu_sigma,
                        help=f"Gaussian sigma in pixels before Otsu (default {defaults.otsu_sigma})")
    args = parser.parse_args(argv)
    if not (DATA / "images").is_dir() or not (DATA / "masks").is_dir():
        print(f"accuracy: skipped, the nist_colonies data is not at {DATA} (it ships only with the "
              "development machines)")
        return
    values = {k: v for k, v in vars(args).items() if k != "work_dir"}
    with tempfile.TemporaryDirectory(prefix="bench_accuracy-") as tmp:
        work_dir = args.work_dir or tmp
        os.makedirs(work_dir, exist_ok=True)
        config = AccuracyConfig(work_dir=work_dir, **values)
        result = run(config)
    (unet_dice, unet_iou), (otsu_dice, otsu_iou, polarity) = result["unet"], result["otsu"]
    print(f"accuracy: UNet dice {unet_dice:.2f} iou {unet_iou:.2f} vs Otsu dice {otsu_dice:.2f} "
          f"iou {otsu_iou:.2f} ({result['test_images']} test images, {result['steps']} steps, "
          f"{result['seconds']:.0f} s CPU wall) [unet f{config.base_filters}, {config.tile_size} px, "
          f"batch {config.batch_size}, Adam {config.learning_rate:g}, last checkpoint; Otsu sigma "
          f"{config.otsu_sigma:g}, {polarity} foreground; load avg {os.getloadavg()[0]:.1f}]")


if __name__ == "__main__":
    main()
