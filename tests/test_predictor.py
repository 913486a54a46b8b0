"""predictor.py: tiled prediction equals one whole-image pass (also with TTA and on a lazily read
image), the tile plan, the memory-based default tile size, TTA inversion and ensembles."""
import keras
import numpy as np
import pytest

import models
import normalization
import predictor
from conftest import whole_image_logits

CLASSES = 3

UNET = models.geometry("unet")  # the default UNet's size divisor, halo and smallest tile


class RowReader:
    """A lazy image: rows are handed out on request and every request is recorded."""

    def __init__(self, array):
        self.array, self.shape, self.requests = array, array.shape, []

    def __getitem__(self, rows):
        self.requests.append((rows.start, rows.stop))
        return self.array[rows].copy()


@pytest.mark.parametrize("length,tile,halo", [(304, 288, 128), (1008, 512, 128), (528, 288, 112),
                                              (64, 512, 128), (2048, 1024, 256)])
def test_plan_tiles_covers_every_pixel_once_with_full_context(length, tile, halo):
    plan = predictor.plan_tiles(length, tile, halo)
    covered = np.zeros(length, dtype=int)
    for start, keep_start, keep_stop in plan:
        assert start % 16 == 0 and 0 <= start and start + min(tile, length) <= length
        covered[keep_start:keep_stop] += 1
        # A kept pixel has a full halo of real context on every side that is not the canvas border.
        assert keep_start == 0 or keep_start - start >= halo
        assert keep_stop == length or start + tile - keep_stop >= halo
    assert (covered == 1).all()
    assert (len(plan) == 1) == (tile >= length)


def test_halo_covers_the_receptive_field():
    for name in models.MODEL_NAMES:
        halo = models.geometry(name).halo
        assert halo % models.SIZE_DIVISOR[name] == 0
        assert halo >= models.receptive_field(name) // 2 + models.SIZE_DIVISOR[name]


@pytest.mark.parametrize("length,tile_size", [(4096, 2048), (4096, 4096), (1008, 512), (304, 288),
                                              (20000, 2048), (64, 512)])
def test_fit_tile_needs_no_more_tiles_and_is_no_larger(length, tile_size):
    halo, divisor = 128, 16
    tile = predictor.fit_tile(length, tile_size, halo, divisor)
    assert tile % divisor == 0 and tile <= tile_size
    assert len(predictor.plan_tiles(length, tile, halo)) <= len(predictor.plan_tiles(length, tile_size,
                                                                                     halo))
    if length > tile_size:  # one divisor less would need more tiles: it is the smallest such tile
        assert len(predictor.plan_tiles(length, tile - divisor, halo)) > len(
            predictor.plan_tiles(length, tile, halo))
    # 4096 px with 2048 px tiles: 3 tiles of 1536 px instead of 3 of 2048 (a third less compute).
    if (length, tile_size) == (4096, 2048):
        assert tile == 1536


def test_reflect_indices_equal_numpy_reflect_padding_for_any_width():
    for length in (1, 2, 3, 7):
        for pad in (0, 1, 5, 20):
            source = np.arange(length)
            padded = np.pad(source, (pad, pad + 3), mode="reflect")
            index = predictor.reflect_indices(0, padded.size, pad, length)
            np.testing.assert_array_equal(source[index], padded)


@pytest.mark.parametrize("name,channels,shape,tile", [("unet", 1, (300, 517), 288),
                                                      ("unet", 3, (300, 517), 288),
                                                      ("segnet", 1, (600, 700), 576)])
def test_tiled_logits_equal_whole_image_logits(name, channels, shape, tile):
    keras.utils.set_random_seed(channels)
    model = models.build_model(name, CLASSES, input_channels=channels, base_filters=2)
    forward = predictor.make_predictor(model)
    image = np.random.default_rng(channels).gamma(2.0, 300.0, size=shape + (channels,)).astype(np.float32)
    stats = normalization.channel_statistics(image)

    geometry = models.geometry(name)
    whole = predictor.predict_image(forward, image, stats, geometry, tile_size=1024)
    lazy = RowReader(image)
    tiled = predictor.predict_image(forward, lazy, stats, geometry, tile_size=tile, batch_size=3)

    assert predictor.count_tiles(*shape, geometry, 1024) == 1 and predictor.count_tiles(*shape, geometry, tile) > 4
    assert whole.shape == tiled.shape == shape + (CLASSES,) and tiled.dtype == np.float32
    np.testing.assert_allclose(tiled, whole, atol=1e-4, rtol=0)
    np.testing.assert_allclose(whole, whole_image_logits(model, image, models.SIZE_DIVISOR[name]),
                               atol=1e-5, rtol=0)
    # The lazy image was read band by band, never whole.
    assert len(lazy.requests) > 1 and max(b - a for a, b in lazy.requests) <= tile
    # The same tiling with too small a halo leaves seams: the check above can fail.
    seamed = predictor.predict_image(forward, image, stats, geometry, tile_size=tile, halo=32)
    assert np.abs(seamed - whole).max() > 1e-3


