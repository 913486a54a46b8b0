"""Label efficiency (issue 23): how good is a model trained from partial annotations?

For each data set the images are split 80/20 (build_lmdb.py, seed 0); every row trains the
trainer's default recipe at one fixed budget (``LabelBudget``: fixed steps, one test pass at the
end, the last checkpoint) and is scored on the masks ``inference.py`` writes for the same DENSE test
images (foreground Dice and IoU over all test pixels pooled, every object class against background):

  dense        every pixel of every training image annotated;
  sparse S%    simulated partial annotations of every training image, about S % of its pixels
               annotated (``simulate_sparse``: a random part of its objects, each traced with a
               RING-pixel band of background around it, plus brush strokes of background away from
               objects), built with build_lmdb.py --unlabelled_value 255; half the annotated
               pixels go to objects (--annotation objects, the default) or, with --annotation
               area, the image's own foreground share (row "sparse S% area": a user who paints
               background as generously as it covers the image);
  few S%       dense masks of a random subset of the training images holding as many annotated
               pixels as the sparse S% row: the alternative a user with the same labelling time has.

Data sets: nist_colonies and coelho2009_nuclei_dev from ../shared/data (skipped when absent) and the
synthetic demo data (demo_data.py). One line of figures per row, then a markdown table (also written
to WORK/labels.md).

Run from the repo root:
    python benchmarks/bench_labels.py [--datasets nist coelho demo] [--shares 30 10 3] [--steps N]
        [--rows dense sparse few] [--annotation objects area] [--seed S] [--work_dir DIR]
"""
import argparse
import dataclasses
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

import build_lmdb  # noqa: E402
import demo_data  # noqa: E402
import records  # noqa: E402
from bench_accuracy import run_tool, score, segment  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SOURCES = {"nist": SHARED / "nist_colonies", "coelho": SHARED / "coelho2009_nuclei_dev"}
UNLABELLED = 255
RING = 2  # px of background traced around a kept object
STROKE_RADIUS = 2  # brush radius of a background stroke (a 5 px wide brush)
STROKE_CLEARANCE = 3  # px a background stroke keeps from any object (a user paints clear background)


@dataclasses.dataclass
class LabelBudget:
    """One fixed budget for every row (the trainer's defaults for everything else)."""
    base_filters: int = 8
    batch_size: int = 8
    tile_size: int = 128
    steps: int = 150
    learning_rate: float = 1e-3
    seed: int = 0


# ----------------------------------------------------------------------------- simulated annotations

def _disk(radius):
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return yy ** 2 + xx ** 2 <= radius ** 2


def simulate_sparse(truth, share, rng, object_share=0.5):
    """A partial annotation of the dense mask ``truth`` with about ``share`` of its pixels annotated.

    ``object_share`` of the target (half by default; "area": the foreground share of ``truth``)
    goes to objects: whole objects (connected foreground components, each traced with
    a RING-pixel band of background) in random order while they fit, then, for objects too large
    to keep whole, brush strokes inside them (STROKE_CLEARANCE px from their edges). The other half
    goes to brush strokes of background, STROKE_CLEARANCE px clear of every object: how a user
    annotates in napari or Fiji. Returns the mask with UNLABELLED elsewhere (uint8).
    """
    target = share * truth.size
    if object_share == "area":
        object_share = float(np.mean(truth > 0))
    annotated = np.zeros(truth.shape, bool)
    objects, count = ndimage.label(truth > 0)
    ring = _disk(RING)
    boxes = ndimage.find_objects(objects)
    for index in rng.permutation(count):
        lo = [max(0, s.start - RING) for s in boxes[index]]
        hi = [min(n, s.stop + RING) for s, n in zip(boxes[index], truth.shape)]
        window = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))
        traced = ndimage.binary_dilation(objects[window] == index + 1, structure=ring)
        if annotated.sum() + traced.sum() <= target * object_share:
            annotated[window] |= traced
    if count:
        inside = ndimage.binary_erosion(truth > 0, structure=_disk(STROKE_CLEARANCE))
        _strokes(annotated, inside, target * object_share, rng)
        clear = ~ndimage.binary_dilation(truth > 0, structure=_disk(STROKE_CLEARANCE))
    else:
        clear = np.ones(truth.shape, bool)
    _strokes(annotated, clear, target, rng)
    return np.where(annotated, truth, UNLABELLED).astype(np.uint8)


