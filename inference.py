"""Segment whole images of any size with a trained UNet or SegNet.

    python inference.py --model runs/unet --image_folder my_images --output_folder my_masks

Each image is read (TIFF via tifffile, PNG/JPEG via imageio), z-score normalised per channel over the
whole image with the same function training uses (augment.zscore_normalize), reflect-padded to a size
the network accepts and run through the model. Images larger than --tile_size are cut into overlapping
tiles whose overlap (the halo) covers the network's receptive field; only each tile's centre is kept,
so the stitched result equals what one whole-image pass would give (no seams). The padding is cropped
off again, and the argmax class of every pixel is written as ``<stem>.tif`` (uint8 class ids, uint16
when the model has more than 256 classes) in --output_folder. With --save_probabilities the per-class
softmax maps are written next to it as ``<stem>_probabilities.npy`` (float32, H x W x classes; load
with numpy.load). Every output file is written to a temporary file in the output folder first and
then renamed over the target, so an existing output is only ever replaced by a complete new one.

An image that cannot be read or has the wrong number of channels is reported (naming the file) and
skipped; the others are still processed, and the exit code is 1 if any image failed.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import sys
import time

import imageio.v3 as iio
import keras
import numpy as np
import tensorflow as tf
import tifffile

import augment
import checkpoints
import models

DEFAULT_EXTENSIONS = ("tif", "tiff", "png", "jpg", "jpeg")
DEFAULT_TILE_SIZE = 256
CONFIG_KEYS = models.CONFIG_KEYS
PROBABILITIES_SUFFIX = "_probabilities.npy"


class InferenceError(Exception):
    """The run cannot start: missing or unreadable model, bad configuration or flags."""


class ImageError(Exception):
    """One image cannot be segmented (unreadable, wrong shape or channel count); others go on."""


@dataclasses.dataclass
class InferenceConfig:
    """Everything one inference run needs (the CLI flags as plain values).

    Exactly one of ``model`` (a .keras file or a training output folder holding model.keras) and
    ``checkpoint_filepath`` (a checkpoint directory holding model.weights.h5, or a training output
    folder) is set. ``tile_size`` None -> the training config's tile size (else 256). ``gpu`` None ->
    the first GPU if there is one, else the CPU; -1 -> the CPU.
    """
    image_folder: str
    output_folder: str
    model: str | None = None
    checkpoint_filepath: str | None = None
    tile_size: int | None = None
    batch_size: int = 4
    gpu: int | None = None
    save_probabilities: bool = False
    image_extensions: tuple = DEFAULT_EXTENSIONS


@dataclasses.dataclass
class InferenceSummary:
    """Outcome of run_inference: output paths written and failed input names with their reasons."""
    written: list
    failed: dict
    seconds: float

    @property
    def ok_count(self):
        return len(self.written)

    @property
    def failed_count(self):
        return len(self.failed)


@dataclasses.dataclass
class LoadedModel:
    """A ready model plus what inference needs to know about it."""
    model: keras.Model
    name: str
    number_classes: int
    input_channels: int
    training_tile_size: int | None
    source: str


# ----------------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------------

def _read_training_config(folders):
    """The first config.json found in ``folders`` as (dict, path), or (None, None)."""
    for folder in folders:
        path = pathlib.Path(folder) / "config.json"
        if path.is_file():
            try:
                with open(path) as f:
                    return json.load(f), path
            except (OSError, ValueError) as exc:
                raise InferenceError(f"cannot read training config {path}: {exc}") from exc
    return None, None


def _model_name(training_config, config_path, model, source):
    """Registry name of a model: the training config's "model", else the name the builder gave the
    saved model (every registered builder names its keras.Model after itself)."""
    if training_config is not None and "model" in training_config:
        name = training_config["model"]
        if name not in models.MODEL_NAMES:
            raise InferenceError(f"{config_path}: model {name!r} is not one of {', '.join(models.MODEL_NAMES)}")
        return name
    if model is not None and model.name in models.MODEL_NAMES:
        return model.name
    raise InferenceError(
        f"cannot tell which model {source} is: it has no training config.json beside it and its name "
        f"{getattr(model, 'name', None)!r} is not one of {', '.join(models.MODEL_NAMES)}; put the "
        f"training config.json (with its \"model\" key) next to it")


def _resolve_checkpoint_dir(path):
    """A directory holding model.weights.h5: ``path`` itself or, for an output folder, its best
    checkpoint (the one model.keras is exported from), else its latest."""
    found = checkpoints.find_checkpoint(str(path), prefer="best", required=(checkpoints.WEIGHTS_FILE,))
    if found is None:
        raise InferenceError(
            f"checkpoint not found: {path} holds neither model.weights.h5 nor "
            f"checkpoints/best|latest/model.weights.h5 (expected a checkpoint directory or a training "
            f"output folder)")
    return pathlib.Path(found)


def load_model(config):
    """Load the model named by ``config.model`` or ``config.checkpoint_filepath``.

    Returns:
      LoadedModel. Raises InferenceError naming the path when anything is missing or unreadable.
    """
    if (config.model is None) == (config.checkpoint_filepath is None):
        raise InferenceError("give exactly one of --model and --checkpoint_filepath")

    if config.model is not None:
        path = pathlib.Path(config.model)
        keras_path = path / "model.keras" if path.is_dir() else path
        if not keras_path.is_file():
            hint = (" (this folder has checkpoints/: use --checkpoint_filepath)"
                    if (path / "checkpoints").is_dir() else "")
            raise InferenceError(f"model not found: {keras_path} (expected a .keras file or a training "
                                 f"output folder holding model.keras){hint}")
        training_config, config_path = _read_training_config([keras_path.parent])
        try:
            model = keras.saving.load_model(str(keras_path), compile=False)
        except Exception as exc:  # Keras raises many types for corrupt or foreign files.
            raise InferenceError(f"cannot load model {keras_path}: {exc}") from exc
        name = _model_name(training_config, config_path, model, keras_path)
        source = str(keras_path)
    else:
        checkpoint = _resolve_checkpoint_dir(config.checkpoint_filepath)
        # A checkpoint lives in <output>/checkpoints/<which>/, the config in <output>/.
        training_config, config_path = _read_training_config(
            [checkpoint, checkpoint.parent, checkpoint.parent.parent])
        if training_config is None:
            raise InferenceError(f"no config.json found for checkpoint {checkpoint} (looked in it and "
                                 f"the two folders above it); it is needed to rebuild the model")
        missing = [key for key in CONFIG_KEYS if key not in training_config]
        if missing:
            raise InferenceError(f"{config_path} lacks {', '.join(missing)} (needed to rebuild the model)")
        name = _model_name(training_config, config_path, None, checkpoint)
        weights = checkpoint / checkpoints.WEIGHTS_FILE
        try:
            model = models.build_from_config(training_config)
            model.load_weights(str(weights))
        except Exception as exc:  # h5py/Keras errors for truncated or mismatched weight files.
            raise InferenceError(f"cannot load weights {weights} into the {name} described by "
                                 f"{config_path}: {exc}") from exc
        source = str(weights)

    tile = training_config.get("tile_size") if training_config else None
    return LoadedModel(model=model, name=name, number_classes=int(model.output_shape[-1]),
                       input_channels=int(model.input_shape[-1]),
                       training_tile_size=int(tile) if tile else None, source=source)


def resolve_device(gpu):
    """TensorFlow device string for --gpu (None -> first GPU if any, else CPU; -1 -> CPU)."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpu is not None and gpu >= len(gpus):
        raise InferenceError(f"--gpu {gpu}: only {len(gpus)} GPU(s) visible to TensorFlow "
                             f"(valid: {list(range(len(gpus)))} or -1 for the CPU)")
    if not gpus or (gpu is not None and gpu < 0):
        chosen, device = [], "/CPU:0"
    else:
        index = gpu or 0
        chosen, device = [gpus[index]], f"/GPU:{index}"
    try:
        # Hide the other GPUs so this process reserves no memory on them (a training run may be
        # using them). Only possible before TensorFlow starts its runtime, as in a fresh CLI process.
        tf.config.set_visible_devices(chosen, "GPU")
    except RuntimeError:
        return device
    return "/GPU:0" if chosen else "/CPU:0"


