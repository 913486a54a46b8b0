"""Sparse annotations (docs/sparse-labels.md): unlabelled pixels in masks, a loss and metrics that
leave them out, foreground crops on annotated pixels, the uncertainty ranking, and the
correct-and-retrain loop."""
import json
import os

import numpy as np
import pytest
import tifffile

import build_lmdb
import records
from build_lmdb import BuildConfig, BuildError


def _write(folder, masks, shape=(32, 32), seed=0):
    """Images (uint16, brighter where the mask says class 1) and the given masks, stems img_<i>."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for i, mask in enumerate(masks):
        image = rng.integers(100, 200, size=shape, dtype=np.uint16)
        tifffile.imwrite(folder / "images" / f"img_{i}.tif", image)
        tifffile.imwrite(folder / "masks" / f"img_{i}.tif", np.asarray(mask))


def _config(folder, **kwargs):
    return BuildConfig(image_folder=str(folder / "images"), mask_folder=str(folder / "masks"),
                       output_folder=str(folder / "out"), dataset_name="s", train_fraction=1.0, **kwargs)


def _stored_masks(path):
    count = records.read_metadata(str(path))["num_records"]
    env = records.open_database(str(path))
    try:
        with env.begin() as txn:
            return [records.decode_record(txn.get(records.record_key(i)))[1].copy() for i in range(count)]
    finally:
        env.close()


def _scribble_mask(seed):
    """A 32 x 32 scribble painting: 0 = not painted, 1 = background stroke, 2 = a painted object."""
    mask = np.zeros((32, 32), np.uint8)
    mask[2:4, :] = 1
    mask[10 + seed:16 + seed, 10:16] = 2
    return mask


# ----------------------------------------------------------------------------- build_lmdb.py

def test_scribbles_map_painted_labels_to_classes_and_count_annotated_pixels_only(tmp_path, capsys):
    masks = [_scribble_mask(0), _scribble_mask(3)]
    _write(tmp_path, masks)
    code = build_lmdb.main(["--image_folder", str(tmp_path / "images"), "--mask_folder", str(tmp_path / "masks"),
                            "--output_folder", str(tmp_path / "out"), "--dataset_name", "s",
                            "--train_fraction", "1", "--scribbles"])
    assert code == 0
    train = tmp_path / "out" / "train-s.lmdb"
    for stored, painted in zip(_stored_masks(train), masks):
        assert stored.dtype == np.int8
        np.testing.assert_array_equal(stored, painted.astype(np.int16) - 1)  # 0 -> -1, L -> L - 1
    meta = records.read_metadata(str(train))
    assert meta["number_classes"] == 2
    assert meta["class_pixel_counts"] == [2 * 64, 2 * 36]
    assert (meta["annotated_pixels"], meta["unlabelled_pixels"]) == (200, 2 * 1024 - 200)
    assert meta["class_presence"] == [[0, 1], [0, 1]]
    assert (meta["scribbles"], meta["unlabelled_value"], meta["ignore_label"]) == (True, None, -1)
    assert "annotated pixels  200 of 2,048 (9.8%); the rest is unlabelled" in capsys.readouterr().out


def test_unlabelled_value_marks_the_unannotated_pixels_and_keeps_the_class_ids(tmp_path):
    mask = np.full((32, 32), 255, np.uint8)
    mask[:4] = 0
    mask[20:24, 20:26] = 1
    _write(tmp_path, [mask])
    result = build_lmdb.build_databases(_config(tmp_path, unlabelled_value=255), show_progress=False)
    (stored,) = _stored_masks(result.paths["train"])
    expected = np.where(mask == 255, -1, mask.astype(np.int16))
    np.testing.assert_array_equal(stored, expected)
    meta = result.metadata["train"]
    assert meta["class_pixel_counts"] == [128, 24] and meta["unlabelled_pixels"] == 1024 - 152
    assert meta["unlabelled_value"] == 255 and records.annotated_share(meta) == pytest.approx(152 / 1024)


def test_unannotated_masks_and_values_beyond_the_declared_classes_are_refused_by_name(tmp_path):
    empty = np.zeros((32, 32), np.uint8)
    beyond = _scribble_mask(0)
    beyond[30, 30] = 4  # painted label 4 = class 3, with 2 classes declared
    _write(tmp_path, [_scribble_mask(0), empty, beyond])
    with pytest.raises(BuildError) as error:
        build_lmdb.build_databases(_config(tmp_path, scribbles=True, number_classes=2), show_progress=False)
    message = str(error.value)
    assert "2 of 3 pair(s) are not usable" in message
    assert f"{tmp_path / 'masks' / 'img_1.tif'}: mask holds no annotated pixel (every pixel is 0 (unpainted) " \
           "with --scribbles)" in message
    assert f"{tmp_path / 'masks' / 'img_2.tif'}: mask holds painted label(s) 4, beyond --number_classes 2" in message
    assert not (tmp_path / "out").exists()
    # The same value check for dense masks with an unlabelled value: 7 is neither a class nor 255.
    dense = tmp_path / "dense"
    mask = np.full((32, 32), 255, np.uint8)
    mask[:3] = 0
    mask[5, 5] = 7
    _write(dense, [mask])
    with pytest.raises(BuildError, match=r"img_0.tif: mask holds value\(s\) 7 outside --number_classes 2"):
        build_lmdb.build_databases(_config(dense, unlabelled_value=255, number_classes=2), show_progress=False)
    with pytest.raises(BuildError, match="--scribbles and --unlabelled_value 255 exclude each other"):
        _config(dense, unlabelled_value=255, scribbles=True).validate()


def test_databases_built_before_sparse_masks_still_load(tmp_path):
    import imagereader
    from conftest import make_synthetic_db

    path = tmp_path / "old.lmdb"
    make_synthetic_db(path, num_records=4)
    # Strip what this version adds, as a database built before it holds.
    env = records.open_database(str(path), readonly=False)
    with env.begin(write=True) as txn:
        meta = records.decode_metadata(txn.get(records.METADATA_KEY))
        for key in ("annotated_pixels", "unlabelled_pixels"):
            del meta[key]
        txn.put(records.METADATA_KEY, records.encode_metadata(meta))
    env.close()
    meta = records.read_metadata(str(path))
    assert records.annotated_share(meta) == 1.0
    with imagereader.ImageReader(str(path), 2, use_augmentation=False, mode="train", tile_size=16,
                                 foreground_crop_fraction=1.0) as reader:
        images, masks = reader.get_batch()
    assert images.shape == (2, 16, 16, 1) and masks.min() >= 0
