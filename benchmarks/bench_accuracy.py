"""Test Dice and IoU of a UNet trained on nist_colonies within a fixed CPU budget, against Otsu.

Steps, each through the project's own command-line tools:
  1. build_lmdb.build_databases: 80/20 split of ../shared/data/nist_colonies (seed 0) into a train
     and a test LMDB in a work folder;
  2. `train_unet.py` for exactly --max_epochs x --test_every_n_steps steps (early stopping cannot
     trigger earlier), with the trainer's default recipe; with --seeds N, N models (seeds --seed,
     --seed + 1, ...);
  3. `inference.py` on the test images with the LAST checkpoint of each model (and with --seeds > 1,
     the ensemble of all of them: `--checkpoint_filepath A B C`). The best checkpoint is chosen by
     the test loss, i.e. on these same images, which would flatter the figures;
  4. foreground (class 1) Dice and IoU over all test pixels pooled (one confusion matrix, as the
     trainer's test pass computes them), next to a classical baseline on the same images: Gaussian
     smoothing (--otsu_sigma) and a per-image Otsu threshold, with the polarity (foreground above or
     below the threshold) that scores better over the test set.
The default budget (base_filters 8, batch 8, 256 px tiles, 10 x 100 = 1000 steps, Adam 1e-3, about
100 epochs of the 80 training images) takes about 9 minutes of training on the 2-core development
machine under light load (about 0.5 s per step). The figures of docs/recipe.md come from the shorter
`--tile_size 128 --max_epochs 6 --seeds 3 --tta` (600 steps of 128 px crops, about 4 minutes per
model, 13.5 minutes in all).
Skips (exit 0) when the data is not on this machine.

``--ablation`` measures the training recipe technique by technique instead (issue 15): every row
adds one technique to the row before it (see ``ABLATION``) and trains for the same fixed budget
(``AblationBudget``: fixed steps, one test pass at the end, the last checkpoint), on nist_colonies
(80/20, seed 0) and on the synthetic demo data (demo_data.generate_demo_dataset, 48 images, 80/20,
seed 0); every figure is computed from the masks inference.py writes for the whole test images. It
prints one line per row, a summary and a markdown table (also written to WORK/ablation.md), and with
``--ensemble`` adds a 3-seed ensemble of the last row (``inference.py --checkpoint_filepath A B C``).

``--time_budget 30m`` measures accuracy per minute instead (issue 26): on each data set of
``--datasets`` (nist_colonies by default; also demo, coelho2009_nuclei_dev, drive_vessels_dev), up to
three runs of train_unet.py given the same wall time: the planned run (``--time_budget`` alone: it
self-configures and ends by itself), the README's hand-set recipe (f8, depth 4, 128 px, batch 8,
its length planned by the same ``--time_budget``) and today's defaults (no flags but the databases
and the class count; stopped by SIGTERM when the time is up, as a Slurm time limit would, which
checkpoints the latest weights); ``--budget_runs`` picks them. All are scored from inference.py's
masks of the whole test images (the LAST checkpoint), foreground Dice pooled over the test set. Prints one line per run and a markdown
table (also written to WORK/budget.md).

Run from the repo root: .venv/bin/python benchmarks/bench_accuracy.py [--work_dir DIR] [--ablation]
"""
import argparse
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import build_lmdb  # noqa: E402
import demo_data  # noqa: E402
import image_io  # noqa: E402
import metrics  # noqa: E402
import plan  # noqa: E402
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
    seeds: int = 1  # models trained (seeds seed, seed + 1, ...); more than one adds their ensemble
    tta: bool = False
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


