"""inference.py under faults and hostile inputs (issue 22, items 1-4 and 9): SIGTERM / SIGINT while an
image is streamed, scratch left by killed runs, a TIFF damaged midway, messages that name the real
problem, the axes a file declares, and the ensemble's architecture and normalisation checks."""
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tifffile

import checkpoints
import image_io
import inference
import models
import trainer
import writers
from conftest import make_synthetic_db
# The saved 1- and 3-channel UNets of test_inference (module fixtures: built again for this module).
from test_inference import save_model_folder, unet_1ch, unet_3ch  # noqa: F401

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _images(folder, **images):
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        tifffile.imwrite(folder / name, image)
    return folder


def _dead_pid():
    """The id of a process of this host that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _host():
    return socket.gethostname().replace("-", "_").replace(".", "_") or "host"


# ----------------------------------------------------------------------------------------------
# 1. SIGTERM / SIGINT while an image is written; scratch of killed runs
# ----------------------------------------------------------------------------------------------

def test_sigterm_while_streaming_removes_the_scratch_and_exits_143(tmp_path, unet_1ch):
    folder, _ = unet_1ch
    rng = np.random.default_rng(0)
    # "b_large" is above STREAM_PIXELS (2048 x 2048): written tile by tile into a scratch file.
    images = _images(tmp_path / "images", **{
        "a_small.tif": rng.integers(0, 4000, (40, 50), dtype=np.uint16),
        "b_large.tif": rng.integers(0, 255, (2304, 2048), dtype=np.uint8)})
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "inference.py"), "--model", str(folder), "--image_folder", str(images),
         "--output_folder", str(out), "--tile_size", "288"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob(".b_large.tif.*.tmp")):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the scratch file of b_large.tif never appeared"
            time.sleep(0.05)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 143, stderr
    assert time.monotonic() - signalled < 30
    assert "interrupted by SIGTERM while segmenting b_large.tif" in stderr and "Traceback" not in stderr
    assert sorted(os.listdir(out)) == ["a_small.tif"], "scratch left behind"
    assert tifffile.imread(out / "a_small.tif").shape == (40, 50)
    assert "a_small.tif" in stdout


def test_sigterm_after_the_run_ended_keeps_its_exit_code(tmp_path, unet_1ch):
    # After its last line inference.py still takes seconds to shut Python and TensorFlow down; a job's
    # time limit arriving then must not turn a complete run's exit code into -15.
    folder, _ = unet_1ch
    images = _images(tmp_path / "images", **{"a.tif": np.ones((40, 50), np.uint16)})
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "inference.py"), "--model", str(folder), "--image_folder", str(images),
         "--output_folder", str(tmp_path / "out"), "--tile_size", "288"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, "TF_CPP_MIN_LOG_LEVEL": "2"})
    try:
        # stdout is a buffered pipe, so the last line arrives when Python flushes it while shutting
        # down: the signal lands then (without the fix: exit -15).
        for line in process.stdout:
            if line.startswith("done: 1 mask(s) written"):
                process.send_signal(signal.SIGTERM)
                break
        else:
            pytest.fail(f"no 'done:' line; stderr: {process.stderr.read()[-2000:]}")
        process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert tifffile.imread(tmp_path / "out" / "a.tif").shape == (40, 50)


def test_sigterm_after_the_last_image_says_so(tmp_path, unet_1ch, monkeypatch, capsys):
    import uncertainty
    folder, _ = unet_1ch
    images = _images(tmp_path / "images", **{"a.tif": np.ones((40, 40), np.uint16)})
    write_ranking = uncertainty.write_ranking

    def signalled(*args, **kwargs):  # a job's time limit, while the ranking is written
        os.kill(os.getpid(), signal.SIGTERM)
        return write_ranking(*args, **kwargs)

    monkeypatch.setattr(uncertainty, "write_ranking", signalled)
    code = inference.main(["--model", str(folder), "--image_folder", str(images), "--output_folder",
                           str(tmp_path / "out"), "--tile_size", "288", "--uncertainty_csv",
                           str(tmp_path / "ranking.csv")])
    assert code == 143
    assert ("interrupted by SIGTERM after the last image (an --uncertainty_csv ranking may not be updated)"
            in capsys.readouterr().err)
    assert tifffile.imread(tmp_path / "out" / "a.tif").shape == (40, 40)


def test_sigint_removes_zarr_scratch_folders_and_exits_130(tmp_path, unet_1ch, monkeypatch, capsys):
    import zarr
    folder, _ = unet_1ch
    images = _images(tmp_path / "images", **{"a.tif": np.ones((40, 40), np.uint16)})
    zarr.create_array(store=str(images / "b.zarr"), data=np.random.default_rng(1).integers(
        0, 900, (600, 200), dtype=np.uint16), chunks=(64, 64))
    bands = inference.predictor.iter_bands

    def interrupted_bands(*args, **kwargs):
        # Ctrl-C arrives after the first band of b.zarr is written into the scratch folders.
        for count, band in enumerate(bands(*args, **kwargs)):
            if count == 1 and args[1].name == "b.zarr":  # args[1]: the image source
                os.kill(os.getpid(), signal.SIGINT)
            yield band

    monkeypatch.setattr(inference.predictor, "iter_bands", interrupted_bands)
    handler = signal.getsignal(signal.SIGINT)
    try:
        code = inference.main(["--model", str(folder), "--image_folder", str(images), "--output_folder",
                               str(tmp_path / "out"), "--tile_size", "288", "--save_probabilities"])
    except KeyboardInterrupt:  # would stop the whole pytest session
        pytest.fail("SIGINT escaped inference.main() as KeyboardInterrupt")

    assert code == 130
    assert "interrupted by SIGINT while segmenting b.zarr" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "out")) == ["a.tif", "a_probabilities.npy"]
    assert signal.getsignal(signal.SIGINT) is handler, "main() restores the handlers it replaced"


def test_a_later_run_removes_scratch_of_killed_runs_only(tmp_path, unet_1ch, capsys):
    folder, _ = unet_1ch
    images = _images(tmp_path / "images", **{"a.tif": np.ones((40, 40), np.uint16)})
    out = tmp_path / "out"
    out.mkdir()
    dead, host = _dead_pid(), _host()
    (out / f".x.tif.{host}-{dead}.tmp").write_bytes(b"half a tiff")
    (out / f".y.zarr.{host}-{dead}.tmp").mkdir()
    (out / f".y.zarr.{host}-{dead}.tmp" / "zarr.json").write_text("{}")
    # Killed between the two renames of a folder swap: the previous output is moved back.
    (out / f".z.zarr.{host}-{dead}.old").mkdir()
    kept = [f".w.tif.{host}-{os.getpid()}.tmp", f".v.tif.otherhost-{dead}.tmp"]  # running; another host
    for name in kept:
        (out / name).write_bytes(b"in progress")

    assert inference.main(["--model", str(folder), "--image_folder", str(images),
                           "--output_folder", str(out)]) == 0

    assert sorted(os.listdir(out)) == sorted(["a.tif", "z.zarr"] + kept)
    stdout = capsys.readouterr().out
    assert f"removed {out / f'.x.tif.{host}-{dead}.tmp'}, left by process {dead}" in stdout
    assert f"restored {out / 'z.zarr'}" in stdout


# ----------------------------------------------------------------------------------------------
# 2. An image damaged midway fails by name; the folder goes on
# ----------------------------------------------------------------------------------------------

def test_a_truncated_tiled_bigtiff_fails_by_name_and_the_next_image_is_done(tmp_path, unet_1ch, capsys):
    folder, _ = unet_1ch
    rng = np.random.default_rng(2)
    images = _images(tmp_path / "images", **{"b_good.tif": rng.integers(0, 900, (60, 70), dtype=np.uint16)})
    tifffile.imwrite(images / "a_cut.tif", rng.integers(0, 900, (512, 512), dtype=np.uint16),
                     tile=(64, 64), bigtiff=True)
    data = (images / "a_cut.tif").read_bytes()
    (images / "a_cut.tif").write_bytes(data[:len(data) // 2])  # the header is intact, half the tiles not

    code = inference.main(["--model", str(folder), "--image_folder", str(images),
                           "--output_folder", str(tmp_path / "out")])

    stderr = capsys.readouterr().err
    assert code == 1
    assert "FAILED a_cut.tif: cannot read rows" in stderr and "damaged or truncated" in stderr
    assert "Traceback" not in stderr
    assert os.listdir(tmp_path / "out") == ["b_good.tif"]


class _FailsAfter:
    """An array whose reads fail after ``reads`` of them: damage met during the prediction."""

    def __init__(self, array, reads):
        self.array, self.reads = array, reads
        self.dtype, self.shape, self.chunks = array.dtype, array.shape, getattr(array, "chunks", None)

    def __getitem__(self, index):
        self.reads -= 1
        if self.reads < 0:
            raise tifffile.TiffFileError("corrupted tile @ (0, 0, 384, 0, 0)")
        return self.array[index]


def test_a_read_error_during_the_streamed_write_leaves_no_output(tmp_path, unet_1ch, monkeypatch):
    folder, _ = unet_1ch
    rng = np.random.default_rng(3)
    images = _images(tmp_path / "images", **{"a.tif": rng.integers(0, 900, (300, 200), dtype=np.uint16),
                                              "b.tif": rng.integers(0, 900, (60, 70), dtype=np.uint16)})
    opened = image_io.open_image

    def damaged_open(path, channels):
        source = opened(path, channels)
        if path.name == "a.tif":
            source.array = _FailsAfter(source.array, reads=1)  # the statistics pass reads it once
        return source

    monkeypatch.setattr(image_io, "open_image", damaged_open)
    monkeypatch.setattr(writers, "STREAM_PIXELS", 1000)
    summary = inference.run_inference(inference.InferenceConfig(
        image_folder=str(images), output_folder=str(tmp_path / "out"), model=str(folder), tile_size=288,
        save_probabilities=True))

    assert list(summary.failed) == ["a.tif"] and "cannot read rows" in summary.failed["a.tif"]
    assert sorted(os.listdir(tmp_path / "out")) == ["b.tif", "b_probabilities.zarr"]


# ----------------------------------------------------------------------------------------------
# 3. Messages that name the real problem
# ----------------------------------------------------------------------------------------------

def test_damaged_and_foreign_models_and_stacks_are_named_for_what_they_are(tmp_path, unet_1ch, capsys):
    import zarr
    folder, _ = unet_1ch
    images = _images(tmp_path / "images", **{"a.tif": np.ones((40, 40), np.uint16)})
    common = ["--image_folder", str(images), "--output_folder", str(tmp_path / "out")]
    damaged = tmp_path / "damaged.keras"
    damaged.write_bytes((folder / "model.keras").read_bytes()[:3000])  # an interrupted copy
    assert inference.main(["--model", str(damaged)] + common) == 2
    message = capsys.readouterr().err
    assert f"{damaged}: the file exists but cannot be read as a Keras model" in message
    assert "may be damaged" in message and "not found" not in message.lower()

    # Another program's model that happens to be named "unet", without a config.json.
    inputs = keras.Input((None, None, 1))
    foreign = keras.Model(inputs, keras.layers.Conv2D(2, 3, padding="same")(inputs), name="unet")
    foreign.save(tmp_path / "foreign.keras")
    assert inference.main(["--model", str(tmp_path / "foreign.keras")] + common) == 2
    message = capsys.readouterr().err
    assert f"{tmp_path / 'foreign.keras'} is not a model trained by this tool" in message
    assert "--unet_depth" not in message and "train_unet.py" in message

    stack = tmp_path / "stack"
    zarr.create_array(store=str(_images(stack) / "s.zarr"), data=np.zeros((5, 256, 256), np.uint16),
                      chunks=(1, 128, 128))
    assert inference.main(["--model", str(folder), "--image_folder", str(stack),
                           "--output_folder", str(tmp_path / "out")]) == 1
    message = capsys.readouterr().err
    assert "s.zarr: shape (5, 256, 256) without axis names: a stack of 5 planes along its first axis" in message
    assert "256 channel(s)" not in message


# ----------------------------------------------------------------------------------------------
# 4. The axes a file declares
# ----------------------------------------------------------------------------------------------

def test_declared_axes_are_used_and_stacks_refused_by_name(tmp_path, unet_3ch, capsys):
    import zarr
    folder, _ = unet_3ch
    planes = np.random.default_rng(4).integers(0, 900, (3, 64, 80), dtype=np.uint16)
    images = tmp_path / "images"
    images.mkdir()
    # Three planes beside a 3-channel model: channels only when the file says so.
    tifffile.imwrite(images / "z.ome.tif", planes, metadata={"axes": "ZYX"})
    tifffile.imwrite(images / "t.tif", planes, imagej=True, metadata={"axes": "TYX"})
    tifffile.imwrite(images / "c.tif", planes, metadata={"axes": "CYX"})
    tifffile.imwrite(images / "rgb.tif", np.moveaxis(planes, 0, -1).astype(np.uint8), photometric="rgb")
    tifffile.imwrite(images / "q.tif", planes, photometric="minisblack")  # shaped, no axes
    with tifffile.TiffWriter(images / "two.tif") as tif:
        tif.write(planes, metadata={"axes": "CYX"})
        tif.write(planes[0], metadata={"axes": "YX"})
    group = zarr.open_group(str(images / "zyx.zarr"), mode="w", zarr_format=2)
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}], "axes": [
        {"name": "z", "type": "space"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]}]
    group.create_array("0", data=planes, chunks=(1, 64, 64))

    summary = inference.run_inference(inference.InferenceConfig(
        image_folder=str(images), output_folder=str(tmp_path / "out"), model=str(folder)))

    assert sorted(summary.failed) == ["t.tif", "z.ome.tif", "zyx.zarr"]
    assert "z.ome.tif: a Z stack of 3 planes (axes Z Y X" in summary.failed["z.ome.tif"]
    assert "t.tif: a time series of 3 frames (axes T Y X" in summary.failed["t.tif"]
    assert "zyx.zarr: a Z stack of 3 planes" in summary.failed["zyx.zarr"]
    assert sorted(os.listdir(tmp_path / "out")) == ["c.tif", "q.tif", "rgb.tif", "two.tif"]
    masks = {name: tifffile.imread(tmp_path / "out" / name) for name in ("c.tif", "q.tif", "two.tif")}
    assert all(mask.shape == (64, 80) for mask in masks.values())
    np.testing.assert_array_equal(masks["q.tif"], masks["c.tif"])
    np.testing.assert_array_equal(masks["two.tif"], masks["c.tif"])
    stdout = capsys.readouterr().out
    assert "q.tif: the file does not declare its axes; shape (3, 64, 80) read as C x H x W" in stdout
    assert "c.tif: the file does not declare" not in stdout
    assert "two.tif: holds 2 image series; segmenting the first, series 0 (axes CYX" in stdout


# ----------------------------------------------------------------------------------------------
# 9. Ensembles: architecture and normalisation must match
# ----------------------------------------------------------------------------------------------

def test_ensemble_refuses_other_architecture_and_other_normalisation(tmp_path, capsys):
    dbs = tmp_path / "dbs"
    make_synthetic_db(dbs / "train", num_records=4, shape=(32, 32), seed=0)
    make_synthetic_db(dbs / "test", num_records=2, shape=(32, 32), seed=1)
    trained = tmp_path / "trained"
    code = trainer.main("unet", [str(a) for a in [
        "--train_database", dbs / "train", "--test_database", dbs / "test", "--output_dir", trained,
        "--batch_size", 2, "--tile_size", 32, "--base_filters", 2, "--unet_depth", 2, "--max_steps", 1,
        "--log_every_n_steps", 1]])
    assert code == 0
    config = json.loads((trained / "config.json").read_text())
    assert config["normalization"] == checkpoints.NORMALIZATION

    # The same task with another depth: another halo and size divisor.
    keras.utils.set_random_seed(0)
    deeper = tmp_path / "deeper"
    deeper.mkdir()
    models.build_model("unet", 2, input_channels=1, base_filters=2, unet_depth=3).save(deeper / "model.keras")
    (deeper / "config.json").write_text(json.dumps(dict(config, unet_depth=3)))
    # The same network, trained on inputs normalised another way.
    other = tmp_path / "other_normalisation"
    shutil.copytree(trained, other)
    (other / "config.json").write_text(json.dumps(dict(config, normalization="min-max to [0, 1]")))

    images = _images(tmp_path / "images", **{"a.tif": np.ones((40, 40), np.uint16)})
    common = ["--image_folder", str(images), "--output_folder", str(tmp_path / "out")]
    capsys.readouterr()
    for member, what in [(deeper, "architecture"), (other, "normalisation")]:
        assert inference.main(["--model", str(trained), str(member)] + common) == 2
        message = capsys.readouterr().err
        assert f"ensemble members differ in {what}" in message and str(member) in message
    assert "'min-max to [0, 1]'" in message
    assert not (tmp_path / "out").exists()
    # An older member without the record used the same normalisation: accepted.
    older = tmp_path / "older"
    shutil.copytree(trained, older)
    (older / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "normalization"}))
    assert inference.main(["--model", str(trained), str(older)] + common) == 0
