"""Build a train and a test LMDB database from a folder of images and a folder of masks.

    python build_lmdb.py --image_folder data/images --mask_folder data/masks \\
        --output_folder data --dataset_name cells [--train_fraction 0.8] [--seed 0] [--tile_size 512]

The steps, each a small function below:
  1. ``find_pairs``: match images and masks by file stem.
  2. ``check_pairs``: read and validate every pair; nothing is written when anything is wrong.
  3. ``split_indices``: split the *source images* into train and test with a seeded generator.
  4. ``write_split``: write each database (cut into tiles when asked) into a temporary directory
     beside the target.
  5. ``install_databases``: rename the new databases into place; a previous database is moved
     aside only once the new one is complete, and restored if anything fails.
The record format lives in records.py.
"""
import argparse
import dataclasses
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Optional

import numpy as np

import records

SUPPORTED_EXTENSIONS = ("tif", "tiff", "png", "jpg", "jpeg")
DEFAULT_EXTENSIONS = ("tif", "tiff", "png")
# JPEG compression changes pixel values, which would silently change class ids.
LOSSY_EXTENSIONS = ("jpg", "jpeg")
STORED_IMAGE_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.int32, np.float32))
SPLITS = ("train", "test")
# Decoded pairs are kept in memory between the validation and the write pass up to this many
# bytes; beyond it the write pass reads the files again (memory stays bounded on large sets).
CACHE_BUDGET_BYTES = 1 << 30
MAX_LISTED_PROBLEMS = 30


class BuildError(Exception):
    """Bad input or an impossible request; the message names the file or value at fault."""


@dataclasses.dataclass
class BuildConfig:
    image_folder: str
    mask_folder: str
    output_folder: str
    dataset_name: str
    train_fraction: float = 0.8
    seed: int = 0
    tile_size: Optional[int] = None
    tile_overlap: int = 0
    image_extensions: tuple = DEFAULT_EXTENSIONS

    def validate(self):
        """Check the plain values (not the files); raises BuildError."""
        name = self.dataset_name
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise BuildError(f"--dataset_name {name!r}: expected a plain name without path separators")
        if not (0.0 < self.train_fraction <= 1.0):  # also false for NaN
            raise BuildError(f"--train_fraction {self.train_fraction}: expected a value in (0, 1]")
        if self.tile_size is not None and self.tile_size < 1:
            raise BuildError(f"--tile_size {self.tile_size}: expected a positive number of pixels")
        if self.tile_size is None and self.tile_overlap != 0:
            raise BuildError(f"--tile_overlap {self.tile_overlap} needs --tile_size")
        if self.tile_size is not None and not (0 <= self.tile_overlap < self.tile_size):
            raise BuildError(f"--tile_overlap {self.tile_overlap}: expected 0 <= overlap < "
                             f"--tile_size ({self.tile_size})")
        extensions = normalize_extensions(self.image_extensions)
        unknown = [e for e in extensions if e not in SUPPORTED_EXTENSIONS]
        if unknown or not extensions:
            raise BuildError(f"--image_extensions {' '.join(self.image_extensions) or '(none)'}: "
                             f"expected some of {', '.join(SUPPORTED_EXTENSIONS)}")


@dataclasses.dataclass
class Pair:
    stem: str
    image_path: str
    mask_path: str


@dataclasses.dataclass
class CheckedPair:
    pair: Pair
    image_shape: tuple  # (H, W, C) after conversion
    image_dtype: np.dtype
    max_label: int


@dataclasses.dataclass
class BuildResult:
    paths: dict  # split -> database path
    metadata: dict  # split -> metadata dict written
    source_images: dict  # split -> number of source images
    database_bytes: dict  # split -> bytes of the database files on disk
    raw_pixel_bytes: dict  # split -> bytes of the image and mask pixels stored
    seconds: float
    config: BuildConfig