def _strokes(annotated, allowed, until, rng, tries=2000):
    """Paint random brush strokes (segments of 10-40 % of the shorter side) on ``allowed`` pixels of
    ``annotated`` until it holds ``until`` pixels (or ``tries`` strokes); at least one stroke."""
    height, width = annotated.shape
    candidates = np.flatnonzero(allowed)
    brush = _disk(STROKE_RADIUS)
    total = int(annotated.sum())
    for attempt in range(tries):
        if candidates.size == 0 or (attempt and total >= until):
            return
        y, x = divmod(int(candidates[rng.integers(candidates.size)]), width)
        length = rng.uniform(0.1, 0.4) * min(height, width)
        angle = rng.uniform(0, np.pi)
        steps = np.linspace(-0.5, 0.5, max(2, int(length)))
        ys = np.clip(np.rint(y + steps * length * np.sin(angle)).astype(int), 0, height - 1)
        xs = np.clip(np.rint(x + steps * length * np.cos(angle)).astype(int), 0, width - 1)
        # Only the stroke's bounding box is dilated: whole-image morphology per stroke is slow on
        # megapixel images.
        y0, y1 = max(0, ys.min() - STROKE_RADIUS), min(height, ys.max() + STROKE_RADIUS + 1)
        x0, x1 = max(0, xs.min() - STROKE_RADIUS), min(width, xs.max() + STROKE_RADIUS + 1)
        line = np.zeros((y1 - y0, x1 - x0), bool)
        line[ys - y0, xs - x0] = True
        window = annotated[y0:y1, x0:x1]
        before = int(window.sum())
        window |= ndimage.binary_dilation(line, structure=brush) & allowed[y0:y1, x0:x1]
        total += int(window.sum()) - before


# ----------------------------------------------------------------------------- data

def _link(folder, paths):
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        target = folder / pathlib.Path(path).name
        if not target.exists():
            target.symlink_to(path)


def dense_split(label, work):
    """The 80/20 dense databases of one data set: (train path, test path, train sources, test image
    paths, number of classes)."""
    if label == "demo":
        source = work / "demo_data"
        if not (source / "images").is_dir():
            demo_data.generate_demo_dataset(str(source), num_images=48, size=256, seed=0)
    else:
        source = SOURCES[label]
    result = build_lmdb.build_databases(build_lmdb.BuildConfig(
        image_folder=str(source / "images"), mask_folder=str(source / "masks"), output_folder=str(work / "db"),
        dataset_name="dense", train_fraction=0.8, seed=0), show_progress=False)
    train_sources = records.read_metadata(result.paths["train"])["sources"]
    test_images = [s["image"] for s in records.read_metadata(result.paths["test"])["sources"]]
    return (result.paths["train"], result.paths["test"], train_sources, test_images,
            result.metadata["train"]["dataset_number_classes"])


