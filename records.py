"""The LMDB record format shared by the builder, the readers, inference and the tests.

A database holds one record per image/mask pair under the key ``b"%08d" % index`` (0 .. N-1) and
one metadata record under ``METADATA_KEY``. Nothing is pickled: opening a database never executes
code.

Record layout (format version 2), all integers little-endian::

    magic        4 bytes   b"SEGR"
    version      uint16    FORMAT_VERSION
    header_len   uint32    length of the JSON header that follows
    header       JSON      {"image_shape": [H, W, C], "image_dtype": "<u2",
                            "mask_shape": [H, W], "mask_dtype": "|u1",
                            "statistics": {"mean": [C floats], "std": [C floats]}}
    image bytes  H*W*C*itemsize, C-order
    mask bytes   H*W*itemsize, C-order

Images are always stored as H x W x C (C >= 1); masks as H x W of an unsigned or signed integer
dtype holding class ids (0 = background); a sparse annotation stores its unlabelled pixels as
IGNORE_LABEL (-1) in a signed dtype. ``statistics`` are the per-channel mean and std of the
whole *source* image the record comes from (normalization.channel_statistics, computed before
tiling): every tile of an image carries its image's values, so the reader, the test pass and
inference normalise a pixel identically wherever it is seen. Version 1 (no statistics; the reader
z-scored each crop) is refused with a "rebuild it" message.

The metadata record is UTF-8 JSON; see ``build_metadata`` for its fields.
"""
import errno
import json
import os
import shutil
import struct
from typing import NamedTuple

import numpy as np

import normalization

FORMAT_VERSION = 2
TOOL_VERSION = "0.1.0"
METADATA_KEY = b"__metadata__"
# The mask value of a pixel that carries no class: an unlabelled pixel of a sparse annotation
# (build_lmdb.py --unlabelled_value / --scribbles stores it in a signed mask dtype), or padding. The
# losses (steps.pixel_sums) and the confusion matrix (metrics.confusion_matrix) leave it out.
IGNORE_LABEL = -1
MAGIC = b"SEGR"
_PREFIX = struct.Struct("<4sHI")
# Recorded in the metadata so a reader of the database knows what its statistics are for.
NORMALIZATION = {"method": "zscore", "statistics": "per channel, over the whole source image"}


class RecordFormatError(ValueError):
    """A record or database does not follow the format this version of the tool reads."""


class NoSpaceError(OSError):
    """The file system ran out of space while a database was written; the message names the folder.

    ``path`` is the database being written, ``detail`` what LMDB or the OS reported.
    """

    def __init__(self, message, path=None, detail=None):
        super().__init__(message)
        self.path, self.detail = path, detail

    def __str__(self):
        return self.args[0]


class Record(NamedTuple):
    """One decoded record: image H x W x C as stored, mask H x W, the source image's statistics."""
    image: np.ndarray
    mask: np.ndarray
    statistics: normalization.ChannelStatistics


def record_key(index):
    return b"%08d" % index


def version_problem(version):
    """The message for a format version this tool does not read, or None when it reads it."""
    if version == FORMAT_VERSION:
        return None
    if isinstance(version, int) and 0 < version < FORMAT_VERSION:
        return (f"was built by an older build_lmdb.py (format {version}); rebuild it with build_lmdb.py "
                f"(format {FORMAT_VERSION} stores each source image's normalisation statistics)")
    return (f"has record format {version!r}, this tool reads format {FORMAT_VERSION} (built by a newer "
            "build_lmdb.py?); update this tool or rebuild it with build_lmdb.py")


def encode_record(image, mask, statistics=None):
    """Encode one image/mask pair.

    Args:
      image: H x W or H x W x C array of any fixed-size numeric dtype.
      mask: H x W integer array of class ids.
      statistics: normalization.ChannelStatistics of the whole source image the pair was cut from;
        None when the pair is a whole source image (they are computed from ``image``).
    Returns:
      bytes of the record.
    """
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    if image.ndim != 3 or mask.ndim != 2 or image.shape[:2] != mask.shape:
        raise RecordFormatError(
            f"image {image.shape} and mask {mask.shape} must be H x W (x C) and H x W of the same H, W")
    if statistics is None:
        statistics = normalization.channel_statistics(image)
    if len(statistics.mean) != image.shape[2] or len(statistics.std) != image.shape[2]:
        raise RecordFormatError(f"statistics of {len(statistics.mean)} channel(s) for an image of "
                                f"{image.shape[2]} channel(s)")
    header = json.dumps({
        "image_shape": list(image.shape), "image_dtype": image.dtype.str,
        "mask_shape": list(mask.shape), "mask_dtype": mask.dtype.str,
        "statistics": statistics.to_dict(),
    }).encode("utf-8")
    return b"".join([_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)), header,
                     np.ascontiguousarray(image).tobytes(), np.ascontiguousarray(mask).tobytes()])