def train(config, train_db, test_db, output_dir, seed):
    """Train the UNet with train_unet.py. Returns (steps trained, wall seconds)."""
    command = [sys.executable, "train_unet.py", "--train_database", train_db, "--test_database", test_db,
               "--output_dir", output_dir, "--base_filters", config.base_filters,
               "--batch_size", config.batch_size, "--tile_size", config.tile_size,
               "--learning_rate", config.learning_rate, "--test_every_n_steps", config.test_every_n_steps,
               "--max_epochs", config.max_epochs, "--early_stopping", config.max_epochs,
               "--reader_count", config.reader_count, "--seed", seed, "--gpus", "none"]
    start = time.perf_counter()
    run_tool([str(c) for c in command], pathlib.Path(output_dir).with_suffix(".log"))
    seconds = time.perf_counter() - start
    with open(pathlib.Path(output_dir) / "checkpoints" / "latest" / "state.json") as f:
        return json.load(f)["step"], seconds


def predict(config, output_dirs, test_images, name):
    """Masks of the test images from inference.py with the LAST checkpoint of each run in
    ``output_dirs`` (several: their ensemble), by file name."""
    import tifffile

    image_folder = pathlib.Path(config.work_dir) / "test_images"
    prediction_folder = pathlib.Path(config.work_dir) / f"predictions-{name}"
    image_folder.mkdir(exist_ok=True)
    for path in test_images:
        link = image_folder / pathlib.Path(path).name
        if not link.exists():
            link.symlink_to(path)
    run_tool([sys.executable, "inference.py", "--checkpoint_filepath",
              *[str(pathlib.Path(d) / "checkpoints" / "latest") for d in output_dirs],
              "--image_folder", str(image_folder), "--output_folder", str(prediction_folder), "--gpu", "-1"]
             + (["--tta"] if config.tta else []),
             pathlib.Path(config.work_dir) / f"inference-{name}.log")
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
    """Build, train --seeds models, predict with each and (several) with their ensemble, score.
    Returns the figures as a dict."""
    import tifffile

    work = pathlib.Path(config.work_dir)
    train_db, test_db, test_images = build_databases(work)
    names = [pathlib.Path(p).name for p in test_images]
    images = [tifffile.imread(DATA / "images" / n) for n in names]
    truths = [tifffile.imread(DATA / "masks" / n) for n in names]
    members, runs = [], []
    for seed in range(config.seed, config.seed + config.seeds):
        output_dir = str(work / f"unet-seed{seed}")
        steps, seconds = train(config, train_db, test_db, output_dir, seed)
        predicted = predict(config, [output_dir], test_images, f"seed{seed}")
        members.append(dict(seed=seed, steps=steps, seconds=seconds,
                            scores=foreground_scores(truths, [predicted[n] for n in names])))
        runs.append(output_dir)
    ensemble = None
    if len(runs) > 1:
        predicted = predict(config, runs, test_images, "ensemble")
        ensemble = foreground_scores(truths, [predicted[n] for n in names])
    otsu = max((foreground_scores(truths, candidate) + (polarity,)
                for candidate, polarity in zip(otsu_predictions(images, config.otsu_sigma), ("bright", "dark"))))
    return {"members": members, "ensemble": ensemble, "otsu": otsu, "test_images": len(names)}


# ----------------------------------------------------------------------------------------------
# The ablation: one technique at a time, same budget, both data sets
# ----------------------------------------------------------------------------------------------

# (row name, train_unet.py flags added to the previous row's, TTA at inference, cumulative).
# A row that is not cumulative is an alternative to the row before it: its flags are not carried on.
ABLATION = [
    ("baseline: CE, Adam 1e-3 constant", ["--loss", "ce"], False, True),
    ("+ CE + Dice loss", ["--loss", "ce+dice"], False, True),
    ("+ poly LR decay, 10 % warm-up", ["--lr_schedule", "poly", "--warmup_steps", "{warmup}"], False, True),
    ("+ elastic 0.04 (3 x 3 grid)", ["--elastic_augmentation_severity", "0.04",
                                     "--elastic_augmentation_grid_points", "3"], False, True),
    ("+ gamma 0.5 + contrast 0.25", ["--gamma_augmentation_severity", "0.5",
                                     "--contrast_augmentation_severity", "0.25"], False, True),
    ("+ foreground crops 0.33", ["--foreground_crop_fraction", "0.33"], False, True),
    ("+ TTA (8 flips/rotations)", [], True, True),
    ("  alt: UNet depth 3 + bilinear", ["--unet_depth", "3", "--upsampling", "bilinear"], True, False),
]


