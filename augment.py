"""Data augmentation for image/mask pairs, and the per-image z-score normalisation shared with inference.

augment_image() draws fresh random parameters from a numpy Generator on every call:

  transform     parameterisation
  reflection    rows and columns flipped independently with probability 0.5 each
  rotation      angle uniform in [0, 360) degrees about the image centre
  jitter        shift uniform in +-severity * image size, per axis
  scale         factor uniform in [1 - severity, 1 + severity], independently per axis
  blur          Gaussian, sigma uniform in [0, max sigma] (same sigma for every channel, never across them)
  noise         Gaussian, sigma uniform in [0, severity * (max - min) of the input image]
  intensity     additive shift uniform in +-severity * (max - min) of the input image

The four geometric transforms are composed into one affine map, so the image is resampled once (bilinear)
and the mask once (nearest neighbour, so it keeps exactly the labels it had) from the same coordinates:
the two stay aligned by construction. Parameters are drawn only for enabled transforms, in the order of
the table above (blur before noise and intensity), then the noise field.

AugmentationConfig is the small configuration object the trainer and ImageReader pass around;
add_augmentation_arguments() / augmentation_config_from_args() give it a CLI with precedence
defaults < JSON file < explicit flags.
"""
import dataclasses
import json
import math
import numbers
import threading

import numpy as np
import scipy.ndimage

# Blur sigmas below this change a pixel by under 1% of its neighbours' difference: skipping the
# filter there costs nothing visible and saves a full pass.
_MIN_BLUR_SIGMA = 0.3
# The Gaussian kernel is cut at 3 sigma (scipy's default is 4): the dropped tails hold 0.27% of the
# weight, invisible after noise, and the kernel is 25% shorter.
_BLUR_TRUNCATE = 3.0
# Relative to |mean|, a float32 channel whose std is below this is only rounding error, not signal.
_CONSTANT_RELATIVE_STD = 4 * float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------------------------------------------
# Geometry: one inverse affine map, one bilinear and one nearest-neighbour resampling
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


def _reflect_table(low, high, size, stride):
    """stride * reflected index for every integer in [low, high], as a lookup table.

    Reflection is about the pixel edges (-0.5 and size - 0.5), scipy's 'reflect' / numpy's 'symmetric':
    the border pixel is repeated once, so every pixel of the image, edge pixels included, appears in the
    mirrored extension with its true weight ('mirror' would skip the edge pixel and double its neighbour).
    A table over the few hundred indices that occur is far cheaper than mod/where over 65k pixels.
    """
    index = np.mod(np.arange(low, high + 1), 2 * size)
    index = np.where(index >= size, 2 * size - 1 - index, index)
    return (index * stride).astype(np.intp)


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
        self.source = np.empty(plane + (channels,), np.float32)
        self.src_rows, self.src_cols, self.frac_rows, self.frac_cols, self.scratch = (
            np.empty(plane, np.float32) for _ in range(5))
        self.row0, self.col0, self.r0, self.r1, self.c0, self.c1, self.index = (
            np.empty(plane, np.intp) for _ in range(7))
        gathered = plane if channels == 1 else plane + (channels,)
        self.v00, self.v01, self.v10, self.v11 = (np.empty(gathered, np.float32) for _ in range(4))
        self.noise = np.empty(plane + (channels,), np.float32)


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


