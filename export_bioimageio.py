"""Export a trained UNet/SegNet as a bioimage.io model package (model spec 0.5) for deepImageJ,
napari and bioimage.io's own tools.

    python export_bioimageio.py --model runs/unet --output unet_colonies.zip \\
        --author "Ada Lovelace;Example Institute" --sample_image my_images/a.tif

The package (one zip) holds:
  rdf.yaml              the model description (type model, format_version FORMAT_VERSION, or
                        KERAS_V3_FORMAT_VERSION with --keras_v3)
  README.md             generated documentation (inputs, outputs, use in napari/deepImageJ, validation)
  cover.png             the test input | its predicted class mask
  test_input.npy        float32 (1, C, H, W) raw image (before normalisation), batch-channel-y-x order
  test_output.npy       float32 (1, K, H, W) class probabilities for it, computed by inference.py's tiled
                        predictor (the same code that segments images here)
  tf_saved_model.zip    TensorFlow SavedModel (serving signature "serve"/"serving_default":
                        float32 (B, C, H, W) "image" -> {"probabilities": float32 (B, K, H, W)})
  model.onnx            ONNX (exported by Keras's own exporter, engines.export_onnx): the same network
                        and tensors as the SavedModel; run by bioimageio.core and ilastik through
                        ONNX Runtime
  sample_input.tif      the test input and its probabilities as TIFF (1, C, H, W) / (1, K, H, W): the
  sample_output.tif     "sample_tensor" of rdf.yaml, which bioimage.io asks for (FAIR) and shows
  model.keras           with --keras_v3 only: the same network as a Keras 3 file (weights format
                        keras_v3, which bioimageio.core runs). Not the default because readers older
                        than bioimageio.spec 0.5.8 reject a package with keras_v3 weights, and deepImageJ
                        runs only the SavedModel; not possible for SegNet, whose custom pooling layers
                        need this project's code to load

The exported network takes batch-channel-y-x tensors and ends in a softmax over the class channel:
its output is per-class probabilities, and the class mask is their argmax over the channel axis (the
same as inference.py's masks). Input normalisation is not part of the weights; rdf.yaml declares it as
the bioimage.io preprocessing ``zero_mean_unit_variance`` over y and x (per sample, per channel), which
is what this project's per-image z-score does. The halo (context to crop from each side of a tile) is
models.geometry(model).halo and the tile sizes are multiples of the model's size divisor (16 UNet,
32 SegNet), at least 2 halos + one divisor.

When bioimageio.spec is installed the package is validated before it is written (an invalid package
is an error and nothing is written); otherwise the command prints how to validate it. The zip is
written to a temporary file next to --output and renamed over it, so --output is either the old file
or the complete new package.
"""
import argparse
import dataclasses
import datetime
import functools
import getpass
import json
import os
import pathlib
import string
import sys
import tempfile
import zipfile

import imageio.v3 as iio
import keras
import numpy as np
import onnx
import tensorflow as tf
import tifffile

import checkpoints
import engines
import image_io
import models
import normalization
import predictor

# The oldest 0.5 format that has everything the package uses, so that older bioimage.io readers
# accept it too (newer ones read any 0.5.x): bioimageio.spec 0.5.11+ writes covers/documentation as
# {source, sha256} entries that readers before 0.5.11 reject, and keras_v3 weights exist from 0.5.8.
FORMAT_VERSION = "0.5.4"
KERAS_V3_FORMAT_VERSION = "0.5.8"
INPUT_ID = "image"
OUTPUT_ID = "probabilities"
SERVING_ENDPOINT = "serve"
# bioimage.io's default epsilon of zero_mean_unit_variance: (x - mean) / (std + eps). Our z-score
# divides by std alone (and maps a constant channel to zeros); for microscopy images, whose std is
# many grey levels, the two differ by a relative 1e-6 / std, far below the test tolerance.
ZMUV_EPS = 1e-6
# Test tensors and the cover use at most this many pixels a side (keeps the package small).
MAX_TEST_SIDE = 512
COVER_HEIGHT = 300
DEFAULT_LICENSE = "CC-BY-4.0"
# Characters bioimage.io allows in a model name.
NAME_CHARACTERS = set(string.ascii_letters + string.digits + "_+- ()")
# Class colours of the cover's mask panel (class 0, the background in most runs, black).
PALETTE = np.array([[0, 0, 0], [255, 200, 0], [0, 170, 255], [230, 60, 60], [80, 200, 80],
                    [200, 90, 220], [255, 140, 0], [0, 210, 190], [160, 160, 160], [255, 255, 255]],
                   dtype=np.uint8)


class ExportError(Exception):
    """The package cannot be made: bad run folder, flags or sample image. Nothing is written."""


class ValidationError(Exception):
    """bioimageio.spec rejected the package; the message holds its summary. Nothing is written."""


@dataclasses.dataclass
class ExportConfig:
    """The CLI flags as plain values.

    ``authors`` are (name, affiliation or None) pairs, ``cite`` (text, DOI or URL) pairs; empty means
    the defaults (the login name; the architecture's paper). ``sample_image`` None -> a generated
    image of bright disks on a noisy background. ``keras_v3`` adds model.keras next to the SavedModel.
    """
    model: str
    output: str
    name: str | None = None
    description: str | None = None
    authors: tuple = ()
    license: str = DEFAULT_LICENSE
    cite: tuple = ()
    tags: tuple = ()
    sample_image: str | None = None
    keras_v3: bool = False
    validate: bool = True