@dataclasses.dataclass
class AblationBudget:
    """The fixed training budget of every ablation row (the same for every row of a data set)."""
    base_filters: int = 8
    batch_size: int = 8
    tile_size: int = 128
    learning_rate: float = 1e-3
    nist_steps: int = 300
    demo_steps: int = 200
    seed: int = 0


def demo_databases(work_dir):
    """The demo data (48 images of 256 px, seed 0) as 80/20 LMDBs. Returns (train, test, test images)."""
    data = pathlib.Path(work_dir) / "demo_data"
    if not (data / "images").is_dir():
        demo_data.generate_demo_dataset(str(data), num_images=48, size=256, seed=0)
    result = build_lmdb.build_databases(build_lmdb.BuildConfig(
        image_folder=str(data / "images"), mask_folder=str(data / "masks"), output_folder=str(work_dir),
        dataset_name="demo", train_fraction=0.8, seed=0), show_progress=False)
    sources = records.read_metadata(result.paths["test"])["sources"]
    return result.paths["train"], result.paths["test"], [s["image"] for s in sources]


def ablation_flags(rows, budget, steps):
    """The train_unet.py flags of each row: the budget, plus the techniques accumulated so far."""
    common = ["--base_filters", budget.base_filters, "--batch_size", budget.batch_size, "--tile_size",
              budget.tile_size, "--learning_rate", budget.learning_rate, "--max_steps", steps,
              "--test_every_n_steps", steps, "--early_stopping", 1000, "--seed", budget.seed, "--gpus", "none",
              "--log_every_n_steps", 50, "--reader_count", 1,
              # Today's defaults for what the rows switch on, so each row differs by its technique only.
              "--optimizer", "adam", "--lr_schedule", "constant", "--warmup_steps", 0,
              "--foreground_crop_fraction", 0, "--unet_depth", 4, "--upsampling", "transpose",
              "--elastic_augmentation_severity", 0, "--gamma_augmentation_severity", 0,
              "--contrast_augmentation_severity", 0]
    accumulated, result = [], []
    for _, flags, _, cumulative in rows:
        flags = [str(f).format(warmup=max(1, steps // 10)) for f in flags]
        result.append([str(c) for c in common + accumulated + flags])
        if cumulative:
            accumulated = accumulated + flags
    return result


def score(truths, predictions, number_classes):
    """Figures of predicted vs true masks: pooled foreground Dice (every object class vs background),
    per-class Dice, mean IoU over classes pooled over all pixels and averaged over images."""
    confusions = [metrics.confusion_matrix(t, p, number_classes) for t, p in zip(truths, predictions)]
    pooled = sum(confusions)
    foreground = np.array([[pooled[0, 0], pooled[0, 1:].sum()], [pooled[1:, 0].sum(), pooled[1:, 1:].sum()]])
    return {"foreground_dice": float(metrics.per_class_dice(foreground)[1]),
            "dice": [float(d) for d in metrics.per_class_dice(pooled)],
            "mean_iou_pooled": float(metrics.mean_iou(pooled)),
            "mean_iou_per_image": float(np.mean([metrics.mean_iou(c) for c in confusions]))}


def segment(work, checkpoints, test_images, name, tta):
    """inference.py's masks of the test images (by file name) and the seconds it took."""
    import tifffile

    image_folder = work / "test_images"
    image_folder.mkdir(exist_ok=True)
    for path in test_images:
        link = image_folder / pathlib.Path(path).name
        if not link.exists():
            link.symlink_to(path)
    output = work / f"predictions-{name}"
    command = [sys.executable, "inference.py", "--checkpoint_filepath", *map(str, checkpoints),
               "--image_folder", str(image_folder), "--output_folder", str(output), "--gpu", "-1"]
    start = time.perf_counter()
    run_tool(command + (["--tta"] if tta else []), work / f"inference-{name}.log")
    seconds = time.perf_counter() - start
    return {pathlib.Path(p).name: tifffile.imread(output / (pathlib.Path(p).stem + ".tif")) for p in test_images}, seconds


def run_dataset(label, work, databases, number_classes, budget, steps):
    """Every ablation row on one data set. Returns a list of result dicts, one per row."""
    import tifffile

    train_db, test_db, test_images = databases
    names = [pathlib.Path(p).name for p in test_images]
    masks = {pathlib.Path(s["image"]).name: s["mask"] for s in records.read_metadata(test_db)["sources"]}
    truths = [tifffile.imread(masks[n]) for n in names]
    results, previous = [], None
    for index, ((row, flags, tta, _), command_flags) in enumerate(zip(ABLATION, ablation_flags(ABLATION, budget, steps))):
        output_dir = work / f"row{index}"
        train_seconds = 0.0
        if flags or previous is None:  # a TTA-only row reuses the previous row's model
            command = [sys.executable, "train_unet.py", "--train_database", train_db, "--test_database", test_db,
                       "--output_dir", str(output_dir), "--number_classes", number_classes, *command_flags]
            start = time.perf_counter()
            run_tool([str(c) for c in command], work / f"train-row{index}.log")
            train_seconds = time.perf_counter() - start
            previous = output_dir
        predicted, inference_seconds = segment(work, [previous / "checkpoints" / "latest"], test_images,
                                               f"row{index}", tta)
        figures = score(truths, [predicted[n] for n in names], number_classes)
        result = dict(figures, data=label, row=row, train_s=train_seconds, inference_s=inference_seconds,
                      steps=steps, model_dir=str(previous), command=command_flags)
        results.append(result)
        print(format_row(result), flush=True)
    return results


def run_ensemble(label, work, databases, number_classes, results, steps):
    """Two more seeds of the last cumulative row, and the 3-model ensemble (``inference.py
    --checkpoint_filepath A B C``) against its members. Returns the ensemble's result dict."""
    import tifffile

    train_db, test_db, test_images = databases
    names = [pathlib.Path(p).name for p in test_images]
    masks = {pathlib.Path(s["image"]).name: s["mask"] for s in records.read_metadata(test_db)["sources"]}
    truths = [tifffile.imread(masks[n]) for n in names]
    final = next(r for r in reversed(results) if not r["row"].startswith("  alt"))
    final_index = results.index(final)
    members = [pathlib.Path(final["model_dir"])]
    train_seconds = 0.0
    for seed in (1, 2):
        output_dir = work / f"seed{seed}"
        command_flags = list(final["command"])
        command_flags[command_flags.index("--seed") + 1] = str(seed)
        command = [sys.executable, "train_unet.py", "--train_database", train_db, "--test_database", test_db,
                   "--output_dir", str(output_dir), "--number_classes", number_classes, *command_flags]
        start = time.perf_counter()
        run_tool([str(c) for c in command], work / f"train-seed{seed}.log")
        train_seconds += time.perf_counter() - start
        members.append(output_dir)
    tta = ABLATION[final_index][2]
    member_scores = []
    for k, member in enumerate(members[1:], 1):
        predicted, _ = segment(work, [member / "checkpoints" / "latest"], test_images, f"seed{k}", tta)
        member_scores.append(score(truths, [predicted[n] for n in names], number_classes))
    predicted, inference_seconds = segment(work, [m / "checkpoints" / "latest" for m in members], test_images,
                                           "ensemble", tta)
    figures = score(truths, [predicted[n] for n in names], number_classes)
    members_dice = [final["foreground_dice"]] + [m["foreground_dice"] for m in member_scores]
    result = dict(figures, data=label, row="  ensemble of 3 seeds of the last row", train_s=train_seconds,
                  inference_s=inference_seconds, steps=steps, members_foreground_dice=members_dice,
                  model_dir=None, command=None)
    print(format_row(result) + "  members " + " ".join(f"{d:.4f}" for d in members_dice), flush=True)
    return result


def format_row(r):
    per_class = " ".join(f"{d:.4f}" for d in r["dice"][1:])
    return (f"{r['data']:5s} {r['row']:36s} fg Dice {r['foreground_dice']:.4f}  class Dice {per_class}  "
            f"mIoU pooled {r['mean_iou_pooled']:.4f} per image {r['mean_iou_per_image']:.4f}  "
            f"train {r['train_s']:.0f} s  inference {r['inference_s']:.0f} s")


def markdown_table(results, budget):
    """The ablation as a Markdown table (docs/recipe.md): one line per row, nist and demo figures side by side."""
    rows = {}
    for r in results:
        rows.setdefault(r["row"], {})[r["data"]] = r
    lines = ["| row | nist fg Dice | nist mIoU per image / pooled | nist train / infer s | demo fg Dice | "
             "demo Dice colony / cell (mean) | demo mIoU per image / pooled | demo train / infer s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row, by_data in rows.items():
        cells = [row.strip()]
        for data in ("nist", "demo"):
            r = by_data.get(data)
            if r is None:
                cells += ["-"] * (3 if data == "nist" else 4)
                continue
            cells.append(f"{r['foreground_dice']:.4f}")
            if data == "demo":
                first, second = r["dice"][1], r["dice"][2]
                cells.append(f"{first:.3f} / {second:.3f} ({(first + second) / 2:.3f})")
            cells.append(f"{r['mean_iou_per_image']:.4f} / {r['mean_iou_pooled']:.4f}")
            cells.append(f"{r['train_s']:.0f} / {r['inference_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Budget per row: UNet base_filters {budget.base_filters}, batch {budget.batch_size}, "
                 f"{budget.tile_size} px crops, peak learning rate {budget.learning_rate:g}, "
                 f"{budget.nist_steps} steps on nist_colonies, {budget.demo_steps} on the demo data, one CPU "
                 "device (2 cores), last checkpoint; a TTA row reuses the row above's model (train 0 s).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Accuracy per minute: planned defaults (--time_budget) vs today's defaults at the same wall time
# ----------------------------------------------------------------------------------------------

SHARED = ROOT.parent / "shared" / "data"
BUDGET_DATASETS = ("nist", "demo", "coelho", "drive")


def shared_databases(work_dir, folder, name):
    """A ../shared/data set (images/ + masks/) as 80/20 LMDBs (seed 0). Returns (train, test, test
    images, number of classes)."""
    result = build_lmdb.build_databases(build_lmdb.BuildConfig(
        image_folder=str(SHARED / folder / "images"), mask_folder=str(SHARED / folder / "masks"),
        output_folder=str(work_dir), dataset_name=name, train_fraction=0.8, seed=0), show_progress=False)
    train_metadata = records.read_metadata(result.paths["train"])
    sources = records.read_metadata(result.paths["test"])["sources"]
    return result.paths["train"], result.paths["test"], [s["image"] for s in sources], \
        max(2, train_metadata["number_classes"])


def budget_databases(label, work):
    """(train, test, test images, classes) of a --datasets name."""
    if label == "demo":
        return (*demo_databases(work), 3)
    folder = {"nist": "nist_colonies", "coelho": "coelho2009_nuclei_dev", "drive": "drive_vessels_dev"}[label]
    return shared_databases(work, folder, label)


def run_for(command, log_path, seconds):
    """Run a project CLI for at most ``seconds`` of wall time, then SIGTERM it (it checkpoints and
    exits 143, as under a Slurm time limit). Returns (exit code, wall seconds)."""
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=environment)
        try:
            code = process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            code = process.wait()
    if code not in (0, 143):
        tail = "".join(open(log_path).readlines()[-25:])
        raise SystemExit(f"{' '.join(map(str, command))} exited with {code}; end of {log_path}:\n{tail}")
    return code, time.perf_counter() - start


def budget_runs(budget_text):
    """The runs --time_budget compares: name -> (row label, train_unet.py flags besides the data)."""
    recipe = ["--base_filters", "8", "--tile_size", "128", "--batch_size", "8"]
    return {
        "planned": (f"--time_budget {budget_text}", ["--time_budget", budget_text]),
        # The recipe at each UNet depth (the depth rule of docs/planning.md was chosen from these).
        **{f"depth{depth}": (f"recipe, depth {depth}", ["--time_budget", budget_text, "--unet_depth", str(depth),
                                                         *recipe]) for depth in (2, 3, 4, 5)},
        # The README's documented recipe (UNet f8, depth 4, 128 px crops, batch 8), hand-set: explicit
        # flags win over self-configuration, so the budget only plans its run length.
        "recipe": ("hand-set recipe", ["--time_budget", budget_text, "--base_filters", "8", "--unet_depth", "4",
                                       "--tile_size", "128", "--batch_size", "8"]),
        "defaults": ("today's defaults", []),
        # The thin-structure candidate of issue 26: the recipe plus skeleton recall.
        "skeleton": ("recipe + skeleton recall", ["--time_budget", budget_text, "--base_filters", "8",
                                                  "--unet_depth", "4", "--tile_size", "128", "--batch_size", "8",
                                                  "--loss", "ce+dice+skeleton"]),
        # The residual-encoder candidate of issue 26 (nnU-Net's ResEnc block), otherwise self-configured
        # like "planned", so the pair tells whether it should be the default.
        "resenc": ("--time_budget + residual encoder", ["--time_budget", budget_text, "--encoder", "residual"]),
    }


def run_budget(work_dir, budget_text, datasets, runs=("planned", "recipe", "defaults")):
    """The runs on every data set, in order; the first one's wall time is the others'. Returns
    (results, markdown table)."""
    budget_s = plan.parse_duration(budget_text)
    work = pathlib.Path(work_dir)
    results = []
    for label in datasets:
        (work / label).mkdir(parents=True, exist_ok=True)
        train_db, test_db, test_images, classes = budget_databases(label, work / label)
        names = [pathlib.Path(p).name for p in test_images]
        masks = {pathlib.Path(s["image"]).name: s["mask"] for s in records.read_metadata(test_db)["sources"]}
        truths = [image_io.read_array(masks[n], "mask") for n in names]
        common = [sys.executable, "train_unet.py", "--train_database", train_db, "--test_database", test_db,
                  "--number_classes", classes, "--gpus", "none"]
        # The first run (planned by default) ends by itself (its budget counts from the trainer's
        # start, so the process gets a minute more for Python and TensorFlow to start); the other
        # runs then get exactly the wall time it took (those with a budget plan their own length).
        wall = budget_s + 60
        for run_name in runs:
            row, flags = budget_runs(budget_text)[run_name]
            output_dir = work / label / run_name
            code, seconds = run_for([str(c) for c in common + ["--output_dir", output_dir] + flags],
                                    work / label / f"train-{output_dir.name}.log", wall)
            wall = seconds
            config = json.loads((output_dir / "config.json").read_text())
            with open(output_dir / "checkpoints" / "latest" / "state.json") as f:
                steps = json.load(f)["step"]
            predicted, inference_s = segment(work / label, [output_dir / "checkpoints" / "latest"], test_images,
                                             output_dir.name, False)
            figures = score(truths, [predicted[n] for n in names], classes)
            result = dict(figures, data=label, row=row, train_s=seconds, exit_code=code, steps=steps,
                          inference_s=inference_s, tile_size=config["tile_size"], batch_size=config["batch_size"],
                          base_filters=config["base_filters"], unet_depth=config["unet_depth"])
            results.append(result)
            print(format_budget_row(result), flush=True)
    table = budget_table(results, budget_text)
    with open(work / "budget.json", "w") as f:
        json.dump(results, f, indent=2)
    with open(work / "budget.md", "w") as f:
        f.write(table + "\n")
    return results, table


def format_budget_row(r):
    return (f"{r['data']:6s} {r['row']:22s} fg Dice {r['foreground_dice']:.3f}  mean IoU {r['mean_iou_pooled']:.3f}  "
            f"{r['steps']} steps in {r['train_s']:.0f} s (exit {r['exit_code']})  f{r['base_filters']} "
            f"depth {r['unet_depth']} {r['tile_size']} px batch {r['batch_size']}")


def budget_table(results, budget_text):
    lines = [f"Same wall time per run (the --time_budget {budget_text} run's, process start to exit; today's "
             "defaults stopped by SIGTERM when it is up), "
             f"load avg {os.getloadavg()[0]:.1f}:", "",
             "| data | run | fg Dice | mean IoU | steps | train s | base filters | depth | tile | batch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['data']} | {r['row']} | {r['foreground_dice']:.3f} | {r['mean_iou_pooled']:.3f} | "
                     f"{r['steps']} | {r['train_s']:.0f} | {r['base_filters']} | {r['unet_depth']} | "
                     f"{r['tile_size']} | {r['batch_size']} |")
    return "\n".join(lines)


def run_ablation(work_dir, budget, ensemble, datasets=("nist", "demo")):
    """Both data sets, every row. Returns (results, markdown table)."""
    work = pathlib.Path(work_dir)
    results = []
    start = time.perf_counter()
    if "nist" in datasets:
        (work / "nist").mkdir(parents=True, exist_ok=True)
        nist = build_databases(work / "nist")
        results += run_dataset("nist", work / "nist", nist, 2, budget, budget.nist_steps)
    if "demo" in datasets:
        (work / "demo").mkdir(parents=True, exist_ok=True)
        results += run_dataset("demo", work / "demo", demo_databases(work / "demo"), 3, budget,
                               budget.demo_steps)
    if ensemble and "nist" in datasets:  # last: the ablation's table is complete without it
        nist_rows = [r for r in results if r["data"] == "nist"]
        results.append(run_ensemble("nist", work / "nist", nist, 2, nist_rows, budget.nist_steps))
    table = markdown_table(results, budget)
    with open(work / "ablation.json", "w") as f:
        json.dump(results, f, indent=2)
    with open(work / "ablation.md", "w") as f:
        f.write(table + "\n")
    print(f"\nablation summary ({time.perf_counter() - start:.0f} s wall, load avg {os.getloadavg()[0]:.1f}):")
    for r in results:
        print("  " + format_row(r))
    print("\n" + table)
    return results, table


def main(argv=None):
    defaults = AccuracyConfig(work_dir="")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default=None, help="keep the databases, run and predictions here "
                        "(default: a temporary folder, deleted afterwards)")
    for name in ("base_filters", "batch_size", "tile_size", "test_every_n_steps", "max_epochs",
                 "reader_count", "seed", "seeds"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name),
                            help=f"default {getattr(defaults, name)}")
    parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate,
                        help=f"default {defaults.learning_rate}")
    parser.add_argument("--tta", action="store_true", help="predict with inference.py --tta")
    parser.add_argument("--otsu_sigma", type=float, default=defaults.otsu_sigma,
                        help=f"Gaussian sigma in pixels before Otsu (default {defaults.otsu_sigma})")
    budget = AblationBudget()
    parser.add_argument("--ablation", action="store_true", help="the technique-by-technique ablation "
                        "(on nist_colonies and the demo data) instead of one run")
    parser.add_argument("--ensemble", action="store_true", help="with --ablation: also a 3-seed ensemble of "
                        "the last row on nist_colonies")
    parser.add_argument("--nist_steps", type=int, default=budget.nist_steps,
                        help=f"with --ablation: steps per row on nist_colonies (default {budget.nist_steps})")
    parser.add_argument("--demo_steps", type=int, default=budget.demo_steps,
                        help=f"with --ablation: steps per row on the demo data (default {budget.demo_steps})")
    parser.add_argument("--time_budget", default=None, help="accuracy per minute: today's defaults vs the "
                        "planned run (train_unet.py --time_budget) at this wall time each, e.g. 30m")
    parser.add_argument("--datasets", nargs="+", default=["nist"], choices=BUDGET_DATASETS,
                        help="with --time_budget: the data sets (default nist)")
    parser.add_argument("--budget_runs", nargs="+", default=["planned", "recipe", "defaults"],
                        choices=list(budget_runs("1m")),
                        help="with --time_budget: the runs to compare, in this order (default planned recipe "
                        "defaults; the first sets the wall time of the others; skeleton = the recipe with "
                        "--loss ce+dice+skeleton; depthN = the recipe at --unet_depth N; resenc = the planned "
                        "run with --encoder residual)")
    args = parser.parse_args(argv)
    if args.time_budget is not None:
        try:
            plan.parse_duration(args.time_budget)
        except ValueError as error:
            parser.error(str(error))
    if not (DATA / "images").is_dir() or not (DATA / "masks").is_dir():
        print(f"accuracy: skipped, the nist_colonies data is not at {DATA} (it ships only with the "
              "development machines)")
        return
    if args.time_budget is not None:
        with tempfile.TemporaryDirectory(prefix="bench_budget-") as tmp:
            work_dir = args.work_dir or tmp
            os.makedirs(work_dir, exist_ok=True)
            runs = list(dict.fromkeys(args.budget_runs))
            _, table = run_budget(work_dir, args.time_budget, args.datasets, runs)
        print("\n" + table)
        return
    if args.ablation:
        budget = AblationBudget(nist_steps=args.nist_steps, demo_steps=args.demo_steps)
        with tempfile.TemporaryDirectory(prefix="bench_ablation-") as tmp:
            work_dir = args.work_dir or tmp
            os.makedirs(work_dir, exist_ok=True)
            run_ablation(work_dir, budget, args.ensemble)
        return
    values = {k: v for k, v in vars(args).items()
              if k not in ("work_dir", "ablation", "ensemble", "nist_steps", "demo_steps", "time_budget", "datasets",
                          "budget_runs")}
    with tempfile.TemporaryDirectory(prefix="bench_accuracy-") as tmp:
        work_dir = args.work_dir or tmp
        os.makedirs(work_dir, exist_ok=True)
        config = AccuracyConfig(work_dir=work_dir, **values)
        result = run(config)
    otsu_dice, otsu_iou, polarity = result["otsu"]
    members = result["members"]
    dice = [m["scores"][0] for m in members]
    figures = " ".join(f"{d:.3f}" for d in dice)
    if len(members) == 1:
        unet = f"UNet dice {dice[0]:.3f} iou {members[0]['scores'][1]:.3f}"
    else:
        ensemble_dice, ensemble_iou = result["ensemble"]
        unet = (f"UNet dice per seed {figures} (mean {np.mean(dice):.3f}, best {max(dice):.3f}), "
                f"{len(members)}-model ensemble dice {ensemble_dice:.3f} iou {ensemble_iou:.3f}")
    seconds = " ".join(f"{m['seconds']:.0f}" for m in members)
    print(f"accuracy: {unet} vs Otsu dice {otsu_dice:.3f} iou {otsu_iou:.3f} ({result['test_images']} test "
          f"images, {members[0]['steps']} steps in {seconds} s CPU wall per model) [unet f{config.base_filters}, "
          f"{config.tile_size} px, batch {config.batch_size}, peak lr {config.learning_rate:g}, the trainer's "
          f"default recipe, last checkpoint{', TTA' if config.tta else ''}; Otsu sigma {config.otsu_sigma:g}, "
          f"{polarity} foreground; load avg {os.getloadavg()[0]:.1f}]")


if __name__ == "__main__":
    main()
