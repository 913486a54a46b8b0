"""steps.py: the per-pixel sums and the losses built from them, per image (train step) and over a
whole test set (test step)."""
import math

import numpy as np
import pytest
import tensorflow as tf

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
    first = steps.pixel_sums(logits[:2], masks[:2], 3, steps.ALL_TERMS, axis=(0, 1, 2), dtype="float64")
    second = steps.pixel_sums(logits[2:], masks[2:], 3, steps.ALL_TERMS, axis=(0, 1, 2), dtype="float64")
    totals = steps.PixelSums(*[np.asarray(a) + np.asarray(b) for a, b in zip(first, second)])
    together = steps.pixel_sums(logits, masks, 3, steps.ALL_TERMS, axis=(0, 1, 2), dtype="float64")
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


# ---------------------------------------------------------------------------------------------
# Skeleton recall (--loss ce+dice+skeleton)
# ---------------------------------------------------------------------------------------------

def test_soft_skeleton_of_a_bar_is_its_centre_line_widened_to_three_pixels():
    bar = np.zeros((1, 32, 40, 1), np.float32)
    bar[0, 10:17, 5:35] = 1.0              # 7 px thick, rows 10-16: centre row 13
    tube = steps.soft_skeleton(tf.constant(bar)).numpy()[0, ..., 0]
    assert set(np.unique(tube)) <= {0.0, 1.0}
    assert not np.any((tube > 0) & (bar[0, ..., 0] == 0))   # inside the bar
    rows = np.nonzero(tube[:, 20])[0]
    assert rows.tolist() == [12, 13, 14]    # the centre row, +-1 px, mid-bar
    assert tube[13, 8:32].all()             # an unbroken line along the bar


def test_skeleton_recall_is_the_share_of_the_centre_line_missed():
    mask = np.zeros((1, 32, 64), np.int32)
    mask[0, 15:18, 2:62] = 1                # a 3 px wide "vessel"
    complete = np.where(mask[..., None] == np.arange(2), 8.0, -8.0).astype(np.float32)
    broken = complete.copy()
    broken[0, :, 30:34] = [8.0, -8.0]       # a 4 px gap: background predicted across the vessel
    dice = [float(steps.per_image_loss(tf.constant(x), tf.constant(mask), "dice", 2)[0]) for x in (complete, broken)]
    full = [float(steps.per_image_loss(tf.constant(x), tf.constant(mask), "ce+dice+skeleton", 2)[0])
            for x in (complete, broken)]
    skeleton = [f - d - float(steps.per_image_loss(tf.constant(x), tf.constant(mask), "ce", 2)[0])
                for f, d, x in zip(full, dice, (complete, broken))]
    assert skeleton[0] == pytest.approx(0.0, abs=1e-2)      # everything on the skeleton found
    sums = steps.pixel_sums(tf.constant(broken), tf.constant(mask), 2, ("skeleton",))
    hit, tube = float(sums.skeleton_hit[0, 1]), float(sums.skeleton_sum[0, 1])
    assert skeleton[1] == pytest.approx(1 - (hit + 1) / (tube + 1), rel=1e-5)
    assert skeleton[1] == pytest.approx(4 / 60, abs=0.01)   # a 4 px gap in a 60 px line


def test_unlabelled_pixels_give_the_skeleton_term_no_gradient():
    rng = np.random.default_rng(1)
    logits = tf.constant(rng.normal(size=(2, 24, 24, 2)).astype(np.float32))
    mask = np.zeros((2, 24, 24), np.int32)
    mask[:, 10:13, :] = 1
    mask[:, :, 15:] = -1                    # unlabelled right part
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = tf.reduce_sum(steps.per_image_loss(logits, tf.constant(mask), "ce+dice+skeleton", 2))
    gradient = tape.gradient(loss, logits).numpy()
    assert np.all(gradient[:, :, 15:] == 0) and np.any(gradient[:, :, :15] != 0)
