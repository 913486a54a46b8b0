"""inference.py: masks equal whole-image inference for any size / channels / dtype, lazily read TIFF
and Zarr, streamed outputs and bounded memory, TTA and ensembles, per-file failures (NaN too),
atomic outputs, the CLI's exit codes, and a real accuracy check on nist_colonies."""
import json
import os
import pathlib
import subprocess
import sys
import warnings

import imageio.v3 as iio
import keras
import numpy as np
import pytest
import tifffile

import image_io
import inference
import models
import normalization
import predictor
import writers
from conftest import whole_image_logits

ROOT = pathlib.Path(__file__).resolve().parent.parent
CLASSES = 3


def save_model_folder(folder, name="unet", number_classes=CLASSES, input_channels=1, base_filters=2,
                      tile_size=64, seed=0):
    """A tiny random-weight model saved like a training output folder (model.keras + config.json)."""
    keras.utils.set_random_seed(seed)
    model = models.build_model(name, number_classes, input_channels=input_channels,
                               base_filters=base_filters)
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    (folder / "config.json").write_text(json.dumps({
        "model": name, "number_classes": number_classes, "tile_size": tile_size,
        "input_channels": input_channels, "base_filters": base_filters, "batch_norm": True}))
    return model


def assert_labels_match(labels, logits, tolerance=1e-4):
    """labels == argmax(logits) except where the two best classes are within ``tolerance`` (ties)."""
    expected = np.argmax(logits, axis=-1)
    top2 = np.sort(logits, axis=-1)[..., -2:]
    differs = (labels != expected) & (top2[..., 1] - top2[..., 0] > tolerance)
    assert not differs.any(), f"{differs.sum()} pixels differ, first at {np.argwhere(differs)[0]}"


@pytest.fixture(scope="module")
def unet_1ch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet_1ch")
    return folder, save_model_folder(folder, input_channels=1)


@pytest.fixture(scope="module")
def unet_3ch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet_3ch")
    return folder, save_model_folder(folder, input_channels=3, seed=1)


# ----------------------------------------------------------------------------------------------
# The whole run: sizes, channels, dtypes, outputs
# ----------------------------------------------------------------------------------------------

def _write(path, image):
    if path.suffix == ".png":
        iio.imwrite(path, image)
    else:
        tifffile.imwrite(path, image)


@pytest.mark.parametrize("channels", [1, 3])
def test_run_inference_writes_a_mask_per_image_of_any_size_and_dtype(tmp_path, channels, unet_1ch,
                                                                     unet_3ch):
    folder, model = unet_1ch if channels == 1 else unet_3ch
    rng = np.random.default_rng(0)
    shape = lambda h, w: (h, w) if channels == 1 else (h, w, channels)  # noqa: E731
    images = {
        "wide.tif": rng.integers(0, 65535, shape(300, 517), dtype=np.uint16),
        "large.png": rng.integers(0, 255, shape(420, 350), dtype=np.uint8),
        "small.tif": rng.normal(0.5, 0.01, shape(40, 50)).astype(np.float32),
    }
    image_folder = tmp_path / "images"
    image_folder.mkdir()
    for name, image in images.items():
        _write(image_folder / name, image)
    (image_folder / "notes.txt").write_text("not an image")

    summary = inference.run_inference(inference.InferenceConfig(
        image_folder=str(image_folder), output_folder=str(tmp_path / "out"), model=str(folder),
        tile_size=288, batch_size=2))

    assert summary.failed == {} and summary.ok_count == 3
    assert sorted(os.listdir(tmp_path / "out")) == ["large.tif", "small.tif", "wide.tif"]
    for name, image in images.items():
        labels = tifffile.imread(tmp_path / "out" / (pathlib.Path(name).stem + ".tif"))
        assert labels.shape == image.shape[:2] and labels.dtype == np.uint8
        assert labels.max() < CLASSES
        assert_labels_match(labels, whole_image_logits(model, image))
    # Random weights still give more than one class, so the comparison above is not vacuous.
    assert len(np.unique(tifffile.imread(tmp_path / "out" / "large.tif"))) > 1


