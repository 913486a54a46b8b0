"""engines.py and inference.py --engine onnxruntime: the ONNX export agrees with TensorFlow (softmax
within 1e-4, also with test-time augmentation and an ensemble), its cache, and the missing package."""
import pathlib
import sys

import numpy as np
import pytest
import tifffile

import checkpoints
import engines
import inference
import normalization
import predictor
from test_sharding import random_image, run, save_tiny_unet

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -r requirements.txt)")


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two tiny UNets loaded as inference loads them (their ONNX caches are made beside them)."""
    folder = tmp_path_factory.mktemp("onnx_models")
    paths = [save_tiny_unet(folder / f"m{seed}", seed=seed) for seed in (0, 1)]
    return checkpoints.load_models(model=[str(p) for p in paths])


def softmax_of(forward, image, members, tta):
    stats = normalization.channel_statistics(image)
    first = members[0]
    logits = predictor.predict_image(forward, image, stats, first.geometry, 72, tta=tta)
    return inference.softmax(logits)


@pytest.mark.parametrize("tta, ensemble", [(False, False), (True, False), (False, True)])
def test_onnxruntime_and_tensorflow_agree_on_probabilities(members, tta, ensemble):
    chosen = members if ensemble else members[:1]
    image = random_image((90, 100, 1), 5)
    expected = softmax_of(engines.make_forward("tensorflow", chosen), image, chosen, tta)
    got = softmax_of(engines.make_forward("onnxruntime", chosen, announce=lambda _: None), image, chosen,
                     tta)
    assert got.shape == expected.shape == (90, 100, 3)
    assert np.abs(got - expected).max() < 1e-4


def test_the_cache_of_a_checkpoint_is_its_folders_model_onnx(tmp_path):
    # A checkpoint is loaded from its weights file; before, the cache was "model.weights.onnx".
    best = tmp_path / "run" / "checkpoints" / "best"
    assert engines.onnx_cache_path(best / "model.weights.h5") == best / "model.onnx"
    assert engines.onnx_cache_path(tmp_path / "unet_a.keras") == tmp_path / "unet_a.onnx"


def test_the_export_is_cached_beside_the_model_and_remade_when_the_model_changes(members, tmp_path):
    member = members[0]
    path, note = engines.cached_onnx(member)
    assert path == pathlib.Path(member.source).parent / "model.onnx" and note == f"cached {path}"  # made above
    copy = save_tiny_unet(tmp_path / "copy", seed=3)
    loaded = checkpoints.load_models(model=str(copy))[0]
    assert engines.cached_onnx(loaded)[1].startswith("exported to ")
    assert engines.cached_onnx(loaded)[1].startswith("cached ")
    save_tiny_unet(tmp_path / "copy", seed=4)  # a retrained model under the same name
    assert engines.cached_onnx(loaded)[1].startswith("exported to ")


def test_run_with_the_onnx_engine_writes_tensorflows_outputs(members, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", random_image((70, 80), 1))
    model = pathlib.Path(members[0].source).parent
    run(tmp_path / "in", tmp_path / "tf", model, save_probabilities=True)
    summary = run(tmp_path / "in", tmp_path / "onnx", model, save_probabilities=True, tta=True,
                  engine="onnxruntime")
    assert summary.ok_count == 1
    assert "engine: onnxruntime;" in capsys.readouterr().out
    tta_tf = run(tmp_path / "in", tmp_path / "tf_tta", model, save_probabilities=True, tta=True)
    assert tta_tf.ok_count == 1
    probabilities = np.load(tmp_path / "onnx" / "a_probabilities.npy")
    assert np.abs(probabilities - np.load(tmp_path / "tf_tta" / "a_probabilities.npy")).max() < 1e-4
    labels = tifffile.imread(tmp_path / "onnx" / "a.tif")
    top2 = np.sort(probabilities, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-4  # away from ties the class ids are equal
    np.testing.assert_array_equal(labels[clear], tifffile.imread(tmp_path / "tf_tta" / "a.tif")[clear])


def test_a_missing_onnxruntime_is_named_with_the_fix(members, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(engines.EngineError, match=r"--engine onnxruntime needs the onnxruntime and "
                                                  r"tf2onnx packages \(pip install onnxruntime tf2onnx"):
        engines.make_forward("onnxruntime", members[:1])
    with pytest.raises(engines.EngineError, match="--engine openvino: expected one of tensorflow, "
                                                  "onnxruntime"):
        engines.make_forward("openvino", members[:1])
