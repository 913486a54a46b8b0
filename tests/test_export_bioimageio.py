"""export_bioimageio.py: a tiny UNet run folder exported once, then the package checked by
bioimageio.spec, bioimageio.core (when installed) and plain TensorFlow; bad --model folders."""
import contextlib
import io
import json
import sys
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import export_bioimageio
import models

CLASSES = 2


def make_run_folder(folder, name="unet", weights="keras"):
    """A training output folder as the trainer leaves it: config.json plus model.keras, or plus
    checkpoints/best/model.weights.h5 (weights="checkpoint")."""
    folder.mkdir(parents=True, exist_ok=True)
    model = models.build_model(name, CLASSES, input_channels=1, base_filters=4, batch_norm=True)
    if weights == "keras":
        model.save(folder / "model.keras")
    else:
        (folder / "checkpoints" / "best").mkdir(parents=True)
        model.save_weights(folder / "checkpoints" / "best" / "model.weights.h5")
    config = {"model": name, "number_classes": CLASSES, "input_channels": 1, "base_filters": 4,
              "batch_norm": True, "tile_size": 64}
    (folder / "config.json").write_text(json.dumps(config))
    return model


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """(zip path, run folder, printed output) of one export with both weights formats, made with
    bioimageio.spec hidden: the export must work without it and then say how to validate."""
    root = tmp_path_factory.mktemp("export")
    make_run_folder(root / "run")
    output = root / "colonies.zip"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setitem(sys.modules, "bioimageio.spec", None)  # importing it now raises ImportError
        code = export_bioimageio.main(["--model", str(root / "run"), "--output", str(output),
                                       "--author", "Ada Lovelace;Example Institute",
                                       "--cite", "A paper;10.1234/example.5678", "--keras_v3"])
    assert code == 0
    return output, root / "run", printed.getvalue()


def read_member(path, name):
    with zipfile.ZipFile(path) as archive:
        with archive.open(name) as f:
            return np.load(f) if name.endswith(".npy") else f.read()


def extract_saved_model(path, folder):
    with zipfile.ZipFile(path) as archive:
        archive.extract("tf_saved_model.zip", folder)
    with zipfile.ZipFile(folder / "tf_saved_model.zip") as archive:
        archive.extractall(folder / "saved_model")
    return folder / "saved_model"


def test_export_without_bioimageio_spec_writes_the_package_and_says_how_to_validate(package):
    path, _, printed = package
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
    assert names == {"rdf.yaml", "README.md", "cover.png", "test_input.npy", "test_output.npy",
                     "sample_input.tif", "sample_output.tif", "tf_saved_model.zip", "model.onnx",
                     "model.keras"}
    assert "not validated" in printed and "pip install bioimageio.spec" in printed
    assert f"wrote {path}" in printed
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_test_tensors_are_bcyx_and_equal_an_independent_recomputation(package):
    path, run, _ = package
    test_input = read_member(path, "test_input.npy")
    test_output = read_member(path, "test_output.npy")
    minimum, step = export_bioimageio.size_rule(models.geometry("unet"))
    assert test_input.dtype == np.float32 and test_output.dtype == np.float32
    assert test_input.shape == (1, 1, minimum, minimum) and minimum % step == 0
    assert test_output.shape == (1, CLASSES, minimum, minimum)
    np.testing.assert_allclose(test_output.sum(axis=1), 1.0, atol=1e-5)
    assert test_input.std() > 100  # raw intensities, not normalised ones

    # Recompute without the exporter: z-score with numpy, the saved Keras model, softmax.
    image = test_input[0].transpose(1, 2, 0).astype(np.float64)
    normalized = ((image - image.mean(axis=(0, 1))) / image.std(axis=(0, 1))).astype(np.float32)
    model = keras.saving.load_model(run / "model.keras", compile=False)
    logits = np.asarray(model(normalized[np.newaxis], training=False))[0]
    expected = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(test_output[0].transpose(1, 2, 0), expected, atol=1e-5)