def test_tiled_logits_equal_whole_image_logits_in_bfloat16():
    # inference.py --precision bfloat16: rounding to 16 bits happens per pixel, so the tile size and
    # the batch still do not change the result.
    keras.utils.set_random_seed(5)
    model = models.with_precision(models.build_model("unet", CLASSES, base_filters=4), "bfloat16")
    forward = predictor.make_predictor(model)
    image = np.random.default_rng(5).gamma(2.0, 300.0, size=(300, 517, 1)).astype(np.float32)
    stats = normalization.channel_statistics(image)
    geometry = models.geometry("unet")
    whole = predictor.predict_image(forward, image, stats, geometry, tile_size=1024)
    tiled = predictor.predict_image(forward, image, stats, geometry, tile_size=288, batch_size=3)
    assert predictor.count_tiles(300, 517, geometry, 288) > 4
    np.testing.assert_allclose(tiled, whole, atol=1e-4, rtol=0)
    exact = predictor.predict_image(predictor.make_predictor(models.with_precision(model, "float32")), image,
                                    stats, geometry, tile_size=1024)
    assert np.abs(exact - whole).max() > 1e-4  # it did compute in bfloat16


def test_tiled_tta_equals_whole_image_tta_and_differs_from_plain():
    keras.utils.set_random_seed(4)
    model = models.build_model("unet", CLASSES, input_channels=1, base_filters=2)
    forward = predictor.make_predictor(model)
    image = np.random.default_rng(4).gamma(2.0, 300.0, size=(300, 420, 1)).astype(np.float32)
    stats = normalization.channel_statistics(image)

    whole = predictor.predict_image(forward, image, stats, UNET, tile_size=1024, tta=True)
    tiled = predictor.predict_image(forward, image, stats, UNET, tile_size=288, batch_size=2, tta=True)
    plain = predictor.predict_image(forward, image, stats, UNET, tile_size=1024)

    np.testing.assert_allclose(tiled, whole, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.exp(whole).sum(axis=-1), 1.0, atol=1e-5)  # log-probabilities
    # The oracle: the mean softmax of the whole image's 8 transformed predictions, each undone.
    padded, (top, left) = predictor.pad_to_divisor(normalization.normalize(image, stats), 16)
    expected = np.zeros(padded.shape[:2] + (CLASSES,))
    for turns in range(4):
        for mirror in (False, True):
            view = np.rot90(padded[:, ::-1] if mirror else padded, turns)
            probabilities = predictor._softmax(np.asarray(model(view[None].copy(), training=False))[0])
            back = np.rot90(probabilities, -turns)
            expected += back[:, ::-1] if mirror else back
    expected = expected[top:top + 300, left:left + 420] / 8
    np.testing.assert_allclose(np.exp(whole), expected, atol=1e-5)
    assert np.abs(np.exp(plain) / np.exp(plain).sum(-1, keepdims=True) - expected).max() > 1e-3


def test_tta_of_an_equivariant_model_changes_nothing():
    # A 3x3 convolution whose kernels have the symmetry of the square, then a pointwise layer: its
    # output turns and mirrors with its input, so TTA must give back exactly the plain prediction;
    # a transform undone wrongly (a mirror the wrong way, a turn too many) moves pixels and fails.
    inputs = keras.Input((None, None, 1))
    symmetric = keras.layers.Conv2D(4, 3, padding="same", activation="relu")
    hidden = symmetric(inputs)
    logits = keras.layers.Conv2D(CLASSES, 1)(hidden)
    model = keras.Model(inputs, logits)
    rng = np.random.default_rng(5)
    kernel = np.zeros((3, 3, 1, 4), np.float32)
    for filter_index in range(4):
        corner, edge, centre = rng.normal(size=3)
        kernel[..., 0, filter_index] = [[corner, edge, corner], [edge, centre, edge],
                                        [corner, edge, corner]]
    symmetric.set_weights([kernel, rng.normal(size=4).astype(np.float32)])
    image = rng.gamma(2.0, 300.0, size=(48, 80, 1)).astype(np.float32)
    stats = normalization.channel_statistics(image)
    forward = predictor.make_predictor(model)

    plain = predictor.predict_image(forward, image, stats, UNET, tile_size=1024)
    augmented = predictor.predict_image(forward, image, stats, UNET, tile_size=1024, tta=True)

    np.testing.assert_allclose(np.exp(augmented), predictor._softmax(plain), atol=1e-6)
    assert np.ptp(plain, axis=(0, 1)).max() > 0.1, "the toy model's output must vary over the image"


