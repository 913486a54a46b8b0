"""inference.py --precision: a model copy computing in bfloat16 / float16 (models.with_precision), the
forward function built from it (engines.make_forward), the warnings where it cannot be faster, and a
whole run whose masks match float32's away from near ties."""
import pathlib
import re

import keras
import numpy as np
import pytest
import tifffile

import checkpoints
import engines
import inference
import models
from test_sharding import random_image, run, save_tiny_unet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_unet(tmp_path_factory.mktemp("precision_model"))


@pytest.mark.parametrize("precision, compute", [("bfloat16", "bfloat16"), ("float16", "float16")])
def test_the_copy_computes_in_the_precision_with_the_same_weights_and_float32_logits(precision, compute):
    keras.utils.set_random_seed(0)
    model = models.build_model("unet", 3, 1, base_filters=4)
    copy = models.with_precision(model, precision)
    dtypes = {layer.name: layer.dtype_policy.compute_dtype for layer in copy.layers
              if not isinstance(layer, keras.layers.InputLayer)}
    assert dtypes.pop("logits") == "float32"
    assert set(dtypes.values()) == {compute}
    for original, copied in zip(model.weights, copy.weights):
        assert copied.dtype == "float32"  # a mixed policy keeps the variables in float32
        np.testing.assert_array_equal(np.asarray(copied), np.asarray(original))
    image = np.random.default_rng(0).normal(size=(1, 64, 64, 1)).astype(np.float32)
    exact, reduced = np.asarray(model(image, training=False)), np.asarray(copy(image, training=False))
    assert reduced.dtype == np.float32 and reduced.shape == exact.shape == (1, 64, 64, 3)
    difference = np.abs(reduced - exact).max()
    # Rounded (so it really computed in 16 bits), yet close: within 5 % of the largest logit.
    assert 1e-5 < difference < 0.05 * np.abs(exact).max()
    assert models.with_precision(copy, precision) is copy
    back = models.with_precision(copy, "float32")
    np.testing.assert_array_equal(np.asarray(back(image, training=False)), exact)
    assert models.with_precision(model, "float32") is model


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_segnet_is_refused_in_16_bits_with_the_reason(precision, tmp_path):
    model = models.build_model("segnet", 3, 1, base_filters=4)
    with pytest.raises(ValueError, match=rf"SegNet cannot compute in {precision}: its max-unpooling .* use "
                                         r"--precision float32"):
        models.with_precision(model, precision)
    assert models.with_precision(model, "float32") is model
    model.save(tmp_path / "segnet.keras")
    loaded = checkpoints.load_models(model=str(tmp_path / "segnet.keras"))
    with pytest.raises(engines.EngineError, match=rf"--precision {precision}: SegNet cannot compute in"):
        engines.make_forward("tensorflow", loaded, precision=precision)


@pytest.mark.parametrize("precision, device, flags, capability, expected", [
    ("float32", "/CPU:0", set(), None, None),
    ("bfloat16", "/CPU:0", {"avx512f", "amx_tile", "amx_bf16"}, None, None),
    ("bfloat16", "/CPU:0", {"avx2", "avx512_bf16"}, None, r"no AMX-BF16 unit .*expect little or no gain"),
    ("float16", "/CPU:0", {"amx_bf16", "avx512_fp16"}, None, r"float16 on a CPU: measured slower"),
    ("bfloat16", "/GPU:0", set(), (8, 0), None),
    ("bfloat16", "/GPU:0", set(), (7, 5), r"compute capability 7\.5\) has no bfloat16 tensor cores .*8\.0"),
    ("float16", "/GPU:0", set(), (7, 0), None),
    ("float16", "/GPU:0", set(), (6, 1), r"compute capability 6\.1\) has no float16 tensor cores .*7\.0"),
])
def test_a_precision_that_cannot_be_faster_here_is_warned_about(precision, device, flags, capability, expected):
    warning = engines.precision_warning(precision, device, flags=flags, compute_capability=capability)
    if expected is None:
        assert warning is None
    else:
        assert warning.startswith(f"--precision {precision}") and re.search(expected, warning)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n\n"
                       "processor\t: 1\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert engines.cpu_flags(cpuinfo) == {"fpu", "avx2", "amx_bf16", "amx_tile"}
    assert engines.cpu_flags(tmp_path / "missing") == set()


def test_reduced_precision_is_for_the_tensorflow_engine_only(tiny):
    loaded = checkpoints.load_models(model=str(tiny))
    with pytest.raises(engines.EngineError, match=r"--precision bfloat16 runs on --engine tensorflow only"):
        engines.make_forward("onnxruntime", loaded, precision="bfloat16")
    with pytest.raises(engines.EngineError, match=r"--precision float64: expected one of float32, bfloat16, "
                                                  r"float16"):
        engines.make_forward("tensorflow", loaded, precision="float64")


def test_a_bfloat16_run_writes_float32s_masks_away_from_near_ties(tiny, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", random_image((90, 100), 4))
    summary = run(tmp_path / "in", tmp_path / "bf16", tiny, save_probabilities=True, tta=True,
                  precision="bfloat16")
    assert summary.ok_count == 1 and not summary.failed
    assert "engine: tensorflow in bfloat16;" in capsys.readouterr().out
    f32_tta = run(tmp_path / "in", tmp_path / "f32_tta", tiny, save_probabilities=True, tta=True)
    assert f32_tta.ok_count == 1
    exact = np.load(tmp_path / "f32_tta" / "a_probabilities.npy")
    reduced = np.load(tmp_path / "bf16" / "a_probabilities.npy")
    assert reduced.shape == exact.shape == (90, 100, 3) and reduced.dtype == np.float32
    assert 1e-5 < np.abs(reduced - exact).max() < 0.05
    top2 = np.sort(exact, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 0.1
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "bf16" / "a.tif")[clear],
                                  tifffile.imread(tmp_path / "f32_tta" / "a.tif")[clear])


def test_the_cli_refuses_bfloat16_with_onnxruntime_before_anything_is_written(tiny, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", random_image((40, 40), 1))
    code = inference.main(["--model", str(tiny), "--image_folder", str(tmp_path / "in"), "--output_folder",
                           str(tmp_path / "out"), "--engine", "onnxruntime", "--precision", "bfloat16"])
    assert code == inference.EXIT_CANNOT_START
    assert "error: --precision bfloat16 runs on --engine tensorflow only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before the output folder was made
