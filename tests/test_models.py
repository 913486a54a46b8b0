"""Tests of models/: output shapes, input-size checks, SegNet's argmax (un)pooling, saving, mixed
precision, XLA and the analytic receptive field against a gradient experiment."""
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import models
from models.layers import MaxPoolingWithArgmax2D, MaxUnpooling2D

# A non-square size per model (divisible by its divisor) and tiny widths keep every model fast.
SIZES = {"unet": (32, 48), "segnet": (64, 96)}


def _images(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.mark.parametrize("name", models.MODEL_NAMES)
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_matches_input(name, channels):
    height, width = SIZES[name]
    model = models.build_model(name, 3, input_channels=channels, base_filters=4,
                               input_size=(height, width))
    logits = model(_images((2, height, width, channels)))
    assert tuple(logits.shape) == (2, height, width, 3)
    assert model.name == name
    assert model.get_layer("logits").kernel.shape == (1, 1, 4, 3)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_dynamic_input_accepts_two_sizes(name):
    model = models.build_model(name, 2, input_channels=1, base_filters=2)
    assert model.input_shape == (None, None, None, 1)
    divisor = models.SIZE_DIVISOR[name]
    for height, width in ((divisor, divisor), (2 * divisor, 3 * divisor)):
        logits = model.predict(_images((1, height, width, 1)), verbose=0)
        assert logits.shape == (1, height, width, 2)


@pytest.mark.parametrize("name, divisor", [("unet", 16), ("segnet", 32)])
def test_bad_size_rejected_with_divisor_and_nearest_sizes(name, divisor):
    assert models.SIZE_DIVISOR[name] == divisor
    bad = 3 * divisor + 4
    with pytest.raises(ValueError, match=rf"divisible by {divisor}.*height {bad} -> use "
                                         rf"{3 * divisor} or {4 * divisor}"):
        models.check_input_size(name, bad, 2 * divisor)
    with pytest.raises(ValueError, match=rf"{name} needs .* by {divisor}.*width 10 -> use {divisor}"):
        models.build_model(name, 2, base_filters=2, input_size=(divisor, 10))
    with pytest.raises(ValueError, match="height 0 is not a positive integer"):
        models.check_input_size(name, 0, divisor)
    models.check_input_size(name, np.int64(2 * divisor), divisor)  # numpy ints from configs are fine


def test_unknown_model_name_lists_choices():
    with pytest.raises(ValueError, match="'vgg'.*unet, segnet"):
        models.build_model("vgg", 2)
    with pytest.raises(ValueError, match="unet, segnet"):
        models.receptive_field("vgg")


def test_batch_norm_flag_removes_bn_and_restores_bias():
    with_bn = models.build_model("unet", 2, base_filters=2)
    without = models.build_model("unet", 2, base_filters=2, batch_norm=False)
    assert with_bn.get_layer("enc1_bn1") is not None and with_bn.get_layer("enc1_conv1").bias is None
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in without.layers)
    assert without.get_layer("enc1_conv1").bias is not None


def test_layers_named_by_stage():
    unet = {layer.name for layer in models.build_model("unet", 2, base_filters=2).layers}
    assert {"enc1_conv1", "enc4_pool", "bottleneck_conv2", "dec4_upconv", "dec1_concat", "dec1_relu2",
            "logits"} <= unet
    segnet = {layer.name for layer in models.build_model("segnet", 2, base_filters=2).layers}
    assert {"enc1_pool", "enc5_conv3", "enc5_pool", "dec5_unpool", "dec1_unpool", "dec1_conv2",
            "logits"} <= segnet
    assert "enc1_conv3" not in segnet and "enc3_conv3" in segnet  # VGG16's 2-2-3-3-3 blocks


def test_unpooling_puts_values_back_at_argmax_positions():
    x = _images((2, 4, 6, 3), seed=1)
    pooled, indices = MaxPoolingWithArgmax2D(2)(x)
    unpooled = MaxUnpooling2D()([pooled, indices, x]).numpy()

    # Expected: inside each 2x2 window (per image and channel) only the maximum survives.
    windows = x.reshape(2, 2, 2, 3, 2, 3)  # (B, H/2, 2, W/2, 2, C)
    window_max = windows.max(axis=(2, 4), keepdims=True)
    expected = np.where(windows == window_max, windows, 0).reshape(x.shape)
    np.testing.assert_array_equal(pooled.numpy(), window_max.reshape(2, 2, 3, 3))
    np.testing.assert_array_equal(unpooled, expected)
    assert np.count_nonzero(unpooled) == pooled.numpy().size