def test_rdf_declares_axes_halo_size_rule_preprocessing_and_weights(package):
    ruyaml = pytest.importorskip("ruyaml", reason="ruyaml (a bioimageio.spec dependency) parses YAML")
    path, _, _ = package
    rdf = ruyaml.YAML(typ="safe").load(read_member(path, "rdf.yaml").decode())
    assert rdf["format_version"] == export_bioimageio.KERAS_V3_FORMAT_VERSION and rdf["type"] == "model"
    assert rdf["covers"] == ["cover.png"] and rdf["documentation"] == "README.md"
    assert rdf["authors"] == [{"name": "Ada Lovelace", "affiliation": "Example Institute"}]
    assert rdf["cite"] == [{"text": "A paper", "doi": "10.1234/example.5678"}]
    assert rdf["license"] == "CC-BY-4.0"
    (image,), (output,) = rdf["inputs"], rdf["outputs"]
    assert [a["type"] for a in image["axes"]] == ["batch", "channel", "space", "space"]
    assert [a.get("id") for a in image["axes"][2:]] == ["y", "x"]
    halo = models.geometry("unet").halo
    assert image["axes"][2]["size"] == {"min": 2 * halo + 16, "step": 16}
    assert all(a["halo"] == halo for a in output["axes"][2:])
    assert image["preprocessing"] == [{"id": "zero_mean_unit_variance",
                                       "kwargs": {"axes": ["y", "x"], "eps": 1e-6}}]
    assert output["axes"][1]["channel_names"] == ["class0", "class1"]
    assert "argmax" in output["description"] and "softmax" in output["description"]
    assert rdf["weights"]["tensorflow_saved_model_bundle"]["tensorflow_version"] == tf.__version__
    assert rdf["weights"]["keras_v3"]["keras_version"] == keras.__version__
    readme = read_member(path, "README.md").decode()
    assert "## Validation" in readme and "deepImageJ" in readme and "napari" in readme


def test_package_validates_with_bioimageio_spec(package):
    spec = pytest.importorskip("bioimageio.spec", reason="bioimageio.spec is not installed "
                               "(pip install -r requirements-dev.txt)")
    path, _, _ = package
    summary = spec.load_description(path, perform_io_checks=True).validation_summary
    # "valid-format" is bioimageio.spec's verdict for a package that passes every static check;
    # "passed" also needs the weights to be run (bioimageio.core, the next test).
    assert summary.status == "valid-format", summary.format()


def test_a_package_bioimageio_spec_rejects_is_reported_by_location(package, tmp_path):
    """export_package validates its staging folder this way before writing (an invalid package
    raises ValidationError with these lines and nothing is written)."""
    pytest.importorskip("bioimageio.spec", reason="bioimageio.spec is not installed "
                        "(pip install -r requirements-dev.txt)")
    path, _, _ = package
    with zipfile.ZipFile(path) as archive:
        archive.extractall(tmp_path)
    rdf = (tmp_path / "rdf.yaml").read_text()
    (tmp_path / "rdf.yaml").write_text(rdf.replace('license: "CC-BY-4.0"', 'license: "NOT-A-LICENSE"'))
    summary = export_bioimageio.validate_package(tmp_path / "rdf.yaml")
    assert summary.status == "failed"
    lines = export_bioimageio.describe_errors(summary).splitlines()
    assert lines and all(line.strip().startswith("license") and len(line) < 400 for line in lines)


def test_bioimageio_core_reproduces_the_test_output_with_every_weights_format(package, tmp_path,
                                                                              monkeypatch):
    core = pytest.importorskip("bioimageio.core", reason="bioimageio.core is not installed "
                               "(pip install -r requirements-dev.txt)")
    path, _, _ = package
    monkeypatch.chdir(tmp_path)  # bioimageio.core unzips TensorFlow weights into the working folder
    summary = core.test_model(path)
    tested = {detail.loc for detail in summary.details if detail.name.startswith("Reproduce")}
    assert tested == {("weights", "keras_v3"), ("weights", "tensorflow_saved_model_bundle"),
                      ("weights", "onnx")}
    assert summary.status == "passed", summary.format()
    # The sample tensors are filled (bioimage.io warns "needs to be filled for FAIR" otherwise).
    assert not [w for d in summary.details for w in d.warnings if "sample_tensor" in str(w.loc)]


