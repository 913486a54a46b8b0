"""Benchmark: augment_image images/s on one core for the 256x256 uint16 nist_colonies images.

Three settings, each timed on the same images and in interleaved rounds (so a busy moment on a shared
machine slows all three alike). Times are the process's CPU time, best of many short rounds: on a shared
machine that excludes waiting for a core, which is not a cost of augmentation.
  original 7     the toolkit's defaults plus intensity 0.1: every transform that existed before elastic
  all but elastic  those 7 plus gamma 0.3 and contrast 0.25
  all 10         those 9 plus elastic 0.04 on a 3 x 3 grid, applied to every image

Run from the repo root: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_augment.py
"""
import os
import pathlib
import sys
import time

# Pin every math library to one thread before numpy/scipy load, so the figure is per core.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_variable] = "1"

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA_DIR = ROOT.parent / "shared" / "data" / "nist_colonies"
NUM_IMAGES = 100
WARMUP_IMAGES = 20
ROUNDS = 15


def main():
    if not (DATA_DIR / "images").is_dir() or not (DATA_DIR / "masks").is_dir():
        print(f"augment: skipped, real data not found at {DATA_DIR}")
        return 0
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import tifffile

    import augment

    image_paths = sorted((DATA_DIR / "images").glob("*.tif"))
    pairs = [(tifffile.imread(p), tifffile.imread(DATA_DIR / "masks" / p.name)) for p in image_paths]
    original = dict(intensity=0.1)
    no_elastic = dict(original, gamma=0.3, contrast=0.25)
    settings = {"original 7": original, "all but elastic": no_elastic,
                "all 10": dict(no_elastic, elastic=0.04, elastic_grid_points=3, elastic_probability=1.0)}
    configs = {name: augment.AugmentationConfig(**values).validate() for name, values in settings.items()}
    rng = np.random.default_rng(0)
    for name in settings:
        for i in range(WARMUP_IMAGES):
            image, mask = pairs[i % len(pairs)]
            augment.augment_image(image, configs[name], mask, rng)
    # Best of several rounds: the machine is shared, and other jobs only ever make a round slower.
    best = dict.fromkeys(settings, float("inf"))
    for _ in range(ROUNDS):
        for name in settings:
            start = time.process_time()
            for i in range(NUM_IMAGES):
                image, mask = pairs[i % len(pairs)]
                augment.augment_image(image, configs[name], mask, rng)
            best[name] = min(best[name], time.process_time() - start)
    image, _ = pairs[0]
    height, width = image.shape[:2]
    figures = "; ".join(f"{name} {NUM_IMAGES / seconds:.0f}" for name, seconds in best.items())
    print(f"augment: {height}x{width} {image.dtype}, images/s per core (1 thread, {NUM_IMAGES} images, "
          f"best of {ROUNDS}): {figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