def test_save_probabilities_writes_float32_class_maps(tmp_path, unet_1ch):
    folder, model = unet_1ch
    (tmp_path / "images").mkdir()
    image = np.random.default_rng(1).integers(0, 4000, (70, 90), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "images" / "a.TIFF", image)

    summary = inference.run_inference(inference.InferenceConfig(
        image_folder=str(tmp_path / "images"), output_folder=str(tmp_path / "out"), model=str(folder),
        save_probabilities=True))

    assert summary.ok_count == 1
    probabilities = np.load(tmp_path / "out" / "a_probabilities.npy")
    labels = tifffile.imread(tmp_path / "out" / "a.tif")
    assert probabilities.shape == (70, 90, CLASSES) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(probabilities, axis=-1), labels)
    np.testing.assert_allclose(probabilities, inference.softmax(whole_image_logits(model, image)),
                               atol=1e-5)


def test_more_than_256_classes_give_uint16_masks(tmp_path):
    save_model_folder(tmp_path / "model", number_classes=300)
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", np.arange(32 * 48, dtype=np.uint16).reshape(32, 48))

    inference.run_inference(inference.InferenceConfig(
        image_folder=str(tmp_path / "images"), output_folder=str(tmp_path / "out"),
        model=str(tmp_path / "model" / "model.keras")))

    labels = tifffile.imread(tmp_path / "out" / "a.tif")
    assert labels.dtype == np.uint16 and labels.shape == (32, 48)
    assert writers.label_dtype(256) == np.uint8 and writers.label_dtype(257) == np.uint16


def test_checkpoint_filepath_rebuilds_the_model_from_config(tmp_path, unet_1ch):
    folder, model = unet_1ch
    output_dir = tmp_path / "run"
    checkpoint = output_dir / "checkpoints" / "best"
    checkpoint.mkdir(parents=True)
    model.save_weights(checkpoint / "model.weights.h5")
    (output_dir / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "images").mkdir()
    image = np.random.default_rng(2).integers(0, 4000, (64, 80), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "images" / "a.tif", image)

    for name, source in [("from_output_dir", output_dir), ("from_checkpoint", checkpoint)]:
        summary = inference.run_inference(inference.InferenceConfig(
            image_folder=str(tmp_path / "images"), output_folder=str(tmp_path / name),
            checkpoint_filepath=str(source)))
        assert summary.ok_count == 1
        assert_labels_match(tifffile.imread(tmp_path / name / "a.tif"), whole_image_logits(model, image))


# ----------------------------------------------------------------------------------------------
# Large images: lazy reading, streamed outputs, bounded memory
# ----------------------------------------------------------------------------------------------

def _in_memory_labels(model, image, tile_size, tta=False):
    """The mask of an in-memory image: whole array, in-memory statistics, the shared predictor."""
    image = image.reshape(image.shape[:2] + (-1,))
    logits = predictor.predict_image(predictor.make_predictor(model), image,
                                     normalization.channel_statistics(image), models.geometry("unet"),
                                     tile_size, tta=tta)
    return np.argmax(logits, axis=-1), logits


def _write_zarr(path, image, ome):
    import zarr
    if not ome:
        zarr.create_array(store=str(path), data=image, chunks=(128, 160))
        return
    # OME-Zarr (NGFF 0.4 layout): a group with multiscales metadata, level "0" as (c, y, x).
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "c", "type": "channel"}, {"name": "y", "type": "space"},
        {"name": "x", "type": "space"}], "datasets": [{"path": "0"}, {"path": "1"}]}]
    group.create_array("0", data=image[np.newaxis], chunks=(1, 128, 160))
    group.create_array("1", data=image[np.newaxis, ::2, ::2], chunks=(1, 128, 160))


def test_image_statistics_stream_the_same_values_as_the_in_memory_function(tmp_path):
    image = np.random.default_rng(3).gamma(2.0, 300.0, (700, 650, 2)).astype(np.float32)
    tifffile.imwrite(tmp_path / "tiled.tif", image, tile=(128, 128), compression="zlib")
    source = image_io.open_image(tmp_path / "tiled.tif", 2)
    try:
        assert source.kind == "chunked TIFF" and source.shape == (700, 650, 2)
        streamed = image_io.image_statistics(source, "tiled.tif")
    finally:
        source.close()
    expected = normalization.channel_statistics(image)
    np.testing.assert_allclose(streamed.mean, expected.mean, rtol=1e-12)
    np.testing.assert_allclose(streamed.std, expected.std, rtol=1e-12)
    assert image_io.image_statistics(image, "x") == streamed  # in memory: the same pass


