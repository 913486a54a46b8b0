"""Training truths (issue 22, items 5-8 and 10): what the trainer measures and uses is what it says.

  - normalisation of integer images with large offsets (item 8);
  - the learning-rate schedule follows the trainer's step under float16 loss scaling (item 10);
  - the test pass predicts in float32 whatever --mixed_precision (item 5);
  - the test pass sizes its tile from the training device's memory and survives out-of-memory (item 6);
  - a database tiled at or below the crop size makes fixed crops, and the trainer says so (item 7).
"""
import numpy as np

import normalization


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
