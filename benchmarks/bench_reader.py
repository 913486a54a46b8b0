"""Images/s delivered by ImageReader (batch 8, augmentation on) against one process augmenting in a loop.

Builds a training database from ../shared/data/nist_colonies (256 x 256 uint16) in a temporary
directory, then measures:
  - single: one process calling augment.augment_image + normalization.normalize in a loop;
  - 1 worker and 2 workers: batches taken from ImageReader.get_batch by a consumer doing nothing else
    (worker start-up and the first batches are excluded: the rate is the steady state).
Targets: 1 worker >= 90% of single; 2 workers >= 1.7 x 1 worker (on 2 cores).
The machine is shared, so the three measurements are interleaved over several rounds and the best
rate of each is kept. The CPU milliseconds per image (single process, reader worker, consumer) are
printed too: they depend much less on what else is running.

Run from the repo root: .venv/bin/python benchmarks/bench_reader.py
"""
import argparse
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import augment  # noqa: E402
import normalization  # noqa: E402
import records  # noqa: E402
from imagereader import ImageReader  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "nist_colonies"
BATCH = 8


def build_database(path):
    """Write every nist_colonies image/mask pair into a database at ``path``; returns the arrays."""
    import tifffile

    names = sorted(p.name for p in (DATA / "images").glob("*.tif"))
    if not names:
        raise SystemExit(f"no .tif images in {DATA / 'images'}: the benchmark needs the nist_colonies data")
    pairs = [(tifffile.imread(DATA / "images" / n), tifffile.imread(DATA / "masks" / n), n) for n in names]
    records.write_database(str(path), ((img, mask, {"image": n, "mask": n}) for img, mask, n in pairs),
                           {"split": "train", "split_seed": 0, "train_fraction": 1.0})
    return [(img, mask) for img, mask, _ in pairs]


def single_process_rate(pairs, seconds):
    """(images/s, CPU ms per image) of one process augmenting and normalising in a loop, as a
    reader worker does (normalised with the source image's statistics, stored with each record)."""
    config = augment.AugmentationConfig()
    rng = np.random.default_rng(0)
    statistics = [normalization.channel_statistics(img) for img, _ in pairs]
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        img, mask = pairs[count % len(pairs)]
        img, mask = augment.augment_image(img, config, mask, rng)
        normalization.normalize(img, statistics[count % len(pairs)])
        count += 1
    return count / (time.perf_counter() - start), (time.process_time() - cpu) / count * 1e3


def _cpu_seconds(pid):
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def reader_rate(db, num_workers, seconds):
    """(steady-state images/s, workers' and consumer's CPU ms per image, start-up to the first batch in s)."""
    start = time.perf_counter()
    with ImageReader(str(db), BATCH, num_workers=num_workers, seed=0) as reader:
        reader.get_batch()
        startup = time.perf_counter() - start
        for _ in range(2 * num_workers):  # let every worker reach its steady state
            reader.get_batch()
        cpu, consumer_cpu = sum(map(_cpu_seconds, reader.worker_pids)), time.process_time()
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            reader.get_batch()
            count += BATCH
        rate = count / (time.perf_counter() - start)
        consumer_cpu = time.process_time() - consumer_cpu
        cpu = sum(map(_cpu_seconds, reader.worker_pids)) - cpu
        return rate, cpu / count * 1e3, consumer_cpu / count * 1e3, startup


def main(seconds, rounds):
    with tempfile.TemporaryDirectory() as tmp:
        db = pathlib.Path(tmp) / "train.lmdb"
        pairs = build_database(db)
        results = {"single": [], 1: [], 2: []}
        for _ in range(rounds):
            results["single"].append(single_process_rate(pairs, seconds))
            results[1].append(reader_rate(db, 1, seconds))
            results[2].append(reader_rate(db, 2, seconds))
    single, single_cpu = max(results["single"])
    one, one_cpu, consumer_cpu, startup_one = max(results[1])
    two, _, _, startup_two = max(results[2])
    print(f"bench_reader (best of {rounds}): single process {single:.0f} img/s | 1 worker {one:.0f} img/s "
          f"({one / single:.2f}x single, target >= 0.90) | 2 workers {two:.0f} img/s "
          f"({two / one:.2f}x 1 worker, target >= 1.70) | CPU ms/img single {single_cpu:.1f}, "
          f"worker {one_cpu:.1f}, consumer {consumer_cpu:.2f} | start-up to first batch "
          f"{startup_one:.1f} s (1 worker), {startup_two:.1f} s (2 workers)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time of each rate per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each is kept")
    args = parser.parse_args()
    main(args.seconds, args.rounds)