@dataclasses.dataclass
class TrainedRun:
    """A training output folder's model and the facts the package states about it."""
    folder: pathlib.Path
    config: dict
    model: keras.Model
    name: str
    number_classes: int
    input_channels: int
    weights_source: pathlib.Path

    @property
    def options(self):
        """The network's shape options from config.json (e.g. unet_depth), which set its size
        divisor and halo."""
        return {key: self.config[key] for key in models.OPTION_KEYS if key in self.config}

    @functools.cached_property
    def geometry(self):
        """The network's models.Geometry (size divisor, receptive field, halo, smallest tile)."""
        return models.geometry(self.name, **self.options)


# ----------------------------------------------------------------------------------------------
# The run folder
# ----------------------------------------------------------------------------------------------

def load_run(folder):
    """Read RUN_DIR/config.json and its best model (model.keras, else checkpoints/best|latest).

    Returns:
      TrainedRun. Raises ExportError naming the path when the folder, its config or its weights are missing,
      unreadable or describe an unknown model.
    """
    folder = pathlib.Path(folder)
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise ExportError(f"--model {folder}: not a folder (expected a training output folder "
                          f"holding config.json and model.keras)")
    if not config_path.is_file():
        raise ExportError(f"--model {folder}: no config.json in it (expected a training output "
                          f"folder written by train_unet.py / train_segnet.py)")
    keras_path = folder / "model.keras"
    source = keras_path if keras_path.is_file() else checkpoints.find_checkpoint(
        str(folder), prefer="best", required=(checkpoints.WEIGHTS_FILE,))
    if source is None:
        raise ExportError(f"--model {folder}: no model weights in it (looked for model.keras, "
                          f"checkpoints/best/{checkpoints.WEIGHTS_FILE} and "
                          f"checkpoints/latest/{checkpoints.WEIGHTS_FILE})")
    try:
        trained = checkpoints.load_trained(source)
    except checkpoints.ModelLoadError as exc:
        raise ExportError(str(exc)) from exc
    model, name, config, config_path = trained.model, trained.name, trained.config, trained.config_path
    missing = [key for key in models.CONFIG_KEYS if key not in config]
    if missing:
        raise ExportError(f"{config_path} lacks {', '.join(missing)} (needed to describe the model)")
    if int(model.input_shape[-1]) != int(config["input_channels"]):
        raise ExportError(f"{source} takes {model.input_shape[-1]} channel(s) but {config_path} says "
                          f"input_channels {config['input_channels']}")
    return TrainedRun(folder=folder, config=config, model=model, name=name,
               number_classes=int(model.output_shape[-1]), input_channels=int(model.input_shape[-1]),
               weights_source=pathlib.Path(trained.source))


def size_rule(geometry):
    """(minimum, step) of the tile side the package declares for a network of this models.Geometry:
    multiples of its size divisor that leave at least one divisor of output after cropping a halo on
    both sides."""
    return geometry.smallest_tile, geometry.size_divisor


# ----------------------------------------------------------------------------------------------
# Test image and tensors
# ----------------------------------------------------------------------------------------------

