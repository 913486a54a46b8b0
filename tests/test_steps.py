"""steps.py: the per-pixel sums and the losses built from them, per image (train step) and over a
whole test set (test step)."""
import math

import numpy as np
import pytest

import steps


def test_per_image_loss_ignores_masked_pixels():
    import tensorflow as tf

    masks = np.zeros((2, 4, 4), np.int32)
    masks[0, :2] = 1                      # 8 foreground pixels
    masks[0, 3] = -1                      # 4 ignored pixels
    masks[1] = -1                         # a fully ignored (padding) image
    logits = np.zeros((2, 4, 4, 2), np.float32)
    logits[0, 3] = [100.0, -100.0]        # huge loss on ignored pixels must not count
    ce = steps.per_image_loss(tf.constant(logits), tf.constant(masks), "ce", 2).numpy()
    np.testing.assert_allclose(ce, [math.log(2), 0.0], rtol=1e-6)
    dice = steps.per_image_loss(tf.constant(logits), tf.constant(masks), "dice", 2).numpy()
    # probabilities 0.5 on the 12 valid pixels: intersection 4, prob sum 6, label sum 8
    np.testing.assert_allclose(dice[0], 1 - (2 * 4 + 1) / (6 + 8 + 1), rtol=1e-6)
    both = steps.per_image_loss(tf.constant(logits), tf.constant(masks), "ce+dice", 2).numpy()
    np.testing.assert_allclose(both, ce + dice, rtol=1e-6)


@pytest.mark.parametrize("loss_name", steps.LOSSES)
def test_summed_totals_give_the_loss_of_all_pixels_together(loss_name):
    # What the test pass relies on: adding two batches' sums equals computing the sums of the two
    # batches at once, and the loss of the totals is not the mean of the per-image losses.
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    masks = rng.integers(0, 3, size=(4, 8, 8)).astype(np.int32)
    masks[1, :6] = -1                     # images with different numbers of valid pixels
    first = steps.pixel_sums(logits[:2], masks[:2], 3, axis=(0, 1, 2), dtype="float64")
    second = steps.pixel_sums(logits[2:], masks[2:], 3, axis=(0, 1, 2), dtype="float64")
    totals = steps.PixelSums(*[np.asarray(a) + np.asarray(b) for a, b in zip(first, second)])
    together = steps.pixel_sums(logits, masks, 3, axis=(0, 1, 2), dtype="float64")
    for total, expected in zip(totals, together):
        np.testing.assert_allclose(total, expected, rtol=1e-12)
    assert float(totals.pixels) == (masks >= 0).sum()
    loss = float(steps.loss_from_sums(totals, loss_name))
    assert loss == pytest.approx(float(steps.loss_from_sums(together, loss_name)), rel=1e-12)
    if "ce" in steps.LOSS_TERMS[loss_name]:
        probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        valid = masks >= 0
        ce = -np.log(np.take_along_axis(probabilities, np.maximum(masks, 0)[..., None], -1)[..., 0])
        mean_ce = ce[valid].mean()
        if loss_name == "ce":
            assert loss == pytest.approx(mean_ce, rel=1e-5)
    per_image_mean = float(np.mean(steps.per_image_loss(logits, masks, loss_name, 3)))
    assert abs(loss - per_image_mean) > 1e-4   # the test loss weights pixels, not images


def test_only_the_needed_terms_are_computed():
    sums = steps.pixel_sums(np.zeros((1, 4, 4, 2), np.float32), np.zeros((1, 4, 4), np.int32), 2, terms=("ce",))
    assert sums.ce_sum is not None and sums.intersection is None and sums.prob_sum is None