def test_saved_model_alone_reproduces_the_test_output(package, tmp_path):
    path, _, _ = package
    loaded = tf.saved_model.load(str(extract_saved_model(path, tmp_path)))
    test_input = read_member(path, "test_input.npy")
    # The preprocessing rdf.yaml declares: zero mean, unit variance over y, x (eps 1e-6).
    mean = test_input.mean(axis=(2, 3), keepdims=True)
    normalized = (test_input - mean) / (test_input.std(axis=(2, 3), keepdims=True) + 1e-6)
    result = loaded.signatures["serving_default"](image=tf.constant(normalized, tf.float32))
    assert set(result) == {"probabilities"}
    np.testing.assert_allclose(result["probabilities"].numpy(), read_member(path, "test_output.npy"),
                               atol=1e-4)
    # Tiles of any valid size and batch give probabilities of the same size.
    batch = np.random.default_rng(0).normal(size=(2, 1, 288, 304)).astype(np.float32)
    assert loaded.serve(batch)["probabilities"].shape == (2, CLASSES, 288, 304)


def test_default_segnet_export_from_a_checkpoint_has_saved_model_weights_only(tmp_path):
    """The default package carries the SavedModel alone and the oldest format version, so older
    bioimage.io readers accept it; the run has only a checkpoint, rebuilt from config.json."""
    make_run_folder(tmp_path / "run", name="segnet", weights="checkpoint")
    with pytest.raises(export_bioimageio.ExportError, match="--keras_v3: the segnet of .*layers of"):
        export_bioimageio.export_package(export_bioimageio.ExportConfig(
            model=str(tmp_path / "run"), output=str(tmp_path / "segnet.zip"), keras_v3=True))
    assert not (tmp_path / "segnet.zip").exists()

    output, summary = export_bioimageio.export_package(export_bioimageio.ExportConfig(
        model=str(tmp_path / "run"), output=str(tmp_path / "segnet.zip")))
    assert summary is None or summary.status == "valid-format", summary.format()
    with zipfile.ZipFile(output) as archive:
        assert "model.keras" not in archive.namelist()
        rdf = archive.read("rdf.yaml").decode()
    assert f'format_version: "{export_bioimageio.FORMAT_VERSION}"' in rdf
    assert "keras_v3" not in rdf and "tensorflow_saved_model_bundle:" in rdf
    minimum, step = export_bioimageio.size_rule(models.geometry("segnet"))
    assert step == 32 and minimum == 2 * models.geometry("segnet").halo + 32
    assert read_member(output, "test_output.npy").shape == (1, CLASSES, minimum, minimum)


def _bad_run(folder, case):
    if case == "missing folder":
        return folder / "nope"
    folder.mkdir()
    config = {"model": "unet", "number_classes": 2, "input_channels": 1, "base_filters": 4,
              "batch_norm": True, "tile_size": 64}
    if case == "unknown model":
        config["model"] = "resnet"
        make_run_folder(folder)
    if case != "no config.json":
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("case, message", [
    ("missing folder", "not a folder"),
    ("no config.json", "no config.json"),
    ("no weights", "no model weights"),
    ("unknown model", "'resnet' is not one of unet, segnet"),
])
def test_bad_model_folder_exits_2_names_the_path_and_writes_nothing(tmp_path, capsys, case, message):
    run = _bad_run(tmp_path / "run", case)
    output = tmp_path / "out.zip"
    output.write_bytes(b"previous package")
    assert export_bioimageio.main(["--model", str(run), "--output", str(output)]) == 2
    error = capsys.readouterr().err
    assert message in error and str(run) in error
    assert output.read_bytes() == b"previous package"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zip", "run"][:1 + run.exists()]


