"""The record format: bit-exact round trips, clear refusals of foreign or damaged data, metadata."""
import json
import os
import struct

import numpy as np
import pytest

import records


def _random_image(rng, shape, dtype):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.normal(0, 1000, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32])
@pytest.mark.parametrize("shape", [(32, 32), (24, 40), (40, 24, 3)])
def test_round_trip_is_bit_exact(dtype, shape):
    rng = np.random.default_rng(1)
    image = _random_image(rng, shape, dtype)
    mask = rng.integers(0, 5, size=shape[:2], dtype=np.uint8)
    decoded_image, decoded_mask = records.decode_record(records.encode_record(image, mask))
    expected = image if image.ndim == 3 else image[:, :, np.newaxis]
    assert decoded_image.shape == expected.shape
    assert decoded_image.dtype == expected.dtype
    assert decoded_image.tobytes() == expected.tobytes()
    assert decoded_mask.dtype == mask.dtype and np.array_equal(decoded_mask, mask)


def test_float_specials_survive():
    image = np.array([[np.nan, np.inf], [-np.inf, -0.0]], np.float32)
    decoded, _ = records.decode_record(records.encode_record(image, np.zeros((2, 2), np.uint8)))
    assert decoded.tobytes() == image[:, :, None].tobytes()


def test_encode_rejects_mismatched_shapes():
    with pytest.raises(records.RecordFormatError, match="same H, W"):
        records.encode_record(np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8))


def test_decode_rejects_foreign_and_damaged_records():
    good = records.encode_record(np.zeros((4, 4), np.uint16), np.zeros((4, 4), np.uint8))
    with pytest.raises(records.RecordFormatError, match="SEGR"):
        records.decode_record(b"\x80\x04pickle" + good[10:])
    with pytest.raises(records.RecordFormatError, match="promises"):
        records.decode_record(good[:-1])
    with pytest.raises(records.RecordFormatError, match="shorter"):
        records.decode_record(b"SE")
    newer = bytearray(good)
    struct.pack_into("<H", newer, 4, records.FORMAT_VERSION + 1)
    with pytest.raises(records.RecordFormatError, match="rebuild"):
        records.decode_record(bytes(newer))


def test_build_metadata_counts_classes_and_presence():
    infos = [
        {"image_shape": [8, 8, 1], "image_dtype": "<u2", "class_counts": {0: 60, 2: 4},
         "source": {"image": "a.tif", "mask": "a.tif"}},
        {"image_shape": [8, 12, 1], "image_dtype": "<u2", "class_counts": [96, 0],
         "source": {"image": "b.tif", "mask": "b.tif"}},
    ]
    meta = records.build_metadata(infos, split="train", split_seed=3, train_fraction=0.5,
                                  extra={"dataset_name": "x"})
    assert meta["number_classes"] == 3
    assert meta["class_pixel_counts"] == [156, 0, 4]
    assert meta["class_presence"] == [[0, 2], [0]]
    assert meta["image_shape"] is None and meta["image_shapes"] == [[8, 8, 1], [8, 12, 1]]
    assert meta["sources"][1]["image"] == "b.tif"
    assert meta["dataset_name"] == "x" and meta["split_seed"] == 3


def test_build_metadata_refuses_mixed_dtypes():
    infos = [{"image_shape": [4, 4, 1], "image_dtype": d, "class_counts": {0: 16}, "source": {}}
             for d in ("|u1", "<u2")]
    with pytest.raises(records.RecordFormatError, match="one image dtype"):
        records.build_metadata(infos, split="train", split_seed=0, train_fraction=1.0)


def test_write_database_grows_the_map_and_reads_back(tmp_path):
    # 5 x 4 MiB exceeds the initial 16 MiB map, so the MapFullError path must run.
    rng = np.random.default_rng(0)
    pairs = [(rng.random((1024, 1024), dtype=np.float32), rng.integers(0, 3, (1024, 1024), dtype=np.uint8),
              {"image": f"{i}.tif", "mask": f"{i}.tif"}) for i in range(5)]
    path = str(tmp_path / "big.lmdb")
    meta = records.write_database(path, iter(pairs), {"split": "train", "split_seed": 0, "train_fraction": 1.0})
    assert meta["num_records"] == 5 and records.read_metadata(path) == json.loads(json.dumps(meta))
    env = records.open_database(path)
    try:
        with env.begin() as txn:
            for i, (image, mask, _) in enumerate(pairs):
                got_image, got_mask = records.decode_record(txn.get(records.record_key(i)))
                assert np.array_equal(got_image[:, :, 0], image) and np.array_equal(got_mask, mask)
    finally:
        env.close()