def synthetic_sample(side, channels, seed=0):
    """A uint16 side x side x channels image of bright disks on a noisy background (colony-like)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    image = 600.0 + rng.normal(0.0, 60.0, size=(side, side))
    for _ in range(12):
        cy, cx = rng.uniform(0, side, size=2)
        radius = rng.uniform(side / 25, side / 8)
        image += 2500.0 * ((yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2)
    stack = np.stack([image * (1.0 + 0.25 * c) for c in range(channels)], axis=-1)
    return np.clip(stack, 0, 65535).astype(np.uint16)


def read_sample(path, channels):
    """Read --sample_image as H x W x C (image_io.read_array).

    A planar C x H x W TIFF is transposed when C matches ``channels``. Raises ExportError naming the
    file when it cannot be read or has another channel count.
    """
    path = pathlib.Path(path)
    try:
        image = image_io.read_array(path)
    except image_io.ImageFileError as exc:
        raise ExportError(f"--sample_image {exc}") from exc
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    elif image.ndim == 3 and image.shape[-1] != channels and image.shape[0] == channels:
        image = np.moveaxis(image, 0, -1)
    if image.ndim != 3 or image.size == 0:
        raise ExportError(f"--sample_image {path}: shape {image.shape} is not H x W or H x W x C")
    if image.shape[-1] != channels:
        raise ExportError(f"--sample_image {path}: has {image.shape[-1]} channel(s) (shape "
                          f"{image.shape}), the model expects {channels}")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ExportError(f"--sample_image {path}: pixel type {image.dtype} is not numeric")
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise ExportError(f"--sample_image {path}: {int(np.count_nonzero(~np.isfinite(image)))} pixel value(s) "
                          "are NaN or Inf; the package's test output would be NaN. Give another image")
    if np.issubdtype(image.dtype, np.integer) and not np.array_equal(image.astype(np.float32), image):
        # The package's input is float32 (bioimage.io tools cast to it): these values would lose
        # digits there, and the test output would not be what inference.py gives for the image.
        raise ExportError(f"--sample_image {path}: its {image.dtype} values are not all exact in float32, "
                          "the package's input type (e.g. integers above 2**24 with a small spread); give "
                          "another image, e.g. with the offset subtracted")
    return image


def fit_to_size_rule(image, minimum, step):
    """Centre-crop (or mirror-pad, when smaller) H x W x C to a square of side min(H, W,
    MAX_TEST_SIDE) rounded down to the step, and at least ``minimum``: a size the package's input
    accepts as is (and a 2:1 cover)."""
    target = max(minimum, min(*image.shape[:2], MAX_TEST_SIDE) // step * step)
    fitted = image
    for axis in (0, 1):
        length = fitted.shape[axis]
        if length >= target:
            start = (length - target) // 2
            fitted = np.take(fitted, range(start, start + target), axis=axis)
        else:
            before = (target - length) // 2
            widths = [(0, 0)] * 3
            widths[axis] = (before, target - length - before)
            # "symmetric" (unlike "reflect") works for pads longer than the image side.
            fitted = np.pad(fitted, widths, mode="symmetric")
    return fitted


def predict_probabilities(run, image):
    """Class probabilities (H x W x K float32) of a raw H x W x C image, computed the way inference.py
    segments images: z-score with the whole image's statistics (what rdf.yaml declares as
    zero_mean_unit_variance per sample and channel), then the shared tiled predictor."""
    stats = normalization.channel_statistics(image)
    tile = max(run.geometry.smallest_tile, *image.shape[:2])
    tile += -tile % run.geometry.size_divisor
    logits = predictor.predict_image(predictor.make_predictor(run.model), image, stats, run.geometry, tile)
    return np.asarray(keras.ops.softmax(logits, axis=-1), dtype=np.float32)


def cover_image(image, probabilities):
    """RGB uint8 h x 2w: the input (first channel, 1-99 percentile contrast) | the argmax class mask,
    subsampled to at most COVER_HEIGHT rows (bioimage.io asks for covers under 500 kB, 2:1 or 1:1)."""
    stride = -(-image.shape[0] // COVER_HEIGHT)
    image, probabilities = image[::stride, ::stride], probabilities[::stride, ::stride]
    channel = image[..., 0].astype(np.float64)
    low, high = np.percentile(channel, [1, 99])
    grey = np.clip((channel - low) / max(high - low, 1e-12), 0, 1)
    left = np.repeat((255 * grey).astype(np.uint8)[..., np.newaxis], 3, axis=-1)
    labels = np.argmax(probabilities, axis=-1)
    right = PALETTE[labels % len(PALETTE)]
    return np.concatenate([left, right], axis=1)


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

def build_package_model(run):
    """The trained network wrapped for bioimage.io: float32 (B, C, H, W) -> softmax (B, K, H, W).

    bioimage.io tensors here are batch-channel-y-x (what deepImageJ and napari pass on), while Keras
    convolutions are channels-last, hence the two transposes; the softmax makes every consumer get
    probabilities, since not every one implements a softmax post-processing step.
    """
    image = keras.Input((run.input_channels, None, None), name=INPUT_ID)          # (B, C, H, W)
    x = keras.layers.Permute((2, 3, 1), name="to_channels_last")(image)           # (B, H, W, C)
    logits = run.model(x)                                                           # (B, H, W, K)
    probabilities = keras.layers.Softmax(axis=-1, name="softmax")(logits)
    out = keras.layers.Permute((3, 1, 2), name=OUTPUT_ID)(probabilities)           # (B, K, H, W)
    return keras.Model(image, out, name=f"{run.name}_bioimageio")


def uses_only_stock_layers(model):
    """True if ``model`` loads in plain Keras (no layer class registered by this project)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            if not uses_only_stock_layers(layer):
                return False
        elif not type(layer).__module__.startswith("keras."):
            return False
    return True


def write_saved_model(package_model, folder, channels):
    """Export ``package_model`` as a TensorFlow SavedModel in ``folder``.

    The endpoint returns a dict keyed by the output tensor id: bioimageio.core's TensorFlow 2 adapter
    (keras.layers.TFSMLayer on endpoint "serve") reads dict outputs, and TF-Serving style consumers
    (deepImageJ) use the same function as the "serving_default" signature with input key "image".
    """
    archive = keras.export.ExportArchive()
    archive.track(package_model)

    def serve(image):
        return {OUTPUT_ID: package_model(image, training=False)}

    archive.add_endpoint(SERVING_ENDPOINT, serve, input_signature=[
        tf.TensorSpec([None, channels, None, None], tf.float32, name=INPUT_ID)])
    archive.write_out(str(folder), verbose=False)


def zip_folder(folder, target):
    """Zip the contents of ``folder`` (paths relative to it, so saved_model.pb is at the root)."""
    folder = pathlib.Path(folder)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())


# ----------------------------------------------------------------------------------------------
# rdf.yaml and README.md
# ----------------------------------------------------------------------------------------------

