"""Split an inference run across processes: a folder into parts balanced by pixels, one huge image
into row bands, and the checks that let a rerun skip what is already complete.

    python inference.py ... --part 0/4 --skip_existing      # one of 4 array tasks (see inference.py)

Pure functions, no TensorFlow: the Slurm launcher (launch_inference_sbatch.sh) and the tests call
them directly.

  - ``parse_part("2/8") -> (2, 8)``: part indices count from 0, like Slurm array task ids.
  - ``assign_parts(sizes, count)``: every image in exactly one part; the parts' pixel totals are
    balanced greedily (largest image first, to the lightest part), so one giant slide does not sit
    in a part with a thousand small fields. Deterministic: every task computes the same split from
    the folder alone, without talking to the others.
  - ``band_rows(height, index, count, align)``: the rows one part predicts of an image split into
    row bands; borders on multiples of ``align`` (the Zarr chunk height), so two parts never write
    the same chunk of the shared output.
  - ``output_is_complete(path, shape)``: the output opens and has the expected shape (and, for a
    TIFF, every strip / tile lies inside the file), so a truncated output is redone.
"""
import argparse
import json
import os
import pathlib
import re
import sys

import numpy as np
import tifffile

import image_io

# Hidden per-band markers beside a banded output: ``.<stem>.band-<index>-of-<count>.done``.
BAND_MARKER = ".{stem}.band-{index}-of-{count}.done"
# Attribute of a banded image's shared Zarr arrays: a random id given when a part creates one.
ARRAY_ID = "segtool_array_id"
# inference.py's line for an image that failed: "[3/10] FAILED name.tif: reason".
FAILED_LINE = re.compile(r"^\[\d+/\d+\] FAILED (.+?): (.*)$")


class PartError(ValueError):
    """A --part value that cannot be used (names the value and the expected form)."""


def parse_part(text):
    """``"I/N"`` -> (I, N) with 0 <= I < N. Raises PartError naming the value."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise PartError(f"--part {text!r}: expected I/N, e.g. 0/4 (part I of N, counted from 0)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise PartError(f"--part {text}: I must be in 0..N-1 and N at least 1 (e.g. 0/{max(count, 1)} "
                        f"... {max(count, 1) - 1}/{max(count, 1)})")
    return index, count


# ----------------------------------------------------------------------------------------------
# Image sizes from headers (no pixels are read)
# ----------------------------------------------------------------------------------------------

def _zarr_shape(path):
    import zarr

    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Group):
        attributes = node.attrs.asdict()
        multiscales = attributes.get("multiscales") or attributes.get("ome", {}).get("multiscales")
        if multiscales:
            return tuple(node[multiscales[0]["datasets"][0]["path"]].shape)
        keys = list(node.array_keys())
        return tuple(node[keys[0]].shape) if len(keys) == 1 else ()
    return tuple(node.shape)


def header_shape(path):
    """The stored shape of an image from its header (TIFF series, Zarr metadata, PNG/JPEG header),
    or () when it cannot be read: the part that gets the file then reports the error by name."""
    path = pathlib.Path(path)
    try:
        if path.is_dir():
            return _zarr_shape(path)
        if image_io.extension_of(path) in image_io.TIFF_EXTENSIONS:
            with tifffile.TiffFile(path) as tif:
                return tuple(tif.series[0].levels[0].shape) if tif.series else ()
        from PIL import Image

        with Image.open(path) as image:  # reads the header only; pixels are decoded on demand
            width, height = image.size
            return (height, width, len(image.getbands()))
    except Exception:  # any unreadable or foreign file: sized 0, reported by its part
        return ()


def pixel_count(shape):
    """Height x width of a stored shape: the product of its two largest axes (channel and length-1
    axes are the small ones), which is what the network's cost grows with."""
    if len(shape) < 2:
        return 0
    largest = sorted(int(s) for s in shape)[-2:]
    return largest[0] * largest[1]


# ----------------------------------------------------------------------------------------------
# Parts of a folder
# ----------------------------------------------------------------------------------------------

