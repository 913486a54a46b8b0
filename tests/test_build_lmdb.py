"""build_lmdb.py: pairing, validation, splitting, tiling, atomic writes and the command line."""
import glob
import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
from PIL import Image

import build_lmdb
import image_io
import records
from build_lmdb import BuildConfig, BuildError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- helpers

def write_pairs(folder, count=10, shape=(32, 32), dtype=np.uint16, seed=0, mask_ext="tif", image_ext="tif"):
    """Write count image/mask pairs under folder/images and folder/masks; return their arrays by stem."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder / "images", exist_ok=True)
    os.makedirs(folder / "masks", exist_ok=True)
    arrays = {}
    for i in range(count):
        stem = f"img_{i:03d}"
        dt = np.dtype(dtype)
        if dt.kind == "f":
            image = rng.normal(100, 30, shape).astype(dt)
        else:
            image = rng.integers(0, min(np.iinfo(dt).max, 60000), size=shape, dtype=dt, endpoint=True)
        mask = rng.integers(0, 3, size=shape[:2], dtype=np.uint8)
        save(folder / "images" / f"{stem}.{image_ext}", image)
        save(folder / "masks" / f"{stem}.{mask_ext}", mask)
        arrays[stem] = (image, mask)
    return arrays


def save(path, array):
    path = str(path)
    if path.endswith((".tif", ".tiff")):
        tifffile.imwrite(path, array)
    else:
        Image.fromarray(array).save(path)


def config_for(folder, **kwargs):
    values = dict(image_folder=str(folder / "images"), mask_folder=str(folder / "masks"),
                  output_folder=str(folder / "out"), dataset_name="x")
    values.update(kwargs)
    return BuildConfig(**values)


def read_db(path):
    """(metadata, list of (image, mask, source)) of a database."""
    meta = records.read_metadata(path)
    env = records.open_database(path)
    try:
        with env.begin() as txn:
            items = []
            for i in range(meta["num_records"]):
                image, mask = records.decode_record(txn.get(records.record_key(i)))
                items.append((image.copy(), mask.copy(), meta["sources"][i]))
    finally:
        env.close()
    return meta, items


def stem_of(source):
    return os.path.splitext(os.path.basename(source["image"]))[0]


def assert_fails(config, *fragments):
    """The build raises BuildError naming every fragment and leaves no output behind."""
    out = config.output_folder
    before = sorted(os.listdir(out)) if os.path.isdir(out) else None
    with pytest.raises(BuildError) as info:
        build_lmdb.build_databases(config, show_progress=False)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in message:\n{info.value}"
    after = sorted(os.listdir(out)) if os.path.isdir(out) else None
    assert after == before, f"output changed: {before} -> {after}"
    return str(info.value)


def digest(db_path):
    with open(os.path.join(db_path, "data.mdb"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("dtype,shape", [
    (np.uint8, (32, 32)), (np.uint16, (24, 40)), (np.int32, (40, 24)), (np.float32, (32, 48)),
    (np.uint16, (24, 36, 3)),
])
def test_round_trip_is_bit_exact(tmp_path, dtype, shape):
    arrays = write_pairs(tmp_path, count=4, shape=shape, dtype=dtype)
    result = build_lmdb.build_databases(config_for(tmp_path, train_fraction=1.0), show_progress=False)
    meta, items = read_db(result.paths["train"])
    assert meta["num_records"] == 4 and meta["image_dtype"] == np.dtype(dtype).name
    for image, mask, source in items:
        want_image, want_mask = arrays[stem_of(source)]
        want_image = want_image if want_image.ndim == 3 else want_image[:, :, None]
        assert image.dtype == want_image.dtype and image.tobytes() == want_image.tobytes()
        assert np.array_equal(mask, want_mask)
    test_meta, _ = read_db(result.paths["test"])
    assert test_meta["num_records"] == 0  # train_fraction 1: an empty test database, as documented


def test_pairs_match_by_stem_across_extensions(tmp_path):
    arrays = write_pairs(tmp_path, count=3, dtype=np.uint8, image_ext="tif", mask_ext="png")
    result = build_lmdb.build_databases(config_for(tmp_path, train_fraction=1.0), show_progress=False)
    _, items = read_db(result.paths["train"])
    assert sorted(stem_of(s) for _, _, s in items) == sorted(arrays)
    for _, mask, source in items:
        assert np.array_equal(mask, arrays[stem_of(source)][1])


def test_lossless_conversions(tmp_path):
    images = tmp_path / "images"
    masks = tmp_path / "masks"
    os.makedirs(images)
    os.makedirs(masks)
    int16 = np.arange(-512, 512, dtype=np.int16).reshape(32, 32)
    tifffile.imwrite(images / "a.tif", int16)
    # A 3-channel mask with identical channels becomes 2-D; a palette PNG keeps its indices.
    labels = (np.arange(32 * 32).reshape(32, 32) % 3).astype(np.uint8)
    tifffile.imwrite(masks / "a.tif", np.stack([labels] * 3, axis=-1))
    tifffile.imwrite(images / "b.tif", int16 + 1)
    palette = Image.fromarray(labels, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    palette.save(masks / "b.png")
    result = build_lmdb.build_databases(config_for(tmp_path, train_fraction=1.0), show_progress=False)
    meta, items = read_db(result.paths["train"])
    assert meta["image_dtype"] == "int32" and meta["number_classes"] == 3
    for image, mask, source in items:
        offset = 0 if stem_of(source) == "a" else 1
        assert np.array_equal(image[:, :, 0], int16.astype(np.int32) + offset)
        assert mask.shape == (32, 32) and np.array_equal(mask, labels)


def test_exact_float64_becomes_float32_and_channels_first_tiff_is_transposed_when_asked(tmp_path):
    os.makedirs(tmp_path / "images")
    os.makedirs(tmp_path / "masks")
    image = np.linspace(0, 1, 2 * 16 * 24).reshape(2, 16, 24).astype(np.float32).astype(np.float64)
    tifffile.imwrite(tmp_path / "images" / "a.tif", image)  # C x H x W, as multi-page TIFFs come
    tifffile.imwrite(tmp_path / "masks" / "a.tif", np.ones((16, 24), np.uint8))
    result = build_lmdb.build_databases(config_for(tmp_path, train_fraction=1.0, first_axis_is_channels=True),
                                        show_progress=False)
    _, [(stored, _, _)] = read_db(result.paths["train"])
    assert stored.dtype == np.float32 and stored.shape == (16, 24, 2)
    assert np.array_equal(stored, np.moveaxis(image, 0, -1).astype(np.float32))


def test_stack_with_2d_masks_is_refused_naming_file_and_shape(tmp_path):
    write_pairs(tmp_path, count=3)
    stack = tmp_path / "images" / "img_001.tif"
    tifffile.imwrite(stack, np.zeros((5, 32, 32), np.uint16))  # Z x H x W beside a 32 x 32 mask
    message = assert_fails(config_for(tmp_path), str(stack), "(5, 32, 32)", "--first_axis_is_channels")
    assert "1 of 3 pair(s)" in message


def test_mixed_uint8_and_uint16_images_are_promoted(tmp_path):
    arrays = write_pairs(tmp_path, count=2, dtype=np.uint8)
    write_pairs(tmp_path / "more", count=1, dtype=np.uint16)
    os.rename(tmp_path / "more" / "images" / "img_000.tif", tmp_path / "images" / "wide.tif")
    os.rename(tmp_path / "more" / "masks" / "img_000.tif", tmp_path / "masks" / "wide.tif")
    result = build_lmdb.build_databases(config_for(tmp_path, train_fraction=1.0), show_progress=False)
    meta, items = read_db(result.paths["train"])
    assert meta["image_dtype"] == "uint16"
    for image, _, source in items:
        if stem_of(source) in arrays:
            assert np.array_equal(image[:, :, 0], arrays[stem_of(source)][0])


# ----------------------------------------------------------------------------- split

@pytest.mark.parametrize("fraction,train,test", [(0.5, 10, 10), (0.8, 16, 4), (0.25, 5, 15), (0.9, 18, 2)])
def test_split_sizes(tmp_path, fraction, train, test):
    write_pairs(tmp_path, count=20, shape=(16, 16))
    result = build_lmdb.build_databases(config_for(tmp_path, train_fraction=fraction), show_progress=False)
    assert result.metadata["train"]["num_records"] == train
    assert result.metadata["test"]["num_records"] == test
    assert records.read_metadata(result.paths["test"])["num_records"] == test
    train_stems = {stem_of(s) for s in result.metadata["train"]["sources"]}
    test_stems = {stem_of(s) for s in result.metadata["test"]["sources"]}
    assert not train_stems & test_stems and len(train_stems | test_stems) == 20


def test_split_is_reproducible_with_a_seed_and_changes_with_another(tmp_path):
    write_pairs(tmp_path, count=20, shape=(16, 16))

    def test_sources(seed, name):
        result = build_lmdb.build_databases(config_for(tmp_path, seed=seed, dataset_name=name),
                                            show_progress=False)
        return [s["image"] for s in result.metadata["test"]["sources"]]

    assert test_sources(3, "a") == test_sources(3, "b")
    assert test_sources(3, "a") != test_sources(4, "c")


def test_split_indices_unit():
    train, test = build_lmdb.split_indices(7, 0.5, seed=0)
    assert len(train) == 4 and len(test) == 3 and sorted(train + test) == list(range(7))
    assert train == sorted(train)


# ----------------------------------------------------------------------------- tiling

@pytest.mark.parametrize("overlap,expected_tiles", [(0, 4 * 3), (8, 4 * 3), (16, 6 * 4)])
def test_tiles_cover_a_non_multiple_image(tmp_path, overlap, expected_tiles):
    arrays = write_pairs(tmp_path, count=1, shape=(100, 70))
    result = build_lmdb.build_databases(
        config_for(tmp_path, train_fraction=1.0, tile_size=32, tile_overlap=overlap), show_progress=False)
    meta, items = read_db(result.paths["train"])
    assert meta["num_records"] == expected_tiles and meta["image_shape"] == [32, 32, 1]
    image, mask = arrays["img_000"]
    covered = np.zeros(mask.shape, bool)
    for tile, tile_mask, source in items:
        y, x = source["tile"]
        assert np.array_equal(tile[:, :, 0], image[y:y + 32, x:x + 32])
        assert np.array_equal(tile_mask, mask[y:y + 32, x:x + 32])
        covered[y:y + 32, x:x + 32] = True
    assert covered.all()


def test_images_smaller_than_the_tile_are_stored_whole(tmp_path):
    write_pairs(tmp_path, count=2, shape=(20, 24))
    result = build_lmdb.build_databases(config_for(tmp_path, train_fraction=1.0, tile_size=32),
                                        show_progress=False)
    assert result.metadata["train"]["num_records"] == 2
    assert result.metadata["train"]["image_shape"] == [20, 24, 1]


def test_tiles_of_one_image_never_land_in_both_splits(tmp_path):
    write_pairs(tmp_path, count=10, shape=(64, 64))
    result = build_lmdb.build_databases(config_for(tmp_path, tile_size=32, train_fraction=0.6),
                                        show_progress=False)
    train = [stem_of(s) for s in result.metadata["train"]["sources"]]
    test = [stem_of(s) for s in result.metadata["test"]["sources"]]
    assert len(train) == 6 * 4 and len(test) == 4  # test images are stored whole
    assert not set(train) & set(test)


def test_train_tiles_carry_source_statistics_test_is_whole_and_pixels_count_once(tmp_path):
    # 100 x 136 with a bright strip, tiled at 64 with overlap 16: 2 x 3 overlapping train tiles.
    os.makedirs(tmp_path / "images")
    os.makedirs(tmp_path / "masks")
    rng = np.random.default_rng(0)
    sources = {}
    for stem in ("a", "b", "c"):
        image = rng.normal(1000, 40, (100, 136)).clip(0).astype(np.uint16)
        image[:, 60:70] += 5000
        mask = (rng.random((100, 136)) < 0.3).astype(np.uint8)
        tifffile.imwrite(tmp_path / "images" / f"{stem}.tif", image)
        tifffile.imwrite(tmp_path / "masks" / f"{stem}.tif", mask)
        sources[stem] = (image, mask)
    result = build_lmdb.build_databases(config_for(tmp_path, train_fraction=0.67, tile_size=64, tile_overlap=16),
                                        show_progress=False)
    for split in ("train", "test"):
        meta = records.read_metadata(result.paths[split])
        env = records.open_database(result.paths[split])
        with env.begin() as txn:
            decoded = [records.decode(txn.get(records.record_key(i))) for i in range(meta["num_records"])]
        env.close()
        stems = sorted({stem_of(s) for s in meta["sources"]})
        for record, source in zip(decoded, meta["sources"]):
            image, _ = sources[stem_of(source)]
            want = image.astype(np.float64)
            np.testing.assert_allclose(record.statistics.mean, [want.mean()], rtol=1e-12)
            np.testing.assert_allclose(record.statistics.std, [want.std()], rtol=1e-12)
        # Each source pixel counted once, whatever the tiles share.
        expected = sum(np.bincount(sources[s][1].ravel(), minlength=2) for s in stems)
        assert meta["class_pixel_counts"] == expected.tolist()
        if split == "train":
            assert len(stems) == 2 and meta["num_records"] == 2 * 6 and meta["tile_size"] == 64
            assert sum(r.mask.size for r in decoded) > sum(expected)  # the tiles do overlap
        else:
            assert meta["num_records"] == 1 and meta["tile_size"] is None
            assert decoded[0].image.shape == (100, 136, 1) and "tile" not in meta["sources"][0]
            assert np.array_equal(decoded[0].image[..., 0], sources[stems[0]][0])


# ----------------------------------------------------------------------------- bad input

def test_a_negative_seed_is_refused_by_name(tmp_path):
    # Before: numpy's "expected non-negative integer" traceback when splitting.
    with pytest.raises(BuildError, match=r"--seed -1: expected an integer from 0 to 4294967295"):
        config_for(tmp_path, seed=-1).validate()


def test_missing_and_empty_folders(tmp_path):
    assert_fails(config_for(tmp_path), str(tmp_path / "images"), "does not exist")
    os.makedirs(tmp_path / "images")
    os.makedirs(tmp_path / "masks")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    assert_fails(config_for(tmp_path), str(tmp_path / "images"), "no files ending in .tif")


def test_a_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    # As root (CI) a chmod 000 folder stays readable: the listing's PermissionError is raised here.
    os.makedirs(tmp_path / "images")
    os.makedirs(tmp_path / "masks")

    def refuse(folder, extensions):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(image_io, "list_files", refuse)
    assert_fails(config_for(tmp_path), f"image folder {tmp_path / 'images'}: cannot list its files "
                                       "(Permission denied)")


def test_every_unpaired_file_is_listed(tmp_path):
    write_pairs(tmp_path, count=4)
    os.remove(tmp_path / "masks" / "img_001.tif")
    os.remove(tmp_path / "masks" / "img_002.tif")
    os.remove(tmp_path / "images" / "img_003.tif")
    assert_fails(config_for(tmp_path), "image without mask: " + str(tmp_path / "images" / "img_001.tif"),
                 "image without mask: " + str(tmp_path / "images" / "img_002.tif"),
                 "mask without image: " + str(tmp_path / "masks" / "img_003.tif"))


def test_size_mismatch(tmp_path):
    write_pairs(tmp_path, count=3)
    tifffile.imwrite(tmp_path / "masks" / "img_001.tif", np.zeros((32, 30), np.uint8))
    assert_fails(config_for(tmp_path), "size mismatch", "img_001.tif", "32x30")


@pytest.mark.parametrize("bad_mask,fragment", [
    (np.full((32, 32), 1.0, np.float32), "float dtype float32"),
    (np.full((32, 32), -1, np.int16), "negative"),
    (np.stack([np.zeros((32, 32), np.uint8), np.ones((32, 32), np.uint8), np.zeros((32, 32), np.uint8)], -1),
     "differing channels"),
    (np.zeros((2, 32, 32, 2), np.uint8), "expected H x W"),
])
def test_bad_masks(tmp_path, bad_mask, fragment):
    write_pairs(tmp_path, count=3)
    tifffile.imwrite(tmp_path / "masks" / "img_002.tif", bad_mask)
    assert_fails(config_for(tmp_path), str(tmp_path / "masks" / "img_002.tif"), fragment)


def test_image_folder_equal_to_mask_folder_is_refused(tmp_path):
    write_pairs(tmp_path, count=3)
    config = config_for(tmp_path, mask_folder=str(tmp_path / "images" / "."))
    assert_fails(config, "--image_folder and --mask_folder are the same folder", "images")


def test_0_255_masks_warn_and_the_flag_maps_255_to_1(tmp_path, capsys):
    write_pairs(tmp_path, count=3)
    for i in range(3):
        path = tmp_path / "masks" / f"img_{i:03d}.tif"
        tifffile.imwrite(path, (tifffile.imread(path) > 0).astype(np.uint8) * 255)
    plain = build_lmdb.build_databases(config_for(tmp_path, train_fraction=1.0), show_progress=False)
    assert plain.metadata["train"]["number_classes"] == 256
    [warning] = plain.warnings
    assert "only the values 0 and 255" in warning and "--masks_255_to_1" in warning
    assert "warning: every mask in" in capsys.readouterr().err
    mapped = build_lmdb.build_databases(config_for(tmp_path, train_fraction=1.0, masks_255_to_1=True),
                                        show_progress=False)
    assert mapped.metadata["train"]["number_classes"] == 2 and mapped.warnings == []
    _, items = read_db(mapped.paths["train"])
    for _, mask, source in items:
        assert np.array_equal(mask, tifffile.imread(source["mask"]) // 255)
    # A mask that is not binary 0/255 is refused rather than merged.
    tifffile.imwrite(tmp_path / "masks" / "img_001.tif", np.full((32, 32), 3, np.uint8))
    assert_fails(config_for(tmp_path, masks_255_to_1=True, dataset_name="y"), "img_001.tif", "also holds 3")


def test_masks_of_background_only_warn_and_so_do_dense_masks_built_as_scribbles(tmp_path):
    write_pairs(tmp_path, count=3)
    for i in range(3):
        path = tmp_path / "masks" / f"img_{i:03d}.tif"
        tifffile.imwrite(path, (tifffile.imread(path) > 0).astype(np.uint8))
    dense = build_lmdb.build_databases(config_for(tmp_path, train_fraction=1.0, scribbles=True), show_progress=False)
    # Dense 0/1 masks read as scribbles: 0 unpainted, 1 -> class 0. Only background is annotated.
    [warning] = dense.warnings
    assert "paints only the value 1: all annotated pixels are class 0" in warning
    for i in range(3):
        tifffile.imwrite(tmp_path / "masks" / f"img_{i:03d}.tif", np.zeros((32, 32), np.uint8))
    empty = build_lmdb.build_databases(config_for(tmp_path, train_fraction=1.0, dataset_name="z"), show_progress=False)
    assert ["class 0 (background): a network trained on them learns only background" in w for w in empty.warnings] \
        == [True]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_float_images_with_non_finite_pixels_are_refused(tmp_path, value):
    write_pairs(tmp_path, count=3, dtype=np.float32)
    bad = tmp_path / "images" / "img_002.tif"
    image = tifffile.imread(bad)
    image[3, 4:9] = value
    tifffile.imwrite(bad, image)
    assert_fails(config_for(tmp_path), str(bad), "5 of 1024 pixel values are not finite")


def test_jpeg_masks_are_refused(tmp_path):
    write_pairs(tmp_path, count=2, dtype=np.uint8, image_ext="jpg", mask_ext="jpg")
    assert_fails(config_for(tmp_path, image_extensions=("jpg",)), "img_000.jpg is JPEG", "lossy")


def test_corrupt_files_are_named(tmp_path):
    write_pairs(tmp_path, count=4, shape=(64, 64))
    (tmp_path / "images" / "img_001.tif").write_bytes(b"II*\x00garbage")
    truncated = tmp_path / "masks" / "img_002.tif"
    truncated.write_bytes(truncated.read_bytes()[:200])
    (tmp_path / "masks" / "img_003.tif").write_bytes(b"")
    assert_fails(config_for(tmp_path), "3 of 4 pair(s)", str(tmp_path / "images" / "img_001.tif"),
                 str(truncated), str(tmp_path / "masks" / "img_003.tif"), "cannot read image",
                 "cannot read mask")


@pytest.mark.parametrize("bad_image,fragment", [
    (np.full((32, 32), 1 + 1j, np.complex64), "unsupported image dtype"),
    (np.full((32, 32), 2 ** 40, np.uint64), "does not fit int32"),
    (np.full((32, 32), 0.1, np.float64), "cannot represent"),
])
def test_unsupported_or_lossy_image_dtypes(tmp_path, bad_image, fragment):
    write_pairs(tmp_path, count=3)
    tifffile.imwrite(tmp_path / "images" / "img_000.tif", bad_image)
    assert_fails(config_for(tmp_path), str(tmp_path / "images" / "img_000.tif"), fragment)


def test_all_bad_pairs_are_reported_together(tmp_path):
    write_pairs(tmp_path, count=4)
    tifffile.imwrite(tmp_path / "masks" / "img_000.tif", np.full((32, 32), 0.5, np.float32))
    tifffile.imwrite(tmp_path / "masks" / "img_003.tif", np.full((32, 32), -2, np.int8))
    assert_fails(config_for(tmp_path), "2 of 4 pair(s)", "img_000.tif", "img_003.tif")


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5, float("nan")])
def test_train_fraction_out_of_range(tmp_path, fraction):
    write_pairs(tmp_path, count=3)
    assert_fails(config_for(tmp_path, train_fraction=fraction), "--train_fraction", "(0, 1]")


def test_split_leaving_the_test_set_empty_says_how_many_images(tmp_path):
    write_pairs(tmp_path, count=3)
    assert_fails(config_for(tmp_path, train_fraction=0.9), "3 image(s)", "test set empty")


def test_tile_flags_are_checked(tmp_path):
    write_pairs(tmp_path, count=3)
    assert_fails(config_for(tmp_path, tile_overlap=4), "--tile_overlap 4 needs --tile_size")
    assert_fails(config_for(tmp_path, tile_size=16, tile_overlap=16), "--tile_overlap 16")


def test_a_target_that_is_not_a_database_is_not_replaced(tmp_path):
    write_pairs(tmp_path, count=5)
    os.makedirs(tmp_path / "out" / "train-x.lmdb")
    (tmp_path / "out" / "train-x.lmdb" / "thesis.tex").write_text("precious")
    assert_fails(config_for(tmp_path), "train-x.lmdb exists and is not an LMDB database")
    assert (tmp_path / "out" / "train-x.lmdb" / "thesis.tex").read_text() == "precious"


# ----------------------------------------------------------------------------- atomic replacement

def _previous_build(tmp_path):
    """A first build (seed 0) to be protected; returns its paths and their digests."""
    write_pairs(tmp_path, count=10)
    first = build_lmdb.build_databases(config_for(tmp_path), show_progress=False)
    return first.paths, {s: digest(p) for s, p in first.paths.items()}


def _assert_previous_intact(tmp_path, paths, digests):
    assert {s: digest(p) for s, p in paths.items()} == digests
    assert records.read_metadata(paths["train"])["split_seed"] == 0
    assert glob.glob(str(tmp_path / "out" / ".build_lmdb-*")) == []


def test_rebuild_replaces_the_previous_databases(tmp_path):
    paths, digests = _previous_build(tmp_path)
    build_lmdb.build_databases(config_for(tmp_path, seed=5), show_progress=False)
    assert records.read_metadata(paths["train"])["split_seed"] == 5
    assert digest(paths["train"]) != digests["train"]
    assert sorted(os.listdir(tmp_path / "out")) == ["test-x.lmdb", "train-x.lmdb"]


@pytest.mark.parametrize("exception", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_midway_keeps_previous_databases(tmp_path, monkeypatch, exception):
    paths, digests = _previous_build(tmp_path)
    calls = []
    real_tiles_of = build_lmdb.tiles_of

    def failing_tiles_of(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # midway through the train database
            raise exception
        return real_tiles_of(*args, **kwargs)

    monkeypatch.setattr(build_lmdb, "tiles_of", failing_tiles_of)
    with pytest.raises(type(exception)):
        build_lmdb.build_databases(config_for(tmp_path, seed=5), show_progress=False)
    assert len(calls) == 5
    _assert_previous_intact(tmp_path, paths, digests)


def test_failure_while_renaming_rolls_back(tmp_path, monkeypatch):
    paths, digests = _previous_build(tmp_path)
    real_rename = os.rename

    def failing_rename(src, dst):
        # Fail when the new test database would move into place, after train already has.
        if os.path.basename(src) == "test-x.lmdb" and ".build_lmdb-" in str(src):
            raise OSError("simulated rename failure")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated"):
        build_lmdb.build_databases(config_for(tmp_path, seed=5), show_progress=False)
    monkeypatch.setattr(os, "rename", real_rename)
    _assert_previous_intact(tmp_path, paths, digests)


def test_previous_database_survives_even_a_failed_roll_back(tmp_path, monkeypatch):
    paths, digests = _previous_build(tmp_path)
    real_rename = os.rename

    def failing_rename(src, dst):
        # Every move of a test database out of the scratch directory fails, restores included.
        if str(dst).endswith("test-x.lmdb") and ".build_lmdb-" in str(src):
            raise OSError("simulated rename failure")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(BuildError, match="kept at") as info:
        build_lmdb.build_databases(config_for(tmp_path, seed=5), show_progress=False)
    monkeypatch.setattr(os, "rename", real_rename)
    [stranded] = glob.glob(str(tmp_path / "out" / ".build_lmdb-*" / "previous-test-x.lmdb"))
    assert stranded in str(info.value)
    assert digest(stranded) == digests["test"] and digest(paths["train"]) == digests["train"]
    assert os.listdir(os.path.dirname(stranded)) == ["previous-test-x.lmdb"]


def test_failed_build_removes_the_output_folder_it_created(tmp_path, monkeypatch):
    write_pairs(tmp_path, count=5)
    monkeypatch.setattr(build_lmdb, "tiles_of", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        build_lmdb.build_databases(config_for(tmp_path), show_progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("signum,exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_in_a_real_process_keeps_previous_databases(tmp_path, signum, exit_code):
    paths, digests = _previous_build(tmp_path)
    # The child slows its write pass down and announces it, so the signal lands mid-build.
    child = _slow_build_child(tmp_path, tmp_path / "writing", "--seed", "5")
    child.send_signal(signum)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == exit_code, stderr
    _assert_previous_intact(tmp_path, paths, digests)


def _slow_build_child(tmp_path, marker, *extra):
    """A build_lmdb.main child whose write pass is slowed down and announced by touching marker."""
    script = (
        "import sys, time, pathlib, build_lmdb\n"
        "real = build_lmdb.tiles_of\n"
        "def slow(*a, **k):\n"
        f"    pathlib.Path({str(marker)!r}).touch()\n"
        "    time.sleep(0.2)\n"
        "    return real(*a, **k)\n"
        "build_lmdb.tiles_of = slow\n"
        "sys.exit(build_lmdb.main(sys.argv[1:]))\n")
    child = subprocess.Popen(
        [sys.executable, "-c", script, "--image_folder", str(tmp_path / "images"), "--mask_folder",
         str(tmp_path / "masks"), "--output_folder", str(tmp_path / "out"), "--dataset_name", "x", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.02)
    assert marker.exists(), child.communicate()
    return child


def _reaped_pid():
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_scratch_of_a_killed_build_is_removed_by_the_next_build(tmp_path):
    paths, digests = _previous_build(tmp_path)
    child = _slow_build_child(tmp_path, tmp_path / "writing", "--seed", "5")
    child.kill()  # SIGKILL: no cleanup runs
    child.communicate(timeout=60)
    [left] = glob.glob(str(tmp_path / "out" / ".build_lmdb-*"))
    assert f"-{child.pid}-" in os.path.basename(left)
    # A scratch of a dead build holding a previous database whose target is gone gets it back;
    # the scratch of a running build (here: this test's own process) is left alone.
    host = os.path.basename(left).split("-")[1]
    stranded = tmp_path / "out" / f".build_lmdb-{host}-{_reaped_pid()}-abc123"
    os.makedirs(stranded)
    os.rename(paths["test"], stranded / "previous-test-x.lmdb")
    running = tmp_path / "out" / f".build_lmdb-{host}-{os.getpid()}-def456"
    os.makedirs(running)
    _assert_scratch_actions(tmp_path, paths, digests, left, stranded, running)


def _assert_scratch_actions(tmp_path, paths, digests, left, stranded, running):
    warned = []
    result = build_lmdb.build_databases(config_for(tmp_path, dataset_name="other"), show_progress=False,
                                        warn=warned.append)
    assert not os.path.exists(left) and not stranded.exists() and running.is_dir()
    assert digest(paths["test"]) == digests["test"] and digest(paths["train"]) == digests["train"]
    assert any(f"removed {left}" in line and "no longer running" in line for line in warned)
    assert any(f"restored {paths['test']}" in line for line in warned)
    assert result.warnings == warned
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        [running.name, "test-x.lmdb", "train-x.lmdb", "test-other.lmdb", "train-other.lmdb"])


def test_disk_full_while_writing_names_the_folder_and_changes_nothing(tmp_path, monkeypatch):
    import lmdb

    paths, digests = _previous_build(tmp_path)
    real_put = records._put_growing
    calls = []

    def failing_put(env, key, value, map_size):
        calls.append(key)
        if len(calls) == 4:
            raise lmdb.DiskError("mdb_txn_commit: No space left on device")
        return real_put(env, key, value, map_size)

    monkeypatch.setattr(records, "_put_growing", failing_put)
    message = str(pytest.raises(BuildError, build_lmdb.build_databases, config_for(tmp_path, seed=5),
                                show_progress=False).value)
    assert message.startswith(f"no space left on {tmp_path / 'out'} while writing train-x.lmdb")
    assert "previous databases, if any, are unchanged" in message
    _assert_previous_intact(tmp_path, paths, digests)


def test_disk_full_on_a_real_small_file_system(tmp_path, monkeypatch):
    small = tmp_path / "small"
    os.makedirs(small)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected DiskError test covers the message")
    try:
        write_pairs(tmp_path, count=30, shape=(128, 128))  # 1.5 MB of pixels, 1 MB of space
        # Pretend the space was still there when the build checked it (another writer filled it).
        monkeypatch.setattr(build_lmdb, "_check_targets", lambda *args: None)
        config = config_for(tmp_path, output_folder=str(small / "out"))
        message = str(pytest.raises(BuildError, build_lmdb.build_databases, config, show_progress=False).value)
        assert message.startswith(f"no space left on {small / 'out'} while writing train-x.lmdb")
        assert not (small / "out").exists()  # the folder it created is gone again, scratch included
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_folds_partition_the_images_reproducibly(tmp_path):
    write_pairs(tmp_path, count=7, shape=(16, 16))

    def build(seed, name):
        result = build_lmdb.build_databases(config_for(tmp_path, folds=3, seed=seed, dataset_name=name),
                                            show_progress=False)
        assert sorted(result.paths) == sorted(f"{s}-fold{i}" for s in ("train", "test") for i in range(3))
        tests = []
        for fold in range(3):
            train_path, test_path = result.paths[f"train-fold{fold}"], result.paths[f"test-fold{fold}"]
            assert os.path.basename(test_path) == f"test-{name}-fold{fold}.lmdb"
            train_meta, test_meta = records.read_metadata(train_path), records.read_metadata(test_path)
            train = {stem_of(s) for s in train_meta["sources"]}
            test = {stem_of(s) for s in test_meta["sources"]}
            assert not train & test and len(train | test) == 7 and len(test) in (2, 3)
            assert (test_meta["fold"], test_meta["folds"], train_meta["split"]) == (fold, 3, "train")
            tests.append(sorted(test))
        every = [stem for fold in tests for stem in fold]
        assert sorted(every) == [f"img_{i:03d}" for i in range(7)]  # each image in exactly one test set
        return tests

    assert build(1, "a") == build(1, "b")
    assert build(1, "a") != build(2, "c")
    assert_fails(config_for(tmp_path, folds=8, dataset_name="d"), "--folds 8 with 7 image(s)")
    assert_fails(config_for(tmp_path, folds=1, dataset_name="d"), "--folds 1")


# ----------------------------------------------------------------------------- command line

def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "build_lmdb.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_cli_help_documents_every_flag():
    done = run_cli("-h")
    assert done.returncode == 0
    for flag in ("--image_folder", "--mask_folder", "--output_folder", "--output_filepath", "--dataset_name",
                 "--train_fraction", "--seed", "--tile_size", "--tile_overlap", "--image_extensions",
                 "--folds", "--masks_255_to_1", "--first_axis_is_channels"):
        assert flag in done.stdout
    text = " ".join(done.stdout.split())
    assert "never land in both" in text and "Test images are always stored whole" in text


def test_cli_builds_and_summarises(tmp_path):
    write_pairs(tmp_path, count=10)
    done = run_cli("--image_folder", str(tmp_path / "images"), "--mask_folder", str(tmp_path / "masks"),
                   "--output_filepath", str(tmp_path / "out"), "--dataset_name", "cli",
                   "--image_extensions", "TIF,.png")
    assert done.returncode == 0, done.stderr
    assert "train      8 images ->      8 records" in done.stdout
    assert "pixels per class" in done.stdout and "MB" in done.stdout
    assert records.read_metadata(str(tmp_path / "out" / "test-cli.lmdb"))["num_records"] == 2


def test_cli_bad_input_exits_1_naming_the_files(tmp_path):
    write_pairs(tmp_path, count=3)
    os.remove(tmp_path / "masks" / "img_001.tif")
    done = run_cli("--image_folder", str(tmp_path / "images"), "--mask_folder", str(tmp_path / "masks"),
                   "--output_folder", str(tmp_path / "out"), "--dataset_name", "cli")
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "img_001.tif" in done.stderr
    assert not (tmp_path / "out").exists()


def test_cli_folds_exclude_train_fraction():
    done = run_cli("--image_folder", "a", "--mask_folder", "b", "--output_folder", "c",
                   "--dataset_name", "d", "--folds", "5", "--train_fraction", "0.5")
    assert done.returncode == 2 and "--train_fraction and --folds exclude each other" in done.stderr


def test_cli_malformed_flag_exits_2():
    done = run_cli("--image_folder", "a", "--mask_folder", "b", "--output_folder", "c",
                   "--dataset_name", "d", "--train_fraction", "lots")
    assert done.returncode == 2 and "--train_fraction" in done.stderr


# ----------------------------------------------------------------------------- real data

def test_nist_colonies(nist_dir, tmp_path):
    result = build_lmdb.build_databases(BuildConfig(
        image_folder=str(nist_dir / "images"), mask_folder=str(nist_dir / "masks"),
        output_folder=str(tmp_path), dataset_name="nist"), show_progress=False)
    train = records.read_metadata(result.paths["train"])
    test = records.read_metadata(result.paths["test"])
    assert (train["num_records"], test["num_records"]) == (80, 20)
    assert train["number_classes"] == 2 and test["number_classes"] == 2
    assert train["image_shape"] == [256, 256, 1] and train["image_dtype"] == "uint16"
    assert sum(train["class_pixel_counts"]) + sum(test["class_pixel_counts"]) == 100 * 256 * 256
    assert len(train["class_presence"]) == 80
    assert not {s["image"] for s in train["sources"]} & {s["image"] for s in test["sources"]}
    raw = sum(result.raw_pixel_bytes.values())
    assert raw == 100 * 256 * 256 * 3
    assert sum(result.database_bytes.values()) / raw < 1.05


# ----------------------------------------------------------------------------- demo data

def test_demo_dataset_builds_into_three_classes(tmp_path):
    import demo_data

    image_folder, mask_folder = demo_data.generate_demo_dataset(str(tmp_path / "data"), num_images=6, size=64)
    image = tifffile.imread(os.path.join(image_folder, "demo_000.tif"))
    assert image.dtype == np.uint16 and image.shape == (64, 64) and image.std() > 100
    again = tmp_path / "again"
    demo_data.generate_demo_dataset(str(again), num_images=1, size=64)
    assert np.array_equal(tifffile.imread(again / "images" / "demo_000.tif"), image)  # seeded
    result = build_lmdb.build_databases(BuildConfig(
        image_folder=image_folder, mask_folder=mask_folder, output_folder=str(tmp_path / "out"),
        dataset_name="demo", train_fraction=1.0), show_progress=False)
    counts = result.metadata["train"]["class_pixel_counts"]
    assert len(counts) == 3 and min(counts) > 0 and counts[0] > counts[1] + counts[2]
