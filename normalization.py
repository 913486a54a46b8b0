"""Input normalisation: one per-channel z-score per *source* image, the same in training, the test
pass and inference.

The statistics (mean and standard deviation of each channel) are those of the whole source image,
computed before any tiling, cropping or augmentation: ``build_lmdb.py`` stores them with every
record (all tiles of an image carry their image's values), the reader normalises each augmented
crop with them, and ``inference.py`` computes them over the whole image it segments, in memory or
in a streaming pass over a lazily read image. So a pixel gets the same network input whichever
tile or crop it is seen in.

    stats = channel_statistics(image)          # ChannelStatistics(mean=[C], std=[C])
    x = normalize(crop, stats)                 # float32, same shape as crop
    running = StreamingStatistics(channels); running.update(block) ...; running.result()
"""
import dataclasses

import numpy as np

# A channel whose std is at most this fraction of |mean| is constant up to rounding: it is mapped to
# zeros rather than amplifying rounding noise to unit variance. Float data carries float32 rounding
# (the images are float32 or were computed in it, e.g. by augmentation); integer data is exact, and
# only the float64 statistics round. The integer rule must not be the float32 one: int32 values of
# 1e8 +- 10 have a real std of 10, below 4 eps32 x 1e8 = 48, and would become all zeros.
CONSTANT_RELATIVE_STD = 4 * float(np.finfo(np.float32).eps)
CONSTANT_RELATIVE_STD_EXACT = 4 * float(np.finfo(np.float64).eps)


@dataclasses.dataclass(frozen=True)
class ChannelStatistics:
    """Per-channel mean and standard deviation of one source image (float64 tuples of length C)."""
    mean: tuple
    std: tuple

    def to_dict(self):
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, value):
        return cls(mean=tuple(float(v) for v in value["mean"]), std=tuple(float(v) for v in value["std"]))


def _as_hwc(image):
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    if image.ndim != 3 or image.size == 0:
        raise ValueError(f"expected a non-empty H x W or H x W x C image, got shape {image.shape}")
    return image


class StreamingStatistics:
    """Mean and std per channel accumulated over blocks of one image (any order, any block sizes).

    Each block contributes its count, mean and sum of squared deviations, merged pairwise
    (Chan et al.), so the result matches ``channel_statistics`` of the whole image to float64
    rounding without holding the image in memory and without the cancellation of sum-of-squares.
    """

    def __init__(self, channels):
        self.count = 0
        self.mean = np.zeros(channels, dtype=np.float64)
        self.m2 = np.zeros(channels, dtype=np.float64)

    def update(self, block):
        block = _as_hwc(block)
        if block.shape[-1] != self.mean.size:
            raise ValueError(f"block has {block.shape[-1]} channel(s), expected {self.mean.size}")
        values = block.reshape(-1, block.shape[-1]).astype(np.float64)
        count = values.shape[0]
        mean = values.mean(axis=0)
        m2 = ((values - mean) ** 2).sum(axis=0)
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * count / total)
        self.count = total

    def result(self):
        if self.count == 0:
            raise ValueError("no pixels were accumulated")
        std = np.sqrt(self.m2 / self.count)
        return ChannelStatistics(mean=tuple(self.mean.tolist()), std=tuple(std.tolist()))


def channel_statistics(image, rows_per_block=1024):
    """Per-channel mean and (population) std of a whole H x W or H x W x C image.

    Computed block-wise with StreamingStatistics, so the in-memory and the streaming paths are one
    algorithm and agree to float64 rounding whatever blocks a lazy reader delivers.
    """
    image = _as_hwc(image)
    running = StreamingStatistics(image.shape[-1])
    for top in range(0, image.shape[0], rows_per_block):
        running.update(image[top:top + rows_per_block])
    return running.result()


def integer_offset(dtype, stats):
    """Per-channel whole numbers near the mean that the training reader subtracts from crops of
    32-bit integer images before augmenting them in float32 (which holds integers exactly only up
    to 2**24: a spread of 10 around 1e8 would vanish); None for other dtypes, which fit float32.
    The augmentation's intensity transforms are relative to a crop's range or mean, so they are
    unchanged by it; ``normalize(..., offset=)`` adds it back."""
    if np.dtype(dtype).kind not in "iu" or np.dtype(dtype).itemsize < 4:
        return None
    return np.round(np.asarray(stats.mean, dtype=np.float64))


def normalize(image, stats, offset=None, dtype=None):
    """(image - mean) / std per channel, float32, same shape as ``image`` (H x W or H x W x C).

    ``offset`` (integer_offset) was subtracted from ``image`` before; ``dtype`` is the stored
    image's, when ``image`` is an augmented float32 copy of it: the constant-channel rule below is
    the stored dtype's, as at inference.

    A constant channel (std 0, or only rounding noise relative to its mean: float32 rounding for
    float data, float64 rounding of the statistics for integer data) becomes zeros. Real but small
    spreads are still scaled to unit std: the network expects the same input statistics whatever
    the image's units. The subtraction is done in float64, so large integer offsets lose nothing.
    """
    array = np.asarray(image)
    flat = array.ndim == 2
    hwc = _as_hwc(array)
    mean = np.asarray(stats.mean, dtype=np.float64)
    std = np.asarray(stats.std, dtype=np.float64)
    if mean.size != hwc.shape[-1]:
        raise ValueError(f"image has {hwc.shape[-1]} channel(s), the statistics {mean.size}")
    source = np.dtype(dtype) if dtype is not None else hwc.dtype
    if np.issubdtype(source, np.floating):  # float16 data: its own, coarser rounding
        relative = max(CONSTANT_RELATIVE_STD, 4 * float(np.finfo(source).eps))
    else:
        relative = CONSTANT_RELATIVE_STD_EXACT
    constant = std <= relative * np.abs(mean)
    scale = np.where(constant, 0.0, 1.0 / np.where(constant, 1.0, std))
    # The mean is subtracted in float64: in float32, integers above 2**24 (and the mean) are rounded
    # to a multiple of 2 or more before the subtraction, which can erase a small spread entirely.
    result = hwc.astype(np.float64)
    result -= mean if offset is None else mean - offset
    result *= scale
    result = result.astype(np.float32)
    return result[..., 0] if flat else result