def _yaml_scalar(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        # YAML 1.1 readers (SnakeYAML in Fiji, PyYAML) read "1e-06" as a string; "1.0e-06" is a float
        # in YAML 1.1 and 1.2 alike.
        return f"{mantissa}.0e{exponent}" if exponent and "." not in mantissa else text
    if isinstance(value, str):
        # A JSON string is a valid YAML double-quoted scalar (same escapes), and never mistaken for
        # a number, a date or a boolean.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)) and not value:
        return "[]"
    if isinstance(value, dict) and not value:
        return "{}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to YAML")


def to_yaml(value, indent=0):
    """Block-style YAML for nested dicts (string keys) / lists of str, int, float, bool and None."""
    pad = "  " * indent
    lines = []
    nested = (lambda item: isinstance(item, (dict, list, tuple)) and len(item) > 0)
    if isinstance(value, dict):
        for key, item in value.items():
            if nested(item):
                lines.append(f"{pad}{key}:")
                lines.extend(to_yaml(item, indent + 1))
            else:
                lines.append(f"{pad}{key}: {_yaml_scalar(item)}")
    else:
        for item in value:
            if nested(item):
                block = to_yaml(item, indent + 1)
                lines.append(f"{pad}- {block[0].lstrip()}")
                lines.extend(block[1:])
            else:
                lines.append(f"{pad}- {_yaml_scalar(item)}")
    return lines


def default_name(run):
    """``segtool <model> <run folder>``, with characters bioimage.io does not allow replaced by '-'."""
    text = f"segtool {run.name} {run.folder.resolve().name}"
    return "".join(c if c in NAME_CHARACTERS else "-" for c in text)[:64].rstrip()


def default_description(run):
    return (f"{models.display_name(run.name)} semantic segmentation of {run.input_channels}-channel 2D images "
            f"into {run.number_classes} classes, trained with segtool. Input: raw image, normalised "
            f"per image and channel (zero mean, unit variance). Output: per-class softmax "
            f"probabilities along the channel axis; the class mask is their argmax over channels.")


def build_rdf(run, config, files, test_shape, keras_weights, onnx_opset):
    """The rdf.yaml content as a dict.

    Args:
      files: package file name -> sha256 for the weights and test tensors.
      test_shape: (H, W) of the test tensors.
      keras_weights: whether model.keras (weights format keras_v3) is in the package.
      onnx_opset: the opset of model.onnx.
    """
    return {
        "format_version": KERAS_V3_FORMAT_VERSION if keras_weights else FORMAT_VERSION,
        "type": "model",
        "name": config.name or default_name(run),
        "description": config.description or default_description(run),
        "authors": _rdf_authors(config),
        "cite": _rdf_cite(run, config),
        "license": config.license,
        "tags": list(dict.fromkeys(["segmentation", "semantic-segmentation", "2d", run.name,
                                    "tensorflow", "keras", *config.tags])),
        "documentation": "README.md",
        "covers": ["cover.png"],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "inputs": [_rdf_input(run, files)],
        "outputs": [_rdf_output(run, files)],
        "weights": _rdf_weights(files, keras_weights, onnx_opset),
        "config": {"segtool": _rdf_segtool(run, test_shape)},
    }


def _rdf_authors(config):
    """--author NAME[:AFFILIATION] entries, else the user running the export."""
    return [{"name": name, **({"affiliation": affiliation} if affiliation else {})}
            for name, affiliation in (config.authors or [(getpass.getuser(), None)])]


def _rdf_cite(run, config):
    """--cite entries, else the architecture's paper; a reference is a URL or a DOI."""
    citations = config.cite or [models.citation(run.name)]
    return [{"text": text, ("url" if reference.startswith(("http://", "https://")) else "doi"): reference}
            for text, reference in citations]


def _space(axis, size, **extra):
    return {"type": "space", "id": axis, "size": size, **extra}


def _rdf_input(run, files):
    """The input tensor: raw image (B, C, H, W), tile sides on the size rule, z-score preprocessing."""
    minimum, step = size_rule(run.geometry)
    return {
        "id": INPUT_ID,
        "description": "raw image (any intensity range); normalised by the preprocessing",
        "axes": [
            {"type": "batch"},
            {"type": "channel", "channel_names": [f"channel{c}" for c in range(run.input_channels)]},
            _space("y", {"min": minimum, "step": step}),
            _space("x", {"min": minimum, "step": step}),
        ],
        "test_tensor": {"source": "test_input.npy", "sha256": files["test_input.npy"]},
        "sample_tensor": {"source": "sample_input.tif", "sha256": files["sample_input.tif"]},
        "data": {"type": "float32"},
        "preprocessing": [{"id": "zero_mean_unit_variance",
                           "kwargs": {"axes": ["y", "x"], "eps": ZMUV_EPS}}],
    }


