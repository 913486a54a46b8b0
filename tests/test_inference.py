"""inference.py: tiling equals whole-image inference, any size / channels / dtype, per-file failures,
atomic outputs, the CLI's exit codes, and a real accuracy check on nist_colonies."""
import json
import os
import pathlib
import subprocess
import sys

import imageio.v3 as iio
import keras
import numpy as np
import pytest
import tifffile

import augment
import inference
import models

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


def whole_image_logits(model, image, divisor=16):
    """Oracle: z-score the whole image, reflect-pad it to the divisor, one model call, crop."""
    normalized = augment.zscore_normalize(image.reshape(image.shape[:2] + (-1,)))
    padded, (top, left) = inference.pad_to_divisor(normalized, divisor)
    logits = np.asarray(model(padded[np.newaxis], training=False))[0]
    return logits[top:top + image.shape[0], left:left + image.shape[1]]


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
# Tiling
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length,tile,halo", [(304, 288, 128), (1008, 512, 128), (528, 288, 112),
                                              (64, 512, 128), (2048, 1024, 256)])
def test_plan_tiles_covers_every_pixel_once_with_full_context(length, tile, halo):
    plan = inference.plan_tiles(length, tile, halo)
    covered = np.zeros(length, dtype=int)
    for start, keep_start, keep_stop in plan:
        assert start % 16 == 0 and 0 <= start and start + min(tile, length) <= length
        covered[keep_start:keep_stop] += 1
        # A kept pixel has a full halo of real context on every side that is not the canvas border.
        assert keep_start == 0 or keep_start - start >= halo
        assert keep_stop == length or start + tile - keep_stop >= halo
    assert (covered == 1).all()
    assert (len(plan) == 1) == (tile >= length)


def test_halo_covers_the_receptive_field():
    for name in models.MODEL_NAMES:
        halo = inference.halo_for(name)
        assert halo % models.SIZE_DIVISOR[name] == 0
        assert halo >= models.receptive_field(name) // 2 + models.SIZE_DIVISOR[name]


@pytest.mark.parametrize("name,channels,shape,tile", [("unet", 1, (300, 517), 288),
                                                      ("unet", 3, (300, 517), 288),
                                                      ("segnet", 1, (600, 700), 576)])
def test_tiled_logits_equal_whole_image_logits(name, channels, shape, tile):
    keras.utils.set_random_seed(channels)
    model = models.build_model(name, CLASSES, input_channels=channels, base_filters=2)
    predictor = inference.make_predictor(model)
    image = augment.zscore_normalize(
        np.random.default_rng(channels).gamma(2.0, 300.0, size=shape + (channels,)))

    whole, whole_tiles = inference.predict_logits(predictor, image, name, tile_size=1024)
    tiled, tiles = inference.predict_logits(predictor, image, name, tile_size=tile, batch_size=3)

    assert whole_tiles == 1 and tiles > 4, "the comparison needs real tiling"
    assert whole.shape == tiled.shape == shape + (CLASSES,) and tiled.dtype == np.float32
    np.testing.assert_allclose(tiled, whole, atol=1e-4, rtol=0)
    assert_labels_match(np.argmax(tiled, axis=-1), whole)
    np.testing.assert_allclose(whole, whole_image_logits(model, image, models.SIZE_DIVISOR[name]),
                               atol=1e-5, rtol=0)
    # The same tiling with too small a halo leaves seams: the check above can fail.
    seamed, _ = inference.predict_logits(predictor, image, name, tile_size=tile, halo=32)
    assert np.abs(seamed - whole).max() > 1e-3


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
        "large.png": rng.integers(0, 255, shape(1000, 700), dtype=np.uint8),
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
    assert inference.label_dtype(256) == np.uint8 and inference.label_dtype(257) == np.uint16


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
        assert inference.main(flags + common) == 1, flags
        assert message in capsys.readouterr().err, flags
    assert not (tmp_path / "out" / "a.tif").exists()
    assert inference.main(["--model", str(folder), "--image_folder", str(tmp_path / "images"),
                           "--output_folder", str(tmp_path / "images")]) == 1
    assert "would overwrite the input" in capsys.readouterr().err


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

    monkeypatch.setattr(inference.tifffile, "imwrite", broken_imwrite)
    summary = inference.run_inference(config)
    assert summary.failed_count == 1 and "disk full" in summary.failed["a.tif"]
    assert (out / "a.tif").read_bytes() == b"previous result"
    assert os.listdir(out) == ["a.tif"], "the temporary file must be removed"

    monkeypatch.undo()
    assert inference.run_inference(config).ok_count == 1
    assert tifffile.imread(out / "a.tif").shape == (40, 40)
    assert os.listdir(out) == ["a.tif"]


def test_cli_process_exit_code(tmp_path, unet_1ch):
    folder, _ = unet_1ch
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", np.ones((40, 40), dtype=np.uint16))
    command = [sys.executable, str(ROOT / "inference.py"), "--model", str(folder),
               "--image_folder", str(tmp_path / "images"), "--output_folder", str(tmp_path / "out")]

    ok = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "[1/1] a.tif 40x40x1 uint16" in ok.stdout and "1 mask(s) written" in ok.stdout

    (tmp_path / "images" / "b.png").write_bytes(b"\x89PNG broken")
    failed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert failed.returncode == 1
    assert "b.png: cannot read image" in failed.stderr
    assert "1 mask(s) written" in failed.stdout and "1 failed" in failed.stdout


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
         "--base_filters", "8", "--batch_size", "4", "--tile_size", "256", "--learning_rate", "1e-3",
         "--max_epochs", "8", "--seed", "0"],
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