def test_lazy_inputs_give_the_in_memory_masks_and_streamed_outputs(tmp_path, unet_1ch, monkeypatch):
    folder, model = unet_1ch
    image = np.random.default_rng(4).integers(0, 60000, (600, 700), dtype=np.uint16)
    images = tmp_path / "images"
    images.mkdir()
    tifffile.imwrite(images / "contiguous.tif", image)
    tifffile.imwrite(images / "tiled.tif", image, tile=(256, 256), compression="zlib", bigtiff=True)
    # Pyramidal OME-TIFF: the full resolution is level 0, a half-size level follows in SubIFDs.
    with tifffile.TiffWriter(images / "pyramid.ome.tif", bigtiff=True) as tif:
        tif.write(image, tile=(128, 128), compression="zlib", subifds=1, metadata={"axes": "YX"})
        tif.write(image[::2, ::2], tile=(128, 128), compression="zlib", subfiletype=1)
    _write_zarr(images / "plain.zarr", image, ome=False)
    _write_zarr(images / "ome.zarr", image, ome=True)
    kinds = {}
    for name in ["contiguous.tif", "tiled.tif", "pyramid.ome.tif", "plain.zarr", "ome.zarr"]:
        source = image_io.open_image(images / name, 1)
        kinds[name] = source.kind
        np.testing.assert_array_equal(source[100:357][..., 0], image[100:357])
        source.close()
    assert kinds["contiguous.tif"] == "contiguous TIFF" and kinds["tiled.tif"] == "chunked TIFF"
    assert kinds["pyramid.ome.tif"] == "chunked TIFF" and kinds["ome.zarr"] == "Zarr"

    # Streamed writing for every image here (normally above 4096 x 4096 px).
    monkeypatch.setattr(writers, "STREAM_PIXELS", 1000)
    summary = inference.run_inference(inference.InferenceConfig(
        image_folder=str(images), output_folder=str(tmp_path / "out"), model=str(folder),
        tile_size=384, batch_size=4, save_probabilities=True))

    expected, logits = _in_memory_labels(model, image, 384)
    assert summary.failed == {} and summary.ok_count == 5
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["contiguous.tif", "tiled.tif", "pyramid.ome.tif", "plain.zarr", "ome.zarr"]
        + [f"{stem}_probabilities.zarr" for stem in ["contiguous", "tiled", "pyramid.ome", "plain", "ome"]])
    import zarr
    for stem in ["contiguous", "tiled", "pyramid.ome"]:
        with tifffile.TiffFile(tmp_path / "out" / f"{stem}.tif") as tif:
            page = tif.pages[0]
            assert tif.is_bigtiff and page.is_tiled and page.tilewidth == 256 and page.compression == 8
            np.testing.assert_array_equal(tif.asarray(), expected)
    for stem in ["plain", "ome"]:
        np.testing.assert_array_equal(zarr.open(str(tmp_path / "out" / f"{stem}.zarr"), mode="r")[:],
                                      expected)
    for stem in ["tiled", "ome"]:
        probabilities = zarr.open(str(tmp_path / "out" / f"{stem}_probabilities.zarr"), mode="r")[:]
        assert probabilities.shape == (600, 700, CLASSES) and probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities, inference.softmax(logits), atol=1e-6)
    assert len(np.unique(expected)) > 1
    # A .zarr folder given as --image_folder is one image.
    one = inference.run_inference(inference.InferenceConfig(
        image_folder=str(images / "ome.zarr"), output_folder=str(tmp_path / "one"), model=str(folder),
        tile_size=288))
    assert one.ok_count == 1 and os.listdir(tmp_path / "one") == ["ome.zarr"]


def test_streamed_probabilities_are_complete_when_the_height_fills_the_last_mask_tile(tmp_path, unet_1ch,
                                                                                     monkeypatch):
    # 512 rows = two whole 256-row TIFF tiles: tifffile has every tile with the last band's, and
    # once stopped pulling the last probabilities were never written (all zero) before the fix.
    folder, model = unet_1ch
    image = np.random.default_rng(7).integers(0, 60000, (512, 300), dtype=np.uint16)
    images = tmp_path / "images"
    images.mkdir()
    tifffile.imwrite(images / "tall.tif", image)
    monkeypatch.setattr(writers, "STREAM_PIXELS", 1000)
    summary = inference.run_inference(inference.InferenceConfig(
        image_folder=str(images), output_folder=str(tmp_path / "out"), model=str(folder),
        tile_size=288, save_probabilities=True))
    assert summary.failed == {} and summary.ok_count == 1
    import zarr
    expected, logits = _in_memory_labels(model, image, 288)
    probabilities = zarr.open(str(tmp_path / "out" / "tall_probabilities.zarr"), mode="r")[:]
    np.testing.assert_allclose(probabilities, inference.softmax(logits), atol=1e-6)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "tall.tif"), expected)