def _warp(image, mask, matrix, offset, work):
    """Resample image (H x W x C) bilinearly and mask (H x W) by nearest neighbour, into new arrays."""
    height, width, channels = image.shape
    m = matrix.astype(np.float32)
    o = offset.astype(np.float32)
    # float32 coordinates: ~3e-5 px resolution at 300 px, far below what bilinear weights can show.
    np.multiply(work.rows, m[0, 0], out=work.src_rows)
    work.src_rows += m[0, 1] * work.cols + o[0]
    np.multiply(work.rows, m[1, 0], out=work.src_cols)
    work.src_cols += m[1, 1] * work.cols + o[1]

    np.floor(work.src_rows, out=work.scratch)
    np.subtract(work.src_rows, work.scratch, out=work.frac_rows)
    np.copyto(work.row0, work.scratch, casting="unsafe")
    np.floor(work.src_cols, out=work.scratch)
    np.subtract(work.src_cols, work.scratch, out=work.frac_cols)
    np.copyto(work.col0, work.scratch, casting="unsafe")
    row_low, row_high = int(work.row0.min()), int(work.row0.max()) + 1
    col_low, col_high = int(work.col0.min()), int(work.col0.max()) + 1
    row_table = _reflect_table(row_low, row_high, height, width)
    col_table = _reflect_table(col_low, col_high, width, 1)
    # Every index is in range by construction, so mode="clip" only skips numpy's buffered bounds check.
    for start, low, table, out in ((work.row0, row_low, row_table, work.r0),
                                   (work.row0, row_low - 1, row_table, work.r1),
                                   (work.col0, col_low, col_table, work.c0),
                                   (work.col0, col_low - 1, col_table, work.c1)):
        np.subtract(start, low, out=work.index)
        table.take(work.index, out=out, mode="clip")

    work.source[...] = image
    source = work.source.reshape(height * width, channels)
    if channels == 1:
        source = source.reshape(-1)
        frac_rows, frac_cols = work.frac_rows, work.frac_cols
    else:
        frac_rows, frac_cols = work.frac_rows[..., None], work.frac_cols[..., None]
    for rows, cols, out in ((work.r0, work.c0, work.v00), (work.r0, work.c1, work.v01),
                            (work.r1, work.c0, work.v10), (work.r1, work.c1, work.v11)):
        np.add(rows, cols, out=work.index)
        source.take(work.index, axis=0, out=out, mode="clip")
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
        # Nearest neighbour from the very same coordinates as the image; rounding stays inside the
        # tables' range because round(x) <= floor(x) + 1.
        np.rint(work.src_rows, out=work.scratch)
        np.copyto(work.row0, work.scratch, casting="unsafe")
        np.rint(work.src_cols, out=work.scratch)
        np.copyto(work.col0, work.scratch, casting="unsafe")
        np.subtract(work.row0, row_low, out=work.index)
        row_table.take(work.index, out=work.r0, mode="clip")
        np.subtract(work.col0, col_low, out=work.index)
        col_table.take(work.index, out=work.c0, mode="clip")
        np.add(work.r0, work.c0, out=work.index)
        warped_mask = np.empty(mask.shape, mask.dtype)
        mask.reshape(-1).take(work.index, out=warped_mask, mode="clip")
    return warped, warped_mask


# ---------------------------------------------------------------------------------------------------
# augment_image
# ---------------------------------------------------------------------------------------------------

def _check_severity(name, value, upper=1.0):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if upper is None:
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    elif not 0 <= value < upper:
        raise ValueError(f"{name} must be in [0, {upper:g}), got {value}")


