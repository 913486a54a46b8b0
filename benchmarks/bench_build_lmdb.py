"""Benchmark: build_lmdb on the 100 nist_colonies pairs (256x256 uint16 + uint8 masks).

Prints one line: source images/s for the whole build (validation, both databases, rename) and
database bytes on disk over raw pixel bytes. Best of a few runs, each into a fresh temporary
folder, so a busy shared machine disturbs the figure less.

Run from the repo root: .venv/bin/python benchmarks/bench_build_lmdb.py
"""
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA_DIR = ROOT.parent / "shared" / "data" / "nist_colonies"
RUNS = 3


def main():
    if not (DATA_DIR / "images").is_dir() or not (DATA_DIR / "masks").is_dir():
        print(f"build_lmdb: skipped, real data not found at {DATA_DIR}")
        return 0
    sys.path.insert(0, str(ROOT))
    import build_lmdb

    best = None
    for _ in range(RUNS):
        with tempfile.TemporaryDirectory() as out:
            result = build_lmdb.build_databases(build_lmdb.BuildConfig(
                image_folder=str(DATA_DIR / "images"), mask_folder=str(DATA_DIR / "masks"),
                output_folder=out, dataset_name="nist"), show_progress=False)
            if best is None or result.seconds < best.seconds:
                best = result
    images = sum(best.source_images.values())
    db_bytes = sum(best.database_bytes.values())
    raw_bytes = sum(best.raw_pixel_bytes.values())
    print(f"build_lmdb nist_colonies: {images / best.seconds:.0f} images/s ({images} images in "
          f"{best.seconds:.2f} s, best of {RUNS}); database {db_bytes / 1e6:.2f} MB / raw pixels "
          f"{raw_bytes / 1e6:.2f} MB = {100.0 * (db_bytes / raw_bytes - 1):+.1f}% overhead")
    return 0


if __name__ == "__main__":
    sys.exit(main())