def _rdf_output(run, files):
    """The output tensor: softmax probabilities (B, K, H, W), the input's size, a halo to crop."""
    halo = run.geometry.halo
    return {
        "id": OUTPUT_ID,
        "description": "per-class softmax probabilities; the class mask is the argmax over the "
                       "channel axis",
        "axes": [
            {"type": "batch"},
            {"type": "channel", "channel_names": [f"class{k}" for k in range(run.number_classes)]},
            _space("y", {"tensor_id": INPUT_ID, "axis_id": "y"}, halo=halo),
            _space("x", {"tensor_id": INPUT_ID, "axis_id": "x"}, halo=halo),
        ],
        "test_tensor": {"source": "test_output.npy", "sha256": files["test_output.npy"]},
        "sample_tensor": {"source": "sample_output.tif", "sha256": files["sample_output.tif"]},
        "data": {"type": "float32", "range": [0.0, 1.0]},
    }


def _rdf_weights(files, keras_weights, onnx_opset):
    """The weights formats: Keras 3 (optional, then the parent), SavedModel, ONNX."""
    weights = {}
    if keras_weights:
        weights["keras_v3"] = {
            "source": "model.keras", "sha256": files["model.keras"],
            "keras_version": keras.__version__, "backend": ["tensorflow", tf.__version__],
            "comment": "Keras 3 model: float32 (B, C, H, W) -> softmax (B, K, H, W); loads with "
                       "keras.saving.load_model and stock Keras layers only."}
    weights["tensorflow_saved_model_bundle"] = {
        "source": "tf_saved_model.zip", "sha256": files["tf_saved_model.zip"],
        "tensorflow_version": tf.__version__,
        **({"parent": "keras_v3"} if keras_weights else {}),
        "comment": f"SavedModel exported from Keras {keras.__version__}; endpoint/signature "
                   f"'{SERVING_ENDPOINT}' (also 'serving_default'): input '{INPUT_ID}' float32 "
                   f"(B, C, H, W) -> dict with '{OUTPUT_ID}' float32 (B, K, H, W)."}
    weights["onnx"] = {
        "source": "model.onnx", "sha256": files["model.onnx"], "opset_version": onnx_opset,
        "parent": "keras_v3" if keras_weights else "tensorflow_saved_model_bundle",
        "comment": f"ONNX exported by Keras {keras.__version__} (tf2onnx): input '{INPUT_ID}' float32 "
                   f"(B, C, H, W) -> float32 (B, K, H, W) probabilities; free batch, height, width."}
    return weights


def _rdf_segtool(run, test_shape):
    """segtool's own record of the network, in the rdf's free "config" section."""
    return {
        "model": run.name, "number_classes": run.number_classes,
        "input_channels": run.input_channels, "base_filters": int(run.config["base_filters"]),
        "batch_norm": bool(run.config["batch_norm"]),
        "training_tile_size": run.config.get("tile_size"), "halo": run.geometry.halo,
        "receptive_field": run.geometry.receptive_field,
        "test_tensor_shape": [1, run.input_channels, *test_shape]}


def build_readme(run, config, keras_weights, sample_source, test_shape):
    """README.md of the package: what goes in and out, how to run it elsewhere, how it was validated."""
    package = pathlib.Path(config.output).name
    title = config.name or default_name(run)
    description = config.description or default_description(run)
    return "\n".join([f"# {title}\n\n{description}\n", _readme_model(run), _readme_input(run),
                      _readme_output(run), _readme_weights(keras_weights), _readme_use(run, package),
                      _readme_validation(run, package, sample_source, test_shape)])


def _readme_model(run):
    """README section: the architecture and where the weights come from."""
    batch_norm = "on" if run.config["batch_norm"] else "off"
    source = run.weights_source.relative_to(run.folder).as_posix()
    return f"""## Model
- Architecture: {models.display_name(run.name)}, {run.config['base_filters']} base filters, batch norm \
{batch_norm}; {run.input_channels} input channel(s), {run.number_classes} classes; receptive field \
{run.geometry.receptive_field} px.
- Trained with segtool (training tile size {run.config.get('tile_size')}); exported by \
`export_bioimageio.py` from `{source}`.
"""


def _readme_input(run):
    """README section: the input tensor, its preprocessing and tile sizes."""
    minimum, step = size_rule(run.geometry)
    halo = run.geometry.halo
    return f"""## Input `{INPUT_ID}`
- float32 tensor with axes batch, channel, y, x: (B, {run.input_channels}, H, W), raw intensities.
- Preprocessing `zero_mean_unit_variance` over y and x (each sample and channel separately, eps \
{ZMUV_EPS}); segtool normalises every whole image the same way before tiling it.
- Tile sides H and W: {minimum} + n * {step} px (n = 0, 1, ...), the rule bioimage.io tools tile \
images by, with a halo of {halo} px; the network itself accepts any multiple of {step}.
"""


def _readme_output(run):
    """README section: the output tensor, the class mask and the halo."""
    halo = run.geometry.halo
    return f"""## Output `{OUTPUT_ID}`
- float32 tensor (B, {run.number_classes}, H, W): per-class softmax probabilities, summing to 1 along \
the channel axis (the softmax is part of the weights; no post-processing step is needed).
- Class mask: the argmax over the channel axis (class ids 0..{run.number_classes - 1}), which is \
exactly what segtool's `inference.py` writes.
- Halo: {halo} px on each side of a tile are to be cropped (they lack context); a tile of side S \
keeps its central S - {2 * halo} px.
"""