def _run_measured(command, log):
    """(exit code, peak RSS in MB) of ``command`` run through benchmarks/peak_rss.py: a child
    spawned from this pytest process directly would report pytest's own peak when that is larger."""
    peak_file = pathlib.Path(str(log) + ".maxrss")
    with open(log, "w") as out:
        returncode = subprocess.run([sys.executable, "-S", str(ROOT / "benchmarks" / "peak_rss.py"),
                                     str(peak_file), *command], stdout=out, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")).returncode
    return returncode, (int(peak_file.read_text()) / 1024 if peak_file.exists() else None)


def _peak_rss_mb(command, log):
    """Peak RSS in MB of ``command``, which must succeed."""
    returncode, peak = _run_measured(command, log)
    assert returncode == 0, pathlib.Path(log).read_text()[-3000:]
    return peak


def test_peak_rss_is_the_commands_own_not_the_callers(tmp_path):
    # This process holds 600 MB more than the command ever does; spawned directly, Linux would
    # report the command's peak as at least this process's.
    ballast = np.ones(600 * 1024 ** 2, np.uint8)
    child = [sys.executable, "-c", "import numpy; a = numpy.ones(100 * 1024 ** 2, numpy.uint8)"]
    peak = _peak_rss_mb(child, tmp_path / "child.log")
    assert 100 <= peak < 300, peak
    assert ballast.sum() == ballast.size
    returncode, peak = _run_measured([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "failed.log")
    assert returncode == 3 and peak > 0
    returncode, _ = _run_measured([str(tmp_path / "no-such-program")], tmp_path / "missing.log")
    assert returncode == 127 and "cannot run" in (tmp_path / "missing.log").read_text()


def test_peak_memory_of_a_large_image_stays_bounded(tmp_path):
    # 16 classes: whole-image float logits of a 2,600 px image would take 412 MB.
    classes, side = 16, 2600
    save_model_folder(tmp_path / "model", number_classes=classes)
    (tmp_path / "small").mkdir()
    (tmp_path / "large").mkdir()
    tifffile.imwrite(tmp_path / "small" / "a.tif", np.ones((512, 512), np.uint16))
    rng = np.random.default_rng(5)
    rows = (rng.integers(0, 4000, (256, side), dtype=np.uint16) for _ in range(0, side, 256))
    # Written by row blocks so the test itself does not hold the image either.
    with tifffile.TiffWriter(tmp_path / "large" / "big.tif", bigtiff=True) as tif:
        tif.write(_tiles_of_rows(rows, side, side), shape=(side, side), dtype=np.uint16, tile=(256, 256),
                  compression="zlib")

    def run(images):
        return _peak_rss_mb([sys.executable, str(ROOT / "inference.py"), "--model", str(tmp_path / "model"),
                             "--image_folder", str(tmp_path / images), "--output_folder",
                             str(tmp_path / f"out_{images}"), "--tile_size", "1024"],
                           tmp_path / f"{images}.log")

    small, large = run("small"), run("large")
    whole_logits_mb = side * side * classes * 4 / 1024 ** 2
    print(f"peak RSS: 512 px image {small:.0f} MB, {side} px image {large:.0f} MB "
          f"(whole-image float logits alone: {whole_logits_mb:.0f} MB)")
    assert large - small < 300 < whole_logits_mb, (small, large)
    assert side * side > writers.STREAM_PIXELS, "the large image must take the streamed path"
    with tifffile.TiffFile(tmp_path / "out_large" / "big.tif") as tif:
        assert tif.pages[0].shape == (side, side) and tif.pages[0].is_tiled
        assert tif.pages[0].asarray().max() < classes


def _tiles_of_rows(row_blocks, height, width, tile=256):
    for block in row_blocks:
        padded = np.zeros((tile, -(-width // tile) * tile), block.dtype)
        padded[:len(block), :width] = block
        for left in range(0, width, tile):
            yield padded[:, left:left + tile]


# ----------------------------------------------------------------------------------------------
# Test-time augmentation and ensembles
# ----------------------------------------------------------------------------------------------

def test_tta_and_ensemble_flags(tmp_path, unet_1ch):
    folder, model = unet_1ch
    (tmp_path / "images").mkdir()
    image = np.random.default_rng(6).integers(0, 4000, (300, 340), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "images" / "a.tif", image)
    common = ["--image_folder", str(tmp_path / "images"), "--tile_size", "288"]

    assert inference.main(["--model", str(folder), "--tta", "--output_folder", str(tmp_path / "tta")]
                          + common) == 0
    expected, logits = _in_memory_labels(model, image, 1024, tta=True)
    assert_labels_match(tifffile.imread(tmp_path / "tta" / "a.tif"), logits)

    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("model.keras", "config.json"):
        (copy / name).write_bytes((folder / name).read_bytes())
    assert inference.main(["--model", str(folder), str(copy), "--output_folder", str(tmp_path / "two")]
                          + common) == 0
    assert_labels_match(tifffile.imread(tmp_path / "two" / "a.tif"), whole_image_logits(model, image))


def test_ensemble_members_must_match(tmp_path, unet_1ch, unet_3ch, capsys):
    folder, _ = unet_1ch
    save_model_folder(tmp_path / "four_classes", number_classes=4)
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", np.ones((40, 40), np.uint16))
    common = ["--image_folder", str(tmp_path / "images"), "--output_folder", str(tmp_path / "out")]
    for other, what in [(tmp_path / "four_classes", "classes"), (unet_3ch[0], "input channels")]:
        assert inference.main(["--model", str(folder), str(other)] + common) == 2
        message = capsys.readouterr().err
        assert f"ensemble members differ in {what}" in message and str(other) in message
    assert not (tmp_path / "out").exists(), "a refused run writes nothing"


# ----------------------------------------------------------------------------------------------
# Failures
# ----------------------------------------------------------------------------------------------

def test_bad_files_fail_by_name_while_the_others_are_written(tmp_path, unet_1ch, capsys):
    folder, _ = unet_1ch
    images = tmp_path / "images"
    images.mkdir()
    tifffile.imwrite(images / "good.tif", np.ones((40, 40), dtype=np.uint16))
    (images / "corrupt.tif").write_bytes(b"II*\x00 this is not really a tiff")
    tifffile.imwrite(images / "rgb.tif", np.zeros((40, 40, 3), dtype=np.uint8))
    tifffile.imwrite(images / "later.tif", np.ones((40, 40), dtype=np.uint16))

    code = inference.main(["--model", str(folder), "--image_folder", str(images),
                           "--output_folder", str(tmp_path / "out")])

    stderr = capsys.readouterr().err
    assert code == 1
    assert "corrupt.tif: cannot read image" in stderr
    assert "rgb.tif: has 3 channel(s)" in stderr and "the model expects 1" in stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["good.tif", "later.tif"]


def test_missing_model_and_bad_flags_exit_non_zero_with_a_message(tmp_path, unet_1ch, capsys):
    folder, _ = unet_1ch
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", np.ones((40, 40), dtype=np.uint16))
    common = ["--image_folder", str(tmp_path / "images"), "--output_folder", str(tmp_path / "out")]

    cases = [
        (["--model", str(tmp_path / "nowhere.keras")], f"model not found: {tmp_path / 'nowhere.keras'}"),
        (["--checkpoint_filepath", str(tmp_path)], f"checkpoint not found: {tmp_path}"),
        (["--model", str(folder), "--tile_size", "100"], "--tile_size 100: must be a multiple of 16"),
        (["--model", str(folder), "--gpu", "7"], "--gpu 7: only"),
        (["--model", str(folder), "--image_extensions", "png"], "no images with extensions png"),
    ]
    for flags, message in cases:
        assert inference.main(flags + common) == 2, flags
        assert message in capsys.readouterr().err, flags
    assert not (tmp_path / "out" / "a.tif").exists()
    assert inference.main(["--model", str(folder), "--image_folder", str(tmp_path / "images"),
                           "--output_folder", str(tmp_path / "images")]) == 2
    assert "would overwrite the input" in capsys.readouterr().err


def test_flags_become_the_config():
    parse = inference.build_parser().parse_args
    base = ["--image_folder", "in", "--output_folder", "out"]
    config = inference.config_from_args(parse(["--model", "m"] + base + [
        "--image_extensions", "TIF, png  .jpg", "--tta"]))
    assert config.image_extensions == ("tif", "png", "jpg") and config.model == "m" and config.tta
    assert config.batch_size == 1 and config.tile_size is None
    ensemble = inference.config_from_args(parse(["--checkpoint_filepath", "a", "b", "c"] + base))
    assert ensemble.checkpoint_filepath == ["a", "b", "c"] and ensemble.model is None


def test_existing_output_is_only_replaced_by_a_complete_file(tmp_path, unet_1ch, monkeypatch):
    folder, _ = unet_1ch
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", np.ones((40, 40), dtype=np.uint16))
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.tif").write_bytes(b"previous result")
    config = inference.InferenceConfig(image_folder=str(tmp_path / "images"), output_folder=str(out),
                                       model=str(folder))

    def broken_imwrite(file, data, **kwargs):
        file.write(b"II*\x00 half a tiff")
        raise OSError("disk full")

    monkeypatch.setattr(writers.tifffile, "imwrite", broken_imwrite)
    summary = inference.run_inference(config)
    assert summary.failed_count == 1 and "disk full" in summary.failed["a.tif"]
    assert (out / "a.tif").read_bytes() == b"previous result"
    assert os.listdir(out) == ["a.tif"], "the temporary file must be removed"

    monkeypatch.undo()
    assert inference.run_inference(config).ok_count == 1
    assert tifffile.imread(out / "a.tif").shape == (40, 40)
    assert os.listdir(out) == ["a.tif"]


def test_an_output_that_would_be_the_image_itself_or_an_unwritable_folder_is_refused_up_front(
        tmp_path, unet_1ch, capsys, monkeypatch):
    folder, _ = unet_1ch
    image = (np.arange(64 * 80) % 251).reshape(64, 80).astype(np.uint16)
    _write_zarr(tmp_path / "slide.zarr", image, ome=False)
    # One Zarr image given as the folder, its parent as the output: the mask P/slide.zarr was written
    # over the input (and with --skip_existing the input counted as its own complete output).
    code = inference.main(["--model", str(folder), "--image_folder", str(tmp_path / "slide.zarr"),
                           "--output_folder", str(tmp_path)])
    assert code == 2
    assert "the outputs of slide.zarr would be written over the image itself" in capsys.readouterr().err
    import zarr
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "slide.zarr"), mode="r")[:], image)

    # An output folder that cannot be written: found before any image is predicted.
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(inference.tempfile, "TemporaryFile", refused)
    code = inference.main(["--model", str(folder), "--image_folder", str(tmp_path / "slide.zarr"),
                           "--output_folder", str(tmp_path / "out")])
    assert code == 2
    assert f"--output_folder {tmp_path / 'out'}: cannot write there (Permission denied)" in capsys.readouterr().err


def test_non_finite_pixels_and_overflowing_values_fail_the_file_by_name(tmp_path, unet_1ch, capsys):
    folder, _ = unet_1ch
    (tmp_path / "images").mkdir()
    image = np.random.default_rng(7).normal(size=(50, 60)).astype(np.float32)
    image[3, 4], image[10, 11], image[20, 0] = np.nan, np.inf, -np.inf
    tifffile.imwrite(tmp_path / "images" / "nan.tif", image)
    tifffile.imwrite(tmp_path / "images" / "ok.tif", np.nan_to_num(image, posinf=0, neginf=0))
    # Finite, but the variance overflows float64: before, a mask of class 0 from NaN statistics.
    tifffile.imwrite(tmp_path / "images" / "vast.tif", np.nan_to_num(image, posinf=0, neginf=0).astype(np.float64) * 1e200)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = inference.main(["--model", str(folder), "--image_folder", str(tmp_path / "images"),
                               "--output_folder", str(tmp_path / "out")])

    assert code == 1
    # The error says it; numpy's overflow warnings before it would only confuse.
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    err = capsys.readouterr().err
    assert "nan.tif: 3 pixel(s) with NaN or Inf values" in err
    assert "vast.tif: values too large to normalise (their variance overflows float64)" in err
    assert os.listdir(tmp_path / "out") == ["ok.tif"]


def test_cli_process_exit_code(tmp_path, unet_1ch, capsys):
    folder, _ = unet_1ch
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", np.ones((40, 40), dtype=np.uint16))
    command = [sys.executable, str(ROOT / "inference.py"), "--model", str(folder),
               "--image_folder", str(tmp_path / "images"), "--output_folder", str(tmp_path / "out")]

    # One real process (the exit code is main()'s), the other outcomes through main() in this one.
    ok = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "[1/1] a.tif 40x40x1 uint16" in ok.stdout and "1 mask(s) written" in ok.stdout

    (tmp_path / "images" / "b.png").write_bytes(b"\x89PNG broken")
    assert inference.main(command[2:]) == 1
    out, err = capsys.readouterr()
    assert "b.png: cannot read image" in err
    assert "1 mask(s) written" in out and "1 failed" in out

    (tmp_path / "a_file").write_text("not a folder")
    command[command.index("--output_folder") + 1] = str(tmp_path / "a_file")
    assert inference.main(command[2:]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"--output_folder {tmp_path / 'a_file'} is an existing file" in err
    assert (tmp_path / "a_file").read_text() == "not a folder"


# ----------------------------------------------------------------------------------------------
# Accuracy on real data
# ----------------------------------------------------------------------------------------------

def _foreground_dice(predicted, true):
    """Dice of the foreground (class > 0) pooled over all pixels of all images."""
    predicted, true = np.asarray(predicted) > 0, np.asarray(true) > 0
    return 2.0 * (predicted & true).sum() / (predicted.sum() + true.sum())


def _otsu_baseline(images):
    """Classical baseline: Gaussian smoothing + Otsu threshold per image, both polarities (the
    colonies may be brighter or darker than the background); returns the masks of each polarity."""
    from skimage.filters import gaussian, threshold_otsu

    bright = []
    for image in images:
        smooth = gaussian(image.astype(np.float64), sigma=2)
        bright.append(smooth > threshold_otsu(smooth))
    bright = np.stack(bright)
    return bright, ~bright


@pytest.mark.slow
def test_nist_dice_beats_baseline(tmp_path, nist_dir):
    import records

    names = sorted(p.name for p in (nist_dir / "images").glob("*.tif"))
    order = np.random.default_rng(0).permutation(len(names))
    test_names = [names[i] for i in order[:20]]
    train_names = [names[i] for i in order[20:]]

    def pairs(selection):
        for name in selection:
            yield (tifffile.imread(nist_dir / "images" / name), tifffile.imread(nist_dir / "masks" / name),
                   {"image": str(nist_dir / "images" / name), "mask": str(nist_dir / "masks" / name)})

    for split, selection in [("train", train_names), ("test", test_names)]:
        records.write_database(str(tmp_path / f"{split}.lmdb"), pairs(selection),
                               {"split": split, "split_seed": 0, "train_fraction": 0.8})
    run = tmp_path / "run"
    training = subprocess.run(
        [sys.executable, "train_unet.py", "--train_database", str(tmp_path / "train.lmdb"),
         "--test_database", str(tmp_path / "test.lmdb"), "--output_dir", str(run),
         "--base_filters", "8", "--batch_size", "4", "--tile_size", "128", "--max_steps", "150",
         "--test_every_n_steps", "75", "--seed", "0"],
        capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert training.returncode == 0, training.stderr[-3000:]

    image_folder = tmp_path / "test_images"
    image_folder.mkdir()
    for name in test_names:  # Links, not copies: inference reads the shared data in place.
        (image_folder / name).symlink_to(nist_dir / "images" / name)
    summary = inference.run_inference(inference.InferenceConfig(
        image_folder=str(image_folder), output_folder=str(tmp_path / "predicted"), model=str(run)))
    assert summary.ok_count == len(test_names) and summary.failed == {}

    true = np.stack([tifffile.imread(nist_dir / "masks" / name) for name in test_names])
    predicted = np.stack([tifffile.imread(tmp_path / "predicted" / name) for name in test_names])
    assert predicted.shape == true.shape
    dice = _foreground_dice(predicted, true)
    baseline = max(_foreground_dice(mask, true) for mask in
                   _otsu_baseline([tifffile.imread(nist_dir / "images" / name) for name in test_names]))
    print(f"foreground Dice: UNet {dice:.3f}, Gaussian + Otsu baseline {baseline:.3f}")
    assert dice > baseline + 0.15, (dice, baseline)

    # model.keras is the checkpoint with the lowest test loss; inference on whole images must score
    # what the trainer's own test pass measured for it (same normalisation, same model).
    with open(run / "test_metrics.csv") as f:
        header, *rows = [line.strip().split(",") for line in f if line.strip()]
    best = min(rows, key=lambda row: float(row[header.index("loss")]))
    assert abs(dice - float(best[header.index("dice_1")])) < 0.01, (dice, best)