def test_open_database_refuses_a_folder_that_is_not_a_database(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.mdb"):
        records.open_database(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not an LMDB"):
        records.open_database(os.path.join(str(tmp_path), "missing.lmdb"))


def test_metadata_of_another_version_is_refused():
    with pytest.raises(records.RecordFormatError, match="rebuild"):
        records.decode_metadata(json.dumps({"format_version": 999}).encode())


def write_format_1_database(path):
    """A database as build_lmdb.py wrote it before format 2: no statistics in the record header."""
    import lmdb

    image, mask = np.arange(64, dtype=np.uint16).reshape(8, 8, 1), np.zeros((8, 8), np.uint8)
    header = json.dumps({"image_shape": [8, 8, 1], "image_dtype": "<u2", "mask_shape": [8, 8],
                         "mask_dtype": "|u1"}).encode()
    record = struct.pack("<4sHI", b"SEGR", 1, len(header)) + header + image.tobytes() + mask.tobytes()
    metadata = {"format_version": 1, "tool_version": "0.1.0", "split": "train", "num_records": 1,
                "image_shape": [8, 8, 1], "channels": 1, "number_classes": 1, "class_pixel_counts": [64],
                "class_presence": [[0]], "sources": [{"image": "a.tif", "mask": "a.tif"}]}
    env = lmdb.open(str(path), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(records.record_key(0), record)
        txn.put(records.METADATA_KEY, json.dumps(metadata).encode())
    env.close()
    return str(path)


def test_older_format_database_is_refused_with_the_rebuild_message(tmp_path):
    path = write_format_1_database(tmp_path / "old.lmdb")
    message = r"old\.lmdb was built by an older build_lmdb\.py \(format 1\); rebuild it with build_lmdb\.py"
    with pytest.raises(records.RecordFormatError, match=message):
        records.read_metadata(path)
    with pytest.raises(records.RecordFormatError, match=message):
        list(records.iter_source_records(path))
    env = records.open_database(path)
    with env.begin() as txn:
        buffer = txn.get(records.record_key(0))
    env.close()
    with pytest.raises(records.RecordFormatError, match=r"older build_lmdb\.py \(format 1\); rebuild it"):
        records.decode(buffer)


def test_foreign_lmdb_with_non_json_metadata_is_not_ours(tmp_path):
    import lmdb

    for name, value in (("bytes", os.urandom(64) + b"\xff"), ("list", b"[1, 2]")):
        env = lmdb.open(str(tmp_path / name), map_size=1 << 20)
        with env.begin(write=True) as txn:
            txn.put(records.METADATA_KEY, value)
        env.close()
        with pytest.raises(records.RecordFormatError, match=f"{name}: not a database built by build_lmdb.py"):
            records.read_metadata(str(tmp_path / name))
    env = lmdb.open(str(tmp_path / "none"), map_size=1 << 20)
    env.close()
    with pytest.raises(records.RecordFormatError, match="not a database built by build_lmdb.py"):
        records.read_metadata(str(tmp_path / "none"))


def test_records_carry_statistics_and_iter_source_records_shards_whole_images(tmp_path):
    import normalization

    rng = np.random.default_rng(0)
    images = [rng.normal(100 * i, 10, (12 + i, 20, 2)).astype(np.float32) for i in range(5)]
    given = normalization.ChannelStatistics(mean=(1.0, 2.0), std=(3.0, 4.0))
    pairs = [(image, np.full(image.shape[:2], i % 2, np.uint8), {"image": f"{i}.tif", "mask": f"{i}.tif"})
             for i, image in enumerate(images)]
    pairs[4] = pairs[4] + (given,)  # explicit statistics (a tile's source image) are stored as given
    path = str(tmp_path / "db")
    records.write_database(path, pairs, {"split": "test", "split_seed": 0, "train_fraction": 0.8})
    seen = {}
    for shard in range(2):
        for index, image, mask, stats, source in records.iter_source_records(path, shard, 2):
            assert index % 2 == shard and source["image"] == f"{index}.tif"
            assert np.array_equal(image, images[index]) and image.flags.writeable
            assert np.array_equal(mask, pairs[index][1])
            seen[index] = stats
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert seen[4] == given
    np.testing.assert_allclose(seen[2].mean, images[2].mean(axis=(0, 1), dtype=np.float64), rtol=1e-12)
    np.testing.assert_allclose(seen[2].std, images[2].std(axis=(0, 1), dtype=np.float64), rtol=1e-12)
    assert records.read_metadata(path)["normalization"]["method"] == "zscore"


def test_iter_source_records_refuses_tiled_databases(tmp_path):
    pairs = [(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), {"image": "a", "mask": "a", "tile": [0, 0]})]
    records.write_database(str(tmp_path / "db"), pairs, {"split": "train", "split_seed": 0, "train_fraction": 1.0})
    with pytest.raises(records.RecordFormatError, match="holds tiles"):
        list(records.iter_source_records(str(tmp_path / "db")))


def test_build_metadata_takes_source_pixel_counts_for_overlapping_tiles():
    infos = [{"image_shape": [8, 8, 1], "image_dtype": "|u1", "class_counts": {0: 40, 1: 24}, "source": {}}] * 3
    meta = records.build_metadata(infos, split="train", split_seed=0, train_fraction=1.0,
                                  class_pixel_counts=[100, 44])
    assert meta["class_pixel_counts"] == [100, 44] and meta["class_presence"] == [[0, 1]] * 3