def test_unpooling_with_unknown_spatial_size_and_odd_reference():
    # An odd reference (5 x 7) pooled 'valid' drops the last row/column; the output keeps its shape.
    @tf.function(input_signature=[tf.TensorSpec((None, None, None, 2), tf.float32)])
    def round_trip(x):
        pooled, indices = MaxPoolingWithArgmax2D(2)(x)
        return MaxUnpooling2D()([pooled, indices, x])

    x = np.arange(2 * 5 * 7 * 2, dtype="float32").reshape(2, 5, 7, 2)  # maxima at bottom-right
    out = round_trip(x).numpy()
    assert out.shape == x.shape
    np.testing.assert_array_equal(out[:, 1:4:2, 1:6:2], x[:, 1:4:2, 1:6:2])
    assert np.count_nonzero(out) == 2 * 2 * 3 * 2


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_save_and_load_keras_file_gives_identical_predictions(name, tmp_path):
    model = models.build_model(name, 3, input_channels=2, base_filters=2)
    images = _images((2, 64, 64, 2))
    expected = model.predict(images, verbose=0)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), expected)


def test_saved_segnet_loads_in_a_fresh_process_after_register_layers(tmp_path):
    # What inference.py relies on (checkpoints.load_trained): the custom layers are found by their
    # registered names, with no custom_objects and no training code.
    model = models.build_model("segnet", 2, base_filters=2)
    images = _images((1, 32, 64, 1))
    model.save(tmp_path / "segnet.keras")
    np.save(tmp_path / "images.npy", images)
    script = ("import sys, keras, numpy as np, models\n"
              "models.register_layers()\n"
              "folder = sys.argv[1]\n"
              "model = keras.saving.load_model(folder + '/segnet.keras')\n"
              "logits = model.predict(np.load(folder + '/images.npy'), verbose=0)\n"
              "np.save(folder + '/logits.npy', logits)\n")
    root = pathlib.Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=root, check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(root)})
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), model.predict(images, verbose=0))


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_logits_stay_float32_under_mixed_precision(name):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = models.build_model(name, 2, base_filters=2)
        assert model.get_layer("enc1_conv1").compute_dtype == "float16"
        logits = model(_images((1, 32, 32, 1)))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert logits.dtype == tf.float32
    assert model.get_layer("logits").compute_dtype == "float32"
    assert np.all(np.isfinite(logits.numpy()))


def test_segnet_cannot_be_xla_compiled_but_unet_can():
    # Pins the reason the trainer refuses --xla for segnet: the argmax pooling has no XLA kernel.
    images = _images((1, 32, 32, 1))
    unet = models.build_model("unet", 2, base_filters=2)
    compiled = tf.function(lambda x: unet(x, training=False), jit_compile=True)
    np.testing.assert_allclose(compiled(images), unet(images, training=False), atol=1e-4)

    segnet = models.build_model("segnet", 2, base_filters=2)
    compiled = tf.function(lambda x: segnet(x, training=False), jit_compile=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="MaxPoolWithArgmax"):
        compiled(images)


def test_receptive_field_values():
    # Worked out in the builders' receptive_field docstrings; fixed for the default depths.
    assert models.receptive_field("unet") == 204
    assert models.receptive_field("segnet") == 404


