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