def _readme_weights(keras_weights):
    """README section: the weights formats in the package."""
    formats = (["`keras_v3` (model.keras, Keras 3)"] if keras_weights else []) + [
        f"`tensorflow_saved_model_bundle` (tf_saved_model.zip, TensorFlow {tf.__version__})",
        "`onnx` (model.onnx; bioimageio.core and ilastik run it with ONNX Runtime)"]
    return f"""## Weights
{chr(10).join(f"- {line}" for line in formats)}
- SavedModel endpoint `{SERVING_ENDPOINT}` (also signature `serving_default`): input `{INPUT_ID}` \
(B, C, H, W) float32, output dict key `{OUTPUT_ID}` (B, K, H, W).
"""


def _readme_use(run, package):
    """README section: running the package in deepImageJ, napari, bioimageio.core, TensorFlow."""
    minimum, step = size_rule(run.geometry)
    return f"""## Use it
- **deepImageJ (Fiji)**: Plugins > DeepImageJ > DeepImageJ Install Model, install a private model
  from this local zip, then DeepImageJ Run. deepImageJ runs the TensorFlow SavedModel weights with
  one of its own TensorFlow 2 engines (this package was exported with TensorFlow {tf.__version__})
  and applies the zero-mean-unit-variance preprocessing itself.
- **napari**: from napari's Python console, with `bioimageio.core` and `tensorflow` installed in
  napari's environment (`napari-bioimageio` only manages models of the bioimage.io website):

      from bioimageio.core import Tensor, predict
      image = viewer.layers[0].data.astype("float32")                  # H x W
      x = Tensor.from_numpy(image[None, None], dims=("batch", "channel", "y", "x"))
      out = predict(model="{package}", inputs={{"{INPUT_ID}": x}}, blocksize_parameter=4)
      probabilities = out.members["{OUTPUT_ID}"].data.to_numpy()[0]     # K x H x W
      viewer.add_labels(probabilities.argmax(axis=0))

  `blocksize_parameter=n` tiles the image with {minimum} + n * {step} px blocks (the image must be at
  least one block); without it the whole image is run at once, and H and W must then be
  multiples of {step}.
- **Command line (bioimageio.core)**: `bioimageio test {package}` reruns the test tensors;
  `bioimageio predict` segments image files (`bioimageio predict --help`).
- **Plain TensorFlow**: unzip tf_saved_model.zip, then
  `tf.saved_model.load(folder).serve(x)["{OUTPUT_ID}"]`, `x` float32 (B, C, H, W) already normalised
  (zero mean, unit variance per image and channel), H and W multiples of {step}.
"""


def _readme_validation(run, package, sample_source, test_shape):
    """README section: the test tensors and how bioimageio.core's tiling compares with segtool's."""
    step = run.geometry.size_divisor
    test_shape = [1, run.input_channels, *test_shape]
    return f"""## Validation
- The test input (`test_input.npy`, shape {test_shape}) is {sample_source}; `test_output.npy` holds
  the probabilities segtool's own tiled predictor computes for it (per-image z-score, then the
  trained network, then softmax). `bioimageio test {package}` (bioimageio.core) checks that
  every weights format reproduces it; the description alone is checked by `python -c "import
  bioimageio.spec as s; print(s.load_description('{package}').validation_summary.status)"`.
- bioimageio.core's tiled prediction (`blocksize_parameter`) equals segtool's to float precision
  away from the image border when H and W are multiples of {step}; within about one halo of the
  border, and for other sizes (segtool centres its padding to a multiple of {step}, which shifts the
  pooling grid), the two differ slightly because each pads images its own way.
- The quality of the segmentation on unseen data is measured by segtool during training
  (`test_metrics.csv` in the training output folder: per-class IoU and Dice on the test split).
"""


def validate_package(source):
    """Validate a package (zip, folder or rdf.yaml) with bioimageio.spec, file checks included.

    Returns:
      its ValidationSummary (``.status`` "valid-format"/"passed" or "failed"; ``.format()`` gives the
      details), or None when bioimageio.spec is not installed.
    """
    try:
        from bioimageio.spec import load_description
    except ImportError:
        return None
    return load_description(source, perform_io_checks=True).validation_summary


def describe_errors(summary, limit=300):
    """One line per error of a ValidationSummary: 'location: message' (long messages, such as the
    list of every valid license, cut to ``limit`` characters)."""
    lines = []
    for error in summary.errors:
        location = ".".join(str(part) for part in error.loc) or "rdf.yaml"
        message = " ".join(str(error.msg).split())
        lines.append(f"  {location}: {message[:limit]}{' ...' if len(message) > limit else ''}")
    return "\n".join(lines)


def write_zip_atomically(output, folder, names):
    """Zip ``names`` of ``folder`` into a temporary file beside ``output``, then rename it over
    ``output`` (image_io.atomic_write): ``output`` is the old file or the new one. Scratch of this
    output left by a killed export is removed first."""
    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as archive:
            for name in names:
                archive.write(pathlib.Path(folder) / name, name)

    output = pathlib.Path(output)
    image_io.remove_stale_scratch(output.parent, target=output.name)
    image_io.atomic_write(output, write)


