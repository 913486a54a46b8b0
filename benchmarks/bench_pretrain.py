"""Does self-supervised pretraining (pretrain_unet.py) save labels? Scratch vs pretrained, 1-8 labels.

Steps, each through the project's own command-line tools:
  1. split the data set's images with seed 0 into --test_images dense test images and the rest; the
     first 1, 2, 4 and 8 of the rest (nested sets) are the labelled training images, and ALL of the
     rest (never a test image) is the unlabelled pool;
  2. build_lmdb.py databases: the unlabelled pool with --unlabelled_only, each labelled set, and a
     one-image database for the trainer's (unused) test pass;
  3. `pretrain_unet.py` on the unlabelled pool for --pretrain_steps steps (timed), once per pretext
     task of --pretext_tasks (blind_spot, masked_patch);
  4. for each labelled count, `train_unet.py` for exactly --finetune_steps steps from scratch and with
     `--init_from` each pretraining (same seed, flags and budget; one test pass at the end, so no
     checkpoint is chosen on the test images), then `inference.py` with the last checkpoint on the
     test images;
  5. foreground (class 1) Dice over all test pixels pooled, from the masks inference.py wrote.
Prints one line per run and a markdown table (also written to WORK/pretrain.md).

Run from the repo root:
    .venv/bin/python benchmarks/bench_pretrain.py [--dataset nist_colonies] [--work_dir DIR]
Skips (exit 0) when the data is not on this machine.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

import bench_accuracy  # noqa: E402
import build_lmdb  # noqa: E402
import image_io  # noqa: E402

DATASETS = {"nist_colonies": ROOT.parent / "shared" / "data" / "nist_colonies",
            "coelho2009_nuclei_dev": ROOT.parent / "shared" / "data" / "coelho2009_nuclei_dev"}
LABELLED_COUNTS = (1, 2, 4, 8)
# Run order: the target's two counts first (pretrained with 2 labelled images against scratch with
# 8), so an interrupted run has answered it.
RUN_ORDER = (2, 8, 1, 4)


@dataclasses.dataclass
class PretrainBenchConfig:
    """The budget: the same architecture and fine-tuning flags for every run (see main's flags)."""
    work_dir: str
    dataset: str = "nist_colonies"
    test_images: int = 20
    base_filters: int = 8
    unet_depth: int = 4
    batch_size: int = 4
    tile_size: int = 128
    pretrain_steps: int = 400
    finetune_steps: int = 150
    learning_rate: float = 1e-3
    seed: int = 0
    pretext_tasks: tuple = ("blind_spot", "masked_patch")
    tta: bool = False  # read by bench_accuracy.predict


def split(data_dir, test_count, seed):
    """(test stems, other stems in a seeded order) of the data set's images."""
    stems = sorted(path.stem for path in image_io.list_files(data_dir / "images", build_lmdb.DEFAULT_EXTENSIONS))
    order = [stems[i] for i in np.random.default_rng(seed).permutation(len(stems))]
    return sorted(order[:test_count]), order[test_count:]


def link_folder(folder, data_dir, stems, masks=True):
    """A folder of symbolic links to the images (and masks) of ``stems``: build_lmdb.py's input."""
    paths = {path.stem: path for path in image_io.list_files(data_dir / "images", build_lmdb.DEFAULT_EXTENSIONS)}
    mask_paths = {path.stem: path for path in image_io.list_files(data_dir / "masks", build_lmdb.DEFAULT_EXTENSIONS)}
    for kind, source in (("images", paths),) + ((("masks", mask_paths),) if masks else ()):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for stem in stems:
            link = folder / kind / source[stem].name
            if not link.exists():
                link.symlink_to(source[stem])
    return folder


def build(folder, name, tile_size=None, unlabelled=False):
    """The train (or unlabelled) database of the images in ``folder``; every image, no test split."""
    result = build_lmdb.build_databases(build_lmdb.BuildConfig(
        image_folder=str(folder / "images"), mask_folder=None if unlabelled else str(folder / "masks"),
        output_folder=str(folder), dataset_name=name, train_fraction=1.0, tile_size=tile_size,
        unlabelled_only=unlabelled), show_progress=False)
    return result.paths["unlabelled" if unlabelled else "train"]


def common_flags(config):
    return ["--base_filters", config.base_filters, "--unet_depth", config.unet_depth,
            "--batch_size", config.batch_size, "--tile_size", config.tile_size, "--seed", config.seed,
            "--learning_rate", config.learning_rate, "--gpus", "none", "--log_every_n_steps", 50]


def timed(command, log_path):
    start = time.perf_counter()
    bench_accuracy.run_tool([str(c) for c in command], log_path)
    return time.perf_counter() - start


def run(config):
    """Build, pretrain, fine-tune from scratch and pretrained for each labelled count, score."""
    data_dir = DATASETS[config.dataset]
    work = pathlib.Path(config.work_dir)
    test_stems, others = split(data_dir, config.test_images, config.seed)
    unlabelled_db = build(link_folder(work / "unlabelled", data_dir, others, masks=False), "pool",
                          tile_size=2 * config.tile_size, unlabelled=True)
    check_db = build(link_folder(work / "check", data_dir, test_stems[:1]), "check")
    pretrain_seconds = {}
    for task in config.pretext_tasks:
        pretrain_seconds[task] = timed([sys.executable, "pretrain_unet.py", "--database", unlabelled_db,
                                        "--output_dir", work / f"pretrain-{task}", *common_flags(config),
                                        "--pretext_task", task, "--max_steps", config.pretrain_steps,
                                        "--test_every_n_steps", config.pretrain_steps], work / f"pretrain-{task}.log")
        print(f"pretraining {task}: {config.pretrain_steps} steps on {len(others)} unlabelled images in "
              f"{pretrain_seconds[task] / 60:.1f} min", flush=True)

    test_paths = [str(p) for p in image_io.list_files(link_folder(work / "test", data_dir, test_stems)
                                                       / "images", build_lmdb.DEFAULT_EXTENSIONS)]
    names = [pathlib.Path(p).name for p in test_paths]
    masks = {path.stem: path for path in image_io.list_files(work / "test" / "masks", build_lmdb.DEFAULT_EXTENSIONS)}
    truths = [image_io.read_array(masks[pathlib.Path(n).stem], "mask") for n in names]
    rows = []
    for count in RUN_ORDER:
        train_db = build(link_folder(work / f"labelled{count}", data_dir, others[:count]), f"n{count}")
        for start in ("scratch", *config.pretext_tasks):
            output_dir = work / f"{start}-{count}"
            extra = ["--init_from", work / f"pretrain-{start}"] if start != "scratch" else []
            seconds = timed([sys.executable, "train_unet.py", "--train_database", train_db, "--test_database",
                             check_db, "--output_dir", output_dir, *common_flags(config), "--max_steps",
                             config.finetune_steps, "--test_every_n_steps", config.finetune_steps, *extra],
                            pathlib.Path(f"{output_dir}.log"))
            predicted = bench_accuracy.predict(config, [str(output_dir)], test_paths, f"{start}-{count}")
            dice, _ = bench_accuracy.foreground_scores(truths, [predicted[n] for n in names])
            rows.append(dict(labelled=count, start=start, dice=dice, seconds=seconds))
            print(f"{count} labelled, {start:12s}: foreground Dice {dice:.3f}  ({seconds / 60:.1f} min)", flush=True)
    return {"rows": rows, "pretrain_seconds": pretrain_seconds, "unlabelled_images": len(others),
            "test_images": len(test_stems)}


def table(config, result):
    by = {(r["labelled"], r["start"]): r["dice"] for r in result["rows"]}
    tasks = config.pretext_tasks
    minutes = ", ".join(f"{task} {seconds / 60:.1f} min" for task, seconds in result["pretrain_seconds"].items())
    lines = [f"{config.dataset}: {result['test_images']} dense test images; pretraining {config.pretrain_steps} steps "
             f"on {result['unlabelled_images']} unlabelled images took {minutes}; fine-tuning "
             f"{config.finetune_steps} steps per run (base_filters {config.base_filters}, depth {config.unet_depth}, "
             f"batch {config.batch_size}, {config.tile_size} px tiles, seed {config.seed})", "",
             "| labelled images | scratch fg Dice | " + " | ".join(f"{t} fg Dice (difference)" for t in tasks) + " |",
             "|---|---|" + "---|" * len(tasks)]
    for count in LABELLED_COUNTS:
        scratch = by[(count, "scratch")]
        cells = [f"{by[(count, t)]:.3f} ({by[(count, t)] - scratch:+.3f})" for t in tasks]
        lines.append(f"| {count} | {scratch:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default=None, help="folder for databases and runs (default: a temporary one)")
    defaults = PretrainBenchConfig(work_dir="")
    for field in dataclasses.fields(PretrainBenchConfig):
        if field.name in ("work_dir", "tta"):
            continue
        if field.name == "pretext_tasks":
            parser.add_argument("--pretext_tasks", nargs="+", default=list(field.default),
                                choices=("blind_spot", "masked_patch"), help="(default: both)")
            continue
        value = getattr(defaults, field.name)
        parser.add_argument(f"--{field.name}", type=type(value), default=value,
                            choices=tuple(DATASETS) if field.name == "dataset" else None,
                            help=f"(default {value})")
    args = parser.parse_args(argv)
    data_dir = DATASETS[args.dataset]
    if not (data_dir / "images").is_dir():
        print(f"skipped: {data_dir} is not on this machine")
        return 0
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="bench_pretrain-")
    os.makedirs(work_dir, exist_ok=True)
    values = dict(vars(args), pretext_tasks=tuple(args.pretext_tasks))
    config = PretrainBenchConfig(**dict(values, work_dir=work_dir))
    print(f"bench_pretrain: {dataclasses.asdict(config)}", flush=True)
    result = run(config)
    text = table(config, result)
    print("\n" + text)
    (pathlib.Path(work_dir) / "pretrain.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
