"""The LMDB record format shared by the builder, the readers, inference and the tests.

A database holds one record per image/mask pair under the key ``b"%08d" % index`` (0 .. N-1) and
one metadata record under ``METADATA_KEY``. Nothing is pickled: opening a database never executes
code.

Record layout (format version 1), all integers little-endian::

    magic        4 bytes   b"SEGR"
    version      uint16    FORMAT_VERSION
    header_len   uint32    length of the JSON header that follows
    header       JSON      {"image_shape": [H, W, C], "image_dtype": "<u2",
                            "mask_shape": [H, W], "mask_dtype": "|u1"}
    image bytes  H*W*C*itemsize, C-order
    mask bytes   H*W*itemsize, C-order

Images are always stored as H x W x C (C >= 1); masks as H x W of an unsigned or signed integer
dtype holding class ids (0 = background).

The metadata record is UTF-8 JSON; see ``build_metadata`` for its fields.
"""
import json
import os
import struct

import numpy as np

FORMAT_VERSION = 1
TOOL_VERSION = "0.1.0"
METADATA_KEY = b"__metadata__"
MAGIC = b"SEGR"
_PREFIX = struct.Struct("<4sHI")


class RecordFormatError(ValueError):
    """A record or database does not follow the format this version of the tool reads."""


def record_key(index):
    return b"%08d" % index


def encode_record(image, mask):
    """Encode one image/mask pair.

    Args:
      image: H x W or H x W x C array of any fixed-size numeric dtype.
      mask: H x W integer array of class ids.
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
    header = json.dumps({
        "image_shape": list(image.shape), "image_dtype": image.dtype.str,
        "mask_shape": list(mask.shape), "mask_dtype": mask.dtype.str,
    }).encode("utf-8")
    return b"".join([_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)), header,
                     np.ascontiguousarray(image).tobytes(), np.ascontiguousarray(mask).tobytes()])


def decode_record(buffer):
    """Decode a record made by ``encode_record``.

    Returns:
      (image, mask): image H x W x C and mask H x W, read-only views on ``buffer`` when it is a
      bytes object (copy them before writing into them).
    """
    buffer = memoryview(buffer)
    if len(buffer) < _PREFIX.size:
        raise RecordFormatError("record is shorter than its header")
    magic, version, header_len = _PREFIX.unpack_from(buffer)
    if magic != MAGIC:
        raise RecordFormatError(f"record does not start with {MAGIC!r}: not a segmentation database record")
    if version != FORMAT_VERSION:
        raise RecordFormatError(
            f"record format version {version}; this tool reads version {FORMAT_VERSION}: rebuild the database")
    start = _PREFIX.size
    header = json.loads(bytes(buffer[start:start + header_len]).decode("utf-8"))
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
    return image.reshape(header["image_shape"]), mask.reshape(header["mask_shape"])


def build_metadata(records_info, *, split, split_seed, train_fraction, extra=None):
    """Build the metadata dict of one database.

    Args:
      records_info: one dict per record, in key order, with "image_shape" ([H, W, C]),
        "image_dtype" (numpy dtype string), "class_counts" (dict or list: class id -> pixels) and
        "source" (dict with at least "image" and "mask" paths; tiles add "tile": [y, x]).
      split: "train" or "test".
      split_seed, train_fraction: how the split was made.
      extra: more JSON-able fields to store.
    Returns:
      The metadata dict: format_version, tool_version, split, split_seed, train_fraction,
      num_records, image_shapes (distinct [H, W, C]), image_shape (the one shape, or None when
      they differ), image_dtype, channels, number_classes (max label + 1), class_pixel_counts
      (list indexed by class id), class_presence (per record, the sorted class ids it holds) and
      sources (per record).
    """
    max_label = -1
    counts_per_record = []
    for info in records_info:
        counts = info["class_counts"]
        counts = dict(enumerate(counts)) if isinstance(counts, (list, tuple)) else dict(counts)
        counts = {int(k): int(v) for k, v in counts.items() if int(v) > 0}
        counts_per_record.append(counts)
        if counts:
            max_label = max(max_label, max(counts))
    number_classes = max_label + 1
    totals = [0] * number_classes
    for counts in counts_per_record:
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
        "class_presence": [sorted(c) for c in counts_per_record],
        "sources": [info["source"] for info in records_info],
    }
    if extra:
        metadata.update(extra)
    return metadata


def encode_metadata(metadata):
    return json.dumps(metadata, sort_keys=True).encode("utf-8")


def decode_metadata(buffer):
    metadata = json.loads(bytes(buffer).decode("utf-8"))
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise RecordFormatError(
            f"database format version {version}; this tool reads version {FORMAT_VERSION}: rebuild the database")
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
        raise RecordFormatError(f"{path}: database has no metadata record; rebuild it with build_lmdb.py")
    return decode_metadata(buffer)


def write_database(path, pairs, metadata_fields):
    """Write a complete database at ``path`` (a new directory) from an iterable of (image, mask).

    The map is sized from the data and grown on MapFullError, never hard-coded. The caller is
    responsible for atomicity (write to a temporary directory, then rename): see build_lmdb.py.

    Args:
      path: directory to create; must not exist.
      pairs: iterable of (image, mask, source_dict).
      metadata_fields: keyword arguments for ``build_metadata`` (split, split_seed,
        train_fraction, extra).
    Returns:
      The metadata dict written.
    """
    import lmdb

    os.makedirs(path)
    map_size = 1 << 24
    env = open_database(path, readonly=False, map_size=map_size)
    infos = []
    try:
        for index, (image, mask, source) in enumerate(pairs):
            value = encode_record(image, mask)
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
    return metadata


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