def _check_flags(config):
    """Raise ExportError for flag values bioimage.io would reject, before any work is done."""
    output = pathlib.Path(config.output)
    if output.suffix.lower() != ".zip":
        raise ExportError(f"--output {output}: must end in .zip (a bioimage.io package is a zip file)")
    if not output.parent.resolve().is_dir():
        raise ExportError(f"--output {output}: folder {output.parent} does not exist")
    if output.is_dir():
        raise ExportError(f"--output {output}: is a folder")
    if not os.access(output.parent.resolve(), os.W_OK):
        raise ExportError(f"--output {output}: folder {output.parent} is not writable")
    if config.name is not None:
        bad = sorted(set(config.name) - NAME_CHARACTERS)
        if bad or not 5 <= len(config.name) <= 128:
            raise ExportError(f"--name {config.name!r}: must be 5 to 128 characters of letters, "
                              f"digits, spaces and _+-() (bioimage.io's rule)"
                              + (f"; not allowed: {''.join(bad)!r}" if bad else ""))
    if config.description is not None and len(config.description) > 1024:
        raise ExportError(f"--description: {len(config.description)} characters, at most 1024")
    for name, _ in config.authors:
        if not name or "/" in name or "\\" in name:
            raise ExportError(f"--author {name!r}: give a name without slashes, e.g. "
                              f"'Ada Lovelace;Example Institute'")
    for text, reference in config.cite:
        if not text or not reference:
            raise ExportError(f"--cite {text};{reference}: give 'TEXT;DOI' or 'TEXT;URL'")


def export_package(config):
    """Write the bioimage.io package described by ``config``.

    Returns:
      (output path, ValidationSummary or None when bioimageio.spec is missing or config.validate is
      False). Raises ExportError for a bad run folder, flag or sample image and ValidationError when
      bioimageio.spec rejects the package; in both cases nothing is written.
    """
    _check_flags(config)
    run = load_run(config.model)
    package_model = build_package_model(run)
    if config.keras_v3 and not uses_only_stock_layers(package_model):
        raise ExportError(f"--keras_v3: the {run.name} of {run.folder} uses layers of segtool's own, "
                          f"which a plain Keras installation cannot load; export it without "
                          f"--keras_v3 (the SavedModel weights need no custom code)")
    minimum, step = size_rule(run.geometry)
    if config.sample_image:
        raw = read_sample(config.sample_image, run.input_channels)
        sample_source = f"a crop of `{pathlib.Path(config.sample_image).name}`"
    else:
        raw = synthetic_sample(minimum, run.input_channels)
        sample_source = ("a generated image of bright disks on a noisy background (no --sample_image "
                         "was given)")
    raw = fit_to_size_rule(raw, minimum, step).astype(np.float32)
    probabilities = predict_probabilities(run, raw)                             # (H, W, K)

    with tempfile.TemporaryDirectory(prefix="bioimageio_export_") as staging:
        staging = pathlib.Path(staging)
        np.save(staging / "test_input.npy", raw.transpose(2, 0, 1)[np.newaxis])        # (1, C, H, W)
        np.save(staging / "test_output.npy", probabilities.transpose(2, 0, 1)[np.newaxis])
        # The same tensors as TIFF: bioimage.io's sample_tensor must be an image file (FAIR).
        tifffile.imwrite(staging / "sample_input.tif", raw.transpose(2, 0, 1)[np.newaxis])
        tifffile.imwrite(staging / "sample_output.tif", probabilities.transpose(2, 0, 1)[np.newaxis])
        iio.imwrite(staging / "cover.png", cover_image(raw, probabilities))

        keras_weights = config.keras_v3
        names = ["rdf.yaml", "README.md", "cover.png", "test_input.npy", "test_output.npy",
                 "sample_input.tif", "sample_output.tif", "tf_saved_model.zip", "model.onnx"] + (
                     ["model.keras"] if keras_weights else [])
        if keras_weights:
            package_model.save(staging / "model.keras")
        write_saved_model(package_model, staging / "saved_model", run.input_channels)
        zip_folder(staging / "saved_model", staging / "tf_saved_model.zip")
        try:
            engines.export_onnx(package_model, staging / "model.onnx",
                                shape=(None, run.input_channels, None, None))
        except engines.EngineError as exc:
            raise ExportError(f"--model {config.model}: {exc}") from exc
        onnx_opset = max(entry.version for entry in onnx.load(str(staging / "model.onnx")).opset_import
                         if entry.domain in ("", "ai.onnx"))

        (staging / "README.md").write_text(
            build_readme(run, config, keras_weights, sample_source, raw.shape[:2]), encoding="utf-8")
        hashed = {name: image_io.sha256(staging / name) for name in names[3:]}
        rdf = build_rdf(run, config, hashed, raw.shape[:2], keras_weights, onnx_opset)
        (staging / "rdf.yaml").write_text("\n".join(to_yaml(rdf)) + "\n", encoding="utf-8")

        summary = validate_package(staging / "rdf.yaml") if config.validate else None
        if summary is not None and summary.status == "failed":
            raise ValidationError("bioimageio.spec rejects the package (nothing written):\n"
                                  + describe_errors(summary))
        try:
            write_zip_atomically(config.output, staging, names)
        except OSError as exc:  # a full disk: the old package stays (atomic), the user learns why
            raise ExportError(f"--output {config.output}: cannot write it ({exc.strerror or exc}); "
                              "an existing file there is unchanged") from None
    return pathlib.Path(config.output), summary


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def _pairs(values, flag, optional_second):
    """'A;B' strings -> (A, B) pairs (B None when optional and absent)."""
    pairs = []
    for value in values or ():
        first, separator, second = (part.strip() for part in value.partition(";"))
        if not separator and not optional_second:
            raise ExportError(f"{flag} {value!r}: expected 'TEXT;DOI' or 'TEXT;URL'")
        pairs.append((first, second or None))
    return tuple(pairs)