def decode(buffer):
    """Decode a record made by ``encode_record`` into a Record.

    The image and mask are read-only views on ``buffer`` when it is a bytes object or an LMDB
    buffer (copy them before writing into them, and before the transaction ends).
    """
    buffer = memoryview(buffer)
    if len(buffer) < _PREFIX.size:
        raise RecordFormatError("record is shorter than its header")
    magic, version, header_len = _PREFIX.unpack_from(buffer)
    if magic != MAGIC:
        raise RecordFormatError(f"record does not start with {MAGIC!r}: not a segmentation database record")
    problem = version_problem(version)
    if problem:
        raise RecordFormatError(f"the database {problem}")
    start = _PREFIX.size
    try:
        header = json.loads(bytes(buffer[start:start + header_len]).decode("utf-8"))
        statistics = normalization.ChannelStatistics.from_dict(header["statistics"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise RecordFormatError(f"record header is damaged ({type(exc).__name__}: {exc})") from None
    offset = start + header_len
    image_dtype = np.dtype(header["image_dtype"])
    mask_dtype = np.dtype(header["mask_dtype"])
    image_count = int(np.prod(header["image_shape"]))
    mask_count = int(np.prod(header["mask_shape"]))
    expected = offset + image_count * image_dtype.itemsize + mask_count * mask_dtype.itemsize
    if len(buffer) != expected:
        raise RecordFormatError(f"record holds {len(buffer)} bytes, its header promises {expected}")
    image = np.frombuffer(buffer, dtype=image_dtype, count=image_count, offset=offset)
    mask = np.frombuffer(buffer, dtype=mask_dtype, count=mask_count,
                         offset=offset + image_count * image_dtype.itemsize)
    return Record(image.reshape(header["image_shape"]), mask.reshape(header["mask_shape"]), statistics)


def decode_record(buffer):
    """(image H x W x C, mask H x W) of a record: ``decode`` for callers that need only the pixels."""
    record = decode(buffer)
    return record.image, record.mask


def build_metadata(records_info, *, split, split_seed, train_fraction, extra=None, class_pixel_counts=None):
    """Build the metadata dict of one database.

    Args:
      records_info: one dict per record, in key order, with "image_shape" ([H, W, C]),
        "image_dtype" (numpy dtype string), "class_counts" (dict or list: class id -> pixels) and
        "source" (dict with at least "image" and "mask" paths; tiles add "tile": [y, x]).
      split: "train" or "test".
      split_seed, train_fraction: how the split was made.
      extra: more JSON-able fields to store.
      class_pixel_counts: pixels per class id over the *source* images (list or dict), when the
        records overlap (tiles sharing pixels) and their own counts would count a pixel twice;
        None = the sum over the records.
    Returns:
      The metadata dict: format_version, tool_version, split, split_seed, train_fraction,
      num_records, image_shapes (distinct [H, W, C]), image_shape (the one shape, or None when
      they differ), image_dtype, channels, number_classes (max label + 1), class_pixel_counts
      (list indexed by class id, each source pixel counted once; annotated pixels only),
      annotated_pixels (their sum), unlabelled_pixels (IGNORE_LABEL pixels), class_presence (per
      record, the sorted class ids it holds), normalization (how the stored statistics are meant to be used)
      and sources (per record).
    """
    max_label = -1
    counts_per_record = []
    unlabelled = 0
    for info in records_info:
        counts = _label_counts(info["class_counts"])
        # IGNORE_LABEL pixels are not annotated: they belong to no class (nor to class_presence).
        unlabelled += counts.pop(IGNORE_LABEL, 0)
        counts_per_record.append(counts)
        if counts:
            max_label = max(max_label, max(counts))
    if class_pixel_counts is not None:
        given = _label_counts(class_pixel_counts)
        unlabelled = given.pop(IGNORE_LABEL, 0)
        if given:
            max_label = max(max_label, max(given))
        counts_per_source = [given]
    else:
        counts_per_source = counts_per_record
    number_classes = max_label + 1
    totals = [0] * number_classes
    for counts in counts_per_source:
        for label, n in counts.items():
            totals[label] += n
    shapes = sorted({tuple(info["image_shape"]) for info in records_info})
    dtypes = sorted({np.dtype(info["image_dtype"]).name for info in records_info})
    if len(dtypes) > 1:
        raise RecordFormatError(f"one database holds one image dtype; got {dtypes}")
    metadata = {
        "format_version": FORMAT_VERSION,
        "tool_version": TOOL_VERSION,
        "split": split,
        "split_seed": split_seed,
        "train_fraction": train_fraction,
        "num_records": len(records_info),
        "image_shapes": [list(s) for s in shapes],
        "image_shape": list(shapes[0]) if len(shapes) == 1 else None,
        "image_dtype": dtypes[0] if dtypes else None,
        "channels": shapes[0][2] if shapes else None,
        "number_classes": number_classes,
        "class_pixel_counts": totals,
        "annotated_pixels": sum(totals),
        "unlabelled_pixels": unlabelled,
        "class_presence": [sorted(c) for c in counts_per_record],
        "normalization": NORMALIZATION,
        "sources": [info["source"] for info in records_info],
    }
    if extra:
        metadata.update(extra)
    return metadata


def _label_counts(counts):
    """{class id: pixels > 0} from a list indexed by class id or a dict (IGNORE_LABEL may be a key)."""
    counts = dict(enumerate(counts)) if isinstance(counts, (list, tuple)) else dict(counts)
    return {int(k): int(v) for k, v in counts.items() if int(v) > 0}


def annotated_share(metadata):
    """Annotated pixels / all pixels of a database (1.0 for databases built before sparse masks)."""
    annotated = metadata.get("annotated_pixels", sum(metadata.get("class_pixel_counts") or []))
    total = annotated + metadata.get("unlabelled_pixels", 0)
    return annotated / total if total else 0.0


def encode_metadata(metadata):
    return json.dumps(metadata, sort_keys=True).encode("utf-8")


def decode_metadata(buffer, path="database"):
    """The metadata dict of a metadata record; RecordFormatError for a foreign or older database."""
    try:
        metadata = json.loads(bytes(buffer).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        metadata = None
    if not isinstance(metadata, dict) or "format_version" not in metadata:
        raise RecordFormatError(f"{path}: not a database built by build_lmdb.py (its {METADATA_KEY.decode()} "
                                "record is not this tool's JSON metadata)")
    problem = version_problem(metadata.get("format_version"))
    if problem:
        raise RecordFormatError(f"{path} {problem}")
    return metadata


def open_database(path, readonly=True, map_size=None):
    """Open an LMDB database directory.

    Read-only opens take no lock and do not create anything, so many reader processes can
    memory-map the same database at once. Each process must open its own environment: an LMDB
    environment must never cross a fork.
    """
    import lmdb  # local import keeps importing this module free of the C extension's setup

    if readonly:
        if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "data.mdb")):
            raise FileNotFoundError(f"{path}: not an LMDB database (expected a folder holding data.mdb)")
        return lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False,
                         max_readers=512, subdir=True)
    # sync=False: the builder calls env.sync() once at the end instead of fsyncing every record.
    return lmdb.open(path, map_size=map_size or (1 << 20), subdir=True, meminit=False, lock=True,
                     sync=False, metasync=False)