def normalize_extensions(extensions):
    """Accept "tif,png", ".TIF" or a list of either; return lower-case names without dots."""
    if isinstance(extensions, str):
        extensions = [extensions]
    names = []
    for item in extensions:
        for part in str(item).split(","):
            part = part.strip().lower().lstrip(".")
            if part and part not in names:
                names.append(part)
    return tuple(names)


# ----------------------------------------------------------------------------- finding pairs

def _files_by_stem(folder, extensions, kind, problems):
    if not os.path.exists(folder):
        raise BuildError(f"{kind} folder {folder} does not exist")
    if not os.path.isdir(folder):
        raise BuildError(f"{kind} folder {folder} is not a directory")
    by_stem = {}
    others = 0
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        stem, ext = os.path.splitext(name)
        # Hidden files include macOS "._name.tif" resource forks, which are not images.
        if name.startswith(".") or not os.path.isfile(path):
            continue
        if ext.lower().lstrip(".") not in extensions:
            others += 1
            continue
        by_stem.setdefault(stem, []).append(path)
    if not by_stem:
        raise BuildError(f"{kind} folder {folder} holds no files ending in "
                         f"{', '.join('.' + e for e in extensions)} ({others} other files)")
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            problems.append(f"{kind} name {stem!r} is ambiguous: {', '.join(paths)}")
    return {stem: paths[0] for stem, paths in by_stem.items()}


def find_pairs(image_folder, mask_folder, extensions):
    """Match images and masks by file stem (a.tif pairs with a.png).

    Returns:
      list of Pair sorted by stem. Raises BuildError listing every unpaired file.
    """
    extensions = normalize_extensions(extensions)
    problems = []
    images = _files_by_stem(image_folder, extensions, "image", problems)
    masks = _files_by_stem(mask_folder, extensions, "mask", problems)
    for stem, path in sorted(masks.items()):
        if os.path.splitext(path)[1].lower().lstrip(".") in LOSSY_EXTENSIONS:
            problems.append(f"mask {path} is JPEG: lossy compression alters class ids; "
                            "save masks as PNG or TIFF")
    lonely_images = sorted(images[s] for s in images.keys() - masks.keys())
    lonely_masks = sorted(masks[s] for s in masks.keys() - images.keys())
    if lonely_images or lonely_masks:
        lines = [f"{len(lonely_images)} image(s) without a mask in {mask_folder} and "
                 f"{len(lonely_masks)} mask(s) without an image in {image_folder} "
                 "(pairs are matched by file stem):"]
        lines += [f"  image without mask: {p}" for p in lonely_images]
        lines += [f"  mask without image: {p}" for p in lonely_masks]
        problems.append("\n".join(lines))
    if problems:
        raise BuildError("\n".join(problems))
    return [Pair(stem, images[stem], masks[stem]) for stem in sorted(images)]


# ----------------------------------------------------------------------------- reading and checking