def make_predictor(model):
    """Callable float32 [B, H, W, C] -> numpy float32 logits [B, H, W, classes].

    BatchNorm must use its moving statistics (training=False): with batch statistics a tile's
    result would depend on the other tiles in its batch and tiling would no longer be exact.
    """
    channels = int(model.input_shape[-1])
    forward = tf.function(lambda x: model(x, training=False),
                          input_signature=[tf.TensorSpec([None, None, None, channels], tf.float32)])
    return lambda batch: np.asarray(forward(tf.constant(batch, tf.float32)), dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Tiling
# ----------------------------------------------------------------------------------------------

def halo_for(name):
    """Context dropped on each inner side of a tile, in pixels.

    An output pixel depends on a receptive_field(name) wide input range that can sit off-centre by up
    to one pooling period (models.receptive_field), so half of it plus the size divisor is enough;
    rounding up to the divisor keeps tile origins on the network's pooling grid, without which tiles
    would not reproduce the whole-image result.
    """
    divisor = models.SIZE_DIVISOR[name]
    return math.ceil((models.receptive_field(name) // 2 + divisor) / divisor) * divisor


def plan_tiles(length, tile, halo):
    """Tiles along one axis of a padded canvas.

    Args:
      length: canvas length (a multiple of the size divisor).
      tile: tile length; if >= length one tile covers everything.
      halo: context dropped at each tile side that is inside the canvas.
    Returns:
      list of (start, keep_start, keep_stop) in canvas coordinates; the keep ranges are contiguous
      and cover [0, length). The first and last tiles touch the canvas border, so their outer side
      sees exactly the border a whole-image pass sees.
    """
    if tile >= length:
        return [(0, 0, length)]
    step = tile - 2 * halo
    if step <= 0:
        raise ValueError(f"tile {tile} leaves no centre after a halo of {halo} on both sides")
    starts = list(range(0, length - tile, step)) + [length - tile]
    plan = []
    for index, start in enumerate(starts):
        keep_start = 0 if index == 0 else plan[-1][2]
        keep_stop = length if index == len(starts) - 1 else start + tile - halo
        plan.append((start, keep_start, keep_stop))
    return plan


def pad_to_divisor(image, divisor):
    """Reflect-pad H x W x C evenly on both sides to multiples of ``divisor``.

    Returns:
      (padded, (top, left)): the original sits at padded[top:top+H, left:left+W].
    """
    height, width = image.shape[:2]
    extra_h = -height % divisor
    extra_w = -width % divisor
    top, left = extra_h // 2, extra_w // 2
    padded = np.pad(image, ((top, extra_h - top), (left, extra_w - left), (0, 0)), mode="reflect")
    return padded, (top, left)


def predict_logits(predictor, image, name, tile_size, batch_size=4, halo=None):
    """Logits of a whole normalised image, tiled when it is larger than ``tile_size``.

    Args:
      predictor: from make_predictor.
      image: float32 H x W x C, already normalised.
      name: model name (for the size divisor and the halo).
      tile_size: largest tile side sent to the network (a multiple of the size divisor).
      batch_size: tiles per network call.
      halo: override of halo_for(name) (tests use it to show that too small a halo leaves seams).
    Returns:
      (logits float32 H x W x classes, number of tiles run).
    """
    height, width = image.shape[:2]
    divisor = models.SIZE_DIVISOR[name]
    halo = halo_for(name) if halo is None else halo
    canvas, (top, left) = pad_to_divisor(image, divisor)
    rows = plan_tiles(canvas.shape[0], tile_size, halo)
    cols = plan_tiles(canvas.shape[1], tile_size, halo)
    tile_h = min(tile_size, canvas.shape[0])
    tile_w = min(tile_size, canvas.shape[1])

    out = None
    tiles = [(r, c) for r in rows for c in cols]
    for first in range(0, len(tiles), batch_size):
        group = tiles[first:first + batch_size]
        batch = np.stack([canvas[r[0]:r[0] + tile_h, c[0]:c[0] + tile_w] for r, c in group])
        logits = predictor(batch)
        if out is None:
            out = np.empty(canvas.shape[:2] + (logits.shape[-1],), dtype=np.float32)
        for ((r_start, r_lo, r_hi), (c_start, c_lo, c_hi)), tile_logits in zip(group, logits):
            out[r_lo:r_hi, c_lo:c_hi] = tile_logits[r_lo - r_start:r_hi - r_start,
                                                    c_lo - c_start:c_hi - c_start]
    return out[top:top + height, left:left + width], len(tiles)


# ----------------------------------------------------------------------------------------------
# Images in, masks out
# ----------------------------------------------------------------------------------------------

def read_image(path, channels):
    """Read one image as H x W x C (numeric dtype as stored).

    A planar C x H x W TIFF is transposed when C matches ``channels``. Raises ImageError naming the
    file when it cannot be read or does not have ``channels`` channels.
    """
    path = pathlib.Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            image = tifffile.imread(path)
        else:
            image = iio.imread(path)
    except Exception as exc:  # Readers raise many types (ValueError, OSError, TiffFileError, ...).
        raise ImageError(f"{path.name}: cannot read image ({type(exc).__name__}: {exc})") from exc
    image = np.asarray(image)
    if image.size == 0:  # tifffile returns an empty array (and only logs) for a broken header.
        raise ImageError(f"{path.name}: cannot read image (no pixel data found)")
    if image.dtype == bool:
        image = image.astype(np.uint8)
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ImageError(f"{path.name}: pixel type {image.dtype} is not an integer or real type")
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    elif image.ndim == 3 and image.shape[-1] != channels and image.shape[0] == channels:
        image = np.moveaxis(image, 0, -1)
    if image.ndim != 3:
        raise ImageError(f"{path.name}: shape {image.shape} is not H x W or H x W x C")
    if image.shape[-1] != channels:
        raise ImageError(f"{path.name}: has {image.shape[-1]} channel(s) (shape {image.shape}), "
                         f"the model expects {channels}")
    return image


def label_dtype(number_classes):
    """Smallest unsigned type holding class ids 0 .. number_classes - 1."""
    return np.uint8 if number_classes <= 256 else np.uint16


def softmax(logits):
    """Per-pixel class probabilities of H x W x classes logits (float32)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def write_atomically(path, write):
    """Call write(file) on a temporary file next to ``path``, then rename it over ``path``.

    The rename is atomic within one folder, so ``path`` is either the old file or the complete new
    one; the temporary file is removed if writing fails.
    """
    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            write(f)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_mask(path, labels):
    """Write an H x W class-id mask as a TIFF, atomically."""
    write_atomically(path, lambda f: tifffile.imwrite(f, labels))


def write_probabilities(path, probabilities):
    """Write H x W x classes float32 probabilities as .npy, atomically."""
    write_atomically(path, lambda f: np.save(f, probabilities))


def list_images(folder, extensions):
    """Sorted image files of ``folder`` (not recursive, hidden files skipped) with these extensions."""
    wanted = {"." + extension.lower().lstrip(".") for extension in extensions}
    return sorted(p for p in pathlib.Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in wanted)


def _resolve_tile_size(requested, loaded, halo):
    """Tile side to use: the requested one (validated), else a default that keeps tiling efficient."""
    divisor = models.SIZE_DIVISOR[loaded.name]
    if requested is None:
        # Training tiles are usually too small to carry a halo of 2 x receptive_field / 2 and still
        # keep much of each tile; a network that fitted in memory for training with gradients fits
        # a larger tile at inference, so raise the default until at least a quarter of a tile is kept.
        tile = max(loaded.training_tile_size or DEFAULT_TILE_SIZE, 4 * halo)
        return tile - tile % divisor
    smallest = 2 * halo + divisor
    if requested < smallest or requested % divisor:
        raise InferenceError(
            f"--tile_size {requested}: must be a multiple of {divisor} and at least {smallest} for "
            f"{loaded.name} (a halo of {halo} px on each side covers its receptive field of "
            f"{models.receptive_field(loaded.name)} px); larger tiles are faster, e.g. {4 * halo}")
    return requested


def _segment_file(path, target, loaded, predictor, tile_size, halo, config):
    """Read, normalise, predict and write one image. Returns a one-line description for the log.

    Every per-image problem (unreadable, wrong channels, out of memory, unwritable output) is raised
    as ImageError naming the file, so the caller can go on with the next image.
    """
    image = read_image(path, loaded.input_channels)
    # Normalise the whole image once, exactly as training normalises each record, so that every
    # tile sees the same statistics and tiling cannot change the result.
    normalized = augment.zscore_normalize(image)
    try:
        logits, tile_count = predict_logits(predictor, normalized, loaded.name, tile_size,
                                            config.batch_size, halo)
    except tf.errors.ResourceExhaustedError as exc:
        raise ImageError(f"{path.name}: out of memory with {tile_size} px tiles in batches of "
                         f"{config.batch_size}; use a smaller --tile_size or --batch_size") from exc
    try:
        write_mask(target, np.argmax(logits, axis=-1).astype(label_dtype(loaded.number_classes)))
        if config.save_probabilities:
            write_probabilities(target.with_name(path.stem + PROBABILITIES_SUFFIX), softmax(logits))
    except OSError as exc:
        raise ImageError(f"{path.name}: cannot write its output: {exc}") from exc
    height, width, channels = image.shape
    return f"{height}x{width}x{channels} {image.dtype} ({tile_count} tile(s))"


def run_inference(config):
    """Segment every image of config.image_folder into config.output_folder.

    Returns:
      InferenceSummary. Raises InferenceError when the run cannot start (model, flags, folders);
      per-image problems are recorded in summary.failed and printed to stderr.
    """
    start_time = time.perf_counter()
    if config.batch_size < 1:
        raise InferenceError(f"--batch_size {config.batch_size}: must be at least 1")
    image_folder = pathlib.Path(config.image_folder)
    output_folder = pathlib.Path(config.output_folder)
    if not image_folder.is_dir():
        raise InferenceError(f"image folder not found: {image_folder}")
    output_folder.mkdir(parents=True, exist_ok=True)
    if output_folder.resolve() == image_folder.resolve():
        raise InferenceError(f"--output_folder {output_folder} is the image folder: masks named "
                             f"<stem>.tif would overwrite the input TIFFs")
    images = list_images(image_folder, config.image_extensions)
    if not images:
        raise InferenceError(f"no images with extensions {','.join(config.image_extensions)} "
                             f"in {image_folder}")

    device = resolve_device(config.gpu)
    with tf.device(device):
        loaded = load_model(config)
    halo = halo_for(loaded.name)
    tile_size = _resolve_tile_size(config.tile_size, loaded, halo)
    print(f"model: {loaded.source} ({loaded.name}, {loaded.input_channels} channel(s) in, "
          f"{loaded.number_classes} classes out)")
    print(f"device: {device}; tile {tile_size} px, halo {halo} px, batch {config.batch_size}; "
          f"{len(images)} image(s) from {image_folder} -> {output_folder}")
    if ((tile_size - 2 * halo) / tile_size) ** 2 < 0.25:
        print(f"note: each {tile_size} px tile keeps only its {tile_size - 2 * halo} px centre; "
              f"a larger --tile_size makes large images much faster")
    predictor = make_predictor(loaded.model)

    written, failed, owners = [], {}, {}
    for index, path in enumerate(images, start=1):
        image_start = time.perf_counter()
        target = output_folder / (path.stem + ".tif")
        try:
            if target.name in owners:
                raise ImageError(f"{path.name}: same stem as {owners[target.name]}, whose mask "
                                 f"{target.name} is already written")
            owners[target.name] = path.name
            with tf.device(device):
                description = _segment_file(path, target, loaded, predictor, tile_size, halo, config)
        except ImageError as exc:
            failed[path.name] = str(exc)
            print(f"[{index}/{len(images)}] FAILED {exc}", file=sys.stderr, flush=True)
            continue
        written.append(str(target))
        print(f"[{index}/{len(images)}] {path.name} {description} -> {target.name} "
              f"({time.perf_counter() - image_start:.2f} s)", flush=True)

    summary = InferenceSummary(written=written, failed=failed, seconds=time.perf_counter() - start_time)
    print(f"done: {summary.ok_count} mask(s) written to {output_folder}, {summary.failed_count} "
          f"failed, {summary.seconds:.1f} s")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return summary


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def build_parser():
    halos = {name: halo_for(name) for name in models.MODEL_NAMES}
    parser = argparse.ArgumentParser(
        description="Segment every image of a folder with a trained model; writes <stem>.tif class "
                    "masks (uint8, uint16 above 256 classes) of the same size into the output folder.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="trained model: a .keras file, or a training output folder "
                        "(uses its model.keras; config.json next to it gives the default tile size)")
    source.add_argument("--checkpoint_filepath", help="training checkpoint directory holding "
                        "model.weights.h5 (e.g. OUTPUT/checkpoints/latest), or a training output "
                        "folder (then its checkpoints/best, else checkpoints/latest); the model is "
                        "rebuilt from the output folder's config.json")
    parser.add_argument("--image_folder", required=True, help="folder of images to segment "
                        "(H x W or H x W x C; any integer or float pixel type)")
    parser.add_argument("--output_folder", required=True,
                        help="where masks go (created if missing; must differ from --image_folder)")
    parser.add_argument("--tile_size", type=int, default=None,
                        help="largest tile side sent to the network, a multiple of 16 (UNet) or 32 "
                        "(SegNet), at least 2 halos + 16/32 px (the halo, half the receptive field "
                        f"rounded up, is {halos['unet']} px for UNet and {halos['segnet']} px for "
                        "SegNet); larger images are cut into overlapping tiles. Default: the "
                        f"training tile_size from config.json (else {DEFAULT_TILE_SIZE}), raised to "
                        f"4 halos ({4 * halos['unet']} UNet, {4 * halos['segnet']} SegNet) when "
                        "smaller so that at least a quarter of every tile is kept")
    parser.add_argument("--batch_size", type=int, default=4, help="tiles per network call (default 4)")
    parser.add_argument("--gpu", type=int, default=None,
                        help="index of the GPU to run on; -1 for the CPU (default: first GPU if "
                        "any, else the CPU)")
    parser.add_argument("--save_probabilities", action="store_true",
                        help="also write <stem>_probabilities.npy: float32 H x W x classes softmax "
                        "maps (numpy.load)")
    parser.add_argument("--image_extensions", default=",".join(DEFAULT_EXTENSIONS),
                        help="comma-separated file extensions to process, case-insensitive "
                        f"(default {','.join(DEFAULT_EXTENSIONS)})")
    return parser


def config_from_args(args):
    """InferenceConfig from parsed command-line arguments."""
    extensions = tuple(e.strip().lower().lstrip(".") for e in args.image_extensions.split(",")
                       if e.strip())
    if not extensions:
        raise InferenceError(f"--image_extensions {args.image_extensions!r}: no extension given")
    return InferenceConfig(image_folder=args.image_folder, output_folder=args.output_folder,
                           model=args.model, checkpoint_filepath=args.checkpoint_filepath,
                           tile_size=args.tile_size, batch_size=args.batch_size, gpu=args.gpu,
                           save_probabilities=args.save_probabilities, image_extensions=extensions)


def main(argv=None):
    """Command-line entry point. Returns the exit code: 0 all written, 1 any failure."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        print("config: " + json.dumps(dataclasses.asdict(config)))
        summary = run_inference(config)
    except InferenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 1 if summary.failed_count else 0


if __name__ == "__main__":
    sys.exit(main())
