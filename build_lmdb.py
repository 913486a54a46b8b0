"""Build a train and a test LMDB database from a folder of images and a folder of masks.

    python build_lmdb.py --image_folder data/images --mask_folder data/masks \\
        --output_folder data --dataset_name cells [--train_fraction 0.8] [--seed 0] [--tile_size 512]
        [--folds 5]
    python build_lmdb.py --image_folder data/unlabelled --unlabelled_only --output_folder data \\
        --dataset_name cells [--tile_size 512]      # one unlabelled-<name>.lmdb for pretrain_unet.py

The steps, each a small function below:
  1. ``find_pairs``: match images and masks by file stem.
  2. ``check_pairs``: read and validate every pair, and compute each source image's normalisation
     statistics and class pixel counts; nothing is written when anything is wrong.
  3. ``split_indices`` (or ``fold_indices`` for --folds): split the *source images* into train and
     test with a seeded generator.
  4. ``write_split``: write each database into a scratch directory beside the target (train
     images cut into tiles when asked; test images always whole, so the test pass predicts them
     as inference.py does and counts every pixel once).
  5. ``install_databases``: rename the new databases into place; a previous database is moved
     aside only once the new one is complete, and restored if anything fails.
The record format lives in records.py, the statistics in normalization.py, the tile plan in tiling.py.
"""
import argparse
import dataclasses
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Optional

import numpy as np

import image_io
import normalization
import progress
import records
import tiling