def read_array(path, kind):
    """Read an image or mask file into a numpy array (TIFF via tifffile, others via imageio)."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    try:
        if ext in ("tif", "tiff"):
            import tifffile
            array = np.asarray(tifffile.imread(path))
        elif kind == "mask":
            # Pillow directly: palette PNG masks hold class ids as palette indices, which
            # imageio would turn into RGB colours.
            from PIL import Image
            with Image.open(path) as img:
                array = np.array(img)
        else:
            import imageio.v3 as iio
            array = np.asarray(iio.imread(path))
    except Exception as exc:  # any decoder error means the same thing to the user
        raise BuildError(f"{path}: cannot read {kind} ({type(exc).__name__}: {exc})") from exc
    if array.size == 0:
        # tifffile returns an empty array (with a logged warning) for some damaged files.
        raise BuildError(f"{path}: cannot read {kind}: the file holds no pixels (damaged or empty?)")
    return array


def to_storable_image(image, path):
    """Return the image in a stored dtype (uint8, uint16, int32, float32), converting losslessly.

    bool -> uint8; int8/int16 -> int32; wider integers -> int32 when every value fits;
    float16 -> float32; float64 -> float32 when every value is exactly representable.
    """
    dtype = image.dtype
    if dtype.byteorder not in ("=", "|"):
        image = image.astype(dtype.newbyteorder("="))
        dtype = image.dtype
    if dtype in STORED_IMAGE_DTYPES:
        return image
    if dtype.kind == "b":
        return image.astype(np.uint8)
    if dtype.kind in "iu":
        if dtype.itemsize <= 2:
            return image.astype(np.int32)
        low, high = (int(image.min()), int(image.max())) if image.size else (0, 0)
        info = np.iinfo(np.int32)
        if low < info.min or high > info.max:
            raise BuildError(f"{path}: image dtype {dtype.name} with values in [{low}, {high}] does "
                             "not fit int32; rescale it to uint16, int32 or float32")
        return image.astype(np.int32)
    if dtype.kind == "f":
        converted = image.astype(np.float32)
        if dtype.itemsize > 4 and not np.array_equal(converted.astype(dtype), image, equal_nan=True):
            raise BuildError(f"{path}: image dtype {dtype.name} holds values float32 cannot represent "
                             "exactly; convert the image to float32 yourself if that precision is enough")
        return converted
    raise BuildError(f"{path}: unsupported image dtype {dtype}; expected uint8, uint16, int32 or float32")


def to_label_mask(mask, path):
    """Return (mask H x W of an unsigned integer dtype, max label) or raise BuildError."""
    if mask.ndim == 3 and mask.shape[2] in (1, 3):
        if mask.shape[2] == 3 and not (np.array_equal(mask[..., 0], mask[..., 1])
                                       and np.array_equal(mask[..., 0], mask[..., 2])):
            raise BuildError(f"{path}: mask is RGB with differing channels; expected one class id per "
                             "pixel (a 2-D mask, or 3 identical channels)")
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise BuildError(f"{path}: mask has shape {mask.shape}; expected H x W class ids "
                         "(or H x W x 3 with identical channels)")
    if mask.dtype.kind == "b":
        mask = mask.astype(np.uint8)
    if mask.dtype.kind == "f":
        raise BuildError(f"{path}: mask has float dtype {mask.dtype.name}; masks must hold integer "
                         "class ids (0 = background)")
    if mask.dtype.kind not in "iu":
        raise BuildError(f"{path}: unsupported mask dtype {mask.dtype}; expected integer class ids")
    low, high = (int(mask.min()), int(mask.max())) if mask.size else (0, 0)
    if low < 0:
        raise BuildError(f"{path}: mask holds negative values (min {low}); class ids must be >= 0")
    if high > np.iinfo(np.uint16).max:
        raise BuildError(f"{path}: mask holds class id {high}; at most 65535 classes are supported "
                         "(is this an instance/object-id mask rather than class ids?)")
    return mask.astype(np.uint8 if high <= 255 else np.uint16), high


def load_pair(pair):
    """Read and convert one pair: (image H x W x C in a stored dtype, mask H x W, max label)."""
    mask, max_label = to_label_mask(read_array(pair.mask_path, "mask"), pair.mask_path)
    image = read_array(pair.image_path, "image")
    if image.ndim == 3 and image.shape[:2] != mask.shape and image.shape[1:] == mask.shape:
        # Multi-page TIFFs come channels-first (C x H x W); the mask's H x W tells which axes are which.
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    if image.ndim != 3:
        raise BuildError(f"{pair.image_path}: image has shape {image.shape}; expected H x W or H x W x C")
    if image.shape[:2] != mask.shape:
        raise BuildError(f"size mismatch: image {pair.image_path} is {image.shape[0]}x{image.shape[1]} "
                         f"but mask {pair.mask_path} is {mask.shape[0]}x{mask.shape[1]}")
    return to_storable_image(image, pair.image_path), mask, max_label


def check_pairs(pairs, progress=None):
    """Read and validate every pair before anything is written.

    Returns:
      (checked, cache): a CheckedPair per pair, and a dict stem -> (image, mask) of the pairs
      kept in memory (up to CACHE_BUDGET_BYTES) so the write pass need not read them again.
    Raises:
      BuildError listing every problem found (up to MAX_LISTED_PROBLEMS of them).
    """
    checked, cache, problems = [], {}, []
    cached_bytes = 0
    for pair in pairs:
        try:
            image, mask, max_label = load_pair(pair)
        except BuildError as exc:
            problems.append(str(exc))
        else:
            checked.append(CheckedPair(pair, image.shape, image.dtype, max_label))
            if cached_bytes + image.nbytes + mask.nbytes <= CACHE_BUDGET_BYTES:
                cache[pair.stem] = (image, mask)
                cached_bytes += image.nbytes + mask.nbytes
        if progress:
            progress.advance()
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        raise BuildError(f"{len(problems)} of {len(pairs)} pair(s) are not usable:\n  "
                         + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else ""))
    return checked, cache


def common_image_dtype(checked):
    """The one dtype all images are stored in: the lossless promotion of their dtypes."""
    by_dtype = {}
    for c in checked:
        by_dtype.setdefault(c.image_dtype, c.pair.image_path)
    common = np.result_type(*by_dtype)
    if common not in STORED_IMAGE_DTYPES:
        examples = ", ".join(f"{d.name} ({p})" for d, p in by_dtype.items())
        raise BuildError(f"images mix dtypes that no stored dtype holds exactly: {examples}; "
                         "convert them to one dtype")
    by_channels = {}
    for c in checked:
        by_channels.setdefault(c.image_shape[2], c.pair.image_path)
    if len(by_channels) > 1:
        examples = ", ".join(f"{n} channel(s) ({p})" for n, p in sorted(by_channels.items()))
        raise BuildError(f"images differ in channel count: {examples}; one dataset needs one count")
    return common


# ----------------------------------------------------------------------------- split and tiles

def split_indices(num_images, train_fraction, seed):
    """Split source image indices into (train, test), each sorted; reproducible for a seed.

    The train count is num_images * train_fraction rounded to the nearest integer.
    """
    num_train = int(math.floor(num_images * train_fraction + 0.5))
    if num_train == 0:
        raise BuildError(f"--train_fraction {train_fraction} with {num_images} image(s) leaves the "
                         "train set empty; use a larger fraction or more images")
    if train_fraction < 1.0 and num_train == num_images:
        raise BuildError(f"--train_fraction {train_fraction} with {num_images} image(s) leaves the test "
                         f"set empty ({num_train} train, 0 test); use more images, a smaller fraction, "
                         "or --train_fraction 1 for an empty test database")
    order = np.random.default_rng(seed).permutation(num_images)
    return sorted(order[:num_train].tolist()), sorted(order[num_train:].tolist())


def tile_origins(length, tile_size, overlap=0):
    """Start offsets of tiles along one axis; the last tile is shifted inward to stay full size.

    An axis no longer than the tile gives a single start 0 (the whole axis is one tile).
    """
    if tile_size is None or length <= tile_size:
        return [0]
    stride = tile_size - overlap
    return list(range(0, length - tile_size, stride)) + [length - tile_size]


def tiles_of(image, mask, tile_size, overlap=0):
    """Yield (y, x, image_tile, mask_tile) covering the whole image; no tiling when tile_size is None."""
    height, width = mask.shape
    size_y = height if tile_size is None else min(tile_size, height)
    size_x = width if tile_size is None else min(tile_size, width)
    for y in tile_origins(height, tile_size, overlap):
        for x in tile_origins(width, tile_size, overlap):
            yield y, x, image[y:y + size_y, x:x + size_x], mask[y:y + size_y, x:x + size_x]


# ----------------------------------------------------------------------------- writing

def write_split(path, items, cache, config, image_dtype, mask_dtype, metadata_fields, progress=None):
    """Write one database at ``path`` from the CheckedPairs ``items``.

    Returns:
      (metadata, raw_pixel_bytes).
    """
    raw_bytes = [0]

    def records_of_split():
        for item in items:
            pair = item.pair
            if pair.stem in cache:
                image, mask = cache.pop(pair.stem)
            else:
                image, mask, _ = load_pair(pair)
                if image.shape != item.image_shape or image.dtype != item.image_dtype:
                    raise BuildError(f"{pair.image_path} changed while the databases were being built")
            image = image.astype(image_dtype, copy=False)
            mask = mask.astype(mask_dtype, copy=False)
            for y, x, image_tile, mask_tile in tiles_of(image, mask, config.tile_size, config.tile_overlap):
                source = {"image": pair.image_path, "mask": pair.mask_path}
                if config.tile_size is not None:
                    source["tile"] = [int(y), int(x)]
                raw_bytes[0] += image_tile.nbytes + mask_tile.nbytes
                yield image_tile, mask_tile, source
            if progress:
                progress.advance()

    metadata = records.write_database(path, records_of_split(), metadata_fields)
    return metadata, raw_bytes[0]


def install_databases(built, scratch_dir):
    """Rename each new database over its target; roll every target back if any step fails.

    Args:
      built: list of (new_path, target_path); new paths live in scratch_dir.
      scratch_dir: where previous databases wait (as previous-<name>) until all new ones are in
        place; the caller deletes it afterwards, which deletes them.
    Raises:
      the original exception after a successful roll back, or BuildError naming where a previous
      database was left when even the roll back failed.
    """
    done = []  # [target, backup or None, installed]
    try:
        for new_path, target in built:
            backup = None
            if os.path.lexists(target):
                backup = os.path.join(scratch_dir, "previous-" + os.path.basename(target))
                os.rename(target, backup)
            done.append([target, backup, False])
            os.rename(new_path, target)
            done[-1][2] = True
    except BaseException as exc:
        stranded = []
        for target, backup, installed in reversed(done):
            try:
                if installed:
                    os.rename(target, os.path.join(scratch_dir, "failed-" + os.path.basename(target)))
                if backup is not None:
                    os.rename(backup, target)
            except OSError:
                stranded.append(f"{backup} (belongs at {target})")
        if stranded:
            raise BuildError(f"installing the new databases failed ({exc}) and so did restoring the "
                             f"previous ones; they are kept at: {', '.join(stranded)}") from exc
        raise


def _clean_scratch(scratch_dir):
    """Delete the scratch directory, unless a previous database is still stranded in it."""
    names = os.listdir(scratch_dir) if os.path.isdir(scratch_dir) else []
    if not any(name.startswith("previous-") for name in names):
        shutil.rmtree(scratch_dir, ignore_errors=True)
        return
    for name in names:
        if not name.startswith("previous-"):
            shutil.rmtree(os.path.join(scratch_dir, name), ignore_errors=True)


def directory_bytes(path):
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


def _check_targets(targets, output_folder, needed_bytes):
    if os.path.exists(output_folder) and not os.path.isdir(output_folder):
        raise BuildError(f"--output_folder {output_folder} exists and is not a directory")
    for target in targets.values():
        if os.path.lexists(target) and not os.path.isfile(os.path.join(target, "data.mdb")):
            raise BuildError(f"{target} exists and is not an LMDB database; refusing to replace it "
                             "(move it away or choose another --dataset_name)")
    existing = output_folder
    while not os.path.isdir(existing):
        existing = os.path.dirname(os.path.abspath(existing))
    free = shutil.disk_usage(existing).free
    if needed_bytes > free:
        raise BuildError(f"{output_folder}: the databases need about {needed_bytes / 1e6:.1f} MB but only "
                         f"{free / 1e6:.1f} MB are free")


def build_databases(config, show_progress=None):
    """Validate the inputs, then write train-<name>.lmdb and test-<name>.lmdb atomically.

    Args:
      config: BuildConfig.
      show_progress: progress lines on stderr; None = only when stderr is a terminal.
    Returns:
      BuildResult. Raises BuildError for bad input (nothing written in that case).
    """
    start = time.perf_counter()
    config.validate()
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    pairs = find_pairs(config.image_folder, config.mask_folder, config.image_extensions)
    checked, cache = check_pairs(pairs, _Progress("checking", len(pairs), show_progress))
    image_dtype = common_image_dtype(checked)
    max_label = max(c.max_label for c in checked)
    mask_dtype = np.dtype(np.uint8 if max_label <= 255 else np.uint16)
    train, test = split_indices(len(checked), config.train_fraction, config.seed)
    split_items = {"train": [checked[i] for i in train], "test": [checked[i] for i in test]}

    targets = {s: os.path.join(config.output_folder, f"{s}-{config.dataset_name}.lmdb") for s in SPLITS}
    pixels = sum(c.image_shape[0] * c.image_shape[1] for c in checked)
    bytes_per_pixel = checked[0].image_shape[2] * image_dtype.itemsize + mask_dtype.itemsize
    overlap_factor = 1.0 if not config.tile_size else (config.tile_size / (config.tile_size - config.tile_overlap)) ** 2
    _check_targets(targets, config.output_folder, int(pixels * bytes_per_pixel * overlap_factor * 1.1) + (1 << 20))

    created_output = not os.path.isdir(config.output_folder)
    os.makedirs(config.output_folder, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".build_lmdb-", dir=config.output_folder)
    succeeded = False
    try:
        metadata, raw_bytes, built = {}, {}, []
        for split in SPLITS:
            new_path = os.path.join(scratch, os.path.basename(targets[split]))
            fields = {
                "split": split, "split_seed": config.seed, "train_fraction": config.train_fraction,
                "extra": {
                    "dataset_name": config.dataset_name,
                    "source_images": len(split_items[split]),
                    "dataset_number_classes": max_label + 1,
                    "tile_size": config.tile_size,
                    "tile_overlap": config.tile_overlap,
                    "image_folder": config.image_folder,
                    "mask_folder": config.mask_folder,
                },
            }
            progress = _Progress(f"writing {split}", len(split_items[split]), show_progress)
            metadata[split], raw_bytes[split] = write_split(
                new_path, split_items[split], cache, config, image_dtype, mask_dtype, fields, progress)
            built.append((new_path, targets[split]))
        install_databases(built, scratch)
        succeeded = True
    finally:
        if succeeded:
            shutil.rmtree(scratch, ignore_errors=True)  # also deletes the replaced databases
        else:
            _clean_scratch(scratch)
        if not succeeded and created_output and not os.listdir(config.output_folder):
            os.rmdir(config.output_folder)
    return BuildResult(
        paths=targets, metadata=metadata,
        source_images={s: len(split_items[s]) for s in SPLITS},
        database_bytes={s: directory_bytes(targets[s]) for s in SPLITS},
        raw_pixel_bytes=raw_bytes, seconds=time.perf_counter() - start, config=config)


def format_summary(result):
    """A few human-readable lines: images, records, class pixels and size of each database."""
    c = result.config
    total = sum(result.source_images.values())
    tiling = f", {c.tile_size}px tiles overlapping {c.tile_overlap}px" if c.tile_size else ""
    lines = [f"Built {total} image/mask pairs in {result.seconds:.1f} s "
             f"(seed {c.seed}, train_fraction {c.train_fraction}{tiling}):"]
    for split in SPLITS:
        meta = result.metadata[split]
        size, raw = result.database_bytes[split], result.raw_pixel_bytes[split]
        overhead = f", {100.0 * (size / raw - 1):+.1f}% over raw pixels" if raw else ""
        lines.append(f"  {split:5s} {result.source_images[split]:6d} images -> {meta['num_records']:6d} "
                     f"records  {size / 1e6:8.2f} MB{overhead}  {result.paths[split]}")
        counts = "  ".join(f"{k}: {n:,}" for k, n in enumerate(meta["class_pixel_counts"]))
        lines.append(f"        pixels per class  {counts or '(no records)'}")
    return "\n".join(lines)


class _Progress:
    """A one-line progress counter on stderr, redrawn at most 10 times a second."""

    def __init__(self, label, total, enabled):
        self.label, self.total, self.enabled = label, total, enabled
        self.done, self.start, self.last_draw = 0, time.perf_counter(), 0.0

    def advance(self):
        self.done += 1
        now = time.perf_counter()
        finished = self.done >= self.total
        if self.enabled and (finished or now - self.last_draw >= 0.1):
            self.last_draw = now
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            rate = self.done / max(now - self.start, 1e-9)
            sys.stderr.write(f"\r{self.label:14s} [{'=' * filled}{' ' * (width - filled)}] "
                             f"{self.done}/{self.total} images, {rate:.0f}/s")
            if finished:
                sys.stderr.write("\n")
            sys.stderr.flush()


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="build_lmdb.py",
        description="Turn a folder of images and a folder of masks into train-<name>.lmdb and "
                    "test-<name>.lmdb. Every file is read and checked before anything is written; "
                    "the databases are built in a temporary directory and renamed into place, so "
                    "an existing database is replaced only once the new one is complete.")
    parser.add_argument("--image_folder", required=True,
                        help="folder of images: H x W grayscale or H x W x C, uint8/uint16/int32/"
                             "float32 (other integer/float dtypes are converted when lossless)")
    parser.add_argument("--mask_folder", required=True,
                        help="folder of masks with the same file stems as the images (a.tif pairs "
                             "with a.png): H x W integer class ids, 0 = background")
    parser.add_argument("--output_folder", "--output_filepath", dest="output_folder", required=True,
                        help="folder that receives train-<name>.lmdb and test-<name>.lmdb (created "
                             "if missing); --output_filepath is the original tool's name for it")
    parser.add_argument("--dataset_name", required=True, help="<name> in the database file names")
    parser.add_argument("--train_fraction", type=float, default=0.8,
                        help="fraction of the source images that go to the train database, in "
                             "(0, 1] (rounded to whole images; default 0.8). With 1 the test "
                             "database is still written, holding 0 records")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the train/test split: same inputs and seed give the same split "
                             "(default 0)")
    parser.add_argument("--tile_size", type=int, default=None,
                        help="cut images larger than N x N into N x N tiles (edge tiles are shifted "
                             "inward so every tile is full size; images smaller than N are stored "
                             "whole). The split is made per source image, so the tiles of one image "
                             "never land in both train and test. Default: store whole images")
    parser.add_argument("--tile_overlap", type=int, default=0,
                        help="pixels shared by neighbouring tiles (needs --tile_size; default 0)")
    parser.add_argument("--image_extensions", nargs="+", default=list(DEFAULT_EXTENSIONS),
                        metavar="EXT",
                        help="file extensions to read, space or comma separated (default: tif tiff "
                             "png); jpg/jpeg are accepted for images only, masks must be lossless")
    args = parser.parse_args(argv)
    return BuildConfig(
        image_folder=args.image_folder, mask_folder=args.mask_folder,
        output_folder=args.output_folder, dataset_name=args.dataset_name,
        train_fraction=args.train_fraction, seed=args.seed, tile_size=args.tile_size,
        tile_overlap=args.tile_overlap, image_extensions=normalize_extensions(args.image_extensions))


def _raise_on_sigterm(signum, frame):
    # SystemExit unwinds through build_databases' cleanup, like Ctrl-C does.
    raise SystemExit(128 + signum)


def main(argv=None):
    config = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    print("build_lmdb configuration: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items()))
    try:
        result = build_databases(config)
    except (BuildError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: no database was changed", file=sys.stderr)
        return 130
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
