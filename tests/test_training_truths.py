"""Training truths (issue 22, items 5-8 and 10): what the trainer measures and uses is what it says.

  - normalisation of integer images with large offsets (item 8);
  - the learning-rate schedule follows the trainer's step under float16 loss scaling (item 10);
  - the test pass predicts in float32 whatever --mixed_precision (item 5);
  - the test pass sizes its tile from the training device's memory and survives out-of-memory (item 6);
  - a database tiled at or below the crop size makes fixed crops, and the trainer says so (item 7).
"""
import csv

import numpy as np
import pytest

import normalization
import optim
import trainer
from conftest import make_synthetic_db


# ---------------------------------------------------------------------------------------------
# Item 8: integer images with large offsets
# ---------------------------------------------------------------------------------------------

def test_int32_images_with_a_large_offset_normalise_exactly():
    # 1e8 +- 10: a real std of ~5.8, below the float32 rounding rule's 4 eps32 x 1e8 = 48, and
    # integers above 2**24 that float32 rounds to multiples of 8.
    rng = np.random.default_rng(0)
    image = (100_000_000 + rng.integers(-10, 11, size=(40, 48))).astype(np.int32)
    stats = normalization.channel_statistics(image)
    out = normalization.normalize(image, stats)
    expected = (image.astype(np.float64) - image.mean()) / image.std()
    assert out.dtype == np.float32 and out.shape == image.shape
    assert np.abs(out).max() > 1.0
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    # The same offset on uint32 and int64 data, and a crop normalised with the source statistics.
    for dtype in (np.uint32, np.int64):
        same = normalization.normalize(image.astype(dtype), stats)
        np.testing.assert_allclose(same, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(normalization.normalize(image[5:21, 8:40], stats), out[5:21, 8:40])


def test_constant_channels_float_rounding_rule_only_for_float_data():
    # A float32 channel whose spread is only float32 rounding still maps to zeros ...
    base = np.full((16, 16), 1e8, np.float32)
    base[::2] = np.nextafter(np.float32(1e8), np.float32(np.inf))
    out = normalization.normalize(base, normalization.channel_statistics(base))
    assert np.all(out == 0)
    # ... while an exactly constant integer channel is zeros and a 1-count spread is real signal.
    constant = np.full((16, 16), 123_456_789, np.int64)
    assert np.all(normalization.normalize(constant, normalization.channel_statistics(constant)) == 0)
    step = constant.copy()
    step[::2] += 1
    out = normalization.normalize(step, normalization.channel_statistics(step))
    np.testing.assert_allclose(np.unique(out), [-1.0, 1.0], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Shared: tiny databases and in-process runs
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dbs")
    make_synthetic_db(root / "train", num_records=6, shape=(32, 32), seed=0)
    make_synthetic_db(root / "test", num_records=2, shape=(48, 48), seed=1)
    return str(root / "train"), str(root / "test")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _config(dbs, output_dir, **overrides):
    values = dict(batch_size=2, tile_size=32, base_filters=2, unet_depth=2, test_every_n_steps=3,
                  log_every_n_steps=1, use_augmentation=False, learning_rate=0.01, optimizer="sgd", max_steps=3)
    values.update(overrides)
    return trainer.TrainConfig("unet", dbs[0], dbs[1], str(output_dir), **values)


# ---------------------------------------------------------------------------------------------
# Item 10: the schedule follows the trainer's step under float16 loss scaling
# ---------------------------------------------------------------------------------------------

def _logged_rates(text):
    """{step: lr} from the trainer's progress lines."""
    return {int(line.split()[1]): float(line.split()[5]) for line in text.splitlines()
            if line.startswith("step ") and line.split()[4] == "lr"}


@pytest.fixture(scope="module")
def float16_run(dbs, tmp_path_factory):
    """One --mixed_precision float16 run (8 steps, poly schedule, one test pass at the end) whose
    step 3 has "overflowing" gradients: the loss-scale optimizer skips that update (and the inner
    optimizer's iterations), as it does for a real inf/NaN gradient. Records the logits the test
    pass computed. Returns (summary, printed output, output folder, [(image, stats, logits)])."""
    import contextlib
    import io

    import keras
    import tensorflow as tf

    import distribute
    import predictor

    calls, skipped_step, predicted = [], 3, []
    original_agree, original_predict = distribute.all_replicas_true, predictor.predict_image

    def not_finite_on_the_skipped_step():
        calls.append(1)
        return len(calls) != skipped_step

    def recording_predict(forward, image, stats, *args, **kwargs):
        logits = original_predict(forward, image, stats, *args, **kwargs)
        predicted.append((np.array(image), stats, logits))
        return logits

    out_dir, printed = tmp_path_factory.mktemp("float16") / "run", io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(distribute, "all_replicas_true", lambda flag: tf.logical_and(
            original_agree(flag), tf.py_function(not_finite_on_the_skipped_step, [], tf.bool)))
        patch.setattr(predictor, "predict_image", recording_predict)
        try:
            summary = trainer.train(_config(dbs, out_dir, mixed_precision="float16", lr_schedule="poly",
                                            warmup_steps=2, max_steps=8, test_every_n_steps=8))
        finally:
            keras.mixed_precision.set_global_policy("float32")
    assert (summary["exit_code"], summary["step"], summary["epoch"]) == (0, 8, 1) and len(calls) == 8
    return summary, printed.getvalue(), out_dir, predicted


def test_float16_schedule_counts_skipped_updates(float16_run):
    summary, printed, out_dir, _ = float16_run
    with np.load(out_dir / "checkpoints" / "latest" / "optimizer.npz") as saved:
        applied = int(saved["SGD/iteration"])
    assert applied <= 7  # the forced skip happened (float16 may skip more early updates by itself)
    # The rate of the update at step s (logged with it) is learning_rate_at(s - 1) whatever was skipped,
    # so the last update uses the schedule's last rate.
    rates = _logged_rates(printed)
    expected = [optim.learning_rate_at(s - 1, 0.01, "poly", 2, 8) for s in range(1, 9)]
    assert sorted(rates) == list(range(1, 9))
    np.testing.assert_allclose([rates[s] for s in range(1, 9)], expected, rtol=1e-5)
    assert rates[8] == pytest.approx(optim.learning_rate_at(7, 0.01, "poly", 2, 8), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Item 5: the test pass predicts in float32 under --mixed_precision
# ---------------------------------------------------------------------------------------------

def test_float16_test_pass_predicts_what_the_float32_export_predicts(float16_run, dbs):
    import keras

    import evaluation
    import models
    import predictor

    summary, _, out_dir, predicted = float16_run
    exported = keras.models.load_model(out_dir / "model.keras")
    assert {layer.dtype_policy.name for layer in exported.layers} == {"float32"}
    options = {"unet_depth": 2}
    forward = predictor.make_predictor(exported)
    assert len(predicted) == 2  # the two test images, once each
    for image, stats, logits in predicted:
        expected = predictor.predict_image(forward, image, stats, models.geometry("unet", **options), 64)
        # float16 logits differ from these by ~1e-3; the float32 pass only by rounding.
        np.testing.assert_allclose(predictor._softmax(logits), predictor._softmax(expected), rtol=0, atol=2e-6)
    # The logged test loss (early stopping and the best checkpoint use it) is the export's.
    logged = float(read_csv(out_dir / "test_metrics.csv")[-1]["loss"])
    row, _, _ = evaluation.Evaluator(exported, "unet", dbs[1], 2, "ce+dice", options=options).run()
    assert logged == pytest.approx(row["loss"], abs=1e-5)  # the CSV keeps 6 digits


def test_bfloat16_model_is_scored_in_float32_with_its_current_weights(dbs):
    import keras

    import evaluation
    import models
    import predictor

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = models.build_model("unet", 2, input_channels=1, base_filters=2, batch_norm=True, unet_depth=2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    reference = models.build_model("unet", 2, input_channels=1, base_filters=2, batch_norm=True, unet_depth=2)
    evaluator = evaluation.Evaluator(model, "unet", dbs[1], 2, "ce", tile_size=64, options={"unet_depth": 2})
    # Weights changed after the evaluator was made (training goes on): the pass scores the new ones.
    model.set_weights([w + 0.01 for w in model.get_weights()])
    reference.set_weights(model.get_weights())
    row = evaluator.run()[0]
    expected = evaluation.Evaluator(reference, "unet", dbs[1], 2, "ce", tile_size=64, options={"unet_depth": 2})
    assert row == pytest.approx(expected.run()[0], rel=1e-6)
    batch = np.random.default_rng(0).normal(size=(1, 64, 64, 1)).astype(np.float32)
    np.testing.assert_allclose(evaluator.forward(batch), predictor.make_predictor(reference)(batch), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Item 6: the test pass's tile from the training device's memory, and out-of-memory fallback
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_test_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("wide") / "test"
    make_synthetic_db(path, num_records=2, shape=(96, 96), seed=3)
    return str(path)


def _tiny_unet():
    import models

    return models.build_model("unet", 2, input_channels=1, base_filters=2, batch_norm=True, unet_depth=2)


def test_test_pass_tile_comes_from_the_training_device_memory(wide_test_db, monkeypatch):
    import tensorflow as tf

    import evaluation
    import models
    import predictor

    model, options = _tiny_unet(), {"unet_depth": 2}
    asked = []

    def fake_memory(device="/CPU:0"):
        asked.append(device)
        return 64 * 1024 ** 2 if "GPU" in device else 512 * 1024 ** 3  # a 64 MiB GPU in a 512 GB host

    monkeypatch.setattr(predictor, "available_memory_bytes", fake_memory)
    evaluator = evaluation.Evaluator(model, "unet", wide_test_db, 2, "ce", options=options, device="/GPU:1")
    assert asked == ["/GPU:1"]
    assert evaluator.tile_size == predictor.default_tile_size(model, models.geometry("unet", **options),
                                                              memory_bytes=64 * 1024 ** 2)
    assert evaluator.tile_size < predictor.MAX_DEFAULT_TILE  # what the host's RAM would have given
    # Without a device (the trainer's case), the one the pass runs on: the first visible GPU, by its
    # physical index (nvidia-smi's numbering; --gpus may have hidden GPU 0 and 1), else the CPU.
    gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:2", device_type="GPU")
    monkeypatch.setattr(tf.config, "get_visible_devices", lambda kind=None: [gpu] if kind == "GPU" else [])
    assert predictor.default_memory_device() == "/GPU:2"
    asked.clear()
    evaluation.Evaluator(model, "unet", wide_test_db, 2, "ce", options=options)
    assert asked == ["/GPU:2"]
    monkeypatch.setattr(tf.config, "get_visible_devices", lambda kind=None: [])
    assert predictor.default_memory_device() == "/CPU:0"


def test_test_pass_halves_its_tile_on_out_of_memory(wide_test_db, capsys):
    import tensorflow as tf

    import evaluation

    model, options = _tiny_unet(), {"unet_depth": 2}
    reference = evaluation.Evaluator(model, "unet", wide_test_db, 2, "ce", tile_size=96, options=options).run()[0]

    # A device where tiles above 64 px do not fit: 96 -> 48, raised to the smallest tile, 60.
    evaluator = evaluation.Evaluator(model, "unet", wide_test_db, 2, "ce", tile_size=96, options=options)
    fits = evaluator.forward
    sides = []

    def forward(batch):
        sides.append(batch.shape[1])
        if batch.shape[1] > 64:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
        return fits(batch)

    evaluator.forward = forward
    capsys.readouterr()
    row = evaluator.run()[0]
    assert evaluator.tile_size == 60 and sides[0] == 96 and set(sides[1:]) == {60}  # kept for image 2
    # Tiling never changes the result: every metric of the pass is the one-tile pass's.
    assert sorted(row) == sorted(reference)
    assert row == pytest.approx(reference, rel=1e-6)
    assert row["test_pixels"] == reference["test_pixels"] == 2 * 96 * 96
    assert "ran out of memory on /CPU:0 with 96 px tiles; predicting with 60 px tiles" in capsys.readouterr().err

    # Nothing fits: a clear error naming the device and the smallest tile, not a traceback.
    def never_fits(batch):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")

    evaluator.forward = never_fits
    with pytest.raises(trainer.TrainingError, match=r"out of memory on /CPU:0 even with unet's smallest tile "
                                                    r"\(60 px, batch 1\)"):
        evaluator.run()


# ---------------------------------------------------------------------------------------------
# Item 7: a database tiled at the crop size makes fixed crops, and the trainer says so
# ---------------------------------------------------------------------------------------------

def _tiled_db(path, tile, num_records=4, seed=0):
    """A train database as build_lmdb.py --tile_size ``tile`` writes it: records of tile x tile px."""
    import records

    rng = np.random.default_rng(seed)

    def pairs():
        for i in range(num_records):
            mask = np.zeros((tile, tile), np.uint8)
            mask[tile // 4:tile // 2, tile // 4:] = 1
            image = (1000.0 * mask + rng.normal(500, 50, (tile, tile))).astype(np.uint16)[..., None]
            yield image, mask, {"image": "a.tif", "mask": "a.tif", "tile": [0, i * tile]}

    return records.write_database(str(path), pairs(), {"split": "train", "split_seed": 0, "train_fraction": 1.0,
                                                       "extra": {"tile_size": tile, "tile_overlap": 0}})


def test_a_database_tiled_at_the_crop_size_is_named_at_start(dbs, tmp_path, capsys):
    _tiled_db(tmp_path / "tiled32", 32)
    code = trainer.main("unet", [str(a) for a in [
        "--train_database", tmp_path / "tiled32", "--test_database", dbs[1], "--output_dir", tmp_path / "run",
        "--batch_size", 2, "--tile_size", 32, "--base_filters", 2, "--unet_depth", 2, "--max_steps", 1,
        "--foreground_crop_fraction", 0.5]])
    err = capsys.readouterr().err
    assert code == 0
    assert (f"--train_database {tmp_path / 'tiled32'} was built with --tile_size 32 (records of at most 32 px) "
            "and --tile_size 32 crops it, so every crop is a whole stored tile") in err
    assert "rebuild the database with build_lmdb.py without --tile_size (whole images) or with a --tile_size " \
           "larger than 32 (e.g. 64)" in err
    assert "--foreground_crop_fraction 0.5 does nothing with this database" in err

    # Crops that can move: whole images, or tiles larger than the crop; no foreground warning at 0.
    def warnings(metadata, **overrides):
        return trainer.fixed_crop_warnings(_config(dbs, tmp_path / "x", **overrides), metadata)

    assert warnings({"tile_size": None, "image_shapes": [[32, 32, 1]]}) == []
    assert warnings({"tile_size": 64, "image_shapes": [[64, 64, 1], [40, 64, 1]]}) == []
    assert len(warnings({"tile_size": 32, "image_shapes": [[32, 32, 1]]}, foreground_crop_fraction=0.0)) == 1