SUPPORTED_EXTENSIONS = ("tif", "tiff", "png", "jpg", "jpeg")
DEFAULT_EXTENSIONS = ("tif", "tiff", "png")
# JPEG compression changes pixel values, which would silently change class ids.
LOSSY_EXTENSIONS = ("jpg", "jpeg")
STORED_IMAGE_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.int32, np.float32))
# Decoded pairs are kept in memory between the validation and the write pass up to this many
# bytes; beyond it the write pass reads the files again (memory stays bounded on large sets).
CACHE_BUDGET_BYTES = 1 << 30
MAX_LISTED_PROBLEMS = 30
# Scratch directories are named .build_lmdb-<host>-<pid>-<random>, so a later build can tell those
# of builds that are no longer running (killed with SIGKILL, or by a crash of the machine).
SCRATCH_PREFIX = ".build_lmdb-"
_SCRATCH_NAME = re.compile(r"^\.build_lmdb-(?P<host>.+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


class BuildError(Exception):
    """Bad input or an impossible request; the message names the file or value at fault."""


@dataclasses.dataclass
class BuildConfig:
    image_folder: str
    mask_folder: Optional[str]  # None with unlabelled_only
    output_folder: str
    dataset_name: str
    train_fraction: Optional[float] = 0.8  # None (unused) with folds
    seed: int = 0
    tile_size: Optional[int] = None
    tile_overlap: int = 0
    image_extensions: tuple = DEFAULT_EXTENSIONS
    masks_255_to_1: bool = False  # binary masks saved as 0/255: store 255 as class 1
    first_axis_is_channels: bool = False  # a 3-D C x H x W image with H x W masks: C is channels
    folds: Optional[int] = None  # K train/test pairs whose test sets partition the images
    # Images without masks: one unlabelled-<name>.lmdb (every image, tiled like a train database)
    # whose masks are all 0 placeholders, for self-supervised pretraining (pretrain_unet.py).
    unlabelled_only: bool = False
    # Sparse annotations (docs/sparse-labels.md): the mask value meaning "not annotated", or the
    # painting-tool convention (0 = not annotated, painted label L = class L - 1). Either one stores
    # unlabelled pixels as records.IGNORE_LABEL, which training and the test pass leave out.
    unlabelled_value: Optional[int] = None
    scribbles: bool = False
    number_classes: Optional[int] = None  # declared class count: a mask value beyond it is refused

    @property
    def sparse(self):
        return self.scribbles or self.unlabelled_value is not None

    def label_options(self):
        """The keyword arguments of to_label_mask besides masks_255_to_1."""
        return {"unlabelled_value": self.unlabelled_value, "scribbles": self.scribbles,
                "number_classes": self.number_classes}

    def validate(self):
        """Check the plain values (not the files); raises BuildError."""
        if self.unlabelled_only:
            self._validate_unlabelled()
        elif self.mask_folder is None:
            raise BuildError("--mask_folder is required (give the folder of masks), unless the images have "
                             "no masks: then build an unlabelled database with --unlabelled_only")
        elif os.path.realpath(self.image_folder) == os.path.realpath(self.mask_folder):
            raise BuildError(f"--image_folder and --mask_folder are the same folder ({self.image_folder}): "
                             "every image would be paired with itself as its mask; give the folder "
                             "holding the masks")
        if not 0 <= self.seed < 2 ** 32:  # numpy's generators take no negative seed
            raise BuildError(f"--seed {self.seed}: expected an integer from 0 to {2 ** 32 - 1}")
        if self.folds is not None and not (isinstance(self.folds, int) and self.folds >= 2):
            raise BuildError(f"--folds {self.folds}: expected an integer >= 2 (5 is usual)")
        name = self.dataset_name
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise BuildError(f"--dataset_name {name!r}: expected a plain name without path separators")
        if self.folds is None and not (0.0 < self.train_fraction <= 1.0):  # also false for NaN
            raise BuildError(f"--train_fraction {self.train_fraction}: expected a value in (0, 1]")
        if self.tile_size is not None and self.tile_size < 1:
            raise BuildError(f"--tile_size {self.tile_size}: expected a positive number of pixels")
        if self.tile_size is None and self.tile_overlap != 0:
            raise BuildError(f"--tile_overlap {self.tile_overlap} needs --tile_size")
        if self.tile_size is not None and not (0 <= self.tile_overlap < self.tile_size):
            raise BuildError(f"--tile_overlap {self.tile_overlap}: expected 0 <= overlap < "
                             f"--tile_size ({self.tile_size})")
        if self.scribbles and self.unlabelled_value is not None:
            raise BuildError(f"--scribbles and --unlabelled_value {self.unlabelled_value} exclude each other: "
                             "with --scribbles the unlabelled value is 0 (painted label L is class L - 1)")
        if self.scribbles and self.masks_255_to_1:
            raise BuildError("--scribbles and --masks_255_to_1 exclude each other: scribble masks hold "
                             "painted labels 1, 2, ... (label L is class L - 1), not 0/255")
        if self.masks_255_to_1 and self.unlabelled_value in (0, 255):
            raise BuildError(f"--unlabelled_value {self.unlabelled_value} with --masks_255_to_1: 0 and 255 "
                             "are the two classes of a 0/255 mask; give another value (e.g. 128)")
        if self.number_classes is not None and not (isinstance(self.number_classes, int) and self.number_classes >= 2):
            raise BuildError(f"--number_classes {self.number_classes}: expected an integer >= 2 "
                             "(background and at least one foreground class)")
        extensions = image_io.parse_extensions(self.image_extensions)
        unknown = [e for e in extensions if e not in SUPPORTED_EXTENSIONS]
        if unknown or not extensions:
            given = self.image_extensions if isinstance(self.image_extensions, str) else " ".join(self.image_extensions)
            raise BuildError(f"--image_extensions {given or '(none)'}: "
                             f"expected some of {', '.join(SUPPORTED_EXTENSIONS)}")

    def _validate_unlabelled(self):
        if self.mask_folder is not None:
            raise BuildError(f"--unlabelled_only builds a database of images without masks, but --mask_folder "
                             f"{self.mask_folder} was given: drop one of the two flags")
        if self.folds is not None:
            raise BuildError(f"--folds {self.folds} with --unlabelled_only: an unlabelled database is one "
                             "database of every image, not split; drop --folds")
        if self.masks_255_to_1:
            raise BuildError("--masks_255_to_1 with --unlabelled_only: there are no masks; drop the flag")
        if self.sparse:
            raise BuildError("--scribbles / --unlabelled_value with --unlabelled_only: there are no masks to "
                             "read them in; drop the flag")


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
    statistics: normalization.ChannelStatistics  # of the whole source image, before any tiling
    class_counts: list  # annotated pixels per class id (index = id) of the whole source image
    objects: dict = None  # class id -> [(extent, width) px] of its objects (measure_objects)
    unlabelled_pixels: int = 0  # pixels stored as records.IGNORE_LABEL (sparse annotations)


@dataclasses.dataclass
class BuildResult:
    paths: dict  # database key ("train", "test", or "train-fold0", "test-fold0", ...) -> path
    metadata: dict  # key -> metadata dict written
    source_images: dict  # key -> number of source images
    database_bytes: dict  # key -> bytes of the database files on disk
    raw_pixel_bytes: dict  # key -> bytes of the image and mask pixels stored
    seconds: float
    config: BuildConfig
    warnings: list = dataclasses.field(default_factory=list)  # also printed on stderr


# ----------------------------------------------------------------------------- finding pairs

def _files_by_stem(folder, extensions, kind, problems):
    if not os.path.exists(folder):
        raise BuildError(f"{kind} folder {folder} does not exist")
    if not os.path.isdir(folder):
        raise BuildError(f"{kind} folder {folder} is not a directory")
    by_stem = {}
    try:
        found = image_io.list_files(folder, extensions)
    except OSError as exc:  # e.g. a folder without read permission
        raise BuildError(f"{kind} folder {folder}: cannot list its files ({exc.strerror})") from exc
    for path in found:
        by_stem.setdefault(path.stem, []).append(str(path))
    if not by_stem:
        others = sum(1 for name in os.listdir(folder)
                     if not name.startswith(".") and os.path.isfile(os.path.join(folder, name)))
        raise BuildError(f"{kind} folder {folder} holds no files ending in "
                         f"{', '.join('.' + e for e in extensions)} ({others} other files)")
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            problems.append(f"{kind} name {stem!r} is ambiguous: {', '.join(paths)}")
    return {stem: paths[0] for stem, paths in by_stem.items()}


def find_pairs(image_folder, mask_folder, extensions):
    """Match images and masks by file stem (a.tif pairs with a.png); ``mask_folder`` None lists the
    images alone (their Pairs have mask_path None).

    Returns:
      list of Pair sorted by stem. Raises BuildError listing every unpaired file.
    """
    extensions = image_io.parse_extensions(extensions)
    problems = []
    images = _files_by_stem(image_folder, extensions, "image", problems)
    if mask_folder is None:  # --unlabelled_only: images alone
        if problems:
            raise BuildError("\n".join(problems))
        return [Pair(stem, images[stem], None) for stem in sorted(images)]
    masks = _files_by_stem(mask_folder, extensions, "mask", problems)
    for stem, path in sorted(masks.items()):
        if image_io.extension_of(path) in LOSSY_EXTENSIONS:
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

def _read(path, kind):
    """image_io.read_array, its errors as BuildError (they are listed with the other bad pairs)."""
    try:
        return image_io.read_array(path, kind)
    except image_io.ImageFileError as exc:
        raise BuildError(str(exc)) from exc


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


def to_label_mask(mask, path, masks_255_to_1=False, unlabelled_value=None, scribbles=False,
                  number_classes=None):
    """Return (mask H x W of class ids, max label) or raise BuildError.

    With ``masks_255_to_1`` a binary 0/255 mask becomes 0/1; any other value is refused, since
    mapping only 255 would silently merge it with whatever class 1 already means.
    Sparse annotations: pixels equal to ``unlabelled_value``, or with ``scribbles`` the pixels 0
    (and painted label L becomes class L - 1), become records.IGNORE_LABEL in a signed dtype; a
    mask without any annotated pixel is refused. ``number_classes``: a class id >= it is refused.
    Dense masks come back unsigned (uint8 or uint16), sparse ones signed (int16 or int32).
    """
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
    unlabelled = None
    if scribbles:
        unlabelled = mask == 0
    elif unlabelled_value is not None:
        unlabelled = mask == unlabelled_value
    if masks_255_to_1:
        others = sorted(set(np.unique(mask).tolist()) - {0, 255, unlabelled_value})
        if others:
            raise BuildError(f"{path}: --masks_255_to_1 is for binary 0/255 masks, but this mask also "
                             f"holds {', '.join(map(str, others[:5]))}; drop the flag, or convert the "
                             "masks to class ids yourself")
        mask = (mask == 255).astype(np.uint8)
    if unlabelled is not None:
        return _sparse_label_mask(mask, unlabelled, path, unlabelled_value, scribbles, number_classes)
    low, high = (int(mask.min()), int(mask.max())) if mask.size else (0, 0)
    if low < 0:
        raise BuildError(f"{path}: mask holds negative values (min {low}); class ids must be >= 0")
    if high > np.iinfo(np.uint16).max:
        raise BuildError(f"{path}: mask holds class id {high}; at most 65535 classes are supported "
                         "(is this an instance/object-id mask rather than class ids?)")
    _check_declared_classes(high, mask, path, number_classes, scribbles=False)
    return mask.astype(np.uint8 if high <= 255 else np.uint16), high


def _sparse_label_mask(mask, unlabelled, path, unlabelled_value, scribbles, number_classes):
    """to_label_mask for a mask with unlabelled pixels: class ids, IGNORE_LABEL where unlabelled."""
    annotated = mask[~unlabelled]
    if annotated.size == 0:
        what = "0 (unpainted) with --scribbles" if scribbles else f"--unlabelled_value {unlabelled_value}"
        raise BuildError(f"{path}: mask holds no annotated pixel (every pixel is {what}); annotate at "
                         "least a stroke of background and of each class present, or leave the image out")
    low, high = int(annotated.min()), int(annotated.max())
    if low < 0:
        raise BuildError(f"{path}: mask holds negative values (min {low}); class ids must be >= 0")
    if high > np.iinfo(np.uint16).max:
        raise BuildError(f"{path}: mask holds class id {high}; at most 65535 classes are supported "
                         "(is this an instance/object-id mask rather than class ids?)")
    labels = mask.astype(np.int32) - (1 if scribbles else 0)  # painted label L is class L - 1
    high -= 1 if scribbles else 0
    _check_declared_classes(high, labels[~unlabelled], path, number_classes, scribbles)
    labels[unlabelled] = records.IGNORE_LABEL
    return labels.astype(np.int16 if high <= np.iinfo(np.int16).max else np.int32), high


def _check_declared_classes(high, labels, path, number_classes, scribbles):
    if number_classes is None or high < number_classes:
        return
    beyond = sorted(int(v) for v in np.unique(labels[labels >= number_classes]))[:5]
    if scribbles:
        raise BuildError(f"{path}: mask holds painted label(s) {', '.join(str(v + 1) for v in beyond)}, "
                         f"beyond --number_classes {number_classes} (with --scribbles paint background as "
                         f"1 and class k as k + 1, so labels 1..{number_classes}); fix the painting or "
                         "raise --number_classes")
    raise BuildError(f"{path}: mask holds value(s) {', '.join(map(str, beyond))} outside --number_classes "
                     f"{number_classes} (class ids 0..{number_classes - 1}); is the unlabelled value another "
                     "one (--unlabelled_value)? Fix the mask or raise --number_classes")


def load_pair(pair, masks_255_to_1=False, first_axis_is_channels=False, **label_options):
    """Read and convert one pair: (image H x W x C in a stored dtype, mask H x W, max label).
    ``label_options``: the sparse-annotation keywords of to_label_mask.

    A pair without a mask (--unlabelled_only) gets an all-0 uint8 placeholder mask, so the readers
    crop and augment it like any other record."""
    if pair.mask_path is None:
        image = _image_without_mask(pair.image_path, first_axis_is_channels)
        return image, np.zeros(image.shape[:2], np.uint8), 0
    mask, max_label = to_label_mask(_read(pair.mask_path, "mask"), pair.mask_path, masks_255_to_1,
                                    **label_options)
    image = _read(pair.image_path, "image")
    if image.ndim == 3 and image.shape[:2] != mask.shape and image.shape[1:] == mask.shape:
        # N x H x W beside an H x W mask: multi-page TIFFs of channels look like this, but so do Z
        # and time stacks, which stored as channels would train a silently different network.
        if not first_axis_is_channels:
            raise BuildError(
                f"{pair.image_path}: image has shape {image.shape}, a stack of {image.shape[0]} planes "
                f"beside the {mask.shape[0]}x{mask.shape[1]} mask {pair.mask_path}. If the first axis "
                "holds channels, build with --first_axis_is_channels; a Z or time stack needs one "
                "image file per plane (or a projection) for 2-D masks")
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    if image.ndim != 3:
        raise BuildError(f"{pair.image_path}: image has shape {image.shape}; expected H x W or H x W x C")
    if image.shape[:2] != mask.shape:
        raise BuildError(f"size mismatch: image {pair.image_path} is {image.shape[0]}x{image.shape[1]} "
                         f"but mask {pair.mask_path} is {mask.shape[0]}x{mask.shape[1]}")
    image = to_storable_image(image, pair.image_path)
    if image.dtype.kind == "f":
        bad = int(image.size - np.count_nonzero(np.isfinite(image)))
        if bad:
            raise BuildError(f"{pair.image_path}: {bad} of {image.size} pixel values are not finite (NaN or "
                             "Inf); replace them (e.g. with the image's median) or leave the image out: "
                             "they would make every loss and normalised pixel of the image NaN")
    return image, mask, max_label


def _image_without_mask(path, first_axis_is_channels):
    """One image of an unlabelled database as H x W x C in a stored dtype (no mask to tell a C x H x W
    stack from an H x W x C image, so a 3-D image whose last axis is long is refused unless
    --first_axis_is_channels says its first axis holds channels)."""
    image = _read(path, "image")
    if image.ndim == 3 and first_axis_is_channels:
        image = np.moveaxis(image, 0, -1)
    elif image.ndim == 3 and image.shape[2] > 4 and image.shape[0] < image.shape[2]:
        raise BuildError(f"{path}: image has shape {image.shape}, which looks like a stack of {image.shape[0]} "
                         "planes. If the first axis holds channels, build with --first_axis_is_channels; a Z "
                         "or time stack needs one image file per plane (or a projection)")
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    if image.ndim != 3:
        raise BuildError(f"{path}: image has shape {image.shape}; expected H x W or H x W x C")
    image = to_storable_image(image, path)
    if image.dtype.kind == "f" and not np.all(np.isfinite(image)):
        raise BuildError(f"{path}: some pixel values are not finite (NaN or Inf); replace them (e.g. with the "
                         "image's median) or leave the image out")
    return image


def check_pairs(pairs, progress=None, masks_255_to_1=False, first_axis_is_channels=False, **label_options):
    """Read and validate every pair before anything is written, computing what the metadata and
    the records need from each whole source image (normalisation statistics, class pixel counts).

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
            image, mask, max_label = load_pair(pair, masks_255_to_1, first_axis_is_channels, **label_options)
        except BuildError as exc:
            problems.append(str(exc))
        else:
            # An unlabelled-only image counts no class pixels (its placeholder mask is no label); a
            # sparse mask counts its annotated pixels only.
            labelled = pair.mask_path is not None
            annotated = mask[mask >= 0] if labelled else mask[:0]
            checked.append(CheckedPair(pair, image.shape, image.dtype, max_label,
                                       normalization.channel_statistics(image),
                                       np.bincount(annotated.ravel()).tolist() if labelled else [],
                                       objects=measure_objects(mask) if labelled else {},
                                       unlabelled_pixels=int(mask.size - annotated.size) if labelled else 0))
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


def fold_indices(num_images, folds, seed):
    """K (train, test) index lists whose test lists partition range(num_images); reproducible.

    The images are permuted with the seed and cut into K nearly equal parts; fold i tests on part
    i and trains on the others.
    """
    if folds > num_images:
        raise BuildError(f"--folds {folds} with {num_images} image(s): every fold needs at least one "
                         "test image; use fewer folds")
    order = np.random.default_rng(seed).permutation(num_images)
    parts = [sorted(part.tolist()) for part in np.array_split(order, folds)]
    return [(sorted(i for j, part in enumerate(parts) if j != k for i in part), parts[k])
            for k in range(folds)]


def tiles_of(image, mask, tile_size, overlap=0):
    """Yield (y, x, image_tile, mask_tile) covering the whole image; no tiling when tile_size is None."""
    height, width = mask.shape
    if tile_size is None:
        yield 0, 0, image, mask
        return
    size_y, size_x = min(tile_size, height), min(tile_size, width)
    for y in tiling.tile_starts(height, size_y, min(overlap, size_y - 1)):
        for x in tiling.tile_starts(width, size_x, min(overlap, size_x - 1)):
            yield y, x, image[y:y + size_y, x:x + size_x], mask[y:y + size_y, x:x + size_x]


# ----------------------------------------------------------------------------- object sizes

def measure_objects(mask):
    """{class id: [(extent, width), ...]} of a whole source mask: for each foreground class (label
    >= 1) and each of its objects, a connected component (8-connectivity) of that label, the larger
    side in pixels of its bounding box (extent) and the diameter of the largest disc inside it
    (width: 2 x its largest distance to the background - 1, so a line n px wide measures about n;
    at most the extent, since the image border is not background). A vessel tree is wide in extent
    and thin in width; a nucleus is about as wide as it is long. Measured on source images, not
    tiles, which would cut objects; train_*.py --time_budget sizes tiles and the UNet's depth from
    them (plan.py).

    In a sparse mask an object touching unlabelled pixels (records.IGNORE_LABEL) may go on beneath
    them, and a brush stroke inside an object always does: those are not measured (a 3 px stroke
    across a 60 px nucleus would read as a thin structure and plan a network that sees 12 px)."""
    from scipy import ndimage

    objects = {}
    square = np.ones((3, 3), dtype=bool)
    unlabelled = mask < 0
    near_unlabelled = ndimage.binary_dilation(unlabelled, structure=square) if unlabelled.any() else None
    for label in np.unique(mask):
        if label < 1:
            continue
        inside = mask == label
        components, count = ndimage.label(inside, structure=square)
        index = np.arange(1, count + 1)
        radii = np.atleast_1d(ndimage.maximum(ndimage.distance_transform_edt(inside), components, index))
        whole = (np.ones(count, dtype=bool) if near_unlabelled is None
                 else ~np.atleast_1d(ndimage.maximum(near_unlabelled, components, index)).astype(bool))
        measured = []
        for box, radius, keep in zip(ndimage.find_objects(components), radii, whole):
            if keep:
                extent = max(box[0].stop - box[0].start, box[1].stop - box[1].start)
                measured.append((extent, int(min(round(2 * radius - 1), extent))))
        objects[int(label)] = measured
    return objects


def object_sizes(items):
    """The metadata's "object_sizes" of a split: per foreground class id (a string, as JSON keys
    are), the number of objects and the 95th percentile and maximum of their extents and of their
    widths (px; see measure_objects)."""
    by_class = {}
    for item in items:
        for label, measured in (item.objects or {}).items():
            by_class.setdefault(label, []).extend(measured)
    sizes = {}
    for label, measured in sorted(by_class.items()):
        if measured:
            extents, widths = np.array(measured).T
            sizes[str(label)] = {"objects": len(measured), "p95_extent_px": float(np.percentile(extents, 95)),
                                 "max_extent_px": int(extents.max()), "p95_width_px": float(np.percentile(widths, 95)),
                                 "max_width_px": int(widths.max())}
    return sizes


# ----------------------------------------------------------------------------- writing

def write_split(path, items, cache, config, image_dtype, mask_dtype, metadata_fields, progress=None,
                tile=True, keep_cached=False):
    """Write one database at ``path`` from the CheckedPairs ``items``.

    Args:
      tile: cut the images into config.tile_size tiles (train databases); False stores them whole.
      keep_cached: leave the pairs in ``cache`` (they go into several databases with --folds).
    Returns:
      (metadata, raw_pixel_bytes).
    """
    raw_bytes = [0]
    tile_size = config.tile_size if tile else None

    def records_of_split():
        for item in items:
            pair = item.pair
            if pair.stem in cache:
                image, mask = cache[pair.stem] if keep_cached else cache.pop(pair.stem)
            else:
                image, mask, _ = load_pair(pair, config.masks_255_to_1, config.first_axis_is_channels,
                                           **config.label_options())
                if image.shape != item.image_shape or image.dtype != item.image_dtype:
                    raise BuildError(f"{pair.image_path} changed while the databases were being built")
            image = image.astype(image_dtype, copy=False)
            mask = mask.astype(mask_dtype, copy=False)
            for y, x, image_tile, mask_tile in tiles_of(image, mask, tile_size, config.tile_overlap):
                source = {"image": pair.image_path, "mask": pair.mask_path}
                if tile_size is not None:
                    source["tile"] = [int(y), int(x)]
                raw_bytes[0] += image_tile.nbytes + mask_tile.nbytes
                # Every tile carries its source image's statistics: a pixel is normalised the same
                # in whichever tile or crop the reader sees it, and as inference normalises it.
                yield image_tile, mask_tile, source, item.statistics
            if progress:
                progress.advance()

    # Overlapping tiles share pixels: the class totals come from the source images instead.
    totals = {records.IGNORE_LABEL: sum(item.unlabelled_pixels for item in items)}
    for item in items:
        for label, count in enumerate(item.class_counts):
            totals[label] = totals.get(label, 0) + count
    fields = dict(metadata_fields, class_pixel_counts=totals)
    fields["extra"] = dict(fields.get("extra") or {}, object_sizes=object_sizes(items))
    metadata = records.write_database(path, records_of_split(), fields)
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


def _make_scratch(output_folder):
    """A new scratch directory named after this host and process (see remove_stale_scratch)."""
    host = socket.gethostname().replace("-", "_") or "host"
    return tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{host}-{os.getpid()}-", dir=output_folder)


def remove_stale_scratch(output_folder):
    """Remove the scratch directories of builds on this host that are no longer running.

    A build killed with SIGKILL (or by a crash) cannot clean up after itself. A previous database
    it had already moved aside (``previous-<name>``) is moved back when ``<name>`` is missing, so no
    good database is ever deleted. Scratch of other hosts (a shared file system) and of running
    builds is left alone. Returns one line per action, for the user.
    """
    host = socket.gethostname().replace("-", "_") or "host"
    actions = []
    if not os.path.isdir(output_folder):
        return actions
    for name in sorted(os.listdir(output_folder)):
        match = _SCRATCH_NAME.match(name)
        path = os.path.join(output_folder, name)
        if not match or match["host"] != host or not os.path.isdir(path) or image_io.process_running(int(match["pid"])):
            continue
        for entry in sorted(os.listdir(path)):
            target = os.path.join(output_folder, entry[len("previous-"):])
            if entry.startswith("previous-") and not os.path.lexists(target):
                os.rename(os.path.join(path, entry), target)
                actions.append(f"restored {target} from the scratch of an interrupted build ({path})")
        shutil.rmtree(path, ignore_errors=True)
        actions.append(f"removed {path}, left by build process {match['pid']} that is no longer running")
    return actions


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


def database_plan(config, num_images):
    """[(key, split, fold or None, image indices)] of the databases to write, in writing order."""
    if config.unlabelled_only:
        return [("unlabelled", "unlabelled", None, list(range(num_images)))]
    if config.folds is None:
        train, test = split_indices(num_images, config.train_fraction, config.seed)
        return [("train", "train", None, train), ("test", "test", None, test)]
    plan = []
    for fold, (train, test) in enumerate(fold_indices(num_images, config.folds, config.seed)):
        plan += [(f"train-fold{fold}", "train", fold, train), (f"test-fold{fold}", "test", fold, test)]
    return plan


def _print_warning(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _mask_warnings(config, checked):
    totals = {}
    for c in checked:
        for label, count in enumerate(c.class_counts):
            if count:
                totals[label] = totals.get(label, 0) + count
    if not config.masks_255_to_1 and 255 in totals and set(totals) <= {0, 255}:
        return [f"every mask in {config.mask_folder} holds only the values 0 and 255, stored as class ids "
                "0 and 255 (number_classes 256). If they are binary masks with 255 = foreground, "
                "rebuild with --masks_255_to_1 (255 becomes class 1), or convert the masks to 0/1 "
                "(mask // 255) yourself"]
    if set(totals) == {0}:
        if config.scribbles:
            return [f"with --scribbles a painted value L is class L - 1 (0 = not painted), and every mask in "
                    f"{config.mask_folder} paints only the value 1: all annotated pixels are class 0 "
                    "(background), nothing teaches the objects. Paint background 1 and objects 2; dense 0/1 "
                    "masks are built without --scribbles"]
        return [f"every annotated pixel of the masks in {config.mask_folder} is class 0 (background): a "
                "network trained on them learns only background"]
    return []


def build_databases(config, show_progress=None, warn=_print_warning):
    """Validate the inputs, then write train-<name>.lmdb and test-<name>.lmdb atomically (with
    --folds K: train-<name>-fold<i>.lmdb and test-<name>-fold<i>.lmdb for i = 0..K-1).

    Args:
      config: BuildConfig.
      show_progress: progress lines on stderr; None = only when stderr is a terminal.
      warn: called with each warning line (default: printed on stderr); they are also returned.
    Returns:
      BuildResult. Raises BuildError for bad input or a full disk (nothing changed in that case).
    """
    start = time.perf_counter()
    config.validate()
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    pairs = find_pairs(config.image_folder, config.mask_folder, config.image_extensions)
    checked, cache = check_pairs(pairs, _Progress("checking", len(pairs), show_progress),
                                 config.masks_255_to_1, config.first_axis_is_channels, **config.label_options())
    image_dtype = common_image_dtype(checked)
    max_label = max(c.max_label for c in checked)
    mask_dtype = stored_mask_dtype(max_label, config.sparse)
    plan = database_plan(config, len(checked))
    warnings = _mask_warnings(config, checked)
    targets = database_paths(config, plan)
    _check_targets(targets, config.output_folder, needed_bytes(config, checked, image_dtype, mask_dtype, len(plan)))

    created_output = not os.path.isdir(config.output_folder)
    os.makedirs(config.output_folder, exist_ok=True)
    warnings += remove_stale_scratch(config.output_folder)
    for line in warnings:
        warn(line)
    scratch = _make_scratch(config.output_folder)
    succeeded = False
    try:
        metadata, raw_bytes, built = {}, {}, []
        for key, split, fold, indices in plan:
            new_path = os.path.join(scratch, os.path.basename(targets[key]))
            items = [checked[i] for i in indices]
            fields = metadata_fields(config, plan, len(checked), max_label, split, fold, len(items))
            writing = _Progress(f"writing {key}", len(items), show_progress)
            try:
                metadata[key], raw_bytes[key] = write_split(
                    new_path, items, cache, config, image_dtype, mask_dtype, fields, writing,
                    tile=split != "test", keep_cached=config.folds is not None)
            except records.NoSpaceError as exc:
                raise BuildError(f"no space left on {config.output_folder} while writing "
                                 f"{os.path.basename(targets[key])} ({exc.detail}); nothing was changed "
                                 "(the previous databases, if any, are unchanged): free some space "
                                 "there or choose another --output_folder, then build again") from exc
            built.append((new_path, targets[key]))
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
        source_images={key: len(indices) for key, _, _, indices in plan},
        database_bytes={key: directory_bytes(path) for key, path in targets.items()},
        raw_pixel_bytes=raw_bytes, seconds=time.perf_counter() - start, config=config, warnings=warnings)


def stored_mask_dtype(max_label, sparse):
    """The smallest mask dtype that holds every label (signed for sparse masks, to hold
    records.IGNORE_LABEL)."""
    if sparse:
        return np.dtype(np.int8 if max_label <= 127 else np.int16 if max_label <= 32767 else np.int32)
    return np.dtype(np.uint8 if max_label <= 255 else np.uint16)


def database_paths(config, plan):
    """{key: output path} of the databases of database_plan's ``plan``."""
    suffix = {key: "" if fold is None else f"-fold{fold}" for key, _, fold, _ in plan}
    return {key: os.path.join(config.output_folder, f"{split}-{config.dataset_name}{suffix[key]}.lmdb")
            for key, split, _, _ in plan}