def build_parser():
    geometries = {name: models.geometry(name) for name in models.MODEL_NAMES}
    halos = {name: geometry.halo for name, geometry in geometries.items()}
    rules = {name: size_rule(geometry) for name, geometry in geometries.items()}
    parser = argparse.ArgumentParser(
        description="Write a trained model as a bioimage.io model package (zip, model spec "
                    "0.5) that deepImageJ (Fiji), napari and bioimage.io's tools can "
                    "run: TensorFlow SavedModel weights (plus a Keras 3 file with --keras_v3), batch-"
                    "channel-y-x tensors, zero-mean-unit-variance preprocessing, softmax "
                    "probabilities out (argmax = class mask), test tensors, cover and README. "
                    f"Tiles: UNet {rules['unet'][0]} + n*{rules['unet'][1]} px with a "
                    f"{halos['unet']} px halo, SegNet {rules['segnet'][0]} + n*{rules['segnet'][1]} "
                    f"px with a {halos['segnet']} px halo.")
    parser.add_argument("--model", required=True, help="training output folder (config.json plus "
                        "model.keras, or checkpoints/best|latest/model.weights.h5)")
    parser.add_argument("--output", required=True, help="package to write, NAME.zip (replaced "
                        "atomically if it exists)")
    parser.add_argument("--name", help="model name (letters, digits, spaces, _+-(); default "
                        "'segtool MODEL RUN_FOLDER')")
    parser.add_argument("--description", help="one-paragraph description (default: generated from "
                        "the model: channels, classes, normalisation, output)")
    parser.add_argument("--author", action="append", metavar="'NAME[;AFFILIATION]'",
                        help="an author; repeat for several (default: your login name)")
    parser.add_argument("--license", default=DEFAULT_LICENSE,
                        help=f"SPDX license identifier of the weights (default {DEFAULT_LICENSE})")
    parser.add_argument("--cite", action="append", metavar="'TEXT;DOI_OR_URL'",
                        help="a reference; repeat for several (default: the architecture's paper)")
    parser.add_argument("--tag", action="append", default=[], help="extra search tag; repeatable "
                        "(always: segmentation, semantic-segmentation, 2d, the model, tensorflow, keras)")
    parser.add_argument("--sample_image", help="an image like those the model segments (TIFF/PNG; "
                        "H x W or H x W x C): its centre becomes the test input and the cover "
                        "(default: a generated image of bright disks)")
    parser.add_argument("--keras_v3", action="store_true", help="UNets of stock Keras layers only (not "
                        "SegNet, not --upsampling bilinear): also include the "
                        "network as a Keras 3 file (weights format keras_v3, run by bioimageio.core); "
                        "readers older than bioimageio.spec 0.5.8 then reject the package, deepImageJ "
                        "uses the SavedModel either way")
    parser.add_argument("--no_validate", action="store_true", help="skip the bioimageio.spec "
                        "validation that otherwise runs before writing when the package is installed")
    return parser


def config_from_args(args):
    return ExportConfig(model=args.model, output=args.output, name=args.name,
                        description=args.description,
                        authors=_pairs(args.author, "--author", optional_second=True),
                        license=args.license, cite=_pairs(args.cite, "--cite", optional_second=False),
                        tags=tuple(args.tag), sample_image=args.sample_image,
                        keras_v3=args.keras_v3, validate=not args.no_validate)


def main(argv=None):
    """Command-line entry point. Returns the exit code: 0 written, 1 rejected by bioimageio.spec,
    2 bad --model, flag or sample image (nothing written in either failure)."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        print("config: " + json.dumps(dataclasses.asdict(config)))
        output, summary = export_package(config)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB)")
    if summary is not None:
        print(f"bioimageio.spec validation: {summary.status}")
    elif config.validate:
        print("bioimageio.spec is not installed, so the package was not validated. To validate it: "
              f"pip install bioimageio.spec, then python -c \"import bioimageio.spec as s; "
              f"print(s.load_description('{output}').validation_summary.status)\"; to also run its "
              f"weights on the test input: pip install bioimageio.core, then bioimageio test {output}")
    if not config.authors:
        print(f"note: author set to your login name {getpass.getuser()!r}; pass --author "
              f"'NAME;AFFILIATION' before sharing the package")
    return 0


if __name__ == "__main__":
    sys.exit(main())
