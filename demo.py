"""Run the tool end to end on the built-in synthetic dataset, so a new user sees every part work.

    python demo.py [--output_dir demo_output] [--seed 0] [--quick]

On the CPU, in under 5 minutes on two cores (70-87 s measured on 2026-12-03, 59-75 s of it
training; 286 s on a slower day; ``--quick``: well under a minute, for tests):
  1. generate_data: write 48 synthetic 256 x 256 uint16 images and their masks (0 background,
     1 colony, 2 cell) into OUTPUT/data (skipped when a complete set is already there).
  2. build_databases: turn them into OUTPUT/train-demo.lmdb and OUTPUT/test-demo.lmdb.
  3. train: run train_unet.py (a small UNet, two logical CPU towers so the data-parallel path
     runs) into OUTPUT/training; its console output is also saved as OUTPUT/logs/train.log.
  4. predict: copy the test split's images (listed in the test database's metadata) to
     OUTPUT/test_images and run inference.py --tta on them into OUTPUT/predictions.
  5. evaluate: score the predicted masks against the true masks.
  6. make_figure: OUTPUT/demo_figure.png, image / true mask / predicted mask for three test images
     plus the training loss and test metric curves.
Training and inference run as child processes: TensorFlow's logical CPU devices must be set up
before TensorFlow initialises, and a child also shows exactly what a user's own command does.
Re-running replaces the previous training, predictions and figure.
"""
import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

import build_lmdb
import demo_data
import image_io
import metrics
import plots
import records

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
FIGURE_EXAMPLES = 3
# Beside the generated images and masks: the --seed that made them.
DATA_RECORD = "demo_data.json"
# TensorFlow's C++ start-up lines (no CUDA driver, oneDNN notes) that TF_CPP_MIN_LOG_LEVEL does not
# silence: kept in the log files, left off the console where they look like errors on a CPU machine.
TF_NATIVE_LOG_LINE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ |WARNING: All log messages before absl)")


class DemoError(Exception):
    """A step failed; the message says which file or command and where its log is."""


@dataclasses.dataclass
class DemoConfig:
    """The sizes of one demo run (the full demo, or the ``quick`` one the tests run)."""
    output_dir: str = "demo_output"
    seed: int = 0
    num_images: int = 48
    image_size: int = 256
    # 128 px crops of the 256 px images: four times the steps per minute of full images. A poly decay
    # of the learning rate to 0 at the last step (with a short warm-up) settles the weights, where a
    # constant rate left the test metrics jumping between epochs. Measured on the 2-core machine
    # (foreground Dice with TTA, total demo time): 300 steps at 1e-3 0.990 in 383 s; base_filters 12
    # instead 0.982 in 274 s; these 225 steps at a peak of 2e-3 0.991 in 286 s.
    tile_size: int = 128
    base_filters: int = 16
    batch_size: int = 4  # per tower
    towers: int = 2
    steps_per_epoch: int = 75
    max_epochs: int = 3
    learning_rate: float = 2e-3
    lr_schedule: str = "poly"
    warmup_steps: int = 22
    # A 3-level UNet with bilinear upsampling (NVIDIA's TinyUNet) learned the demo data much faster
    # than the 4-level one in the ablation of docs/recipe.md (foreground Dice 0.77 vs 0.57 after 100 steps; the
    # two are level at 200, 0.951 vs 0.950), and the demo's budget is a few hundred steps.
    unet_depth: int = 3
    upsampling: str = "bilinear"
    # Cells cover under 2 % of the pixels; the Dice term keeps the rare class from being ignored.
    loss: str = "ce+dice"
    # Test-time augmentation: the softmax averaged over the 8 flips/rotations of each test image, a
    # gain at prediction time only (eight forward passes of a few 256 px images).
    tta: bool = True

    @classmethod
    def quick(cls, output_dir, seed=0):
        """A run of a few seconds of training on tiny images: checks the plumbing, not the accuracy."""
        return cls(output_dir=output_dir, seed=seed, num_images=8, image_size=64, tile_size=64,
                   base_filters=8, batch_size=2, steps_per_epoch=4, max_epochs=1, warmup_steps=1)

    @property
    def data_dir(self):
        return os.path.join(self.output_dir, "data")

    @property
    def training_dir(self):
        return os.path.join(self.output_dir, "training")

    @property
    def test_images_dir(self):
        return os.path.join(self.output_dir, "test_images")

    @property
    def predictions_dir(self):
        return os.path.join(self.output_dir, "predictions")

    @property
    def logs_dir(self):
        return os.path.join(self.output_dir, "logs")

    @property
    def figure_path(self):
        return os.path.join(self.output_dir, "demo_figure.png")