def test_ensemble_of_two_copies_equals_the_model_and_of_two_models_averages():
    keras.utils.set_random_seed(6)
    first = models.build_model("unet", CLASSES, input_channels=1, base_filters=2)
    second = models.build_model("unet", CLASSES, input_channels=1, base_filters=2)
    copy = models.build_model("unet", CLASSES, input_channels=1, base_filters=2)
    copy.set_weights(first.get_weights())
    image = np.random.default_rng(6).integers(0, 4000, (64, 96, 1)).astype(np.uint16)
    stats = normalization.channel_statistics(image)

    def probabilities(forward):
        return predictor._softmax(predictor.predict_image(forward, image, stats, UNET, 1024))

    single = probabilities(predictor.make_predictor(first))
    np.testing.assert_allclose(probabilities(predictor.make_predictor([first, copy])), single, atol=1e-6)
    other = probabilities(predictor.make_predictor(second))
    np.testing.assert_allclose(probabilities(predictor.make_predictor([first, second])),
                               (single + other) / 2, atol=1e-6)


def test_default_tile_size_follows_the_memory():
    keras.utils.set_random_seed(7)
    small = models.build_model("unet", 2, input_channels=1, base_filters=2)
    wide = models.build_model("unet", 2, input_channels=1, base_filters=8)
    per_pixel = predictor.activation_bytes_per_pixel(small)
    assert 0 < per_pixel < predictor.activation_bytes_per_pixel(wide)

    gib = 1024 ** 3
    tile = predictor.default_tile_size(small, UNET, memory_bytes=gib)
    assert tile % 16 == 0 and UNET.smallest_tile <= tile <= predictor.MAX_DEFAULT_TILE
    # The tile's activations fit the budget, and one divisor more would not (unless capped).
    assert tile ** 2 * per_pixel <= predictor.MEMORY_FRACTION * gib
    assert (tile + 16) ** 2 * per_pixel > predictor.MEMORY_FRACTION * gib or tile == predictor.MAX_DEFAULT_TILE
    assert predictor.default_tile_size(wide, UNET, memory_bytes=gib) < tile
    assert predictor.default_tile_size(small, UNET, batch_size=4, memory_bytes=gib) < tile
    assert predictor.default_tile_size(small, UNET, memory_bytes=1024) == UNET.smallest_tile
    assert predictor.default_tile_size([small, wide], UNET, memory_bytes=gib) == \
        predictor.default_tile_size(wide, UNET, memory_bytes=gib)
    assert predictor.available_memory_bytes() > 0


def test_shallower_unet_tiles_on_its_own_divisor_and_halo():
    # --unet_depth 3 --upsampling bilinear: divisor 8 and a smaller halo; tiling must use them.
    options = {"unet_depth": 3, "upsampling": "bilinear"}
    geometry = models.geometry("unet", **options)
    assert geometry.size_divisor == 8
    assert geometry.halo < models.geometry("unet").halo
    keras.utils.set_random_seed(5)
    model = models.build_model("unet", CLASSES, input_channels=1, base_filters=2, **options)
    forward = predictor.make_predictor(model)
    image = np.random.default_rng(5).gamma(2.0, 300.0, size=(203, 310, 1)).astype(np.float32)
    stats = normalization.channel_statistics(image)
    tile = geometry.smallest_tile + 8
    whole = predictor.predict_image(forward, image, stats, geometry, tile_size=1024)
    tiled = predictor.predict_image(forward, image, stats, geometry, tile_size=tile)
    assert predictor.count_tiles(203, 310, geometry, tile) > 2
    np.testing.assert_allclose(tiled, whole, atol=1e-4, rtol=0)
    np.testing.assert_allclose(whole, whole_image_logits(model, image, 8), atol=1e-5, rtol=0)
