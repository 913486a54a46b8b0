"""Tests for augment.py: geometry, elastic fields, each transform on its own, masks, config/CLI, z-score."""
import argparse
import dataclasses
import json

import numpy as np
import pytest
import scipy.ndimage as ndi

import augment

ORIGINAL_SEVEN = dict(rotation=True, reflection=True, jitter=0.1, noise=0.02, scale=0.1, blur_max_sigma=2.0,
                      intensity=0.1)
ALL_ON = dict(ORIGINAL_SEVEN, elastic=0.05, elastic_grid_points=3, gamma=0.5, contrast=0.3)
GEOMETRY_ONLY = dict(rotation=True, reflection=True, jitter=0.1, scale=0.1)
GEOMETRY_AND_ELASTIC = dict(GEOMETRY_ONLY, elastic=0.05)


def only(**on):
    """An AugmentationConfig with only the settings ``on`` enabled."""
    return dataclasses.replace(augment.AugmentationConfig.disabled(), **on)


def block_mask(shape=(64, 64), block=16, labels=(0, 1, 2, 3), seed=0):
    """A mask of square blocks with random labels (edges of blocks give clean boundaries)."""
    rng = np.random.default_rng(seed)
    cells = rng.choice(labels, size=(shape[0] // block, shape[1] // block))
    return np.kron(cells, np.ones((block, block), dtype=np.int64)).astype(np.uint8)


def textured_image(shape=(64, 64), dtype=np.uint16, seed=0):
    """A smooth-ish random image (blurred noise) so interpolation differences stay small."""
    rng = np.random.default_rng(seed)
    image = ndi.gaussian_filter(rng.random(shape), 2.0) * 40000 + 1000
    return image.astype(dtype)


# ---------------------------------------------------------------------------------------------------
# masks and alignment
# ---------------------------------------------------------------------------------------------------

def test_mask_labels_preserved_and_dtype_kept():
    mask = block_mask(labels=(0, 3, 7))
    image = textured_image()
    for seed in range(20):
        out_image, out_mask = augment.augment_image(image, only(**ALL_ON), mask, rng=np.random.default_rng(seed))
        assert out_mask.dtype == np.uint8 and out_mask.shape == mask.shape
        assert set(np.unique(out_mask)) <= {0, 3, 7}
        assert out_image.dtype == np.float32 and out_image.shape == image.shape


@pytest.mark.parametrize("geometry", [GEOMETRY_ONLY, GEOMETRY_AND_ELASTIC], ids=["affine", "elastic+affine"])
def test_image_and_mask_stay_aligned(geometry):
    # A mask-valued image must warp onto its own warped mask.
    mask = block_mask(shape=(96, 96), block=24)
    k = 100.0
    image = k * mask.astype(np.float32)
    for seed in range(10):
        out_image, out_mask = augment.augment_image(image, only(**geometry), mask, rng=np.random.default_rng(seed))
        agree = np.rint(out_image / k) == out_mask
        # Tolerance: only a thin band along label boundaries may differ (bilinear vs nearest there);
        # with 24 px blocks that band is under 2% of the pixels.
        assert agree.mean() >= 0.98, f"seed {seed}: only {agree.mean():.3f} of pixels agree"
        # Away from boundaries (3 x 3 neighbourhood of one label) the two must agree exactly. The
        # outermost ring is left out: its window is cut by the edge and misses boundaries beyond it.
        interior = (ndi.maximum_filter(out_mask, 3) == ndi.minimum_filter(out_mask, 3))
        interior[0] = interior[-1] = interior[:, 0] = interior[:, -1] = False
        np.testing.assert_allclose(out_image[interior], k * out_mask[interior], atol=1e-3)
        assert interior.mean() > 0.75


def test_misaligned_mask_would_be_detected():
    # Guard for the test above: a mask flipped relative to the image fails the same criterion.
    mask = block_mask(seed=3)
    image = 100.0 * mask
    assert (np.rint(image[::-1] / 100.0) == mask).mean() < 0.95


def test_real_nist_pair(nist_dir):
    import tifffile

    image_path = sorted((nist_dir / "images").glob("*.tif"))[0]
    image = tifffile.imread(image_path)
    mask = tifffile.imread(nist_dir / "masks" / image_path.name)
    out_image, out_mask = augment.augment_image(image, only(**ALL_ON), mask, rng=np.random.default_rng(0))
    assert out_image.dtype == np.float32 and out_image.shape == image.shape
    assert np.isfinite(out_image).all()
    assert out_mask.dtype == mask.dtype and set(np.unique(out_mask)) <= set(np.unique(mask))


# ---------------------------------------------------------------------------------------------------
# each transform alone
# ---------------------------------------------------------------------------------------------------

def test_all_disabled_is_bit_exact_identity():
    for dtype in (np.uint8, np.uint16, np.int32, np.float32):
        image = textured_image(dtype=dtype) if dtype != np.uint8 else (textured_image() // 200).astype(dtype)
        mask = block_mask()
        out_image, out_mask = augment.augment_image(image, only(), mask, rng=np.random.default_rng(0))
        assert out_image.dtype == np.float32
        np.testing.assert_array_equal(out_image, image.astype(np.float32))
        np.testing.assert_array_equal(out_mask, mask)
        assert out_image is not image


def test_reflection_only_is_a_flip_of_image_and_mask():
    image = textured_image()
    mask = block_mask()
    flips = {(False, False): (image, mask), (True, False): (image[::-1], mask[::-1]),
             (False, True): (image[:, ::-1], mask[:, ::-1]),
             (True, True): (image[::-1, ::-1], mask[::-1, ::-1])}
    seen = set()
    for seed in range(16):
        out_image, out_mask = augment.augment_image(image, only(reflection=True), mask, rng=np.random.default_rng(seed))
        matches = [key for key, (im, ma) in flips.items()
                   if np.array_equal(out_image, im.astype(np.float32)) and np.array_equal(out_mask, ma)]
        assert len(matches) == 1, f"seed {seed}: output is not exactly one flip of the input"
        seen.add(matches[0])
    assert len(seen) == 4


def test_rotation_only_matches_scipy_rotate_by_drawn_angle():
    image = textured_image().astype(np.float32)
    mask = block_mask()
    seed = 7
    angle = np.random.default_rng(seed).uniform(0, 360)  # rotation is the first draw when alone
    out_image, out_mask = augment.augment_image(image, only(rotation=True), mask, rng=np.random.default_rng(seed))
    expected = ndi.rotate(image, angle, reshape=False, order=1, mode="reflect")
    np.testing.assert_allclose(out_image, expected, rtol=0, atol=0.05)
    expected_mask = ndi.rotate(mask, angle, reshape=False, order=0, mode="reflect")
    assert (out_mask == expected_mask).mean() > 0.995
    assert not np.allclose(out_image, image, atol=100)


def test_quarter_turn_map_is_exact_rot90():
    image = textured_image(shape=(32, 32)).astype(np.float64)
    matrix, offset = augment.inverse_affine(image.shape, angle_degrees=90)
    rotated = ndi.affine_transform(image, matrix, offset, order=1, mode="reflect")
    np.testing.assert_array_equal(rotated, np.rot90(image))


def test_jitter_only_is_a_shift_by_the_drawn_amount():
    image = textured_image().astype(np.float32)
    mask = block_mask()
    seed, severity = 3, 0.2
    shift = np.random.default_rng(seed).uniform(-severity, severity, 2) * image.shape
    out_image, out_mask = augment.augment_image(image, only(jitter=severity), mask, rng=np.random.default_rng(seed))
    np.testing.assert_allclose(out_image, ndi.shift(image, shift, order=1, mode="reflect"), atol=0.05)
    assert (out_mask == ndi.shift(mask, shift, order=0, mode="reflect")).mean() > 0.995
    assert np.abs(shift).max() > 1


def test_scale_only_is_a_zoom_about_the_centre_by_the_drawn_factors():
    image = textured_image().astype(np.float32)
    mask = block_mask()
    seed, severity = 5, 0.3
    factors = np.random.default_rng(seed).uniform(1 - severity, 1 + severity, 2)
    out_image, out_mask = augment.augment_image(image, only(scale=severity), mask, rng=np.random.default_rng(seed))
    centre = (np.array(image.shape) - 1) / 2
    matrix = np.diag(1 / factors)
    expected = ndi.affine_transform(image, matrix, centre - matrix @ centre, order=1, mode="reflect")
    np.testing.assert_allclose(out_image, expected, atol=0.05)
    assert np.abs(factors - 1).max() > 0.05
    assert set(np.unique(out_mask)) <= set(np.unique(mask))


def test_noise_only_keeps_mask_and_mean_and_adds_drawn_sigma():
    image = np.full((64, 64), 1000, dtype=np.uint16)
    image[:, 32:] = 3000  # range 2000
    mask = block_mask()
    seed, severity = 11, 0.1
    sigma = np.random.default_rng(seed).uniform(0, severity * 2000)
    out_image, out_mask = augment.augment_image(image, only(noise=severity), mask, rng=np.random.default_rng(seed))
    np.testing.assert_array_equal(out_mask, mask)
    residual = out_image - image.astype(np.float32)
    assert sigma > 10
    assert abs(residual.std() - sigma) < 0.05 * sigma
    assert abs(residual.mean()) < 4 * sigma / 64  # 4 standard errors of the mean over 4096 pixels


def test_intensity_only_shifts_every_pixel_by_one_bounded_constant():
    image = textured_image()
    mask = block_mask()
    value_range = float(image.max()) - float(image.min())
    shifts = []
    for seed in range(10):
        out_image, out_mask = augment.augment_image(image, only(intensity=0.2), mask, rng=np.random.default_rng(seed))
        delta = out_image.astype(np.float64) - image
        assert np.ptp(delta) < 0.01, "intensity must be a single additive constant"
        assert abs(delta.mean()) <= 0.2 * value_range + 0.01
        np.testing.assert_array_equal(out_mask, mask)
        shifts.append(delta.mean())
    assert min(shifts) < 0 < max(shifts)


def test_blur_only_keeps_mean_lowers_variance_and_matches_gaussian_filter():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4000, (64, 64)).astype(np.uint16)
    mask = block_mask()
    seed, max_sigma = 2, 3.0
    sigma = np.random.default_rng(seed).uniform(0, max_sigma)
    assert sigma > 0.5
    out_image, out_mask = augment.augment_image(image, only(blur_max_sigma=max_sigma), mask,
                                                rng=np.random.default_rng(seed))
    np.testing.assert_array_equal(out_mask, mask)
    assert abs(out_image.mean() - image.mean()) < 0.01 * image.mean()
    assert out_image.var() < 0.5 * image.var()
    expected = ndi.gaussian_filter(image.astype(np.float32), sigma, mode="reflect", truncate=3.0)
    np.testing.assert_allclose(out_image, expected, rtol=1e-5, atol=1e-2)


# ---------------------------------------------------------------------------------------------------
# elastic deformation, gamma and contrast
# ---------------------------------------------------------------------------------------------------

def spline_field(grid, size_rows, size_cols):
    """Independent reference: a natural cubic spline through the grid, along rows, then along columns."""
    from scipy.interpolate import CubicSpline

    points = grid.shape[0]
    along_rows = CubicSpline(np.linspace(-0.5, size_rows - 0.5, points), grid, axis=0,
                             bc_type="natural")(np.arange(size_rows))
    return CubicSpline(np.linspace(-0.5, size_cols - 0.5, points), along_rows, axis=1,
                       bc_type="natural")(np.arange(size_cols))


def test_elastic_field_is_the_spline_of_its_grid_and_a_seed_reproduces_it():
    shape, severity, points = (48, 64), 0.05, 4
    field = augment.elastic_displacement(shape, severity, points, np.random.default_rng(5))
    assert field.shape == (2, 48, 64) and field.dtype == np.float32
    grid = np.random.default_rng(5).standard_normal((2, points, points))
    np.testing.assert_allclose(field[0], spline_field(grid[0] * severity * 48, 48, 64), atol=1e-4)
    np.testing.assert_allclose(field[1], spline_field(grid[1] * severity * 64, 48, 64), atol=1e-4)
    # Same seed, same field; another seed, another field.
    np.testing.assert_array_equal(field, augment.elastic_displacement(shape, severity, points,
                                                                      np.random.default_rng(5)))
    other = augment.elastic_displacement(shape, severity, points, np.random.default_rng(6))
    assert np.abs(other - field).max() > 1.0
    with pytest.raises(ValueError, match="elastic grid_points must be an integer >= 2, got 1"):
        augment.elastic_displacement(shape, severity, 1, np.random.default_rng(0))


def test_elastic_field_smoothness_follows_grid_points():
    def roughness(points):
        field = augment.elastic_displacement((96, 96), 0.05, points, np.random.default_rng(0))
        return np.abs(np.diff(field, 2, axis=1)).mean()
    # Pixel-to-pixel change is tiny next to the displacement itself (smooth, not per-pixel noise) and
    # grows with the number of grid points.
    field = augment.elastic_displacement((96, 96), 0.05, 3, np.random.default_rng(0))
    assert np.abs(field).max() > 3 and np.abs(np.diff(field, axis=2)).max() < 0.1 * np.abs(field).max()
    assert roughness(3) < roughness(6) < roughness(12)


def test_elastic_with_affine_is_one_resampling_at_composed_coordinates():
    image = textured_image(shape=(64, 80)).astype(np.float32)
    mask = block_mask(shape=(64, 80))
    seed = 9
    out_image, out_mask = augment.augment_image(image, only(**GEOMETRY_AND_ELASTIC), mask,
                                                rng=np.random.default_rng(seed))
    # Replay the draws in the documented order: flips, angle, shift, scale, then the elastic grid.
    rng = np.random.default_rng(seed)
    flip_rows, flip_cols = rng.random(2) < 0.5
    angle = rng.uniform(0, 360)
    shift = rng.uniform(-0.1, 0.1, 2) * image.shape
    scale = rng.uniform(0.9, 1.1, 2)
    field = augment.elastic_displacement(image.shape, 0.05, 3, rng)
    assert np.abs(field).max() > 2
    matrix, offset = augment.inverse_affine(image.shape, flip_rows, flip_cols, angle, shift, scale)
    rows, cols = np.mgrid[0:64, 0:80].astype(np.float64)
    coords = np.stack([matrix[0, 0] * rows + matrix[0, 1] * cols + offset[0] + field[0],
                       matrix[1, 0] * rows + matrix[1, 1] * cols + offset[1] + field[1]])
    expected = ndi.map_coordinates(image, coords, order=1, mode="reflect")
    np.testing.assert_allclose(out_image, expected, atol=0.5)  # values ~1e4: float32 coordinates
    expected_mask = ndi.map_coordinates(mask, coords, order=0, mode="reflect")
    assert (out_mask == expected_mask).mean() > 0.995
    # Without the field the result is a different image: the field really was applied.
    affine_only = ndi.map_coordinates(image, coords - np.stack([field[0], field[1]]), order=1,
                                      mode="reflect")
    assert np.abs(affine_only - out_image).max() > 100


@pytest.mark.parametrize("shape", [(5, 7), (9, 4)])
def test_samples_beyond_one_reflection_match_scipy(shape):
    # Displacements of up to three image sizes on a tiny image: the padded source then holds
    # reflections of reflections (np.pad), still scipy's "reflect" everywhere.
    rng = np.random.default_rng(3)
    image = rng.uniform(0, 1000, shape).astype(np.float32)
    mask = rng.integers(0, 4, shape).astype(np.uint8)
    work = augment._Workspace(*shape, 1)
    field = rng.uniform(-3, 3, (2,) + shape).astype(np.float32) * max(shape)
    matrix, offset = np.eye(2), np.zeros(2)
    out_image, out_mask = augment._warp(image[..., None], mask, matrix, offset, work, field)
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    coords = np.stack([rows + field[0], cols + field[1]])
    np.testing.assert_allclose(out_image[..., 0], ndi.map_coordinates(image, coords, order=1, mode="reflect"),
                               atol=0.05)
    assert (out_mask == ndi.map_coordinates(mask, coords, order=0, mode="reflect")).mean() > 0.9


def test_elastic_keeps_class_ids_and_warps_the_mask():
    mask = block_mask(labels=(0, 2, 5))
    image = textured_image()
    changed = 0
    for seed in range(10):
        _, out_mask = augment.augment_image(image, only(elastic=0.08, elastic_grid_points=4), mask,
                                            rng=np.random.default_rng(seed))
        assert out_mask.dtype == mask.dtype and set(np.unique(out_mask)) <= {0, 2, 5}
        changed += not np.array_equal(out_mask, mask)
    assert changed == 10


def test_elastic_probability_and_off_switches_leave_the_other_draws_alone():
    image, mask = textured_image(), block_mask()
    # p = 0 (or severity 0) draws nothing: output is exactly that of the seven original transforms,
    # whatever the other elastic settings are.
    reference = augment.augment_image(image, only(**ORIGINAL_SEVEN), mask, rng=np.random.default_rng(4))
    for extra in (dict(elastic=0.2, elastic_probability=0.0),
                  dict(elastic=0.0, elastic_grid_points=7, elastic_probability=0.3, gamma=0.0, contrast=0.0)):
        out = augment.augment_image(image, only(**ORIGINAL_SEVEN, **extra), mask, rng=np.random.default_rng(4))
        np.testing.assert_array_equal(out[0], reference[0])
        np.testing.assert_array_equal(out[1], reference[1])
    # p = 0.5: about half the images are deformed, the rest returned untouched.
    sometimes = only(elastic=0.05, elastic_probability=0.5)
    deformed = sum(not np.array_equal(augment.augment_image(image, sometimes, rng=np.random.default_rng(seed)),
                                      image.astype(np.float32))
                   for seed in range(60))
    assert 15 <= deformed <= 45


def test_gamma_only_is_the_power_curve_between_min_and_max():
    image = textured_image()
    mask = block_mask()
    low, high = float(image.min()), float(image.max())
    gammas = []
    for seed in range(12):
        limit = np.log1p(0.5)
        gamma = np.exp(np.random.default_rng(seed).uniform(-limit, limit))
        out_image, out_mask = augment.augment_image(image, only(gamma=0.5), mask, rng=np.random.default_rng(seed))
        expected = ((image - low) / (high - low)) ** gamma * (high - low) + low
        np.testing.assert_allclose(out_image, expected, rtol=1e-5, atol=0.05)
        np.testing.assert_array_equal(out_mask, mask)
        assert 1 / 1.5 <= gamma <= 1.5
        gammas.append(gamma)
    assert min(gammas) < 0.9 and max(gammas) > 1.1


def test_gamma_uses_each_channels_own_range_and_keeps_constant_channels():
    rng = np.random.default_rng(0)
    image = np.stack([rng.integers(100, 200, (32, 32)), rng.integers(5000, 60000, (32, 32)),
                      np.full((32, 32), 777)], axis=-1).astype(np.uint16)
    seed = 3
    gamma = np.exp(np.random.default_rng(seed).uniform(-np.log1p(0.8), np.log1p(0.8)))
    assert abs(gamma - 1) > 0.2
    out = augment.augment_image(image, only(gamma=0.8), rng=np.random.default_rng(seed))
    for channel in range(2):
        low, high = float(image[..., channel].min()), float(image[..., channel].max())
        expected = ((image[..., channel] - low) / (high - low)) ** gamma * (high - low) + low
        np.testing.assert_allclose(out[..., channel], expected, rtol=1e-5, atol=0.01)
    np.testing.assert_array_equal(out[..., 2], 777.0)


def test_gamma_lookup_for_integer_levels_matches_the_per_pixel_curve():
    # ~600 grey levels over 64 x 64 pixels: integers take the lookup-table path, the same values as
    # float32 the per-pixel path; both must give the same curve.
    image = (textured_image() // 20).astype(np.uint16)
    assert np.ptp(image) < image.size // 4
    lookup = augment.augment_image(image, only(gamma=0.9), rng=np.random.default_rng(2))
    direct = augment.augment_image(image.astype(np.float32), only(gamma=0.9), rng=np.random.default_rng(2))
    np.testing.assert_allclose(lookup, direct, rtol=1e-6)
    assert np.abs(lookup - image).max() > 20


def test_contrast_only_scales_deviations_from_the_mean():
    image = textured_image()
    mask = block_mask()
    for seed in range(5):
        factor = np.random.default_rng(seed).uniform(0.7, 1.3)
        out_image, out_mask = augment.augment_image(image, only(contrast=0.3), mask, rng=np.random.default_rng(seed))
        expected = (image - image.mean()) * factor + image.mean()
        np.testing.assert_allclose(out_image, expected, rtol=1e-5, atol=0.05)
        np.testing.assert_array_equal(out_mask, mask)
    assert abs(factor - 1) > 0.02


# ---------------------------------------------------------------------------------------------------
# determinism, channels, dtypes
# ---------------------------------------------------------------------------------------------------

def test_same_seed_same_output_different_seed_different_output():
    image, mask = textured_image(), block_mask()
    a = augment.augment_image(image, only(**ALL_ON), mask, rng=np.random.default_rng(42))
    b = augment.augment_image(image, only(**ALL_ON), mask, rng=np.random.default_rng(42))
    c = augment.augment_image(image, only(**ALL_ON), mask, rng=np.random.default_rng(43))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_multichannel_channels_share_geometry_and_blur_stays_within_channels():
    base = textured_image()
    image = np.stack([base, base, base], axis=-1)
    mask = block_mask()
    no_noise = dict(ALL_ON, noise=0)
    for seed in range(5):
        out_image, out_mask = augment.augment_image(image, only(**no_noise), mask, rng=np.random.default_rng(seed))
        assert out_image.shape == (64, 64, 3) and out_image.dtype == np.float32
        np.testing.assert_array_equal(out_image[..., 0], out_image[..., 1])
        np.testing.assert_array_equal(out_image[..., 0], out_image[..., 2])
        # Same parameters on a single-channel copy give the same channel.
        single, single_mask = augment.augment_image(base, only(**no_noise), mask, rng=np.random.default_rng(seed))
        np.testing.assert_allclose(out_image[..., 0], single, rtol=1e-6, atol=1e-2)
        np.testing.assert_array_equal(out_mask, single_mask)
    # Constant channels of different values stay constant: blur never mixes channels.
    flat = np.stack([np.zeros((64, 64)), np.full((64, 64), 1000.0)], axis=-1).astype(np.float32)
    out = augment.augment_image(flat, only(blur_max_sigma=5.0, rotation=True), rng=np.random.default_rng(1))
    np.testing.assert_allclose(out[..., 0], 0.0, atol=1e-3)
    np.testing.assert_allclose(out[..., 1], 1000.0, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32])
def test_dtypes_all_transforms(dtype):
    rng = np.random.default_rng(0)
    if dtype == np.int32:
        image = rng.integers(-50000, 50000, (48, 40)).astype(dtype)
    elif dtype == np.float32:
        image = rng.normal(0, 0.01, (48, 40)).astype(dtype)
    else:
        image = rng.integers(0, np.iinfo(dtype).max, (48, 40)).astype(dtype)
    mask = rng.integers(0, 3, (48, 40)).astype(np.int32)
    out_image, out_mask = augment.augment_image(image, only(**ALL_ON), mask, rng=np.random.default_rng(1))
    assert out_image.dtype == np.float32 and out_image.shape == image.shape
    assert np.isfinite(out_image).all()
    lo, hi, spread = float(image.min()), float(image.max()), float(np.ptp(image))
    assert lo - 0.5 * spread < out_image.mean() < hi + 0.5 * spread
    assert out_mask.dtype == np.int32 and set(np.unique(out_mask)) <= {0, 1, 2}
    assert augment.augment_image(image, only(**ALL_ON), rng=np.random.default_rng(1)).shape == image.shape


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------

def test_bad_shapes_and_rng():
    with pytest.raises(ValueError, match=r"mask shape \(8, 9\) does not match the image's H x W \(8, 8\)"):
        augment.augment_image(np.zeros((8, 8)), only(), np.zeros((8, 9)))
    with pytest.raises(ValueError, match=r"got shape \(2, 8, 8, 1\)"):
        augment.augment_image(np.zeros((2, 8, 8, 1)), only())
    with pytest.raises(ValueError, match="numeric dtype"):
        augment.augment_image(np.array([["a", "b"], ["c", "d"]]), only())
    with pytest.raises(TypeError, match="numpy.random.Generator, got RandomState"):
        augment.augment_image(np.zeros((8, 8)), only(), rng=np.random.RandomState(0))


# ---------------------------------------------------------------------------------------------------
# AugmentationConfig and the CLI
# ---------------------------------------------------------------------------------------------------

def test_config_defaults_and_disabled():
    config = augment.AugmentationConfig()
    # The defaults the ablation chose (docs/recipe.md): gamma and contrast on,
    # elastic off.
    assert config.to_dict() == dict(reflection=True, rotation=True, jitter=0.1, noise=0.02, scale=0.1,
                                    blur_max_sigma=2.0, intensity=0.0, elastic=0.0,
                                    elastic_grid_points=3, elastic_probability=1.0, gamma=0.5,
                                    contrast=0.25)
    image = textured_image()
    out = augment.augment_image(image, augment.AugmentationConfig.disabled(), rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out, image.astype(np.float32))


@pytest.mark.parametrize("field, value, message", [
    ("jitter", 1.5, r"jitter_augmentation_severity \(config key 'jitter'\) must be in \[0, 1\), got 1.5"),
    ("noise", -0.1, r"noise_augmentation_severity \(config key 'noise'\) must be in \[0, 1\), got -0.1"),
    ("scale", 1.0, r"scale_augmentation_severity \(config key 'scale'\) must be in \[0, 1\), got 1.0"),
    ("intensity", float("nan"), r"intensity_augmentation_severity \(config key 'intensity'\) must be a finite"),
    ("elastic_grid_points", True, r"elastic_augmentation_grid_points .* must be an integer >= 2, got True"),
    ("elastic_probability", -0.5, r"elastic_augmentation_probability .* must be in \[0, 1\], got -0.5"),
    ("blur_max_sigma", -2.0, r"blur_augmentation_max_sigma \(config key 'blur_max_sigma'\) must be >= 0"),
    ("noise", "0.1",
     r"noise_augmentation_severity \(config key 'noise'\) must be a finite number, got '0.1'"),
    ("rotation", 2, r"rotation_augmentation \(config key 'rotation'\) must be 0/1 or true/false, got 2"),
    ("elastic", 1.0, r"elastic_augmentation_severity \(config key 'elastic'\) must be in \[0, 1\), got 1.0"),
    ("elastic_grid_points", 1,
     r"elastic_augmentation_grid_points \(config key 'elastic_grid_points'\) must be an integer >= 2, got 1"),
    ("elastic_grid_points", 3.0, r"elastic_augmentation_grid_points .* must be an integer >= 2, got 3.0"),
    ("elastic_probability", 1.5,
     r"elastic_augmentation_probability \(config key 'elastic_probability'\) must be in \[0, 1\], got 1.5"),
    ("gamma", -0.2, r"gamma_augmentation_severity \(config key 'gamma'\) must be in \[0, 1\), got -0.2"),
    ("contrast", float("inf"), r"contrast_augmentation_severity \(config key 'contrast'\) must be a finite"),
])
def test_config_validate_names_field_and_value(field, value, message):
    config = augment.AugmentationConfig(**{field: value})
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_config_from_json(tmp_path):
    path = tmp_path / "aug.json"
    path.write_text(json.dumps({"noise": 0.05, "rotation": 0, "elastic": 0.04, "elastic_grid_points": 4,
                                "gamma": 0.3, "contrast": 0.25}))
    config = augment.AugmentationConfig.from_json(path)
    assert config.noise == 0.05 and config.rotation is False
    assert (config.elastic, config.elastic_grid_points, config.gamma, config.contrast) == (0.04, 4, 0.3, 0.25)
    assert isinstance(config.elastic_grid_points, int) and config.elastic_probability == 1.0
    assert config.jitter == 0.1 and config.reflection is True  # missing keys keep defaults
    round_trip = tmp_path / "round.json"
    round_trip.write_text(json.dumps(config.to_dict()))
    assert augment.AugmentationConfig.from_json(round_trip) == config

    path.write_text(json.dumps({"noise": 0.05, "sharpen": 1}))
    with pytest.raises(ValueError, match=r"unknown keys \['sharpen'\]; valid keys are \['reflection'"):
        augment.AugmentationConfig.from_json(path)
    path.write_text("{noise: 0.1")
    with pytest.raises(ValueError, match="aug.json is not valid JSON"):
        augment.AugmentationConfig.from_json(path)
    path.write_text("[0.1]")
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        augment.AugmentationConfig.from_json(path)
    path.write_text(json.dumps({"scale": 1.2}))
    with pytest.raises(ValueError, match=r"aug.json: scale_augmentation_severity .* got 1.2"):
        augment.AugmentationConfig.from_json(path)
    with pytest.raises(ValueError, match="cannot read augmentation config .*missing.json"):
        augment.AugmentationConfig.from_json(tmp_path / "missing.json")


def test_cli_precedence_defaults_json_flags(tmp_path):
    parser = augment.add_augmentation_arguments(argparse.ArgumentParser())
    assert augment.augmentation_config_from_args(parser.parse_args([])) == augment.AugmentationConfig()

    path = tmp_path / "aug.json"
    path.write_text(json.dumps({"noise": 0.05, "scale": 0.2, "reflection": False}))
    args = parser.parse_args(["--augmentation_config", str(path), "--scale_augmentation_severity", "0.3",
                              "--rotation_augmentation", "0", "--blur_augmentation_max_sigma", "1.5",
                              "--intensity_augmentation_severity", "0.1",
                              "--elastic_augmentation_severity", "0.04", "--elastic_augmentation_grid_points",
                              "5", "--elastic_augmentation_probability", "0.5",
                              "--gamma_augmentation_severity", "0.3", "--contrast_augmentation_severity",
                              "0.2"])
    config = augment.augmentation_config_from_args(args)
    assert config == augment.AugmentationConfig(reflection=False, rotation=False, jitter=0.1, noise=0.05,
                                                 scale=0.3, blur_max_sigma=1.5, intensity=0.1, elastic=0.04,
                                                 elastic_grid_points=5, elastic_probability=0.5, gamma=0.3,
                                                 contrast=0.2)
    # A flag overrides the JSON value for the new keys too.
    path.write_text(json.dumps({"elastic": 0.1, "gamma": 0.5}))
    config = augment.augmentation_config_from_args(parser.parse_args(
        ["--augmentation_config", str(path), "--gamma_augmentation_severity", "0"]))
    assert (config.elastic, config.gamma) == (0.1, 0.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--elastic_augmentation_grid_points", "2.5"])

    args = parser.parse_args(["--jitter_augmentation_severity", "1.5"])
    with pytest.raises(ValueError, match=r"jitter_augmentation_severity .* got 1.5"):
        augment.augmentation_config_from_args(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["--reflection_augmentation", "2"])