@dataclasses.dataclass
class TestImage:
    """One image of the test split with its true mask and, once predicted, its predicted mask."""
    image_path: str
    mask_path: str
    prediction_path: str


# ----------------------------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------------------------

def generate_data(config):
    """Step 1: the synthetic dataset; returns (image_folder, mask_folder).

    The set is written to a temporary folder and renamed into place, so an interrupted run never
    leaves a partial set that a later run would mistake for a complete one.
    """
    image_folder = os.path.join(config.data_dir, "images")
    mask_folder = os.path.join(config.data_dir, "masks")
    if os.path.isdir(config.data_dir):
        _check_existing_data(config, image_folder, mask_folder)
        print(f"[1] demo data already present in {config.data_dir}")
        return image_folder, mask_folder
    os.makedirs(config.output_dir, exist_ok=True)
    with image_io.atomic_folder(config.data_dir) as scratch:
        demo_data.generate_demo_dataset(scratch, num_images=config.num_images, size=config.image_size,
                                        seed=config.seed)
        with open(os.path.join(scratch, DATA_RECORD), "w") as f:
            json.dump({"seed": config.seed}, f)
    classes = ", ".join(f"{k} {name}" for k, name in demo_data.CLASS_NAMES.items())
    print(f"[1] wrote {config.num_images} synthetic {config.image_size}x{config.image_size} images to "
          f"{image_folder} and masks ({classes}) to {mask_folder}")
    return image_folder, mask_folder


def _data_seed(data_dir):
    """The --seed recorded with the demo data in ``data_dir``, or None."""
    try:
        with open(os.path.join(data_dir, DATA_RECORD)) as f:
            return json.load(f).get("seed")
    except (OSError, ValueError, AttributeError):
        return None


def _check_existing_data(config, image_folder, mask_folder):
    """DemoError unless config.data_dir holds the set this configuration would generate."""
    import tifffile

    images = sorted(os.listdir(image_folder)) if os.path.isdir(image_folder) else []
    masks = sorted(os.listdir(mask_folder)) if os.path.isdir(mask_folder) else []
    expected = f"{config.num_images} images of {config.image_size}x{config.image_size}"
    found = f"{len(images)} images"
    if images:
        height, width = tifffile.imread(os.path.join(image_folder, images[0])).shape[:2]
        found = f"{len(images)} images of {height}x{width}"
        if (images == masks and len(images) == config.num_images
                and (height, width) == (config.image_size, config.image_size)):
            seed = _data_seed(config.data_dir)
            if seed in (None, config.seed):  # None: written before the seed was recorded
                return
            raise DemoError(f"{config.data_dir} holds the demo data of --seed {seed}, not {config.seed}; delete "
                            f"{config.data_dir} or choose another --output_dir")
    if images != masks:
        found += f" and {len(masks)} masks that do not match them by name"
    raise DemoError(f"{config.data_dir} holds {found}, expected {expected} (made by an earlier run "
                    f"with other settings?); delete {config.data_dir} or choose another --output_dir")


def build_databases(config, folders):
    """Step 2: train-demo.lmdb and test-demo.lmdb; returns the build_lmdb.BuildResult."""
    image_folder, mask_folder = folders
    # Absolute paths, because the test database's metadata is later used to find its source files.
    result = build_lmdb.build_databases(build_lmdb.BuildConfig(
        image_folder=os.path.abspath(image_folder), mask_folder=os.path.abspath(mask_folder),
        output_folder=config.output_dir, dataset_name="demo", train_fraction=0.8, seed=config.seed))
    print("[2] " + build_lmdb.format_summary(result))
    return result


