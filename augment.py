"""Data augmentation for image/mask pairs (normalisation is not done here: see normalization.py).

augment_image() draws fresh random parameters from a numpy Generator on every call:

  transform     parameterisation
  reflection    rows and columns flipped independently with probability 0.5 each
  rotation      angle uniform in [0, 360) degrees about the image centre
  jitter        shift uniform in +-severity * image size, per axis
  scale         factor uniform in [1 - severity, 1 + severity], independently per axis
  elastic       with probability p, a smooth random displacement field: on a coarse grid of n x n points
                spanning the image, displacements drawn from a Gaussian with std severity * image size per
                axis, interpolated to every pixel by a natural cubic spline (the U-Net paper's 3 x 3 grid
                with 10 px std is n = 3, severity 0.04 at 256 px)
  gamma         each channel rescaled to [0, 1] by the input's min and max, raised to a power gamma with
                log(gamma) uniform in +-log(1 + severity), mapped back to the same min and max
  blur          Gaussian, sigma uniform in [0, max sigma] (same sigma for every channel, never across them)
  contrast      deviations from each channel's mean multiplied by one factor uniform in
                [1 - severity, 1 + severity] (not clipped)
  noise         Gaussian, sigma uniform in [0, severity * (max - min) of the input image] (drawn as
                65,536-level quantiles of the normal distribution: see _normal_quantiles)
  intensity     additive shift uniform in +-severity * (max - min) of the input image

The geometric transforms (the first five) are composed into one map from output to input coordinates,
input = affine(output) + elastic displacement(output), so the image is resampled once (bilinear) and the
mask once (nearest neighbour, so it keeps exactly the labels it had) from the same coordinates: the two
stay aligned by construction. Borders reflect. Gamma, a pixelwise curve, is applied to the input before
the resampling (the two commute up to interpolation); the rest follow it in the order of the table.
Parameters are drawn only for enabled transforms, in the order of the table (the elastic probability
coin only when 0 < p < 1, the noise field right after its sigma). A disabled transform draws nothing, so
with elastic, gamma and contrast off the output is exactly the one of the seven original transforms for
the same Generator state.

The intensity transforms (gamma, contrast, noise, intensity) act on the values they are given, in their
units: the reader passes the raw crop (stored dtype values) and normalises afterwards with the source
image's statistics, so their strengths are relative to the crop's own value range (or mean), which makes
them independent of the image's units and bit depth.

AugmentationConfig is the small configuration object the trainer and ImageReader pass around; its
fields are also the augmentation flags (flags.py), and add_augmentation_arguments() /
augmentation_config_from_args() resolve them with precedence defaults < JSON file < explicit flags.
"""
import dataclasses
import functools
import json
import math
import numbers
import threading

import numpy as np
import scipy.interpolate
import scipy.ndimage
import scipy.special

import flags

# Blur sigmas below this change a pixel by under 1% of its neighbours' difference: skipping the
# filter there costs nothing visible and saves a full pass.
_MIN_BLUR_SIGMA = 0.3
# The Gaussian kernel is cut at 3 sigma (scipy's default is 4): the dropped tails hold 0.27% of the
# weight, invisible after noise, and the kernel is 25% shorter.
_BLUR_TRUNCATE = 3.0
# Gaussian noise is looked up from this many quantiles of N(0, 1) by uniform 16-bit codes.
_NOISE_LEVELS = 2 ** 16


# ---------------------------------------------------------------------------------------------------
# Geometry: one inverse affine map plus an elastic field, one bilinear and one nearest-neighbour
# resampling
# ---------------------------------------------------------------------------------------------------

