"""normalization.py: per-source-image statistics, streaming == in-memory, constant channels."""
import numpy as np
import pytest

import normalization


def test_statistics_match_numpy_and_streaming_in_any_blocks():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 65535, size=(300, 170, 2)).astype(np.uint16)
    whole = normalization.channel_statistics(image)
    np.testing.assert_allclose(whole.mean, image.mean(axis=(0, 1), dtype=np.float64), rtol=1e-12)
    np.testing.assert_allclose(whole.std, image.std(axis=(0, 1), dtype=np.float64), rtol=1e-12)
    running = normalization.StreamingStatistics(2)
    for top in range(0, 300, 64):  # tiles in a scattered order, of unequal sizes
        for left in (100, 0):
            running.update(image[top:top + 64, left:left + (70 if left else 100)])
    streamed = running.result()
    np.testing.assert_allclose(streamed.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(streamed.std, whole.std, rtol=1e-12)


def test_normalize_crop_with_source_statistics_equals_whole_image_pixels():
    rng = np.random.default_rng(1)
    image = rng.normal(1000, 40, size=(100, 136)).astype(np.float32)
    image[:, 60:70] += 5000  # a bright strip: crop statistics would differ from the source's
    stats = normalization.channel_statistics(image)
    whole = normalization.normalize(image, stats)
    assert whole.shape == image.shape and whole.dtype == np.float32
    assert abs(whole.mean()) < 1e-4 and abs(whole.std() - 1) < 1e-4
    crop = normalization.normalize(image[10:74, 40:104], stats)
    np.testing.assert_array_equal(crop, whole[10:74, 40:104])


def test_constant_channel_becomes_zero_and_round_trip_through_json():
    image = np.stack([np.full((8, 8), 7.0), np.arange(64.0).reshape(8, 8)], axis=-1)
    stats = normalization.channel_statistics(image)
    out = normalization.normalize(image, stats)
    assert np.all(out[..., 0] == 0) and abs(out[..., 1].std() - 1) < 1e-6
    again = normalization.ChannelStatistics.from_dict(stats.to_dict())
    assert again == stats
    with pytest.raises(ValueError, match="channel"):
        normalization.normalize(image[..., :1], stats)
    # A small but real spread is amplified to unit std, not mistaken for a constant channel.
    tiny = np.random.default_rng(2).normal(3.0, 0.01, (32, 32)).astype(np.float32)
    out = normalization.normalize(tiny, normalization.channel_statistics(tiny))
    assert abs(out.std() - 1.0) < 1e-3 and abs(out.mean()) < 1e-3