def _gradient_extent(name, size, position, batch=8, **options):
    """Rows and columns of a (size x size) input that reach output pixel (position, position) by a
    non-zero gradient, for a batch-norm-free model with random positive conv weights (mean 1/fan_in,
    so activations stay O(1)) and zero biases on positive random images: every ReLU passes, so no path
    is cut and only max-pooling decides which pixels are seen; the batch and the many rows let every
    column of a pooling window win somewhere."""
    rng = np.random.default_rng(0)
    model = models.build_model(name, 1, base_filters=2, batch_norm=False, **options)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2DTranspose):
            fan_in = layer.kernel.shape[3]  # kernel (k, k, out, in); stride == k: one input pixel each
        elif isinstance(layer, keras.layers.Conv2D):
            fan_in = np.prod(layer.kernel.shape[:3])
        else:
            continue
        layer.kernel.assign(rng.uniform(0, 2 / fan_in, layer.kernel.shape).astype("float32"))
        layer.bias.assign(np.zeros(layer.bias.shape, "float32"))
    images = tf.constant(rng.uniform(0.5, 1.5, (batch, size, size, 1)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(images)
        target = tf.reduce_sum(model(images)[:, position, position, 0])
    seen = tape.gradient(target, images).numpy() != 0
    rows = np.flatnonzero(seen.any(axis=(0, 2, 3)))
    columns = np.flatnonzero(seen.any(axis=(0, 1, 3)))
    # The whole receptive field must lie inside the image, or borders would cut the extent.
    assert rows.min() > 0 and rows.max() < size - 1 and columns.min() > 0 and columns.max() < size - 1
    return rows.max() - rows.min() + 1, columns.max() - columns.min() + 1


@pytest.mark.parametrize("name, size, position, options", [
    ("unet", 256, 128 + 2, {}),      # 2 mod 16: a position where the analytic range is widest
    ("segnet", 448, 224 + 6, {}),    # 6 mod 32: likewise
    ("unet", 192, 96 + 2, {"unet_depth": 3, "upsampling": "bilinear"}),
    ("unet", 192, 96 + 2, {"unet_depth": 3, "encoder": "residual"}),
])
def test_receptive_field_matches_gradient_experiment(name, size, position, options):
    analytic = models.receptive_field(name, **options)
    extents = _gradient_extent(name, size, position, **options)
    # A gradient can only show part of the true field. For UNet it shows all of it. A SegNet pixel
    # unpooled at the deepest level also depends on the encoder pixel that *lost* its argmax (it decides
    # where the value goes) with no gradient, which hides one 16-px cell (388 of 404 are visible); the
    # argmax draw may hide a little more, so allow one pooling period.
    for extent in extents:
        assert analytic - models.size_divisor(name, **options) <= extent <= analytic
        if name == "unet":
            assert extent == analytic


def test_every_registered_model_module_exports_the_registry_contract():
    import importlib

    for name in models.MODEL_NAMES:
        module = importlib.import_module(f"models.{name}")
        assert models.SIZE_DIVISOR[name] == module.SIZE_DIVISOR and module.SIZE_DIVISOR in (16, 32)
        assert models.receptive_field(name) == module.receptive_field()
        assert models.xla_problem(name) == module.XLA_PROBLEM
        assert module.PRECISION_PROBLEM is None or isinstance(module.PRECISION_PROBLEM, str)
        assert models.display_name(name).lower() == name
        text, doi = models.citation(name)
        assert text and doi.startswith("10.")
        assert models.build_model(name, 2, base_filters=2).name == name
    assert models.xla_problem("unet") is None and "no XLA kernel" in models.xla_problem("segnet")


def test_build_from_config_needs_every_config_key():
    config = {"model": "segnet", "number_classes": 3, "input_channels": 2, "base_filters": 2, "batch_norm": False}
    model = models.build_from_config(config)
    assert model.name == "segnet" and model.input_shape[-1] == 2 and model.output_shape[-1] == 3
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    with pytest.raises(KeyError, match="lacks base_filters"):
        models.build_from_config({k: v for k, v in config.items() if k != "base_filters"})


def test_unet_depth_and_upsampling_shape_the_network():
    model = models.build_model("unet", 3, input_channels=2, base_filters=2, unet_depth=3, upsampling="bilinear")
    images = _images((2, 40, 24, 2))  # multiples of 8, not of 16
    assert tuple(model(images).shape) == (2, 40, 24, 3)
    names = {layer.name for layer in model.layers}
    assert "enc3_pool" in names and "enc4_conv1" not in names and "dec3_upsample" in names
    assert not any(isinstance(layer, keras.layers.Conv2DTranspose) for layer in model.layers)
    # Depth 3 halves the divisor and shrinks the receptive field; bilinear + 3x3 conv widens it.
    assert models.size_divisor("unet", unet_depth=3) == 8 and models.size_divisor("unet") == 16
    assert models.receptive_field("unet", unet_depth=3) == 100
    assert models.receptive_field("unet", unet_depth=3, upsampling="bilinear") == 124
    assert models.receptive_field("unet", unet_depth=4, upsampling="transpose") == 204
    models.check_input_size("unet", 40, 24, unet_depth=3)
    with pytest.raises(ValueError, match="divisible by 8.*height 36 -> use 32 or 40"):
        models.check_input_size("unet", 36, 24, unet_depth=3)
    # A whole config.json may be passed: keys of other models are ignored, missing ones default.
    config = {"model": "unet", "number_classes": 2, "input_channels": 1, "base_filters": 2,
              "batch_norm": True, "unet_depth": 3, "upsampling": "bilinear", "tile_size": 64}
    rebuilt = models.build_from_config(config)
    assert [w.shape for w in rebuilt.weights] == [w.shape for w in
                                                  models.build_model("unet", 2, base_filters=2, unet_depth=3,
                                                                     upsampling="bilinear").weights]
    # A segnet config.json records the unet options at their defaults.
    assert models.size_divisor("segnet", **config | {"unet_depth": 4, "upsampling": "transpose"}) == 32


def test_bad_unet_options_name_the_flag():
    with pytest.raises(ValueError, match="--unet_depth 0: expected an integer from 1 to 6"):
        models.build_model("unet", 2, unet_depth=0)
    with pytest.raises(ValueError, match="--upsampling 'nearest': expected one of transpose, bilinear"):
        models.size_divisor("unet", upsampling="nearest")
    with pytest.raises(ValueError, match="--unet_depth 3 applies to unet only, not to segnet"):
        models.build_model("segnet", 2, unet_depth=3)
    with pytest.raises(ValueError, match="--encoder 'dense': expected one of plain, residual"):
        models.build_model("unet", 2, encoder="dense")
    with pytest.raises(ValueError, match="--encoder residual applies to unet only, not to segnet"):
        models.build_model("segnet", 2, encoder="residual")


def test_residual_encoder_adds_each_level_s_input_to_its_two_convs(tmp_path):
    plain = models.build_model("unet", 2, input_channels=3, base_filters=4, unet_depth=2)
    model = models.build_model("unet", 2, input_channels=3, base_filters=4, unet_depth=2, encoder="residual")
    images = _images((2, 32, 16, 3))
    assert tuple(model(images).shape) == (2, 32, 16, 2)
    # The same convs as the plain UNet, plus a 1x1 shortcut (and its BN) where the channels change:
    # every encoder level and the bottleneck (each doubles them).
    plain_names = {layer.name for layer in plain.layers}
    names = {layer.name for layer in model.layers}
    extra = {f"{stage}_{part}" for stage in ("enc1", "enc2", "bottleneck")
             for part in ("shortcut", "shortcut_bn", "add")}
    assert names - plain_names == extra and plain_names <= names
    assert models.receptive_field("unet", unet_depth=2, encoder="residual") == models.receptive_field("unet", unet_depth=2)
    # enc1's output is relu(conv-BN(conv-BN-ReLU(x)) + BN(1x1 conv(x))), computed here layer by layer.
    enc1 = keras.Model(model.input, [model.get_layer(name).output for name in
                                     ("enc1_bn2", "enc1_shortcut_bn", "enc1_relu2")])
    residual, shortcut, out = (t.numpy() for t in enc1(images, training=False))
    np.testing.assert_allclose(out, np.maximum(residual + shortcut, 0), atol=1e-6)
    kernel = model.get_layer("enc1_shortcut").kernel.numpy()[0, 0]  # (3, 4)
    bn = model.get_layer("enc1_shortcut_bn")
    projected = images @ kernel
    expected = (projected - bn.moving_mean.numpy()) / np.sqrt(bn.moving_variance.numpy() + bn.epsilon) \
        * bn.gamma.numpy() + bn.beta.numpy()
    np.testing.assert_allclose(shortcut, expected, atol=1e-5)
    # A .keras file tells its encoder; the rebuilt network has the same weights' shapes.
    model.save(tmp_path / "r.keras")
    loaded = keras.saving.load_model(tmp_path / "r.keras")
    assert models.options_of(loaded) == {"unet_depth": 2, "upsampling": "transpose", "encoder": "residual"}
    np.testing.assert_allclose(loaded(images).numpy(), model(images).numpy(), atol=1e-6)
    rebuilt = models.build_from_config({"model": "unet", "number_classes": 2, "input_channels": 3,
                                        "base_filters": 4, "batch_norm": True, "unet_depth": 2,
                                        "encoder": "residual"})
    assert [w.shape for w in rebuilt.weights] == [w.shape for w in model.weights]


def test_bilinear_unet_traces_for_any_size_and_round_trips_through_keras_file(tmp_path):
    model = models.build_model("unet", 2, base_filters=2, unet_depth=3, upsampling="bilinear")
    # What inference does: one tf.function for every tile size (unknown H, W when traced).
    forward = tf.function(lambda x: model(x, training=False),
                          input_signature=[tf.TensorSpec((None, None, None, 1), tf.float32)])
    for height, width in ((16, 24), (40, 8)):
        images = _images((1, height, width, 1))
        np.testing.assert_allclose(forward(images).numpy(), model(images, training=False).numpy(), atol=1e-6)
        assert forward(images).shape == (1, height, width, 2)
    # The layer upsamples exactly like tf.image.resize's bilinear mode (half-pixel centres).
    features = _images((1, 5, 3, 2))
    upsample = model.get_layer("dec1_upsample")
    np.testing.assert_allclose(upsample(features).numpy(),
                               tf.image.resize(features, (10, 6), method="bilinear").numpy(), atol=1e-6)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    # A .keras file alone tells its shape options (inference needs them for the divisor and halo).
    assert models.options_of(loaded) == {"unet_depth": 3, "upsampling": "bilinear", "encoder": "plain"}
    assert models.options_of(models.build_model("unet", 2, base_filters=2)) == {
        "unet_depth": 4, "upsampling": "transpose", "encoder": "plain"}
    assert models.options_of(models.build_model("segnet", 2, base_filters=2)) == {}
    images = _images((2, 32, 16, 1))
    np.testing.assert_allclose(loaded(images).numpy(), model(images).numpy(), atol=1e-6)
