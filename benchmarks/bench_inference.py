"""Inference on large images: peak memory and speed of inference.py, and its tiling overhead.

  (a) a generated 20,000 x 20,000 uint16 tiled (256 px), zlib-compressed BigTIFF segmented by
      `inference.py` (a subprocess, as a user runs it) with a small random-weight UNet
      (base_filters 4, 2 classes) on the CPU, --tile_size 2048: peak RSS of that process (its own
      rusage, via peak_rss.py; target at most 2 GB) and megapixels/s of its per-image time (reading,
      statistics pass, prediction, writing the tiled BigTIFF mask).
  (b) throughput of inference on a 4,096 x 4,096 uint16 image (its per-image time in
      run_inference, default tile size, i.e. the memory-based rule) divided by that of one
      `model.predict` call on the same whole normalised (padded) image: target at least 0.75
      (tiling, halos, reading and writing cost at most 25 %). Both warm: inference's figure is
      that of the second of two copies of the image, model.predict's the second call.
  (c) the cost of --tta: the time of a 1,024 x 1,024 image with and without it.
One line of figures at the end. Needs ~1 GB in a temporary folder and ~10 minutes on 2 cores.

With --engines, instead: (d) the engines side by side in one run (engines.py): Mpx/s of
`--engine tensorflow` and `--engine onnxruntime` for the default UNet (base_filters 64) and a small
one (base_filters 8), each the per-image time of the second of two copies of an image (the ONNX
export, timed separately, and tracing happen on the first), the share of mask pixels on which the
engines differ, and one inference.py process on 4 images vs two `--part I/2` processes at once
(wall time, start-up included). ~15 minutes on 2 cores.

Run from the repo root, alone on the machine: flock /tmp/bench.lock .venv/bin/python benchmarks/bench_inference.py
"""
import argparse
import contextlib
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import inference  # noqa: E402
import models  # noqa: E402
import normalization  # noqa: E402
import predictor  # noqa: E402

BASE_FILTERS, CLASSES, LARGE_SIDE, LARGE_TILE, MEDIUM_SIDE, TTA_SIDE = 4, 2, 20000, 2048, 4096, 1024


def save_model(folder, base_filters=BASE_FILTERS):
    """A random-weight UNet saved like a training output folder; returns the keras model."""
    import keras

    keras.utils.set_random_seed(0)
    model = models.build_model("unet", CLASSES, input_channels=1, base_filters=base_filters)
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    (folder / "config.json").write_text(json.dumps({
        "model": "unet", "number_classes": CLASSES, "input_channels": 1,
        "base_filters": base_filters, "batch_norm": True}))
    return model


def synthetic_rows(side, rows, seed=0):
    """Blocks of ``rows`` rows of a colony-like uint16 image: bright discs on a noisy background."""
    rng = np.random.default_rng(seed)
    x = np.arange(side)
    for top in range(0, side, rows):
        y = np.arange(top, min(side, top + rows))[:, None]
        discs = (np.sin(x / 97.0) * np.cos(y / 83.0) > 0.6).astype(np.float32)
        block = 1000 + 2000 * discs + rng.normal(0, 150, (len(y), side))
        yield np.clip(block, 0, 65535).astype(np.uint16)