def augment_image(img, mask=None, rotation_flag=False, reflection_flag=False,
                  jitter_augmentation_severity=0, noise_augmentation_severity=0,
                  scale_augmentation_severity=0, blur_augmentation_max_sigma=0,
                  intensity_augmentation_severity=0, rng=None):
    """Randomly augment an image and (optionally) its label mask with one shared geometry.

    Args:
      img: H x W or H x W x C array of any numeric dtype.
      mask: None or an H x W label array; resampled by nearest neighbour, so it keeps its dtype and
        contains only labels that were already in it.
      rotation_flag, reflection_flag: enable random rotation / random flips of rows and columns.
      jitter_augmentation_severity, noise_augmentation_severity, scale_augmentation_severity,
        intensity_augmentation_severity: in [0, 1); 0 disables (see the module docstring for meanings).
      blur_augmentation_max_sigma: >= 0 pixels; 0 disables.
      rng: numpy.random.Generator (None: a fresh unseeded one).

    Returns:
      The augmented image as float32 with img's shape, or (image, mask) when a mask is given.
    """
    image_in = np.asarray(img)
    if image_in.ndim not in (2, 3) or image_in.size == 0:
        raise ValueError(f"img must be a non-empty H x W or H x W x C array, got shape {image_in.shape}")
    if not (np.issubdtype(image_in.dtype, np.number) or image_in.dtype == np.bool_):
        raise ValueError(f"img must have a numeric dtype, got {image_in.dtype}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image_in.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match the image's H x W {image_in.shape[:2]}")
    for name, value in (("jitter_augmentation_severity", jitter_augmentation_severity),
                        ("noise_augmentation_severity", noise_augmentation_severity),
                        ("scale_augmentation_severity", scale_augmentation_severity),
                        ("intensity_augmentation_severity", intensity_augmentation_severity)):
        _check_severity(name, value)
    _check_severity("blur_augmentation_max_sigma", blur_augmentation_max_sigma, upper=None)
    if rng is None:
        rng = np.random.default_rng()
    elif not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")

    height, width = image_in.shape[:2]
    channels = 1 if image_in.ndim == 2 else image_in.shape[2]
    image = image_in.reshape(height, width, channels)
    if noise_augmentation_severity > 0 or intensity_augmentation_severity > 0:
        value_range = float(image_in.max()) - float(image_in.min())

    # Geometry: draw every enabled parameter, then resample once (skipped when the map is the identity,
    # so disabled augmentation returns the float32 input bit-exactly).
    flip_rows = flip_cols = False
    angle = 0.0
    shift = (0.0, 0.0)
    scale = (1.0, 1.0)
    if reflection_flag:
        flip_rows, flip_cols = (bool(v) for v in rng.random(2) < 0.5)
    if rotation_flag:
        angle = float(rng.uniform(0.0, 360.0))
    if jitter_augmentation_severity > 0:
        shift = tuple(rng.uniform(-jitter_augmentation_severity, jitter_augmentation_severity, 2)
                      * (height, width))
    if scale_augmentation_severity > 0:
        scale = tuple(rng.uniform(1.0 - scale_augmentation_severity, 1.0 + scale_augmentation_severity, 2))
    matrix, offset = inverse_affine((height, width), flip_rows, flip_cols, angle, shift, scale)
    if np.array_equal(matrix, np.eye(2)) and not offset.any():
        image = image.astype(np.float32)
    else:
        image, mask = _warp(image, mask, matrix, offset, _workspace(height, width, channels))

    if blur_augmentation_max_sigma > 0:
        sigma = float(rng.uniform(0.0, blur_augmentation_max_sigma))
        if sigma >= _MIN_BLUR_SIGMA:
            # Sigma 0 on the channel axis: blur within each channel, never across channels.
            image = scipy.ndimage.gaussian_filter(image, (sigma, sigma, 0.0), mode="reflect",
                                                  truncate=_BLUR_TRUNCATE)
    if noise_augmentation_severity > 0:
        noise_sigma = float(rng.uniform(0.0, noise_augmentation_severity * value_range))
        noise = _workspace(height, width, channels).noise
        rng.standard_normal(out=noise, dtype=np.float32)
        noise *= np.float32(noise_sigma)
        image += noise
    if intensity_augmentation_severity > 0:
        limit = intensity_augmentation_severity * value_range
        image += np.float32(rng.uniform(-limit, limit))

    image = image.reshape(image_in.shape)
    if mask is None:
        return image
    return image, mask


# ---------------------------------------------------------------------------------------------------
# Normalisation (shared by the reader and inference)
# ---------------------------------------------------------------------------------------------------

def zscore_normalize(img):
    """Per-channel z-score: (x - mean) / std over H and W, as float32 of the same shape.

    A constant channel (std zero, or only float32 rounding noise relative to its mean) becomes zeros.
    Small but real spreads are still scaled to unit std: a float image with std 0.01 is amplified, not
    left alone, because the network expects the same statistics whatever the image's units.
    """
    image = np.asarray(img)
    if image.ndim not in (2, 3) or image.size == 0:
        raise ValueError(f"zscore_normalize expects a non-empty H x W or H x W x C array, got shape "
                         f"{image.shape}")
    image = image.astype(np.float32)
    # float64 accumulators: summing 65k uint16-range values in float32 would lose digits.
    mean = image.mean(axis=(0, 1), dtype=np.float64)
    std = image.std(axis=(0, 1), dtype=np.float64)
    constant = std <= _CONSTANT_RELATIVE_STD * np.abs(mean)
    std = np.where(constant, 1.0, std)
    result = image - mean.astype(np.float32)
    result /= std.astype(np.float32)
    if np.any(constant):
        if image.ndim == 2:
            result[...] = 0.0
        else:
            result[..., np.atleast_1d(constant)] = 0.0
    return result


# ---------------------------------------------------------------------------------------------------
# Configuration and CLI
# ---------------------------------------------------------------------------------------------------

# config field -> (command-line flag / augment_image keyword)
_FIELD_FLAGS = {
    "reflection": ("reflection_augmentation", "reflection_flag"),
    "rotation": ("rotation_augmentation", "rotation_flag"),
    "jitter": ("jitter_augmentation_severity", "jitter_augmentation_severity"),
    "noise": ("noise_augmentation_severity", "noise_augmentation_severity"),
    "scale": ("scale_augmentation_severity", "scale_augmentation_severity"),
    "blur_max_sigma": ("blur_augmentation_max_sigma", "blur_augmentation_max_sigma"),
    "intensity": ("intensity_augmentation_severity", "intensity_augmentation_severity"),
}
_BOOLEAN_FIELDS = ("reflection", "rotation")


