"""Training truths (issue 22, items 5-8 and 10): what the trainer measures and uses is what it says.

  - normalisation of integer images with large offsets (item 8);
  - the learning-rate schedule follows the trainer's step under float16 loss scaling (item 10);
  - the test pass predicts in float32 whatever --mixed_precision (item 5);
  - the test pass sizes its tile from the training device's memory and survives out-of-memory (item 6);
  - a database tiled at or below the crop size makes fixed crops, and the trainer says so (item 7).
"""
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


def _config(dbs, output_dir, **overrides):
    values = dict(batch_size=2, tile_size=32, base_filters=2, unet_depth=2, test_every_n_steps=3,
                  log_every_n_steps=1, use_augmentation=False, learning_rate=0.01, optimizer="sgd", max_steps=3)
    values.update(overrides)
    return trainer.TrainConfig("unet", dbs[0], dbs[1], str(output_dir), **values)


@pytest.fixture
def float32_afterwards():
    """A run under --mixed_precision leaves its global Keras policy; later tests expect float32."""
    yield
    import keras
    keras.mixed_precision.set_global_policy("float32")


# ---------------------------------------------------------------------------------------------
# Item 10: the schedule follows the trainer's step under float16 loss scaling
# ---------------------------------------------------------------------------------------------

def _logged_rates(text):
    """{step: lr} from the trainer's progress lines."""
    return {int(line.split()[1]): float(line.split()[5]) for line in text.splitlines()
            if line.startswith("step ") and line.split()[4] == "lr"}


def test_float16_schedule_counts_skipped_updates(dbs, tmp_path, capsys, monkeypatch, float32_afterwards):
    import tensorflow as tf

    import distribute

    # Step 3's gradients "overflow": the loss-scale optimizer skips that update (and the inner
    # optimizer's iterations), as it does for a real inf/NaN gradient.
    calls, skipped_step = [], 3
    original = distribute.all_replicas_true

    def not_finite_on_the_skipped_step():
        calls.append(1)
        return len(calls) != skipped_step

    monkeypatch.setattr(distribute, "all_replicas_true", lambda flag: tf.logical_and(
        original(flag), tf.py_function(not_finite_on_the_skipped_step, [], tf.bool)))
    summary = trainer.train(_config(dbs, tmp_path / "run", mixed_precision="float16", lr_schedule="poly",
                                    warmup_steps=2, max_steps=8, test_every_n_steps=8))
    assert (summary["exit_code"], summary["step"]) == (0, 8) and len(calls) == 8
    with np.load(tmp_path / "run" / "checkpoints" / "latest" / "optimizer.npz") as saved:
        applied = int(saved["SGD/iteration"])
    assert applied <= 7  # the forced skip happened (float16 may skip more early updates by itself)
    # The rate of the update at step s (logged with it) is learning_rate_at(s - 1) whatever was skipped,
    # so the last update uses the schedule's last rate.
    rates = _logged_rates(capsys.readouterr().out)
    expected = [optim.learning_rate_at(s - 1, 0.01, "poly", 2, 8) for s in range(1, 9)]
    assert sorted(rates) == list(range(1, 9))
    np.testing.assert_allclose([rates[s] for s in range(1, 9)], expected, rtol=1e-5)
    assert rates[8] == pytest.approx(optim.learning_rate_at(7, 0.01, "poly", 2, 8), rel=1e-5)