def train(config, databases):
    """Step 3: train_unet.py on two logical CPU towers; returns the path of the exported model.keras."""
    number_classes = len(demo_data.CLASS_NAMES)
    _remove_previous(config.training_dir)
    command = [
        sys.executable, os.path.join(REPO_DIR, "train_unet.py"),
        "--train_database", databases.paths["train"], "--test_database", databases.paths["test"],
        "--output_dir", config.training_dir, "--number_classes", number_classes,
        "--cpu_towers", config.towers, "--base_filters", config.base_filters,
        "--tile_size", config.tile_size, "--batch_size", config.batch_size,
        "--test_every_n_steps", config.steps_per_epoch, "--max_epochs", config.max_epochs,
        "--learning_rate", config.learning_rate, "--lr_schedule", config.lr_schedule,
        "--warmup_steps", config.warmup_steps, "--unet_depth", config.unet_depth,
        "--upsampling", config.upsampling, "--loss", config.loss, "--seed", config.seed,
        "--log_every_n_steps", max(1, config.steps_per_epoch // 2)]
    steps = config.steps_per_epoch * config.max_epochs
    print(f"[3] training a {config.unet_depth}-level UNet ({config.base_filters} base filters, "
          f"{config.upsampling} upsampling, {config.tile_size} px tiles, "
          f"{config.batch_size} per tower x {config.towers} CPU towers) for {steps} steps; "
          f"log: {os.path.join(config.logs_dir, 'train.log')}", flush=True)
    run_logged(command, os.path.join(config.logs_dir, "train.log"), "train_unet.py")
    model_path = os.path.join(config.training_dir, "model.keras")
    if not os.path.exists(model_path):
        raise DemoError(f"train_unet.py finished but did not write {model_path}")
    return model_path


def predict(config, databases, model_path):
    """Step 4: inference.py on the test split's images; returns a TestImage per test image."""
    sources = records.read_metadata(databases.paths["test"])["sources"]
    _remove_previous(config.test_images_dir)
    _remove_previous(config.predictions_dir)
    os.makedirs(config.test_images_dir)
    test_images, seen = [], set()
    for source in sources:
        if source["image"] in seen:  # a tiled database lists an image once per tile
            continue
        seen.add(source["image"])
        name = os.path.basename(source["image"])
        shutil.copy2(source["image"], os.path.join(config.test_images_dir, name))
        prediction = os.path.join(config.predictions_dir, os.path.splitext(name)[0] + ".tif")
        test_images.append(TestImage(source["image"], source["mask"], prediction))
    command = [sys.executable, os.path.join(REPO_DIR, "inference.py"), "--model", model_path,
               "--image_folder", config.test_images_dir, "--output_folder", config.predictions_dir,
               "--gpu", -1] + (["--tta"] if config.tta else [])
    print(f"[4] segmenting the {len(test_images)} test images with inference.py"
          f"{' --tta (8 flips/rotations averaged)' if config.tta else ''}; "
          f"log: {os.path.join(config.logs_dir, 'inference.log')}", flush=True)
    run_logged(command, os.path.join(config.logs_dir, "inference.log"), "inference.py")
    missing = [t.prediction_path for t in test_images if not os.path.exists(t.prediction_path)]
    if missing:
        raise DemoError(f"inference.py did not write {', '.join(missing)}")
    return test_images


def evaluate(test_images, number_classes):
    """Step 5: compare predicted with true masks over all test pixels.

    Returns:
      dict with foreground_dice (any object vs background), pixel_accuracy, dice (per class list),
      iou (per class list), mean_iou, and per_image_foreground_dice (list, one per test image).
    """
    import tifffile

    confusion = np.zeros((number_classes, number_classes), np.int64)
    per_image = []
    for test_image in test_images:
        truth = tifffile.imread(test_image.mask_path)
        predicted = tifffile.imread(test_image.prediction_path)
        if predicted.shape != truth.shape:
            raise DemoError(f"{test_image.prediction_path} is {predicted.shape}, but its true mask "
                            f"{test_image.mask_path} is {truth.shape}")
        confusion += metrics.confusion_matrix(truth, predicted, number_classes)
        per_image.append(foreground_dice(truth, predicted))
    # Foreground = every object class together: the 2 x 2 confusion of background vs the rest.
    foreground = np.array([[confusion[0, 0], confusion[0, 1:].sum()],
                           [confusion[1:, 0].sum(), confusion[1:, 1:].sum()]])
    return {"foreground_dice": float(metrics.per_class_dice(foreground)[1]),
            "pixel_accuracy": metrics.pixel_accuracy(confusion),
            "dice": metrics.per_class_dice(confusion).tolist(),
            "iou": metrics.per_class_iou(confusion).tolist(),
            "mean_iou": metrics.mean_iou(confusion),
            "per_image_foreground_dice": per_image}


def foreground_dice(truth, predicted):
    """Dice of (predicted > 0) vs (truth > 0); 1.0 when both are empty."""
    truth, predicted = truth > 0, predicted > 0
    total = truth.sum() + predicted.sum()
    return float(2 * np.logical_and(truth, predicted).sum() / total) if total else 1.0


def make_figure(config, test_images, evaluation):
    """Step 6: demo_figure.png: image / true mask / predicted mask rows, then loss and metric curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tifffile
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    names = demo_data.CLASS_NAMES
    colors = ListedColormap(["#1b1b1b", "#ff9f1c", "#2ec4b6"][:len(names)])
    shown = list(zip(test_images, evaluation["per_image_foreground_dice"]))[:FIGURE_EXAMPLES]
    rows = len(shown)
    fig = plt.figure(figsize=(12, 3.6 * rows + 4.2))
    grid = fig.add_gridspec(rows + 1, 6, height_ratios=[3.6] * rows + [3.6])
    for row, (test_image, dice) in enumerate(shown):
        image = tifffile.imread(test_image.image_path).astype(np.float32)
        # A 1-99 % stretch: the raw 16-bit range would show a nearly uniform grey.
        low, high = np.percentile(image, [1, 99])
        panels = [(np.clip((image - low) / max(high - low, 1e-6), 0, 1), "gray",
                   f"image {os.path.basename(test_image.image_path)}"),
                  (tifffile.imread(test_image.mask_path), colors, "true mask"),
                  (tifffile.imread(test_image.prediction_path), colors,
                   f"predicted mask (foreground Dice {dice:.3f})")]
        for column, (pixels, cmap, title) in enumerate(panels):
            ax = fig.add_subplot(grid[row, 2 * column:2 * column + 2])
            ax.imshow(pixels, cmap=cmap, vmin=0, vmax=1 if cmap == "gray" else len(names) - 1,
                      interpolation="nearest")
            ax.set_title(title, fontsize=10)
            ax.axis("off")
    fig.legend(handles=[Patch(color=colors(k), label=f"{k} {name}") for k, name in names.items()],
               loc="upper center", ncol=len(names), frameon=False)

    test_rows = _read_csv(os.path.join(config.training_dir, "test_metrics.csv"))
    plots.plot_loss(fig.add_subplot(grid[rows, 0:3]),
                    _read_csv(os.path.join(config.training_dir, "train_loss.csv")), test_rows)
    plots.plot_metrics(fig.add_subplot(grid[rows, 3:6]), test_rows, plots.metric_curves(names))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    fig.savefig(config.figure_path, dpi=80)
    plt.close(fig)
    print(f"[6] wrote {config.figure_path}")
    return config.figure_path


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def run_logged(command, log_path, label):
    """Run ``command``, echoing its output to the console and to ``log_path``; DemoError on failure."""
    command = [str(part) for part in command]
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up banner is noise here
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=env, bufsize=1)
        with process.stdout:
            for line in process.stdout:
                log.write(line)
                if not TF_NATIVE_LOG_LINE.match(line):
                    sys.stdout.write("    " + line)
                    sys.stdout.flush()
        code = process.wait()
    if code != 0:
        raise DemoError(f"{label} exited with code {code}; see {log_path} (command: {' '.join(command)})")


def _remove_previous(path):
    """Delete a folder of an earlier demo run, so its old files cannot mix with the new ones."""
    if os.path.isdir(path):
        shutil.rmtree(path)


def _read_csv(path):
    if not os.path.exists(path):
        raise DemoError(f"{path} is missing: the training run did not write it")
    return plots.read_csv(path)


def best_test_row(training_dir):
    """The test_metrics.csv row with the lowest test loss: the epoch model.keras comes from."""
    path = os.path.join(training_dir, "test_metrics.csv")
    rows = _read_csv(path)
    if not rows:
        raise DemoError(f"{path} holds no test pass")
    return min(rows, key=lambda r: float(r["loss"])), len(rows)


def format_report(config, best, epochs, evaluation, test_count):
    """The final metrics and the location of every output, as printed at the end."""
    names = demo_data.CLASS_NAMES
    lines = [f"Test metrics of the trained model (training/test_metrics.csv, best of {epochs} epoch(s): "
             f"epoch {best['epoch']}, step {best['step']}):",
             f"  loss {float(best['loss']):.4f}  pixel accuracy {float(best['pixel_accuracy']):.4f}  "
             f"mean IoU {float(best['mean_iou']):.4f}",
             "  class          IoU     Dice"]
    for k, name in names.items():
        lines.append(f"  {k} {name:11s} {float(best[f'iou_{k}']):.4f}  {float(best[f'dice_{k}']):.4f}")
    per_class = "  ".join(f"{name} {evaluation['dice'][k]:.3f}" for k, name in names.items())
    lines += [f"Predictions of inference.py on the {test_count} whole test images:",
              f"  foreground Dice {evaluation['foreground_dice']:.4f}  pixel accuracy "
              f"{evaluation['pixel_accuracy']:.4f}  mean IoU {evaluation['mean_iou']:.4f}  "
              f"Dice per class: {per_class}",
              "Outputs:"]
    training = config.training_dir
    outputs = [("synthetic images and masks", config.data_dir),
               ("LMDB databases", os.path.join(config.output_dir, "{train,test}-demo.lmdb")),
               ("training folder", training),
               ("  resolved configuration", os.path.join(training, "config.json")),
               ("  train loss per step", os.path.join(training, "train_loss.csv")),
               ("  test metrics per epoch", os.path.join(training, "test_metrics.csv")),
               ("  loss and metric plots", os.path.join(training, "plots", "{loss,metrics}.png")),
               ("  TensorBoard logs", os.path.join(training, "tensorboard")),
               ("  checkpoints", os.path.join(training, "checkpoints", "{latest,best}")),
               ("  trained model", os.path.join(training, "model.keras")),
               ("test images (inputs)", config.test_images_dir),
               ("predicted masks", config.predictions_dir),
               ("console logs", config.logs_dir),
               ("figure", config.figure_path)]
    lines += [f"  {label:28s} {path}" for label, path in outputs]
    lines.append(f"See the training curves with: tensorboard --logdir {os.path.join(training, 'tensorboard')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def run_demo(config):
    """All the steps in order; returns the final report text. Raises DemoError or build_lmdb.BuildError."""
    timings = {}

    def timed(name, function, *args):
        start = time.perf_counter()
        result = function(*args)
        timings[name] = time.perf_counter() - start
        return result

    folders = timed("data", generate_data, config)
    databases = timed("databases", build_databases, config, folders)
    model_path = timed("training", train, config, databases)
    test_images = timed("inference", predict, config, databases, model_path)
    number_classes = len(demo_data.CLASS_NAMES)
    evaluation = evaluate(test_images, number_classes)
    print(f"[5] scored {len(test_images)} predicted masks against the true masks")
    timed("figure", make_figure, config, test_images, evaluation)
    best, epochs = best_test_row(config.training_dir)
    times = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    return f"Times: {times}\n" + format_report(config, best, epochs, evaluation, len(test_images))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Run the whole tool on a synthetic dataset: generate it, build the LMDBs, train a "
                    "small UNet on two CPU towers, segment the test images and draw a figure "
                    "(under 5 minutes on two CPU cores).")
    parser.add_argument("--output_dir", default="demo_output",
                        help="folder for the demo data and everything built from it (default demo_output)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data, the train/test split and training (default 0)")
    parser.add_argument("--quick", action="store_true",
                        help="8 tiny 64 px images and a few training steps: checks that every step "
                             "runs (well under a minute) without learning much")
    args = parser.parse_args(argv)
    config = DemoConfig.quick(args.output_dir, args.seed) if args.quick else DemoConfig(args.output_dir, args.seed)
    start = time.perf_counter()
    try:
        report = run_demo(config)
    except (DemoError, build_lmdb.BuildError, records.RecordFormatError, OSError) as exc:
        print(f"demo.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo.py: interrupted", file=sys.stderr)
        return 130
    print(f"\nDemo finished in {time.perf_counter() - start:.0f} s.\n{report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