def test_bad_flags_exit_2_before_any_work(tmp_path, capsys):
    make_run_folder(tmp_path / "run")
    for argv, message in [(["--output", str(tmp_path / "a.tar")], "must end in .zip"),
                          (["--output", str(tmp_path / "a.zip"), "--name", "bad/name"], "--name"),
                          (["--output", str(tmp_path / "a.zip"), "--cite", "no doi"], "TEXT;DOI")]:
        assert export_bioimageio.main(["--model", str(tmp_path / "run"), *argv]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_sample_image_is_read_and_fitted_to_a_square_the_package_accepts(tmp_path):
    import tifffile
    minimum, step = export_bioimageio.size_rule(models.geometry("unet"))
    planar = np.arange(2 * 600 * 1000, dtype=np.uint16).reshape(2, 600, 1000)  # C x H x W TIFF
    tifffile.imwrite(tmp_path / "planar.tif", planar)
    image = export_bioimageio.read_sample(tmp_path / "planar.tif", channels=2)
    assert image.shape == (600, 1000, 2) and image.dtype == np.uint16
    fitted = export_bioimageio.fit_to_size_rule(image, minimum, step)
    assert fitted.shape == (512, 512, 2)  # MAX_TEST_SIDE, centred
    np.testing.assert_array_equal(fitted, image[44:556, 244:756])
    small = export_bioimageio.fit_to_size_rule(image[:256, :300], minimum, step)
    assert small.shape == (minimum, minimum, 2)  # mirror-padded up to the smallest tile
    np.testing.assert_array_equal(small[8:264, :, 0], image[:256, 14:286, 0])
    expected = r"planar.tif: .*shape \(2, 600, 1000\)\), the model expects 3"
    with pytest.raises(export_bioimageio.ExportError, match=expected):
        export_bioimageio.read_sample(tmp_path / "planar.tif", channels=3)


def test_a_sample_with_nan_or_values_float32_cannot_hold_is_refused_by_name(tmp_path):
    import tifffile
    image = np.ones((100, 100), np.float32)
    image[3, 4] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", image)
    with pytest.raises(export_bioimageio.ExportError, match=r"nan.tif: 1 pixel value\(s\) are NaN or Inf"):
        export_bioimageio.read_sample(tmp_path / "nan.tif", channels=1)
    # 1e8 + a spread of 33: float32 keeps a fraction of the values (the test output was 0.97 off).
    offset = (100_000_000 + np.arange(100 * 100).reshape(100, 100) % 100).astype(np.int32)
    tifffile.imwrite(tmp_path / "offset.tif", offset)
    with pytest.raises(export_bioimageio.ExportError,
                       match="offset.tif: its int32 values are not all exact in float32"):
        export_bioimageio.read_sample(tmp_path / "offset.tif", channels=1)
    tifffile.imwrite(tmp_path / "fine.tif", offset - 100_000_000)
    assert export_bioimageio.read_sample(tmp_path / "fine.tif", channels=1).shape == (100, 100, 1)


def test_a_failed_write_exits_2_naming_the_output_and_keeps_the_old_package(tmp_path, capsys, monkeypatch):
    make_run_folder(tmp_path / "run")
    output = tmp_path / "out.zip"
    output.write_bytes(b"previous package")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_bioimageio, "write_zip_atomically", full_disk)
    assert export_bioimageio.main(["--model", str(tmp_path / "run"), "--output", str(output), "--no_validate"]) == 2
    assert f"--output {output}: cannot write it (No space left on device); an existing file there is unchanged" \
        in capsys.readouterr().err
    assert output.read_bytes() == b"previous package"


def test_yaml_writer_round_trips_through_a_yaml_parser():
    ruyaml = pytest.importorskip("ruyaml", reason="ruyaml (a bioimageio.spec dependency) parses YAML")
    value = {"a": "text: with 'quotes' and \"more\"\nand a newline", "n": 3, "eps": 1e-6,
             "range": [0.0, 1.0], "flag": True, "none": None, "empty": [], "version": "2.21",
             "nested": [{"id": "y", "size": {"min": 272, "step": 16}}, ["tensorflow", "2.21.0"]]}
    assert ruyaml.YAML(typ="safe").load("\n".join(export_bioimageio.to_yaml(value))) == value


def test_help_names_every_flag():
    text = export_bioimageio.build_parser().format_help()
    for flag in ("--model", "--output", "--name", "--description", "--author", "--license", "--cite",
                 "--sample_image"):
        assert flag in text