def read_metadata(path):
    """The metadata dict of the database at ``path``."""
    env = open_database(path)
    try:
        with env.begin() as txn:
            buffer = txn.get(METADATA_KEY)
    finally:
        env.close()
    if buffer is None:
        raise RecordFormatError(f"{path}: not a database built by build_lmdb.py (it has no "
                                f"{METADATA_KEY.decode()} record)")
    return decode_metadata(buffer, path)


def write_database(path, pairs, metadata_fields):
    """Write a complete database at ``path`` (a new directory) from an iterable of records.

    The map is sized from the data and grown on MapFullError, never hard-coded. The caller is
    responsible for atomicity (write to a temporary directory, then rename): see build_lmdb.py.

    Args:
      path: directory to create; must not exist.
      pairs: iterable of (image, mask, source_dict) for whole source images, or of
        (image, mask, source_dict, statistics) where statistics are the
        normalization.ChannelStatistics of the source image a tile was cut from.
      metadata_fields: keyword arguments for ``build_metadata`` (split, split_seed,
        train_fraction, extra, class_pixel_counts).
    Returns:
      The metadata dict written.
    Raises:
      NoSpaceError naming the folder when the file system fills up (LMDB reports it as
      lmdb.DiskError); the half-written directory is left for the caller to remove.
    """
    import lmdb

    folder = os.path.dirname(os.path.abspath(path))
    largest = 0
    try:
        os.makedirs(path)
        map_size = 1 << 24
        env = open_database(path, readonly=False, map_size=map_size)
        infos = []
        try:
            for index, item in enumerate(pairs):
                image, mask, source = item[:3]
                statistics = item[3] if len(item) > 3 else None
                value = encode_record(image, mask, statistics)
                largest = max(largest, len(value))
                labels, counts = np.unique(np.asarray(mask), return_counts=True)
                infos.append({
                    "image_shape": list(np.asarray(image).shape) if np.ndim(image) == 3
                    else list(np.asarray(image).shape) + [1],
                    "image_dtype": np.asarray(image).dtype.str,
                    "class_counts": {int(l): int(c) for l, c in zip(labels, counts)},
                    "source": source,
                })
                map_size = _put_growing(env, record_key(index), value, map_size)
            metadata = build_metadata(infos, **metadata_fields)
            _put_growing(env, METADATA_KEY, encode_metadata(metadata), map_size)
            env.sync()
        finally:
            env.close()
    except (lmdb.Error, OSError) as exc:
        # LMDB reports a full disk as DiskError, or as EIO after a short write (seen on tmpfs):
        # an I/O error with (almost) no free space left is taken to be that.
        full = (isinstance(exc, lmdb.DiskError) or getattr(exc, "errno", None) == errno.ENOSPC
                or _free_bytes(folder) < (1 << 20) + largest)
        if not full:
            raise
        raise NoSpaceError(_no_space_message(folder, path, exc), path, str(exc)) from exc
    return metadata