def needed_bytes(config, checked, image_dtype, mask_dtype, databases):
    """An upper estimate of the disk space ``databases`` databases of the CheckedPairs take."""
    pixels = sum(c.image_shape[0] * c.image_shape[1] for c in checked)
    bytes_per_pixel = checked[0].image_shape[2] * image_dtype.itemsize + mask_dtype.itemsize
    overlap_factor = 1.0 if not config.tile_size else (config.tile_size / (config.tile_size - config.tile_overlap)) ** 2
    copies = 1 if config.folds is None else config.folds  # each image is in K - 1 train sets and 1 test set
    return int(pixels * bytes_per_pixel * overlap_factor * copies * 1.1) + (1 << 20) * databases


def metadata_fields(config, plan, num_images, max_label, split, fold, source_images):
    """The metadata fields records.write_database records for one database of ``plan``."""
    extra = {
        "dataset_name": config.dataset_name,
        "source_images": source_images,
        "dataset_number_classes": max_label + 1,
        # Only train (and unlabelled) databases are tiled; test images are stored whole.
        "tile_size": config.tile_size if split != "test" else None,
        "tile_overlap": config.tile_overlap if split != "test" else 0,
        "image_folder": config.image_folder,
        "mask_folder": config.mask_folder,
        "masks_255_to_1": config.masks_255_to_1,
        # How the masks' unlabelled pixels were declared; they are stored as ignore_label.
        "unlabelled_value": config.unlabelled_value,
        "scribbles": config.scribbles,
        "ignore_label": records.IGNORE_LABEL,
    }
    if fold is not None:
        extra.update(fold=fold, folds=config.folds)
    if config.unlabelled_only:
        extra["unlabelled_only"] = True  # train_unet.py refuses it, pretrain_unet.py reads it
    return {"split": split, "split_seed": config.seed, "extra": extra,
            "train_fraction": config.train_fraction if fold is None
            else round(len(plan[2 * fold][3]) / num_images, 6)}