def assign_parts(sizes, count):
    """Split images into ``count`` parts balanced by pixels.

    Args:
      sizes: {name: pixels}.
      count: number of parts.
    Returns:
      list of ``count`` sorted name lists; every name in exactly one. Greedy: names by pixels
      descending (ties by name), each to the part with the fewest pixels so far (ties: lowest
      index). The heaviest part exceeds the mean by at most the largest single image.
    """
    loads, parts = [0] * count, [[] for _ in range(count)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        lightest = min(range(count), key=lambda i: (loads[i], i))
        parts[lightest].append(name)
        loads[lightest] += sizes[name]
    return [sorted(part) for part in parts]


def select_part(paths, index, count, sizes=None):
    """The paths of part ``index`` of ``count`` (sizes from headers unless given as {path: pixels}).

    Returns:
      (selected paths in the input order, pixels of the part, pixels of all).
    """
    sizes = sizes or {path: pixel_count(header_shape(path)) for path in paths}
    by_name = {pathlib.Path(path).name: path for path in paths}
    if len(by_name) != len(paths):  # distinct folders' files: keep the full path as the key
        by_name = {str(path): path for path in paths}
    keyed = {key: sizes[path] for key, path in by_name.items()}
    chosen = set(assign_parts(keyed, count)[index])
    selected = [path for key, path in by_name.items() if key in chosen]
    return selected, sum(keyed[key] for key in chosen), sum(keyed.values())


# ----------------------------------------------------------------------------------------------
# Row bands of one image
# ----------------------------------------------------------------------------------------------

def band_rows(height, index, count, align):
    """Rows [lo, hi) part ``index`` of ``count`` predicts of an image ``height`` rows high.

    Band borders are multiples of ``align`` (the shared Zarr output's chunk height: a chunk written
    by two processes at once could lose one's rows). With fewer aligned blocks than parts, the last
    parts get an empty band (lo == hi).
    """
    blocks = -(-height // align)
    lo_block, hi_block = blocks * index // count, blocks * (index + 1) // count
    return min(height, lo_block * align), min(height, hi_block * align)


def band_marker(output_folder, stem, index, count):
    """The file written when part ``index`` of ``count`` has written its band of ``stem``."""
    return pathlib.Path(output_folder) / BAND_MARKER.format(stem=stem, index=index, count=count)


def array_id(target):
    """The id a part gave the shared Zarr array at ``target`` when it created it (ARRAY_ID), None when
    there is no such array."""
    try:
        import zarr

        return zarr.open_array(str(target), mode="r").attrs.get(ARRAY_ID)
    except Exception:
        return None


def write_band_marker(output_folder, stem, index, count, rows, targets, uncertainty_sums=None):
    """Mark a band complete in the shared arrays at ``targets`` (written last, atomically: a band
    without it is redone). The marker names the arrays by their ids, so it stops counting when they
    are removed or replaced (a rerun then recreates them and must write every band again).
    ``uncertainty_sums``: the band's uncertainty.ImageUncertainty.sums(), for band_sums."""
    content = {"rows": list(rows), "arrays": {pathlib.Path(t).name: array_id(t) for t in targets}}
    if uncertainty_sums is not None:
        content["uncertainty"] = uncertainty_sums
    image_io.atomic_write(band_marker(output_folder, stem, index, count),
                          lambda f: f.write(json.dumps(content)), mode="w")


def band_complete(output_folder, stem, index, count, targets):
    """Whether band ``index`` of ``count`` of ``stem`` is marked complete in the arrays now at
    ``targets`` (the same arrays the marker names, not earlier ones of the same name)."""
    try:
        named = json.loads(band_marker(output_folder, stem, index, count).read_text()).get("arrays", {})
    except (OSError, ValueError, AttributeError):
        return False
    ids = [named.get(pathlib.Path(t).name) for t in targets]
    return all(known is not None and known == array_id(t) for known, t in zip(ids, targets))


def band_sums(output_folder, stem, count):
    """The uncertainty sums of every band of ``stem`` from their markers, or None when a band has
    none (it was written without --uncertainty_csv) or no marker."""
    sums = []
    for index in range(count):
        try:
            marker = json.loads(band_marker(output_folder, stem, index, count).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(marker, dict) or not isinstance(marker.get("uncertainty"), dict):
            return None
        sums.append(marker["uncertainty"])
    return sums


def bands_done(output_folder, stem, count):
    """Indices of the parts whose band of ``stem`` is marked complete in the present ``<stem>.zarr``."""
    target = pathlib.Path(output_folder) / f"{stem}.zarr"
    return [i for i in range(count) if band_complete(output_folder, stem, i, count, [target])]


# ----------------------------------------------------------------------------------------------
# Is an output complete?
# ----------------------------------------------------------------------------------------------

def _tiff_complete(path, shape):
    with tifffile.TiffFile(path) as tif:
        if not tif.series or tuple(tif.series[0].shape) != tuple(shape):
            return False
        size = os.fstat(tif.filehandle.fileno()).st_size
        for page in tif.pages:
            ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c]
            if ends and max(ends) > size:  # cut off while being copied or written in place
                return False
    return True


def output_is_complete(path, shape):
    """True when ``path`` (a mask .tif, a probabilities .npy, or a .zarr array) opens, has
    ``shape`` and holds all its data. Every error (missing, truncated, foreign) means False."""
    path = pathlib.Path(path)
    try:
        if path.suffix == ".zarr":
            import zarr

            return path.is_dir() and tuple(zarr.open_array(str(path), mode="r").shape) == tuple(shape)
        if path.suffix == ".npy":
            # A memory map fails when the file is shorter than its header says.
            return tuple(np.load(path, mmap_mode="r").shape) == tuple(shape)
        return _tiff_complete(path, shape)
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------
# The summary of a job array (launch_inference_sbatch.sh, written by the task that ends last)
# ----------------------------------------------------------------------------------------------

def image_done(path, output_folder, parts, banded=False):
    """Whether the mask of ``path`` is complete in ``output_folder``: a final name appears only
    complete (written aside, then renamed); a ``banded`` image's shared ``<stem>.zarr`` when every
    one of the ``parts`` bands is marked complete."""
    output_folder = pathlib.Path(output_folder)
    stem = image_io.image_stem(path)
    if banded:
        if len(bands_done(output_folder, stem, parts)) < parts:
            return False
        try:  # an image replaced since (another size) is not done: its rerun refuses the old array
            return pixel_count(_zarr_shape(output_folder / f"{stem}.zarr")) == pixel_count(header_shape(path))
        except Exception:
            return False
    return (output_folder / f"{stem}.tif").is_file() or (output_folder / f"{stem}.zarr").is_dir()


def failure_reasons(log_texts):
    """{image name: reason} from inference.py's FAILED lines; a later line wins (a rerun's)."""
    reasons = {}
    for text in log_texts:
        for line in text.splitlines():
            match = FAILED_LINE.match(line.strip())
            if match:
                # image_io names a file it cannot read by its path: the summary lists names.
                reasons[pathlib.PurePath(match.group(1)).name] = match.group(2)
    return reasons


def inference_extensions(inference_args):
    """The --image_extensions among the extra inference.py flags ``inference_args`` (a string, split
    into words as the launcher splits EXTRA_INFERENCE_ARGS), else inference.py's default."""
    parser = argparse.ArgumentParser(add_help=False)
    image_io.add_extensions_flag(parser)
    known, _ = parser.parse_known_args(inference_args.split())
    return image_io.parse_extensions(known.image_extensions) or image_io.IMAGE_EXTENSIONS


def summarize(image_folder, output_folder, run, parts, extensions=image_io.IMAGE_EXTENSIONS):
    """The summary text of run ``run`` (N ``parts``) of launch_inference_sbatch.sh, over the images
    with ``extensions`` (those the tasks' inference.py listed)."""
    output_folder = pathlib.Path(output_folder)
    logs = output_folder / "logs"
    images = image_io.list_images(image_folder, extensions)
    banded = len(images) == 1 and parts > 1  # as inference.py splits a single image into bands
    owners = image_io.stem_owners(images)  # an image sharing its stem writes nothing (inference.py)
    done = [p.name for p in images
            if owners[image_io.image_stem(p)] == p.name and image_done(p, output_folder, parts, banded)]
    missing = [p.name for p in images if p.name not in done]
    texts = [path.read_text(errors="replace") for path in sorted(logs.glob("part_*.log"))]
    reasons = failure_reasons(texts)
    codes = []
    for index in range(parts):
        status = logs / f"run{run}_part{index}.status"
        codes.append(f"part {index}: {status.read_text().strip() if status.is_file() else 'not ended'}")
    lines = [f"run {run}: {len(images)} image(s) in {image_folder}: {len(done)} done, {len(missing)} not "
             f"done; exit codes: {', '.join(codes)}",
             f"done ({len(done)}): {', '.join(done)}",
             f"not done ({len(missing)}):"]
    lines += [f"  {name}: {reasons.get(name, 'no mask and no error logged (task stopped?); rerun the part')}"
              for name in missing]
    return "\n".join(lines) + "\n"


def main(argv=None):
    """``python sharding.py summary ...``: write OUTPUT/logs/summary_<run>.txt and print it."""
    parser = argparse.ArgumentParser(description="Summary of a launch_inference_sbatch.sh array: the "
                                     "images done and not done (with the reason logged)")
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary")
    summary.add_argument("--image_folder", required=True)
    summary.add_argument("--output_folder", required=True)
    summary.add_argument("--run", required=True, help="the array job id")
    summary.add_argument("--parts", type=int, required=True, help="the number of array tasks")
    summary.add_argument("--inference_args", default="", help="the extra inference.py flags of the "
                         "tasks (EXTRA_INFERENCE_ARGS): their --image_extensions chooses the images")
    args = parser.parse_args(argv)
    text = summarize(args.image_folder, args.output_folder, args.run, args.parts,
                     inference_extensions(args.inference_args))
    target = pathlib.Path(args.output_folder) / "logs" / f"summary_{args.run}.txt"
    image_io.atomic_write(target, lambda f: f.write(text), mode="w")
    print(f"summary ({target}):\n{text}", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