def write_tiled_tiff(path, side, tile=256):
    """The side x side image as a tiled zlib BigTIFF, written tile row by tile row."""
    import tifffile

    def tiles():
        for block in synthetic_rows(side, tile):
            padded = np.zeros((tile, -(-side // tile) * tile), np.uint16)
            padded[:len(block), :side] = block
            for left in range(0, side, tile):
                yield padded[:, left:left + tile]

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(tiles(), shape=(side, side), dtype=np.uint16, tile=(tile, tile), compression="zlib")


def image_seconds(log_text, name):
    """Per-image seconds from inference.py's "[i/n] name ... (12.34 s" line."""
    match = re.search(rf"\] {re.escape(name)} .*\((\d+\.\d+) s", log_text)
    if not match:
        raise RuntimeError(f"no timing line for {name} in the inference log:\n{log_text[-3000:]}")
    return float(match.group(1))


def bench_large(work, model_folder):
    """(a): peak RSS (GB), Mpx/s and seconds of inference.py on the 20,000 px tiled TIFF."""
    images = work / "large"
    images.mkdir()
    start = time.perf_counter()
    write_tiled_tiff(images / "large.tif", LARGE_SIDE)
    print(f"(a) wrote {LARGE_SIDE} x {LARGE_SIDE} tiled TIFF in {time.perf_counter() - start:.0f} s "
          f"({(images / 'large.tif').stat().st_size / 1e9:.2f} GB)", flush=True)
    log = work / "large.log"
    command = [sys.executable, str(ROOT / "inference.py"), "--model", str(model_folder),
               "--image_folder", str(images), "--output_folder", str(work / "large_out"), "--gpu", "-1",
               "--tile_size", str(LARGE_TILE)]
    peak_file = work / "large.maxrss"
    with open(log, "w") as out:
        # Through peak_rss.py: this process holds TensorFlow and the (b) and (c) runs, and a child
        # spawned from it directly would report that as its own peak.
        status = subprocess.run([sys.executable, "-S", str(ROOT / "benchmarks" / "peak_rss.py"), str(peak_file),
                                 *command], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    text = log.read_text()
    if status != 0:
        raise RuntimeError(f"inference.py failed:\n{text[-3000:]}")
    seconds = image_seconds(text, "large.tif")
    print(text[-1500:], flush=True)
    return int(peak_file.read_text()) / 1024 ** 2, LARGE_SIDE ** 2 / seconds / 1e6, seconds



def run_folder(folder, output, model_folder, **flags):
    """run_inference on ``folder``; returns its log (stdout)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        summary = inference.run_inference(inference.InferenceConfig(
            image_folder=str(folder), output_folder=str(output), model=str(model_folder), gpu=-1,
            **flags))
    if summary.failed:
        raise RuntimeError(f"inference failed: {summary.failed}")
    return buffer.getvalue()


def bench_medium(work, model_folder, model):
    """(b): inference Mpx/s, model.predict Mpx/s, their ratio, and the tile inference chose."""
    import tifffile

    folder = work / "medium"
    folder.mkdir()
    image = next(synthetic_rows(MEDIUM_SIDE, MEDIUM_SIDE, seed=1))
    for name in ("a.tif", "b.tif"):  # the second copy is timed: tracing happened on the first
        tifffile.imwrite(folder / name, image)
    log = run_folder(folder, work / "medium_out", model_folder)
    inference_rate = MEDIUM_SIDE ** 2 / image_seconds(log, "b.tif") / 1e6
    tile = int(re.search(r"tiles up to (\d+) px", log).group(1))
    tiles = int(re.search(r"\] b\.tif .*\((\d+) tile", log).group(1))

    padded, _ = predictor.pad_to_divisor(
        normalization.normalize(image[..., None], normalization.channel_statistics(image)), 16)
    batch = padded[np.newaxis]
    model.predict(batch, batch_size=1, verbose=0)
    start = time.perf_counter()
    model.predict(batch, batch_size=1, verbose=0)
    predict_rate = MEDIUM_SIDE ** 2 / (time.perf_counter() - start) / 1e6
    print(log, flush=True)
    return inference_rate, predict_rate, tile, tiles


def bench_tta(work, model_folder):
    """(c): seconds of one 1,024 px image with --tta divided by without."""
    import tifffile

    folder = work / "tta"
    folder.mkdir()
    image = next(synthetic_rows(TTA_SIDE, TTA_SIDE, seed=2))
    for name in ("a.tif", "b.tif"):
        tifffile.imwrite(folder / name, image)
    plain = image_seconds(run_folder(folder, work / "tta_plain", model_folder), "b.tif")
    augmented = image_seconds(run_folder(folder, work / "tta_on", model_folder, tta=True), "b.tif")
    return augmented / plain


# (d): (base_filters, image side) per model: sides that take tens of seconds per image here.
ENGINE_MODELS = ((64, 1024), (8, 2048))
PARTS_IMAGES, PARTS_SIDE = 4, 1024


def engine_rate(work, model_folder, folder, engine):
    """Mpx/s of ``engine`` on b.tif of ``folder`` (second copy), and its masks' folder."""
    output = work / f"{model_folder.name}_{engine}"
    start = time.perf_counter()
    log = run_folder(folder, output, model_folder, engine=engine, tile_size=512)
    total = time.perf_counter() - start
    side = int(re.search(r"\] b\.tif (\d+)x", log).group(1))
    seconds = image_seconds(log, "b.tif")
    return side ** 2 / seconds / 1e6, total, output


def bench_parts(work, model_folder, engine):
    """Wall seconds of one inference.py process on PARTS_IMAGES images, and of two --part processes."""
    import tifffile

    folder = work / "parts_in"
    if not folder.is_dir():
        folder.mkdir()
        for i in range(PARTS_IMAGES):
            tifffile.imwrite(folder / f"img_{i}.tif", next(synthetic_rows(PARTS_SIDE, PARTS_SIDE, seed=i)))
    command = [sys.executable, str(ROOT / "inference.py"), "--model", str(model_folder), "--image_folder",
               str(folder), "--gpu", "-1", "--tile_size", "512", "--engine", engine]
    timings = []
    for parts in (1, 2):
        output = work / f"parts_{engine}_{parts}"
        start = time.perf_counter()
        processes = [subprocess.Popen(command + ["--output_folder", str(output)]
                                      + (["--part", f"{i}/{parts}"] if parts > 1 else []),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
                     for i in range(parts)]
        for process in processes:
            _, errors = process.communicate()
            if process.returncode:
                raise RuntimeError(f"inference.py failed: {errors.decode()[-2000:]}")
        timings.append(time.perf_counter() - start)
    return timings


def bench_engines(work):
    """(d): one line per model and engine, the masks' agreement, and 1 vs 2 processes."""
    import tifffile

    lines = []
    for base_filters, side in ENGINE_MODELS:
        model_folder = work / f"unet{base_filters}"
        save_model(model_folder, base_filters)
        folder = work / f"engines_{side}"
        if not folder.is_dir():
            folder.mkdir()
            image = next(synthetic_rows(side, side, seed=3))
            for name in ("a.tif", "b.tif"):
                tifffile.imwrite(folder / name, image)
        rates, outputs = {}, {}
        for engine in ("tensorflow", "onnxruntime"):
            rates[engine], total, outputs[engine] = engine_rate(work, model_folder, folder, engine)
            print(f"(d) base_filters {base_filters}, {side} px, {engine}: {rates[engine]:.3f} Mpx/s "
                  f"(run {total:.0f} s)", flush=True)
        differ = np.mean(tifffile.imread(outputs["tensorflow"] / "b.tif")
                         != tifffile.imread(outputs["onnxruntime"] / "b.tif"))
        lines.append(f"base_filters {base_filters} ({side} px): tensorflow {rates['tensorflow']:.3f}, "
                     f"onnxruntime {rates['onnxruntime']:.3f} Mpx/s (x{rates['onnxruntime'] / rates['tensorflow']:.2f}); "
                     f"masks differ on {100 * differ:.4f} % of pixels")
    small = work / f"unet{ENGINE_MODELS[-1][0]}"
    pixels = PARTS_IMAGES * PARTS_SIDE ** 2 / 1e6
    for engine in ("tensorflow", "onnxruntime"):
        one, two = bench_parts(work, small, engine)
        lines.append(f"{engine}, base_filters {ENGINE_MODELS[-1][0]}, {PARTS_IMAGES} x {PARTS_SIDE} px: "
                     f"1 process {pixels / one:.3f} Mpx/s ({one:.0f} s), 2 x --part I/2 at once "
                     f"{pixels / two:.3f} Mpx/s ({two:.0f} s)")
    print("bench_inference --engines (CPU):\n  " + "\n  ".join(lines), flush=True)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip_large", action="store_true", help="only (b) and (c)")
    parser.add_argument("--engines", action="store_true",
                        help="only (d): TensorFlow vs ONNX Runtime, and 1 vs 2 --part processes")
    args = parser.parse_args(argv)
    if args.engines:
        with tempfile.TemporaryDirectory(prefix="bench_inference-") as temporary:
            return bench_engines(pathlib.Path(temporary))
    with tempfile.TemporaryDirectory(prefix="bench_inference-") as temporary:
        work = pathlib.Path(temporary)
        model = save_model(work / "model")
        tta_ratio = bench_tta(work, work / "model")
        inference_rate, predict_rate, tile, tiles = bench_medium(work, work / "model", model)
        large = "(a) skipped" if args.skip_large else None
        if large is None:
            rss_gb, large_rate, large_seconds = bench_large(work, work / "model")
            large = (f"(a) {LARGE_SIDE}x{LARGE_SIDE} uint16 tiled TIFF, tile {LARGE_TILE}: peak RSS "
                     f"{rss_gb:.2f} GB (target <= 2), {large_rate:.2f} Mpx/s ({large_seconds:.0f} s)")
    ratio = inference_rate / predict_rate
    print(f"bench_inference: UNet base_filters {BASE_FILTERS}, CPU; {large}; (b) {MEDIUM_SIDE}x"
          f"{MEDIUM_SIDE}: inference {inference_rate:.2f} Mpx/s (default tile {tile}, {tiles} tile(s)) "
          f"/ model.predict {predict_rate:.2f} Mpx/s = {ratio:.2f} (target >= 0.75); (c) --tta costs "
          f"{tta_ratio:.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