def inverse_affine(shape, flip_rows=False, flip_cols=False, angle_degrees=0.0, shift=(0.0, 0.0),
                   scale=(1.0, 1.0)):
    """The (matrix, offset) mapping output (row, col) coordinates to input coordinates.

    The forward transform flips, scales, rotates about the image centre, then shifts by `shift` pixels;
    input = matrix @ output + offset, the convention of scipy.ndimage.affine_transform. The rotation
    sense matches scipy.ndimage.rotate(image, angle_degrees, reshape=False).
    """
    centre = (np.array(shape[:2], dtype=np.float64) - 1.0) / 2.0
    if angle_degrees % 90 == 0:
        # Exact cosines/sines so quarter turns land on integer coordinates and copy pixels exactly.
        cos, sin = [(1, 0), (0, 1), (-1, 0), (0, -1)][int(angle_degrees // 90) % 4]
    else:
        theta = math.radians(angle_degrees)
        cos, sin = math.cos(theta), math.sin(theta)
    inverse_rotation = np.array([[cos, sin], [-sin, cos]], dtype=np.float64)
    flips = np.diag([-1.0 if flip_rows else 1.0, -1.0 if flip_cols else 1.0])
    inverse_scale = np.diag([1.0 / scale[0], 1.0 / scale[1]])
    matrix = flips @ inverse_scale @ inverse_rotation
    offset = centre - matrix @ (centre + np.asarray(shift, dtype=np.float64))
    return matrix, offset


def _reflect_pad(array, top, bottom, left, right, out):
    """``array`` (H x W or H x W x C) extended by reflection about its pixel edges, scipy's 'reflect' /
    numpy's 'symmetric' (d c b a | a b c d | d c b a: the border pixel repeats once, so every pixel
    keeps its true weight in the extension), into ``out`` of the padded shape; returns ``out``.
    Margins wider than the image itself (reflections of reflections) go through np.pad."""
    height, width = array.shape[:2]
    if top > height or bottom > height or left > width or right > width:
        out[...] = np.pad(array, [(top, bottom), (left, right)] + [(0, 0)] * (array.ndim - 2), mode="symmetric")
        return out
    centre = out[top:top + height, left:left + width]
    centre[...] = array
    out[:top, left:left + width] = array[:top][::-1]
    out[top + height:, left:left + width] = array[height - bottom:][::-1]
    out[:, :left] = out[:, left:2 * left][:, ::-1]
    out[:, left + width:] = out[:, left + width - right:left + width][:, ::-1]
    return out


class _Workspace:
    """Preallocated scratch arrays for one image shape.

    A warp needs ~15 temporaries of up to 512 KB; allocated fresh on every call, glibc hands them back
    to the kernel on free and the next call page-faults them all in again, which measured as more than
    half the cost of an augmentation. Reusing them (one workspace per shape and thread) removes that.
    """

    def __init__(self, height, width, channels):
        plane = (height, width)
        self.rows = np.arange(height, dtype=np.float32)[:, None]
        self.cols = np.arange(width, dtype=np.float32)[None, :]
        self.src_rows, self.src_cols, self.frac_rows, self.frac_cols, self.scratch = (
            np.empty(plane, np.float32) for _ in range(5))
        self.row0, self.col0, self.index, self.nearest = (np.empty(plane, np.intp) for _ in range(4))
        self.round_up = np.empty(plane, np.bool_)
        self.flat = {}  # name -> a flat buffer, grown on demand (the padded image and mask)
        gathered = plane if channels == 1 else plane + (channels,)
        self.v00, self.v01, self.v10, self.v11 = (np.empty(gathered, np.float32) for _ in range(4))
        self.noise = np.empty(plane + (channels,), np.float32)
        self.displacement = np.empty((2,) + plane, np.float32)
        self.blurred, self.blur_term = (np.empty(plane + (channels,), np.float32) for _ in range(2))
        self.padded = {}  # (axis, radius) -> the image reflect-padded along that axis

    def buffer(self, name, shape, dtype):
        """A scratch array of ``shape``: a view of a flat buffer kept for the next call (grown, with
        room to spare, when a larger one is needed)."""
        size = math.prod(shape)
        flat = self.flat.get(name)
        if flat is None or flat.size < size or flat.dtype != dtype:
            flat = self.flat[name] = np.empty(2 * size, dtype)
        return flat[:size].reshape(shape)

    def padded_buffer(self, axis, radius, shape):
        key = (axis, radius)
        if key not in self.padded:
            padded_shape = list(shape)
            padded_shape[axis] += 2 * radius
            self.padded[key] = np.empty(padded_shape, np.float32)
        return self.padded[key]


_workspaces = threading.local()


def _workspace(height, width, channels):
    cache = getattr(_workspaces, "by_shape", None)
    if cache is None:
        cache = _workspaces.by_shape = {}
    key = (height, width, channels)
    if key not in cache:
        if len(cache) >= 4:  # varied shapes (e.g. tests): keep memory bounded
            cache.clear()
        cache[key] = _Workspace(height, width, channels)
    return cache[key]


@functools.lru_cache(maxsize=16)
def _spline_weights(size, grid_points):
    """size x grid_points float32 matrix: row i holds the weights of the grid values at pixel i.

    The grid points span the image edge to edge (-0.5 to size - 0.5); the interpolant is a natural cubic
    spline (C2-smooth, exact at the grid points), which is linear in the grid values, so its value at
    every pixel is this fixed matrix times them: the per-call cost is two tiny matrix products.
    """
    knots = np.linspace(-0.5, size - 0.5, grid_points)
    spline = scipy.interpolate.CubicSpline(knots, np.eye(grid_points), bc_type="natural")
    weights = np.ascontiguousarray(spline(np.arange(size, dtype=np.float64)), dtype=np.float32)
    weights.flags.writeable = False
    return weights


def elastic_displacement(shape, severity, grid_points=3, rng=None, out=None):
    """A smooth random displacement field, drawn on a coarse grid and spline-interpolated to every pixel.

    Args:
      shape: (H, W, ...) of the image; only H and W are used.
      severity: standard deviation of the grid displacements as a fraction of the image size, per axis
        (rows: severity * H pixels, columns: severity * W pixels).
      grid_points: n >= 2, the grid is n x n; fewer points give a smoother field.
      rng: numpy.random.Generator; draws exactly one standard_normal((2, n, n)).
      out: optional float32 array of shape (2, H, W) to write into.

    Returns:
      float32 array (2, H, W): the row and column displacement in pixels at every pixel.
    """
    _check_severity("elastic severity", severity)
    _check_grid_points("elastic grid_points", grid_points)
    height, width = shape[:2]
    if rng is None:
        rng = np.random.default_rng()
    grid = rng.standard_normal((2, grid_points, grid_points)).astype(np.float32)
    grid[0] *= np.float32(severity * height)
    grid[1] *= np.float32(severity * width)
    if out is None:
        out = np.empty((2, height, width), np.float32)
    row_weights = _spline_weights(height, grid_points)
    col_weights = _spline_weights(width, grid_points)
    for axis in range(2):
        np.matmul(row_weights @ grid[axis], col_weights.T, out=out[axis])
    return out


def _warp(image, mask, matrix, offset, work, displacement=None):
    """Resample image (H x W x C) bilinearly and mask (H x W) by nearest neighbour, into new arrays.

    Output pixel p samples the input at matrix @ p + offset + displacement[:, p] (displacement None: 0).
    """
    height, width, channels = image.shape
    m = matrix.astype(np.float32)
    o = offset.astype(np.float32)
    # float32 coordinates: ~3e-5 px resolution at 300 px, far below what bilinear weights can show.
    np.multiply(work.rows, m[0, 0], out=work.src_rows)
    work.src_rows += m[0, 1] * work.cols + o[0]
    np.multiply(work.rows, m[1, 0], out=work.src_cols)
    work.src_cols += m[1, 1] * work.cols + o[1]
    if displacement is not None:
        work.src_rows += displacement[0]
        work.src_cols += displacement[1]

    np.floor(work.src_rows, out=work.scratch)
    np.subtract(work.src_rows, work.scratch, out=work.frac_rows)
    np.copyto(work.row0, work.scratch, casting="unsafe")
    np.floor(work.src_cols, out=work.scratch)
    np.subtract(work.src_cols, work.scratch, out=work.frac_cols)
    np.copyto(work.col0, work.scratch, casting="unsafe")
    # Reflect-pad the source just enough that every neighbour a pixel samples exists in it: then the
    # four neighbours are one flat index into four shifted views of it (no per-pixel border logic).
    row_low, row_high = int(work.row0.min()), int(work.row0.max()) + 1
    col_low, col_high = int(work.col0.min()), int(work.col0.max()) + 1
    pads = (max(0, -row_low), max(0, row_high - (height - 1)), max(0, -col_low), max(0, col_high - (width - 1)))
    pad_top, pad_bottom, pad_left, pad_right = pads
    padded_width = width + pad_left + pad_right
    padded_shape = (height + pad_top + pad_bottom, padded_width)
    source = _reflect_pad(image, *pads, work.buffer("image", padded_shape + (channels,), np.float32))
    source = source.reshape(-1) if channels == 1 else source.reshape(-1, channels)
    np.multiply(work.row0, padded_width, out=work.index)
    work.index += work.col0
    work.index += pad_top * padded_width + pad_left
    if channels == 1:
        frac_rows, frac_cols = work.frac_rows, work.frac_cols
    else:
        frac_rows, frac_cols = work.frac_rows[..., None], work.frac_cols[..., None]
    # Every index is in range by construction, so mode="clip" only skips numpy's buffered bounds check.
    for shift, out in ((0, work.v00), (1, work.v01), (padded_width, work.v10), (padded_width + 1, work.v11)):
        source[shift:].take(work.index, axis=0, out=out, mode="clip")
    # Written as a + f * (b - a) so a zero fraction returns the source pixel bit-exactly (flips, quarter
    # turns and integer shifts copy pixels instead of rounding them).
    top, bottom = work.v01, work.v11
    top -= work.v00
    top *= frac_cols
    top += work.v00
    bottom -= work.v10
    bottom *= frac_cols
    bottom += work.v10
    bottom -= top
    bottom *= frac_rows
    warped = np.add(top, bottom).reshape(height, width, channels)

    warped_mask = None
    if mask is not None:
        # Nearest neighbour from the very same coordinates as the image: floor(x + 0.5), i.e. the
        # top-left neighbour moved by one where the fraction is at least a half (inside the padding).
        padded_mask = _reflect_pad(mask, *pads, work.buffer("mask", padded_shape, mask.dtype))
        np.greater_equal(work.frac_rows, 0.5, out=work.round_up)
        np.multiply(work.round_up, padded_width, out=work.nearest)
        work.nearest += work.index
        np.greater_equal(work.frac_cols, 0.5, out=work.round_up)
        work.nearest += work.round_up
        warped_mask = np.empty(mask.shape, mask.dtype)
        padded_mask.reshape(-1).take(work.nearest, out=warped_mask, mode="clip")
    return warped, warped_mask


# ---------------------------------------------------------------------------------------------------
# Blur and noise
# ---------------------------------------------------------------------------------------------------

def _blur_axis(image, weights, axis, work, out):
    """``image`` (float32, H x W x C) correlated along ``axis`` with the symmetric ``weights`` (centre
    first), borders reflected as scipy.ndimage's mode="reflect" (d c b a | a b c d | d c b a), into
    ``out``. Shifted slices of a padded copy: a few vector passes instead of scipy's per-line float64
    loop, which measured four times slower at 256 x 256."""
    radius = len(weights) - 1
    length = image.shape[axis]
    padded = work.padded_buffer(axis, radius, image.shape)

    def part(array, start, stop):
        index = [slice(None)] * array.ndim
        index[axis] = slice(start, stop)
        return array[tuple(index)]

    part(padded, radius, radius + length)[...] = image
    part(padded, 0, radius)[...] = np.flip(part(image, 0, radius), axis)
    part(padded, radius + length, None)[...] = np.flip(part(image, length - radius, length), axis)
    np.multiply(part(padded, radius, radius + length), weights[0], out=out)
    term = work.blur_term
    for k in range(1, radius + 1):
        np.add(part(padded, radius - k, radius - k + length), part(padded, radius + k, radius + k + length),
               out=term)
        term *= weights[k]
        out += term
    return out


def gaussian_blur(image, sigma, work=None, out=None):
    """scipy.ndimage.gaussian_filter(image, (sigma, sigma, 0), mode="reflect", truncate=3) for a float32
    H x W x C array (each channel on its own), into ``out`` (None: a new array; may be ``image``);
    equal to scipy's up to float32 rounding (the tests pin it)."""
    height, width, channels = image.shape
    radius = int(_BLUR_TRUNCATE * sigma + 0.5)
    if radius >= min(height, width):  # the reflection would wrap more than once: scipy handles that
        return scipy.ndimage.gaussian_filter(image, (sigma, sigma, 0.0), mode="reflect", truncate=_BLUR_TRUNCATE)
    if work is None:
        work = _workspace(height, width, channels)
    taps = np.exp(-0.5 * (np.arange(radius + 1) / sigma) ** 2)
    weights = (taps / (2.0 * taps.sum() - taps[0])).astype(np.float32)
    rows = _blur_axis(image, weights, 0, work, work.blurred)
    return _blur_axis(rows, weights, 1, work, np.empty(image.shape, np.float32) if out is None else out)


@functools.lru_cache(maxsize=1)
def _normal_quantiles():
    """The 65,536 quantiles (i + 0.5) / 65,536 of N(0, 1) as float32 (they reach +-4.17).

    A uniform 16-bit code per pixel picks one: the noise is normal up to that quantisation, and
    drawing the codes costs a seventh of numpy's float32 standard_normal.
    """
    table = scipy.special.ndtri((np.arange(_NOISE_LEVELS) + 0.5) / _NOISE_LEVELS).astype(np.float32)
    table.flags.writeable = False
    return table


def gaussian_noise(rng, sigma, out):
    """Fill ``out`` (float32) with N(0, sigma^2) noise from ``rng`` (one uniform 16-bit code a value)."""
    codes = rng.integers(0, _NOISE_LEVELS, size=out.size, dtype=np.uint16)
    _normal_quantiles().take(codes, out=out.reshape(-1))
    out *= np.float32(sigma)
    return out


# ---------------------------------------------------------------------------------------------------
# augment_image
# ---------------------------------------------------------------------------------------------------

def _check_severity(name, value, upper=1.0, upper_inclusive=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if upper is None:
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    elif upper_inclusive:
        if not 0 <= value <= upper:
            raise ValueError(f"{name} must be in [0, {upper:g}], got {value}")
    elif not 0 <= value < upper:
        raise ValueError(f"{name} must be in [0, {upper:g}), got {value}")


def _check_grid_points(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 2:
        raise ValueError(f"{name} must be an integer >= 2, got {value!r}")


def _power_curve(offsets, span, gamma):
    """In place on float32 offsets in [0, span]: (offsets / span) ** gamma * span.

    Computed as exp(gamma * log(offsets) + (1 - gamma) * log(span)): numpy's float32 log and exp are
    vectorised and together cost half of np.power.
    """
    with np.errstate(divide="ignore"):  # log(0) = -inf, and exp(-inf) = 0 is the right answer
        np.log(offsets, out=offsets)
    offsets *= np.float32(gamma)
    offsets += np.float32((1.0 - gamma) * math.log(span))
    np.exp(offsets, out=offsets)
    return offsets


def _gamma_curve(image, gamma):
    """Each channel of an H x W x C array mapped by ((x - min) / (max - min)) ** gamma * (max - min) + min.

    Returns a new float32 array; each channel's min and max map onto themselves, a constant channel onto
    itself. An integer crop holds at most max - min + 1 grey levels, usually far fewer than pixels (a
    256 x 256 microscopy crop spans a few thousand), so then the curve is evaluated once per level and
    looked up, at a third of the cost of evaluating it per pixel.
    """
    out = np.empty(image.shape, np.float32)
    for channel in range(image.shape[2]):
        values = image[..., channel]
        low, high = values.min(), values.max()
        span = float(high) - float(low)
        if span == 0:
            out[..., channel] = values
        elif np.issubdtype(values.dtype, np.integer) and span < values.size // 4:
            table = _power_curve(np.arange(int(span) + 1, dtype=np.float32), span, gamma)
            table += np.float32(low)
            # values >= low, so the difference neither wraps (unsigned) nor overflows (it is <= span).
            np.take(table, values - low, out=out[..., channel], mode="clip")
        else:
            # Monotone rounding keeps float32(x) >= float32(min), so the offsets are never negative.
            offsets = values.astype(np.float32)
            offsets -= np.float32(low)
            out[..., channel] = _power_curve(offsets, span, gamma)
            out[..., channel] += np.float32(low)
    return out


def augment_image(img, config, mask=None, rng=None):
    """Randomly augment an image and (optionally) its label mask with one shared geometry.

    The intensity transforms work in the units of img: give it the raw crop and normalise afterwards
    (their strengths are relative to the crop's own range or mean; see the module docstring).

    Args:
      img: H x W or H x W x C array of any numeric dtype.
      config: AugmentationConfig, validated (AugmentationConfig.validate; not checked again here);
        AugmentationConfig.disabled() returns the image unchanged (as float32).
      mask: None or an H x W label array; resampled by nearest neighbour, so it keeps its dtype and
        contains only labels that were already in it.
      rng: numpy.random.Generator (None: a fresh unseeded one).

    Returns:
      The augmented image as float32 with img's shape, or (image, mask) when a mask is given.
    """
    image_in, mask = _checked_arrays(img, mask)
    if rng is None:
        rng = np.random.default_rng()
    elif not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    height, width = image_in.shape[:2]
    channels = 1 if image_in.ndim == 2 else image_in.shape[2]
    image = image_in.reshape(height, width, channels)
    work = _workspace(height, width, channels)
    # The noise and the intensity shift scale with the input's range, before anything changes it.
    value_range = float(image_in.max()) - float(image_in.min()) if config.noise > 0 or config.intensity > 0 else 0.0

    # Parameters are drawn in the module docstring's order: geometry, gamma, then the rest after the warp.
    matrix, offset, displacement = _draw_geometry(config, rng, height, width, work)
    if config.gamma > 0:
        # A pixelwise curve commutes with the resampling (up to interpolation), so it is applied to the
        # input: there its min and max are exactly the crop's, and integer grey levels can be looked up.
        limit = math.log1p(config.gamma)
        image = _gamma_curve(image, math.exp(rng.uniform(-limit, limit)))
    image, mask = _resample(image, mask, matrix, offset, displacement, work)
    image = _blur_and_intensities(image, config, rng, value_range, work)

    image = image.reshape(image_in.shape)
    if mask is None:
        return image
    return image, mask


def _checked_arrays(img, mask):
    """(image, mask) as arrays, or ValueError for a shape or dtype augment_image cannot take."""
    image = np.asarray(img)
    if image.ndim not in (2, 3) or image.size == 0:
        raise ValueError(f"img must be a non-empty H x W or H x W x C array, got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == np.bool_):
        raise ValueError(f"img must have a numeric dtype, got {image.dtype}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match the image's H x W {image.shape[:2]}")
    return image, mask


def _draw_geometry(config, rng, height, width, work):
    """(matrix, offset, displacement or None): the output-to-input map of one draw of the enabled
    geometric transforms (flips, rotation, jitter, scale, elastic field; in that order)."""
    flip_rows = flip_cols = False
    angle = 0.0
    shift = (0.0, 0.0)
    scale = (1.0, 1.0)
    if config.reflection:
        flip_rows, flip_cols = (bool(v) for v in rng.random(2) < 0.5)
    if config.rotation:
        angle = float(rng.uniform(0.0, 360.0))
    if config.jitter > 0:
        shift = tuple(rng.uniform(-config.jitter, config.jitter, 2) * (height, width))
    if config.scale > 0:
        scale = tuple(rng.uniform(1.0 - config.scale, 1.0 + config.scale, 2))
    displacement = None
    if config.elastic > 0 and config.elastic_probability > 0:
        # No coin is drawn at probability 1, so "always" draws exactly what the field needs.
        if config.elastic_probability >= 1 or rng.random() < config.elastic_probability:
            displacement = elastic_displacement((height, width), config.elastic, config.elastic_grid_points, rng,
                                                out=work.displacement)
    matrix, offset = inverse_affine((height, width), flip_rows, flip_cols, angle, shift, scale)
    return matrix, offset, displacement


def _resample(image, mask, matrix, offset, displacement, work):
    """(float32 image, mask) resampled at the map's coordinates; skipped when the map is the identity,
    so disabled augmentation returns the float32 input bit-exactly."""
    if displacement is None and np.array_equal(matrix, np.eye(2)) and not offset.any():
        return image.astype(np.float32), mask
    return _warp(image, mask, matrix, offset, work, displacement)


def _blur_and_intensities(image, config, rng, value_range, work):
    """The transforms after the warp, in place on ``image`` (this call's own float32 array): blur,
    contrast, noise, intensity shift, each drawn only when enabled."""
    if config.blur_max_sigma > 0:
        sigma = float(rng.uniform(0.0, config.blur_max_sigma))
        if sigma >= _MIN_BLUR_SIGMA:
            image = gaussian_blur(image, sigma, work, out=image)
    if config.contrast > 0:
        factor = float(rng.uniform(1.0 - config.contrast, 1.0 + config.contrast))
        mean = image.mean(axis=(0, 1), dtype=np.float64)
        image *= np.float32(factor)
        image += (mean * (1.0 - factor)).astype(np.float32)
    if config.noise > 0:
        noise_sigma = float(rng.uniform(0.0, config.noise * value_range))
        image += gaussian_noise(rng, noise_sigma, work.noise)
    if config.intensity > 0:
        limit = config.intensity * value_range
        image += np.float32(rng.uniform(-limit, limit))
    return image


# ---------------------------------------------------------------------------------------------------
# Configuration and CLI
# ---------------------------------------------------------------------------------------------------

# The strengths whose range is [0, 1) (see AugmentationConfig.validate for the others).
_SEVERITY_FIELDS = ("jitter", "noise", "scale", "intensity", "elastic", "gamma", "contrast")


def _strength(help, default, name, kind=float):
    """An AugmentationConfig field and its --<name> flag, whose help ends with the default."""
    return flags.flag(f"{help} (default {{default:g}})", default, kind=kind, name=name,
                      metavar="N" if kind is int else "F")


@dataclasses.dataclass
class AugmentationConfig:
    """Which augmentations run and how strongly; each field is also a flag (flags.py).

    The first seven defaults are the original toolkit's. Gamma 0.5 and contrast 0.25 (nnU-Net's ranges,
    gamma in [0.67, 1.5], contrast x [0.75, 1.25]) are on: in the ablation of docs/recipe.md they helped on the
    demo data and were neutral on nist_colonies. Elastic is off: it lowered the Dice on both sets at
    the ablation's shortest budget and was neutral at twice that (0.04 on a 3 x 3 grid, the U-Net
    paper's 10 px at 256 px, is the value to try with very few images and a long run).
    """
    reflection: bool = flags.flag("random flips of rows and columns (default {default:d})", True, kind="binary",
                                  name="reflection_augmentation")
    rotation: bool = flags.flag("random rotation in [0, 360) degrees (default {default:d})", True, kind="binary",
                                name="rotation_augmentation")
    jitter: float = _strength("random shift, fraction of the image size in [0, 1)", 0.1,
                              "jitter_augmentation_severity")
    noise: float = _strength("Gaussian noise sigma up to this fraction of the image range, [0, 1)", 0.02,
                             "noise_augmentation_severity")
    scale: float = _strength("random zoom in [1 - s, 1 + s] per axis, [0, 1)", 0.1, "scale_augmentation_severity")
    blur_max_sigma: float = _strength("Gaussian blur sigma drawn in [0, this] pixels, >= 0", 2.0,
                                      "blur_augmentation_max_sigma")
    intensity: float = _strength("additive shift up to this fraction of the image range, [0, 1)", 0.0,
                                 "intensity_augmentation_severity")
    elastic: float = _strength("smooth elastic deformation: std of the coarse-grid displacements as a fraction "
                               "of the image size, [0, 1), 0 = off; 0.04 is the U-Net paper's 10 px at 256 px",
                               0.0, "elastic_augmentation_severity")
    elastic_grid_points: int = _strength("the elastic displacements are drawn on an N x N grid spanning the "
                                         "image and spline-interpolated; fewer points = smoother, >= 2", 3,
                                         "elastic_augmentation_grid_points", kind=int)
    elastic_probability: float = _strength("share of images that get an elastic deformation, [0, 1]", 1.0,
                                           "elastic_augmentation_probability")
    gamma: float = _strength("gamma correction: log(gamma) uniform in +-log(1 + g), on the image rescaled to "
                             "[0, 1] by its min and max, [0, 1), 0 = off", 0.5, "gamma_augmentation_severity")
    contrast: float = _strength("deviations from the mean scaled by a factor in [1 - c, 1 + c], [0, 1), 0 = off",
                                0.25, "contrast_augmentation_severity")

    @classmethod
    def disabled(cls):
        """A configuration with every augmentation off."""
        return cls(reflection=False, rotation=False, jitter=0.0, noise=0.0, scale=0.0,
                   blur_max_sigma=0.0, intensity=0.0, elastic=0.0, gamma=0.0, contrast=0.0)

    def validate(self):
        """Raise ValueError naming the flag, field and value when a setting is out of range; returns self
        (with 0/1 as bool and numbers as float, the grid points as int). The one check of these
        settings: augment_image trusts them."""
        checks = {field: _check_severity for field in _SEVERITY_FIELDS}
        checks["blur_max_sigma"] = functools.partial(_check_severity, upper=None)
        checks["elastic_probability"] = functools.partial(_check_severity, upper_inclusive=True)
        checks["elastic_grid_points"] = _check_grid_points
        for field in flags.flag_fields(AugmentationConfig):
            value, name = getattr(self, field.name), flags.flag_name(field)
            if field.metadata["flag"]["kind"] == "binary":
                if not isinstance(value, (bool, np.bool_)) and not (
                        isinstance(value, numbers.Integral) and value in (0, 1)):
                    raise ValueError(f"{name} (config key '{field.name}') must be 0/1 or true/false, got {value!r}")
                setattr(self, field.name, bool(value))
                continue
            try:
                checks[field.name](name, value)
            except ValueError as error:
                raise ValueError(f"{name} (config key '{field.name}') {str(error).split(' ', 1)[1]}") from None
            setattr(self, field.name, int(value) if field.metadata["flag"]["kind"] is int else float(value))
        return self

    @classmethod
    def from_json(cls, path):
        """Load a validated config from a JSON object; missing keys keep their defaults."""
        try:
            with open(path) as handle:
                values = json.load(handle)
        except OSError as error:
            raise ValueError(f"cannot read augmentation config {path}: {error.strerror}") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"augmentation config {path} is not valid JSON: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"augmentation config {path} must hold a JSON object, got "
                             f"{type(values).__name__}")
        keys = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(keys))
        if unknown:
            raise ValueError(f"augmentation config {path} has unknown keys {unknown}; valid keys are {keys}")
        try:
            return cls(**values).validate()
        except ValueError as error:
            raise ValueError(f"augmentation config {path}: {error}") from None

    def to_dict(self):
        """The settings as a plain dict (JSON-serialisable, the same keys from_json accepts)."""
        return dataclasses.asdict(self)


def add_augmentation_arguments(parser):
    """Add --augmentation_config and the flags of AugmentationConfig's fields (all default None = not
    given) to an argparse parser, as its "augmentation" group."""
    group = parser.add_argument_group("augmentation",
                                      "precedence: built-in defaults < --augmentation_config < flags")
    group.add_argument("--augmentation_config", metavar="FILE.json", default=None,
                       help="JSON object with any of the keys "
                            f"{', '.join(field.name for field in dataclasses.fields(AugmentationConfig))}")
    flags.add_flags(group, AugmentationConfig, overrides=True)
    return parser


def augmentation_config_from_args(args):
    """Resolve the augmentation flags into a validated AugmentationConfig (defaults < JSON < flags)."""
    path = getattr(args, "augmentation_config", None)
    config = AugmentationConfig.from_json(path) if path else AugmentationConfig()
    for field in flags.flag_fields(AugmentationConfig):
        value = getattr(args, flags.flag_name(field), None)
        if value is not None:
            setattr(config, field.name, flags.parsed_value(field, value))
    return config.validate()