@dataclasses.dataclass
class AugmentationConfig:
    """Which augmentations run and how strongly; the defaults are the original toolkit's."""
    reflection: bool = True
    rotation: bool = True
    jitter: float = 0.1
    noise: float = 0.02
    scale: float = 0.1
    blur_max_sigma: float = 2.0
    intensity: float = 0.0

    @classmethod
    def disabled(cls):
        """A configuration with every augmentation off."""
        return cls(reflection=False, rotation=False, jitter=0.0, noise=0.0, scale=0.0,
                   blur_max_sigma=0.0, intensity=0.0)

    def validate(self):
        """Raise ValueError naming the field and value when a setting is out of range; returns self."""
        for field in _BOOLEAN_FIELDS:
            value = getattr(self, field)
            if not isinstance(value, (bool, np.bool_)) and not (
                    isinstance(value, numbers.Integral) and value in (0, 1)):
                raise ValueError(f"{_FIELD_FLAGS[field][0]} (config key '{field}') must be 0/1 or "
                                 f"true/false, got {value!r}")
            setattr(self, field, bool(value))
        for field in ("jitter", "noise", "scale", "intensity", "blur_max_sigma"):
            try:
                _check_severity(_FIELD_FLAGS[field][0], getattr(self, field),
                                upper=None if field == "blur_max_sigma" else 1.0)
            except ValueError as error:
                flag, rest = str(error).split(" ", 1)
                raise ValueError(f"{flag} (config key '{field}') {rest}") from None
            setattr(self, field, float(getattr(self, field)))
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
        unknown = sorted(set(values) - set(_FIELD_FLAGS))
        if unknown:
            raise ValueError(f"augmentation config {path} has unknown keys {unknown}; valid keys are "
                             f"{list(_FIELD_FLAGS)}")
        try:
            return cls(**values).validate()
        except ValueError as error:
            raise ValueError(f"augmentation config {path}: {error}") from None

    def to_dict(self):
        """The settings as a plain dict (JSON-serialisable, the same keys from_json accepts)."""
        return dataclasses.asdict(self)

    def augment_kwargs(self):
        """Keyword arguments for augment_image (everything but img, mask and rng)."""
        return {keyword: getattr(self, field) for field, (_, keyword) in _FIELD_FLAGS.items()}


def add_augmentation_arguments(parser):
    """Add the augmentation flags (all default None = not given) to an argparse parser."""
    group = parser.add_argument_group("augmentation",
                                      "precedence: built-in defaults < --augmentation_config < flags")
    group.add_argument("--augmentation_config", metavar="FILE.json", default=None,
                       help=f"JSON object with any of the keys {', '.join(_FIELD_FLAGS)}")
    group.add_argument("--reflection_augmentation", type=int, choices=(0, 1), default=None,
                       help="random flips of rows and columns (default 1)")
    group.add_argument("--rotation_augmentation", type=int, choices=(0, 1), default=None,
                       help="random rotation in [0, 360) degrees (default 1)")
    defaults = AugmentationConfig()
    for field, help_text in (("jitter", "random shift, fraction of the image size in [0, 1)"),
                             ("noise", "Gaussian noise sigma up to this fraction of the image range, [0, 1)"),
                             ("scale", "random zoom in [1 - s, 1 + s] per axis, [0, 1)"),
                             ("blur_max_sigma", "Gaussian blur sigma drawn in [0, this] pixels, >= 0"),
                             ("intensity", "additive shift up to this fraction of the image range, [0, 1)")):
        group.add_argument(f"--{_FIELD_FLAGS[field][0]}", type=float, default=None, metavar="F",
                           help=f"{help_text} (default {getattr(defaults, field):g})")
    return parser


def augmentation_config_from_args(args):
    """Resolve the augmentation flags into a validated AugmentationConfig (defaults < JSON < flags)."""
    path = getattr(args, "augmentation_config", None)
    config = AugmentationConfig.from_json(path) if path else AugmentationConfig()
    for field, (flag, _) in _FIELD_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            setattr(config, field, bool(value) if field in _BOOLEAN_FIELDS else value)
    return config.validate()