def format_summary(result):
    """A few human-readable lines: images, records, class pixels and size of each database."""
    c = result.config
    total = sum(list(result.source_images.values())[:2])  # the first train/test pair holds every image
    tiles = f", train images cut into {c.tile_size}px tiles overlapping {c.tile_overlap}px" if c.tile_size else ""
    split = f"{c.folds} folds" if c.folds else f"train_fraction {c.train_fraction}"
    lines = [f"Built {total} image/mask pairs in {result.seconds:.1f} s (seed {c.seed}, {split}{tiles}):"]
    if c.unlabelled_only:
        tiles = f", cut into {c.tile_size}px tiles overlapping {c.tile_overlap}px" if c.tile_size else ""
        lines = [f"Built {total} unlabelled images (no masks) in {result.seconds:.1f} s{tiles}:"]
    width = max(5, *map(len, result.paths))
    for key in result.paths:
        meta = result.metadata[key]
        size, raw = result.database_bytes[key], result.raw_pixel_bytes[key]
        overhead = f", {100.0 * (size / raw - 1):+.1f}% over raw pixels" if raw else ""
        lines.append(f"  {key:{width}s} {result.source_images[key]:6d} images -> {meta['num_records']:6d} "
                     f"records  {size / 1e6:8.2f} MB{overhead}  {result.paths[key]}")
        counts = "  ".join(f"{k}: {n:,}" for k, n in enumerate(meta["class_pixel_counts"]))
        lines.append(f"  {'':{width}s} pixels per class  {counts or '(no records)'}")
        if c.sparse and meta["num_records"]:
            lines.append(f"  {'':{width}s} annotated pixels  {meta['annotated_pixels']:,} of "
                         f"{meta['annotated_pixels'] + meta['unlabelled_pixels']:,} "
                         f"({100.0 * records.annotated_share(meta):.1f}%); the rest is unlabelled")
    return "\n".join(lines)