def _free_bytes(folder):
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return float("inf")


def _no_space_message(folder, path, exc):
    return (f"no space left on {folder} while writing {os.path.basename(path)} ({exc}); nothing was "
            "replaced: free some space there (or choose another output folder) and build again")


def iter_source_records(path, shard_index=0, shard_count=1):
    """The whole source images of a database, for a test pass that predicts them as inference does.

    build_lmdb.py stores test databases untiled, so each record is one source image with every
    pixel once. Records are taken ``shard_index::shard_count`` (one part per training worker).

    Yields:
      (index, image H x W x C as stored, mask H x W, normalization.ChannelStatistics, source dict);
      the arrays are copies, valid after the next item.
    Raises:
      RecordFormatError for an older or foreign database, or one whose records are tiles (a train
      database built with --tile_size), whose pixels would be counted more than once.
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index!r}")
    metadata = read_metadata(path)
    sources = metadata.get("sources") or []
    if any("tile" in source for source in sources):
        raise RecordFormatError(f"{path} holds tiles of its source images (a train database built with "
                                "--tile_size); the test pass needs whole images: give the "
                                "test-<name>.lmdb that build_lmdb.py wrote beside it")
    env = open_database(path)
    try:
        with env.begin(buffers=True) as txn:
            for index in range(shard_index, int(metadata["num_records"]), shard_count):
                buffer = txn.get(record_key(index))
                if buffer is None:
                    raise RecordFormatError(f"{path}: record {index} is missing")
                try:
                    record = decode(buffer)
                except RecordFormatError as exc:
                    raise RecordFormatError(f"{path}: record {index}: {exc}") from None
                yield (index, record.image.copy(), record.mask.copy(), record.statistics,
                       sources[index] if index < len(sources) else {})
    finally:
        env.close()


def _put_growing(env, key, value, map_size):
    import lmdb

    while True:
        try:
            with env.begin(write=True) as txn:
                txn.put(key, value)
            return map_size
        except lmdb.MapFullError:
            # Double the map: LMDB needs the file size up front, and doubling keeps the number of
            # resizes logarithmic in the database size.
            map_size = max(map_size * 2, map_size + 4 * len(value))
            env.set_mapsize(map_size)