def sparse_database(work, name, train_sources, share, seed, object_share=0.5):
    """Simulated partial annotations of every training image, as a train database. Returns (path,
    annotated pixels, images)."""
    import tifffile

    folder = work / name
    _link(folder / "images", [s["image"] for s in train_sources])
    (folder / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for source in train_sources:
        truth = build_lmdb.to_label_mask(build_lmdb._read(source["mask"], "mask"), source["mask"])[0]
        tifffile.imwrite(folder / "masks" / (pathlib.Path(source["image"]).stem + ".tif"),
                         simulate_sparse(truth, share, rng, object_share))
    result = build_lmdb.build_databases(build_lmdb.BuildConfig(
        image_folder=str(folder / "images"), mask_folder=str(folder / "masks"), output_folder=str(work / "db"),
        dataset_name=name, train_fraction=1.0, unlabelled_value=UNLABELLED), show_progress=False)
    return result.paths["train"], result.metadata["train"]["annotated_pixels"], len(train_sources)


def few_database(work, name, train_sources, annotated_pixels, seed):
    """Dense masks of random training images holding the nearest possible number of pixels to
    ``annotated_pixels`` (at least one image). Returns (path, annotated pixels, images)."""
    order = np.random.default_rng(seed).permutation(len(train_sources))
    chosen, pixels = [], 0
    for index in order:
        size = build_lmdb._read(train_sources[index]["mask"], "mask").size
        if chosen and pixels + size / 2 > annotated_pixels:
            break
        chosen.append(train_sources[index])
        pixels += size
    folder = work / name
    _link(folder / "images", [s["image"] for s in chosen])
    _link(folder / "masks", [s["mask"] for s in chosen])
    result = build_lmdb.build_databases(build_lmdb.BuildConfig(
        image_folder=str(folder / "images"), mask_folder=str(folder / "masks"), output_folder=str(work / "db"),
        dataset_name=name, train_fraction=1.0), show_progress=False)
    return result.paths["train"], result.metadata["train"]["annotated_pixels"], len(chosen)


# ----------------------------------------------------------------------------- training and scoring

def train(work, name, train_db, test_db, number_classes, budget):
    """train_unet.py at the budget (default recipe otherwise). Returns (checkpoint, seconds)."""
    output_dir = work / f"run-{name}"
    command = ["train_unet.py", "--train_database", train_db, "--test_database", test_db,
               "--output_dir", output_dir, "--number_classes", number_classes,
               "--base_filters", budget.base_filters, "--batch_size", budget.batch_size,
               "--tile_size", budget.tile_size, "--learning_rate", budget.learning_rate,
               "--max_steps", budget.steps, "--test_every_n_steps", budget.steps, "--early_stopping", 1000,
               "--log_every_n_steps", 50, "--reader_count", 1, "--seed", budget.seed, "--gpus", "none"]
    start = time.perf_counter()
    run_tool([sys.executable] + [str(c) for c in command], work / f"train-{name}.log")
    return output_dir / "checkpoints" / "latest", time.perf_counter() - start


def run_dataset(label, work, shares, budget, kinds=("dense", "sparse", "few"), annotations=("objects",)):
    """The rows of ``kinds`` on one data set (sparse once per annotation style). Returns a list of
    result dicts."""
    work.mkdir(parents=True, exist_ok=True)
    train_db, test_db, train_sources, test_images, number_classes = dense_split(label, work)
    masks = {pathlib.Path(s["image"]).name: s["mask"] for s in records.read_metadata(test_db)["sources"]}
    names = [pathlib.Path(p).name for p in test_images]
    truths = [build_lmdb.to_label_mask(build_lmdb._read(masks[n], "mask"), masks[n])[0] for n in names]
    dense_pixels = records.read_metadata(train_db)["annotated_pixels"]
    rows = [("dense", None, lambda: (train_db, dense_pixels, len(train_sources)))] if "dense" in kinds else []
    for share in shares:
        for style in annotations if "sparse" in kinds or "few" in kinds else ():
            suffix = "" if style == "objects" else f" {style}"
            rows.append((f"sparse {share:g}%{suffix}", share,
                         lambda share=share, style=style: sparse_database(
                             work, f"sparse{share:g}{suffix.strip()}", train_sources, share / 100, budget.seed,
                             0.5 if style == "objects" else style)))
        if "few" in kinds:
            rows.append((f"few {share:g}%", share, None))
    results, sparse_pixels = [], {}
    for row, share, make in rows:
        key = row.replace(" ", "").replace("%", "")
        if make is None:  # "few": as many annotated pixels as the sparse row of the same share
            database, annotated, images = few_database(work, key, train_sources, sparse_pixels[share], budget.seed)
        else:
            database, annotated, images = make()
            sparse_pixels.setdefault(share, annotated)
            if row.startswith("sparse") and "sparse" not in kinds:
                continue  # built only for the pixel count of "few"
        checkpoint, seconds = train(work, key, database, test_db, number_classes, budget)
        predicted, inference_seconds = segment(work, [checkpoint], test_images, key, False)
        figures = score(truths, [predicted[n] for n in names], number_classes)
        result = dict(data=label, row=row, annotated=annotated, share=annotated / dense_pixels, images=images,
                      foreground_dice=figures["foreground_dice"], mean_iou=figures["mean_iou_pooled"],
                      train_s=seconds, inference_s=inference_seconds, load=os.getloadavg()[0])
        results.append(result)
        print(format_row(result), flush=True)
    return results


def format_row(r):
    return (f"labels: {r['data']:6s} {r['row']:16s} {r['share'] * 100:5.1f}% of train pixels annotated "
            f"({r['annotated']:,} px on {r['images']} images)  foreground Dice {r['foreground_dice']:.3f}  "
            f"mean IoU {r['mean_iou']:.3f}  train {r['train_s']:.0f} s  inference {r['inference_s']:.0f} s  "
            f"load {r['load']:.1f}")


def markdown_table(results, budget):
    lines = [f"UNet f{budget.base_filters}, batch {budget.batch_size}, {budget.tile_size} px crops, "
             f"{budget.steps} steps, peak lr {budget.learning_rate:g}, the trainer's default recipe, last "
             "checkpoint; scored on the dense test images (80/20 split, seed 0) from inference.py's masks.",
             "", "| data | row | annotated share of train pixels | images | foreground Dice | mean IoU | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['data']} | {r['row']} | {r['share'] * 100:.1f} % | {r['images']} | "
                     f"{r['foreground_dice']:.3f} | {r['mean_iou']:.3f} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    defaults = LabelBudget()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["nist", "coelho", "demo"],
                        choices=["nist", "coelho", "demo"], help="default: all three")
    parser.add_argument("--shares", nargs="+", type=float, default=[30, 10, 3],
                        help="annotated shares of the sparse rows, in percent (default 30 10 3)")
    for name in ("base_filters", "batch_size", "tile_size", "steps", "seed"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name),
                            help=f"default {getattr(defaults, name)}")
    parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--rows", nargs="+", default=["dense", "sparse", "few"], choices=["dense", "sparse", "few"],
                        help="the kinds of rows to train (default all three)")
    parser.add_argument("--annotation", nargs="+", default=["objects"], choices=["objects", "area"],
                        help="simulated annotation styles of the sparse rows: objects = half the annotated "
                        "pixels on objects (default), area = the image's foreground share on objects")
    parser.add_argument("--work_dir", default=None, help="keep everything here (default: a temporary "
                        "folder, deleted afterwards)")
    args = parser.parse_args(argv)
    budget = LabelBudget(base_filters=args.base_filters, batch_size=args.batch_size, tile_size=args.tile_size,
                         steps=args.steps, learning_rate=args.learning_rate, seed=args.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_labels-") as tmp:
        work = pathlib.Path(args.work_dir or tmp)
        for label in args.datasets:
            if label in SOURCES and not (SOURCES[label] / "masks").is_dir():
                print(f"labels: {label} skipped, its data is not at {SOURCES[label]}")
                continue
            results += run_dataset(label, work / label, args.shares, budget, args.rows, args.annotation)
        table = markdown_table(results, budget)
        print(table)
        if args.work_dir:
            (work / "labels.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