class _Progress:
    """The images done in one pass (checking, or writing one database), shown on stderr by a
    progress.ProgressLine (when enabled) with the pass's name as its last figure."""

    def __init__(self, label, total, enabled):
        self.label, self.done = label, 0
        self.line = progress.ProgressLine(total, unit="image", stream=sys.stderr) if enabled else None
        if self.line:
            self.line.update(0)  # the line's rate and remaining time count from here

    def advance(self):
        self.done += 1
        if self.line:
            self.line.update(self.done, metric=self.label)


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="build_lmdb.py",
        description="Turn a folder of images and a folder of masks into train-<name>.lmdb and "
                    "test-<name>.lmdb. Every file is read and checked before anything is written; "
                    "the databases are built in a temporary directory and renamed into place, so "
                    "an existing database is replaced only once the new one is complete. Each record "
                    "stores the per-channel mean and std of its whole source image, which training, "
                    "the test pass and inference.py all normalise with.")
    parser.add_argument("--image_folder", required=True,
                        help="folder of images: H x W grayscale or H x W x C, uint8/uint16/int32/"
                             "float32 (other integer/float dtypes are converted when lossless; float "
                             "images with NaN or Inf pixels are refused)")
    parser.add_argument("--mask_folder", default=None,
                        help="folder of masks with the same file stems as the images (a.tif pairs "
                             "with a.png): H x W integer class ids, 0 = background; must not be "
                             "--image_folder. Required unless --unlabelled_only")
    parser.add_argument("--unlabelled_only", action="store_true",
                        help="the images have no masks: write one unlabelled-<name>.lmdb of every image "
                             "(no train/test split; tiled with --tile_size like a train database) for "
                             "self-supervised pretraining with pretrain_unet.py; train_unet.py refuses it")
    parser.add_argument("--output_folder", "--output_filepath", dest="output_folder", required=True,
                        help="folder that receives train-<name>.lmdb and test-<name>.lmdb (created "
                             "if missing); --output_filepath is the original tool's name for it")
    parser.add_argument("--dataset_name", required=True, help="<name> in the database file names")
    parser.add_argument("--train_fraction", type=float, default=None,
                        help="fraction of the source images that go to the train database, in "
                             "(0, 1] (rounded to whole images; default 0.8). With 1 the test "
                             "database is still written, holding 0 records. Not with --folds")
    parser.add_argument("--folds", type=int, default=None, metavar="K",
                        help="cross-validation: write K pairs train-<name>-fold<i>.lmdb / "
                             "test-<name>-fold<i>.lmdb (i = 0..K-1) whose test sets partition the "
                             "images (each image is in exactly one test set; reproducible with --seed)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the train/test split (or of the folds): same inputs and seed "
                             "give the same split (default 0)")
    parser.add_argument("--tile_size", type=int, default=None,
                        help="cut TRAIN images larger than N x N into N x N tiles (edge tiles are "
                             "shifted inward so every tile is full size; images smaller than N are "
                             "stored whole). Test images are always stored whole, so the test pass "
                             "predicts them as inference.py does. The split is made per source image, "
                             "so the tiles of one image never land in both train and test. Default: "
                             "store whole images")
    parser.add_argument("--tile_overlap", type=int, default=0,
                        help="pixels shared by neighbouring train tiles (needs --tile_size; default 0)")
    parser.add_argument("--image_extensions", nargs="+", default=list(DEFAULT_EXTENSIONS),
                        metavar="EXT",
                        help="file extensions to read, space or comma separated (default: tif tiff "
                             "png); jpg/jpeg are accepted for images only, masks must be lossless")
    parser.add_argument("--masks_255_to_1", action="store_true",
                        help="binary masks saved as 0/255: store 255 as class 1 (a mask holding "
                             "other values is refused). Without it such masks are stored as classes "
                             "0 and 255, with a warning")
    parser.add_argument("--first_axis_is_channels", action="store_true",
                        help="3-D images N x H x W beside H x W masks hold N channels (e.g. a "
                             "multi-page TIFF of channels). Without it they are refused as Z or time "
                             "stacks, which 2-D masks cannot label")
    parser.add_argument("--unlabelled_value", type=int, default=None, metavar="V",
                        help="sparse annotations: the mask value meaning 'not annotated' (e.g. 255); "
                             "those pixels are left out of the loss and the test metrics. A mask "
                             "with no annotated pixel is refused")
    parser.add_argument("--scribbles", action="store_true",
                        help="sparse annotations painted in napari/Fiji: 0 = not annotated, painted "
                             "label L = class L - 1 (paint background as 1, class k as k + 1)")
    parser.add_argument("--number_classes", type=int, default=None, metavar="K",
                        help="declare the class count: a mask holding a class id >= K (with "
                             "--scribbles, a label > K) is refused by name. Default: any id is a class")
    args = parser.parse_args(argv)
    if args.unlabelled_only and args.train_fraction is not None:
        parser.error("--train_fraction with --unlabelled_only: an unlabelled database holds every image "
                     "(there is no test split); drop --train_fraction")
    if args.folds is not None and args.train_fraction is not None:
        parser.error("--train_fraction and --folds exclude each other: with --folds K each fold "
                     "tests on 1/K of the images")
    return BuildConfig(
        image_folder=args.image_folder, mask_folder=args.mask_folder,
        output_folder=args.output_folder, dataset_name=args.dataset_name,
        train_fraction=((1.0 if args.unlabelled_only else None if args.folds else 0.8)
                        if args.train_fraction is None else args.train_fraction),
        seed=args.seed,
        tile_size=args.tile_size, tile_overlap=args.tile_overlap,
        image_extensions=image_io.parse_extensions(args.image_extensions),
        masks_255_to_1=args.masks_255_to_1, first_axis_is_channels=args.first_axis_is_channels,
        folds=args.folds, unlabelled_only=args.unlabelled_only, unlabelled_value=args.unlabelled_value,
        scribbles=args.scribbles, number_classes=args.number_classes)


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
