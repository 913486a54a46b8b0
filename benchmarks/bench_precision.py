"""inference.py --precision bfloat16 against float32 on a trained model and its test images: speed and
how much the masks change.

    python benchmarks/bench_precision.py --model runs/unet --test_database data/test-cells.lmdb

The test images (and their masks) are those listed in the test database, as the training run's test
pass saw them. inference.py's run_inference segments them four times in this one process,
interleaved (float32, bfloat16, float32, bfloat16) so that a change of the machine's load hits both
precisions; each precision's Mpx/s counts the per-image times of both of its runs except each run's
first image (which pays for tracing). Then the share of mask pixels on which the precisions differ
and each one's foreground Dice (mean over the classes above 0, pooled over the images) against the
true masks. One line of figures at the end.

Run from the repo root, alone on the machine.
"""
import argparse
import os
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_inference, also when imported from elsewhere
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import image_io  # noqa: E402
import metrics  # noqa: E402
import records  # noqa: E402
from bench_inference import image_seconds, run_folder  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def segment(folder, output, model, precision, tile_size):
    """run_inference on ``folder``; returns {image name: seconds} of every image but the first."""
    log = run_folder(folder, output, model, precision=precision, tile_size=tile_size)
    names = [path.name for path in image_io.list_images(folder)]  # in inference's order
    return {name: image_seconds(log, name) for name in names[1:]}


def foreground_dice(truths, predicted, classes):
    confusion = sum(metrics.confusion_matrix(truth, prediction, classes)
                    for truth, prediction in zip(truths, predicted))
    return float(np.nanmean(metrics.per_class_dice(confusion)[1:]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a trained model (.keras or a training output folder)")
    parser.add_argument("--test_database", required=True, help="the LMDB whose images are segmented")
    parser.add_argument("--tile_size", type=int, default=None, help="inference.py's --tile_size (default: its own)")
    args = parser.parse_args(argv)

    sources = records.read_metadata(args.test_database)["sources"]
    with tempfile.TemporaryDirectory(prefix="bench_precision-") as temporary:
        work = pathlib.Path(temporary)
        folder = work / "images"
        folder.mkdir()
        for source in sources:
            (folder / pathlib.Path(source["image"]).name).symlink_to(source["image"])
        times = {precision: {} for precision in PRECISIONS}
        for round_ in range(2):
            for precision in PRECISIONS:
                seconds = segment(folder, work / f"{precision}_{round_}", args.model, precision, args.tile_size)
                for name, value in seconds.items():
                    times[precision][f"{name}/{round_}"] = value
                print(f"round {round_ + 1}, {precision}: {sum(seconds.values()):.1f} s for {len(seconds)} images",
                      flush=True)
        names = [pathlib.Path(source["image"]).name for source in sources]
        truths = [image_io.read_array(source["mask"], "mask") for source in sources]
        pixels = {name: truth.size for name, truth in zip(names, truths)}
        predicted = {precision: [image_io.read_array(work / f"{precision}_0" / f"{image_io.image_stem(pathlib.Path(n))}.tif",
                                                     "mask") for n in names] for precision in PRECISIONS}
        classes = int(max(max(t.max() for t in truths), *(p.max() for p in predicted["float32"]))) + 1
        rates = {precision: sum(pixels[key.rsplit("/", 1)[0]] for key in timed) / sum(timed.values()) / 1e6
                 for precision, timed in times.items()}
        differ = (sum(int(np.sum(a != b)) for a, b in zip(predicted["float32"], predicted["bfloat16"]))
                  / sum(pixels.values()))
        dice = {precision: foreground_dice(truths, predicted[precision], classes) for precision in PRECISIONS}
    print(f"bench_precision: {args.model}, {len(names)} test images ({sum(pixels.values()) / 1e6:.1f} Mpx): "
          f"float32 {rates['float32']:.3f} Mpx/s, bfloat16 {rates['bfloat16']:.3f} Mpx/s "
          f"(x{rates['bfloat16'] / rates['float32']:.2f}); masks differ on {100 * differ:.4f} % of pixels; "
          f"foreground Dice float32 {dice['float32']:.4f}, bfloat16 {dice['bfloat16']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
