"""Segment whole images of any size, also larger than memory, with a trained UNet or SegNet.

    python inference.py --model runs/unet --image_folder my_images --output_folder my_masks
    python inference.py --model fold0 fold1 fold2 --tta ...     # ensemble, test-time augmentation

Input: every image file of --image_folder (TIFF, PNG, JPEG; OME-TIFF and pyramidal TIFF at full
resolution) and every Zarr / OME-Zarr folder (``*.zarr``) in it; --image_folder may also be one
``.zarr`` folder. TIFF and Zarr are read lazily, a band of tile rows at a time: an uncompressed
TIFF is memory-mapped, a tiled / compressed / pyramidal TIFF and Zarr are read by chunks
(tifffile's ``aszarr``), so an image larger than memory can be segmented. PNG/JPEG are read whole.

Each image is z-score normalised per channel with the statistics of the whole image (computed in a
streaming pass, normalization.py: the same values as in training), reflect-padded to a size the
network accepts and predicted by the tiled predictor (predictor.py): overlapping tiles whose halo
covers the receptive field, only each tile's centre kept, so the result equals one whole-image pass
(no seams). By default the tile is the largest the free memory allows (GPU memory on a GPU, else
RAM; predictor.default_tile_size), shrunk per image to the smallest size needing as many tiles.

Output, in --output_folder, per image ``<stem>``:
  - ``<stem>.tif``: class ids (uint8, uint16 above 256 classes), H x W. Images with more than
    STREAM_PIXELS pixels (2048 x 2048) are written progressively as a tiled (256 px), zlib-compressed
    BigTIFF, so memory holds a few bands of tiles, never the whole mask.
  - ``<stem>.zarr`` instead when the input was Zarr: a Zarr array H x W, chunks 512 x 512.
  - with --save_probabilities, the softmax maps H x W x classes float32: ``<stem>_probabilities.npy``
    for images up to STREAM_PIXELS read from files (numpy.load), else (and for Zarr input)
    ``<stem>_probabilities.zarr`` (a Zarr array, chunks 512 x 512 x classes), written band by band.
Every output is written to a temporary file or folder beside the target and renamed over it when
complete, so an existing output is only ever replaced by a complete new one.

--tta averages the softmax over the 8 flips / quarter turns of every tile (each undone exactly),
--model A B C averages the softmax of several models (same classes, channels and architecture).

An image that cannot be read (also a damaged one whose read fails midway), has the wrong number of
channels or holds NaN/Inf pixels is reported (naming the file) and skipped; the others are still
processed, and the exit code is 1 if any image failed. A run that cannot start (model, flags,
folders) exits with code 2. SIGTERM (scancel, a Slurm time limit, preemption) or SIGINT (Ctrl-C)
stops the run within a tile batch: the interrupted image's partial output is removed, the masks
already written stay, and the exit code is 143 / 130. Scratch left in --output_folder by a run that
was killed outright (SIGKILL) is removed by the next run.
"""
import argparse
import contextlib
import dataclasses
import json
import mmap
import os
import pathlib
import shutil
import signal
import sys
import threading
import time

import keras
import numpy as np
import tensorflow as tf
import tifffile

import checkpoints
import engines
import image_io
import models
import normalization
import predictor
import sharding
import uncertainty

DEFAULT_EXTENSIONS = ("tif", "tiff", "png", "jpg", "jpeg", "zarr")
PROBABILITIES_SUFFIX = "_probabilities.npy"
PROBABILITIES_ZARR_SUFFIX = "_probabilities.zarr"
# Above this many pixels an image's outputs are streamed (tiled BigTIFF / Zarr), below it written
# whole as a plain TIFF (and .npy), which every tool opens.
STREAM_PIXELS = 2048 * 2048
TIFF_TILE = 256
ZARR_CHUNK = 512
# The statistics pass reads blocks of at most this many values (float64 copies are made of them).
STATS_BLOCK_VALUES = 1024 ** 2
# A progress line at most this often (seconds) while an image is predicted.
PROGRESS_SECONDS = 15.0
EXIT_IMAGE_FAILED, EXIT_CANNOT_START = 1, 2


class InferenceError(Exception):
    """The run cannot start: missing or unreadable model, bad configuration or flags."""


class ImageError(Exception):
    """One image cannot be segmented (unreadable, wrong shape or channel count); others go on."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived (raised by main's handler in the main thread). A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` on the way swallows it, while every
    ``except BaseException``/``finally`` that removes scratch still runs."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum
        self.image = None  # the image being segmented, set by run_inference


@dataclasses.dataclass
class InferenceConfig:
    """Everything one inference run needs (the CLI flags as plain values).

    Exactly one of ``model`` (a .keras file or a training output folder holding model.keras) and
    ``checkpoint_filepath`` (a checkpoint directory holding model.weights.h5, or a training output
    folder) is set; either may be a list of paths: an ensemble whose softmax is averaged.
    ``tile_size`` None -> predictor.default_tile_size (from the free memory of the device).
    ``gpu`` None -> the first GPU if there is one, else the CPU; -1 -> the CPU.
    """
    image_folder: str
    output_folder: str
    model: str | list | None = None
    checkpoint_filepath: str | list | None = None
    tile_size: int | None = None
    batch_size: int = 1
    gpu: int | None = None
    save_probabilities: bool = False
    tta: bool = False
    image_extensions: tuple = DEFAULT_EXTENSIONS
    # (I, N): this process segments part I of N (sharding.py); a single image is split into row bands.
    part: tuple | None = None
    skip_existing: bool = False
    engine: str = "tensorflow"  # or "onnxruntime" (engines.py): same tiles, halos, TTA, ensembles
    uncertainty_csv: str | None = None  # rank the images by uncertainty here (uncertainty.py)


@dataclasses.dataclass
class InferenceSummary:
    """Outcome of run_inference: output paths written and failed input names with their reasons."""
    written: list
    failed: dict
    seconds: float
    skipped: list = dataclasses.field(default_factory=list)  # inputs whose complete outputs existed

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
    options: dict = dataclasses.field(default_factory=dict)  # shape options (e.g. unet_depth)


# ----------------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------------

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
    """Load the one model named by ``config.model`` or ``config.checkpoint_filepath`` (load_models
    checks that exactly one is given, and gives each member of an ensemble in turn).

    Returns:
      LoadedModel. Raises InferenceError naming the path when anything is missing or unreadable.
    """
    if config.model is not None:
        path = pathlib.Path(config.model)
        keras_path = path / "model.keras" if path.is_dir() else path
        if not keras_path.is_file():
            hint = (" (this folder has checkpoints/: use --checkpoint_filepath)"
                    if (path / "checkpoints").is_dir() else "")
            raise InferenceError(f"model not found: {keras_path} (expected a .keras file or a training "
                                 f"output folder holding model.keras){hint}")
        source = keras_path
    else:
        source = _resolve_checkpoint_dir(config.checkpoint_filepath)
    try:
        trained = checkpoints.load_trained(source)
    except checkpoints.ModelLoadError as exc:
        raise InferenceError(str(exc)) from exc
    model, name, training_config, source = trained.model, trained.name, trained.config, trained.source

    tile = training_config.get("tile_size") if training_config else None
    # Depth changes the size divisor and the halo: from config.json, else from the model itself.
    options = ({key: training_config[key] for key in models.OPTION_KEYS if key in training_config}
               if training_config else models.options_of(model))
    try:
        models.check_options(name, **options)
    except ValueError as exc:
        if training_config is None:
            # The options were read from the model's layers, not given by anyone: a message naming
            # a flag (e.g. "--unet_depth 0") would blame a flag the user never gave.
            raise InferenceError(
                f"{source} is not a model trained by this tool: it is named {name!r}, but its layers "
                f"are not those of this tool's {models.display_name(name)}. Inference needs the "
                f"model.keras that train_unet.py / train_segnet.py export into their output folder "
                f"(with its config.json), or such a folder's checkpoint (--checkpoint_filepath)") from exc
        raise InferenceError(f"{source}: {exc}") from exc
    return LoadedModel(model=model, name=name, number_classes=int(model.output_shape[-1]),
                       input_channels=int(model.input_shape[-1]),
                       training_tile_size=int(tile) if tile else None, source=source, options=options)


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


def _recorded_normalization(source):
    """The "normalization" entry of the training config.json beside a loaded model; a model without
    one (trained before it was recorded, or a bare .keras file) used checkpoints.NORMALIZATION."""
    folder = pathlib.Path(source).parent
    for candidate in (folder, folder.parent, folder.parent.parent):
        path = candidate / "config.json"
        if path.is_file():
            with contextlib.suppress(OSError, ValueError, AttributeError):
                return json.loads(path.read_text()).get("normalization", checkpoints.NORMALIZATION)
            return None
    return checkpoints.NORMALIZATION


def load_models(config):
    """Every model of the run (one, or the members of an ensemble), checked to be compatible.

    Returns:
      list of LoadedModel. Raises InferenceError when a member cannot be loaded, or when members
      differ in classes, input channels, architecture (halo and size divisor) or normalisation.
    """
    if (config.model is None) == (config.checkpoint_filepath is None):
        raise InferenceError("give exactly one of --model and --checkpoint_filepath")
    flag, paths = (("--model", config.model) if config.model is not None
                   else ("--checkpoint_filepath", config.checkpoint_filepath))
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise InferenceError(f"{flag}: no path given")
    loaded = []
    for path in paths:
        member = dataclasses.replace(config, model=str(path) if flag == "--model" else None,
                                     checkpoint_filepath=str(path) if flag != "--model" else None)
        loaded.append(load_model(member))
    first = loaded[0]
    for other in loaded[1:]:
        for what, value in [("classes", lambda m: m.number_classes),
                            ("input channels", lambda m: m.input_channels),
                            ("architecture", lambda m: (m.name, models.model_options(m.name, **m.options))),
                            ("normalisation", lambda m: _recorded_normalization(m.source))]:
            if value(other) != value(first):
                raise InferenceError(
                    f"{flag}: ensemble members differ in {what}: {first.source} has {value(first)!r}, "
                    f"{other.source} has {value(other)!r}; an ensemble averages the softmax of models "
                    f"trained for the same task (same classes, channels and architecture)")
    return loaded


# ----------------------------------------------------------------------------------------------
# Images in: lazily read row bands
# ----------------------------------------------------------------------------------------------

def is_zarr_folder(path):
    path = pathlib.Path(path)
    return path.is_dir() and path.suffix.lower() == ".zarr"


class ImageSource:
    """One image as H x W x C, read lazily: ``source[r0:r1]`` reads rows r0..r1 only.

    ``array`` is anything sliceable numpy-style (ndarray, memory map, zarr array); ``axes`` names
    each of its axes: "y", "x", "c" or "-" (a length-1 axis that is dropped).
    """

    def __init__(self, name, array, axes, kind, on_close=None, mapping=None):
        self.name, self.array, self.axes, self.kind = name, array, axes, kind
        self._on_close, self._mapping = on_close or [], mapping
        self.dtype = np.dtype(array.dtype)
        channels = array.shape[axes.index("c")] if "c" in axes else 1
        self.shape = (int(array.shape[axes.index("y")]), int(array.shape[axes.index("x")]), int(channels))
        # Rows per stored chunk (1 when any row range is read directly): reads aligned to it decode
        # each chunk once.
        chunks = getattr(array, "chunks", None)
        self.chunk_rows = int(chunks[axes.index("y")]) if chunks else 1

    def __getitem__(self, rows):
        index = tuple(rows if a == "y" else 0 if a == "-" else slice(None) for a in self.axes)
        try:
            block = self.array[index]
            # A copy detaches the rows from a memory map (zarr already returns a new array).
            block = np.array(block) if self._mapping is not None else np.asarray(block)
        except Exception as exc:  # decoders raise many types, e.g. tifffile's "corrupted tile"
            # Damage past the header shows only when its chunks are decoded, at any point of the
            # statistics pass or the prediction: this image fails by name, the others go on.
            raise ImageError(f"{self.name}: cannot read rows {rows.start}-{rows.stop} "
                             f"({type(exc).__name__}: {exc}); the file is damaged or truncated") from exc
        kept = [a for a in self.axes if a != "-"]
        block = np.transpose(block, [kept.index(a) for a in "yxc" if a in kept])
        if "c" not in kept:
            block = block[:, :, np.newaxis]
        if self._mapping is not None:
            # Pages of a memory-mapped file count as this process's memory while mapped: drop them
            # once read, so scanning a huge TIFF does not look (and get killed) like a memory leak.
            self._mapping.madvise(mmap.MADV_DONTNEED)
        return block.astype(np.uint8) if block.dtype == bool else block

    def close(self):
        for close in reversed(self._on_close):
            with contextlib.suppress(Exception):
                close()
        self._on_close = []


# Axis letters meaning "not declared": tifffile names an axis of a file without axis metadata 'Q'
# (shaped, unknown) or 'I' (a plain sequence of pages).
UNDECLARED_AXES = ("Q", "I")
STACK_AXES = {"Z": "a Z stack of {n} planes", "T": "a time series of {n} frames"}


def _declared_axes(path, names, shape):
    """ImageSource axes from the axis names a file declares (tifffile's series axes such as "ZYX",
    "YXS", "CYX"; OME-Zarr / Zarr dimension names), or None when it declares none.

    C and S (samples, e.g. RGB) are channels, Y and X the image plane, length-1 axes are dropped; any
    other axis longer than 1 (Z, T, ...) is refused by name: its planes are not channels.
    """
    names = [str(name).upper() for name in names]
    if len(names) != len(shape) or any(n in UNDECLARED_AXES and size > 1 for n, size in zip(names, shape)):
        return None
    axes = ""
    for name, size in zip(names, shape):
        if name in ("Y", "X"):
            axes += name.lower()
        elif size == 1:
            axes += "-"
        elif name in ("C", "S") and "c" not in axes:
            axes += "c"
        else:
            what = STACK_AXES.get(name, f"{{n}} planes along axis {name!r}").format(n=size)
            raise ImageError(
                f"{path.name}: {what} (axes {' '.join(names)}, shape {tuple(shape)}); only 2-D images "
                f"(Y, X and channels) are segmented: save one image per plane (or a projection) and "
                f"segment those")
    return axes if "y" in axes and "x" in axes else None


def _guessed_axes(path, shape, channels):
    """Axes of an array whose file declares none (_axes_from_shape), said in one printed line when
    there was a choice. A 3-D array whose ends both differ from the model's channel count and whose
    first axis is the shorter is refused as a stack: reading its 256 rows as channels blames the
    wrong axis."""
    kept = [size for size in shape if size != 1] if len(shape) > 3 else list(shape)
    if len(kept) == 3 and channels not in (kept[0], kept[-1]) and kept[0] < kept[-1]:
        raise ImageError(
            f"{path.name}: shape {tuple(shape)} without axis names: a stack of {kept[0]} planes along "
            f"its first axis, which may be channels, Z or time; the model expects {channels} "
            f"channel(s). Only 2-D images are segmented: save one image per plane (or a projection), "
            f"or write the file with its axes (e.g. tifffile's metadata={{'axes': 'CYX'}})")
    axes = _axes_from_shape(shape, channels)
    if axes is not None and len(kept) == 3:
        layout = "C x H x W" if axes.replace("-", "") == "cyx" else "H x W x C"
        print(f"    {path.name}: the file does not declare its axes; shape {tuple(shape)} read as "
              f"{layout}", flush=True)
    return axes


def _axes_from_shape(shape, channels):
    """Axes of an array without axis names: H x W, H x W x C, or C x H x W when C is the model's
    channel count and the last axis is not; length-1 leading axes of higher ranks are dropped."""
    axes = ["?"] * len(shape)
    leading = 0
    while len(shape) - leading > 3 and shape[leading] == 1:
        axes[leading] = "-"
        leading += 1
    rest = shape[leading:]
    if len(rest) == 2:
        axes[leading:] = ["y", "x"]
    elif len(rest) == 3 and rest[-1] != channels and rest[0] == channels:
        axes[leading:] = ["c", "y", "x"]
    elif len(rest) == 3:
        axes[leading:] = ["y", "x", "c"]
    else:
        return None
    return "".join(axes)


def _check_source(source, path, channels):
    if not (np.issubdtype(source.dtype, np.integer) or np.issubdtype(source.dtype, np.floating)
            or source.dtype == bool):
        raise ImageError(f"{path.name}: pixel type {source.dtype} is not an integer or real type")
    if source.shape[-1] != channels:
        raise ImageError(f"{path.name}: has {source.shape[-1]} channel(s) (shape "
                         f"{tuple(source.array.shape)}), the model expects {channels}")
    if source.shape[0] == 0 or source.shape[1] == 0:
        raise ImageError(f"{path.name}: cannot read image (no pixel data found)")
    return source


def _make_source(path, array, channels, kind, on_close=(), mapping=None, axes=None, names=None):
    """ImageSource of ``array``: with ``axes`` as given, else from the axis ``names`` the file
    declares, else guessed from the shape."""
    try:
        axes = axes or (_declared_axes(path, names, tuple(array.shape)) if names else None)
        axes = axes or _guessed_axes(path, tuple(array.shape), channels)
        if axes is None:
            raise ImageError(f"{path.name}: shape {tuple(array.shape)} is not H x W or H x W x C")
    except ImageError:
        for close in on_close:
            close()
        raise
    return ImageSource(path.name, array, axes, kind, list(on_close), mapping)


def _open_tiff(path, channels):
    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, OSError, ...
        raise ImageError(f"{path.name}: cannot read image ({type(exc).__name__}: {exc})") from exc
    try:
        if not tif.series or not tif.series[0].shape or 0 in tif.series[0].shape:
            raise ImageError(f"{path.name}: cannot read image (no pixel data found)")
        series = tif.series[0]
        level = series.levels[0]  # full resolution of a pyramid
        if len(tif.series) > 1:
            print(f"    {path.name}: holds {len(tif.series)} image series; segmenting the first, "
                  f"series 0 (axes {series.axes}, shape {tuple(series.shape)})", flush=True)
        if level.dataoffset is not None and level.dtype is not None:
            # Uncompressed and contiguous in the file: memory-map it.
            mapping = mmap.mmap(tif.filehandle.fileno(), 0, access=mmap.ACCESS_READ)
            array = np.ndarray(level.shape, level.dtype.newbyteorder(tif.byteorder), buffer=mapping,
                               offset=level.dataoffset)
            return _make_source(path, array, channels, "memory-mapped TIFF",
                                [mapping.close, tif.close], mapping, names=level.axes)
        try:
            import zarr
        except ImportError:  # without zarr a compressed TIFF can only be read whole
            return _make_source(path, level.asarray(), channels, "TIFF", [tif.close], names=level.axes)
        store = tif.aszarr(series=0, level=0)
        array = zarr.open(store, mode="r")
        return _make_source(path, array, channels, "chunked TIFF", [store.close, tif.close],
                            names=level.axes)
    except ImageError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise ImageError(f"{path.name}: cannot read image ({type(exc).__name__}: {exc})") from exc


def _ome_zarr_level0(group, path):
    """(array, axes) of an OME-Zarr image group's full-resolution level, or (None, None)."""
    attributes = group.attrs.asdict()
    multiscales = attributes.get("multiscales") or attributes.get("ome", {}).get("multiscales")
    if not multiscales:
        return None, None
    first = multiscales[0]
    array = group[first["datasets"][0]["path"]]
    # NGFF 0.4 axes are {"name", "type"} (a type "channel" / "time" axis may have any name), 0.3's
    # plain names ("tczyx").
    names = [({"channel": "C", "time": "T"}.get(axis.get("type"), axis.get("name", "?"))
              if isinstance(axis, dict) else axis) for axis in first.get("axes", [])]
    return array, _declared_axes(path, names, tuple(array.shape))


def _open_zarr(path, channels):
    try:
        import zarr
    except ImportError as exc:
        raise ImageError(f"{path.name}: reading Zarr needs the zarr package (pip install zarr)") from exc
    try:
        node = zarr.open(str(path), mode="r")
        axes = None
        if isinstance(node, zarr.Group):
            array, axes = _ome_zarr_level0(node, path)
            if array is None:
                arrays = list(node.array_keys())
                if len(arrays) != 1:
                    raise ImageError(f"{path.name}: a Zarr group without OME-Zarr multiscales "
                                     f"metadata and with {len(arrays)} arrays; expected one image")
                array = node[arrays[0]]
        else:
            array = node
        # A plain array's axis names: Zarr v3 dimension_names, or xarray's attribute in Zarr v2.
        names = (getattr(array.metadata, "dimension_names", None)
                 or array.attrs.asdict().get("_ARRAY_DIMENSIONS"))
    except ImageError:
        raise
    except Exception as exc:  # zarr raises many types for damaged or foreign folders
        raise ImageError(f"{path.name}: cannot read Zarr image ({type(exc).__name__}: {exc})") from exc
    if names is not None and any(name is None for name in names):
        names = None
    return _make_source(path, array, channels, "Zarr", axes=axes, names=names)


def open_image(path, channels):
    """The image at ``path`` as an ImageSource (H x W x C), checked against ``channels``.

    TIFF: memory-mapped when uncompressed and contiguous, else read by chunks (tiled, compressed,
    pyramidal at level 0, OME-TIFF); Zarr / OME-Zarr folders by chunks; other formats whole.
    Raises ImageError naming the file.
    """
    path = pathlib.Path(path)
    if is_zarr_folder(path):
        source = _open_zarr(path, channels)
    elif image_io.extension_of(path) in image_io.TIFF_EXTENSIONS:
        source = _open_tiff(path, channels)
    else:
        try:
            array = image_io.read_array(path, kind="image")
        except image_io.ImageFileError as exc:
            raise ImageError(str(exc)) from exc
        # PNG and JPEG store H x W or H x W x C by definition: nothing to guess.
        source = _make_source(path, array, channels, "in memory",
                              axes={2: "yx", 3: "yxc"}.get(array.ndim))
    try:
        return _check_source(source, path, channels)
    except ImageError:
        source.close()
        raise


def image_statistics(image, name):
    """Per-channel statistics of a whole image (ndarray or ImageSource) in one streaming pass.

    Raises ImageError naming the image when it holds NaN or Inf values: a mask computed from them
    would be silently wrong.
    """
    height, width, channels = image.shape
    chunk_rows = getattr(image, "chunk_rows", 1)
    rows = max(1, STATS_BLOCK_VALUES // (width * channels))
    rows = max(chunk_rows, rows // chunk_rows * chunk_rows)
    running = normalization.StreamingStatistics(channels)
    non_finite = 0
    for top in range(0, height, rows):
        block = np.asarray(image[top:top + rows])
        if np.issubdtype(block.dtype, np.floating):
            bad = ~np.isfinite(block).all(axis=-1)
            non_finite += int(bad.sum())
            if non_finite:
                continue
        running.update(block)
    if non_finite:
        raise ImageError(f"{name}: {non_finite} pixel(s) with NaN or Inf values (of {height * width}); "
                         f"replace them (e.g. by the image's median) before segmenting")
    return running.result()


# ----------------------------------------------------------------------------------------------
# Masks out: whole, or streamed as tiled BigTIFF / Zarr
# ----------------------------------------------------------------------------------------------

def label_dtype(number_classes):
    """Smallest unsigned type holding class ids 0 .. number_classes - 1."""
    return np.uint8 if number_classes <= 256 else np.uint16


def softmax(logits):
    """Per-pixel class probabilities of H x W x classes logits (float32)."""
    return predictor._softmax(logits).astype(np.float32)


def write_mask(path, labels):
    """Write an H x W class-id mask as a TIFF, atomically."""
    image_io.atomic_write(path, lambda f: tifffile.imwrite(f, labels))


def write_probabilities(path, probabilities):
    """Write H x W x classes float32 probabilities as .npy, atomically."""
    image_io.atomic_write(path, lambda f: np.save(f, probabilities))


@contextlib.contextmanager
def atomic_folder(path):
    """Yield a temporary folder beside ``path`` to fill; when the block completes, it replaces
    ``path`` (the old one is removed only after the new one is in place). Removed on failure."""
    path = pathlib.Path(path)
    temporary, old = image_io.scratch_path(path, "tmp"), image_io.scratch_path(path, "old")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        yield temporary
        if path.exists() or path.is_symlink():
            os.replace(path, old)
        os.replace(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        if os.path.lexists(old) and not os.path.lexists(path):  # stopped between the two renames
            os.replace(old, path)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old.exists():
        old.unlink()


def _create_zarr(folder, shape, dtype):
    import zarr
    chunks = (ZARR_CHUNK, ZARR_CHUNK) + tuple(shape[2:])
    return zarr.create_array(store=str(folder), shape=shape, chunks=chunks, dtype=dtype)


class RowBlocks:
    """Collects bands of rows in order and hands them on in blocks of ``rows`` rows (the last one
    may be shorter), so writers get chunk-aligned blocks whatever the tile bands' heights."""

    def __init__(self, rows):
        self.rows, self.start, self.pending = rows, 0, None

    def add(self, band):
        if self.pending is not None:
            band = np.concatenate([self.pending, band])
        stop = len(band) // self.rows * self.rows
        for top in range(0, stop, self.rows):
            yield self.start, band[top:top + self.rows]
            self.start += self.rows
        self.pending = band[stop:].copy()  # a copy: the band itself can be freed

    def flush(self):
        if self.pending is not None and len(self.pending):
            yield self.start, self.pending
        self.pending = None


def _tiff_tiles(blocks, width):
    """TIFF tiles (TIFF_TILE square, row-major, zero-padded at the edges) of row blocks."""
    for _, block in blocks:
        padded = np.zeros((TIFF_TILE, -(-width // TIFF_TILE) * TIFF_TILE) + block.shape[2:], block.dtype)
        padded[:len(block), :width] = block
        for left in range(0, width, TIFF_TILE):
            yield padded[:, left:left + TIFF_TILE]


class Progress:
    """A plain progress line with rate and ETA, at most every PROGRESS_SECONDS (none for short
    images): readable in logs, where a redrawn bar would be noise."""

    def __init__(self, name, pixels, interval=PROGRESS_SECONDS):
        self.name, self.pixels, self.interval = name, pixels, interval
        self.start = self.last = time.perf_counter()

    def __call__(self, done, total):
        now = time.perf_counter()
        if now - self.last < self.interval or done == total:
            return
        self.last = now
        elapsed = now - self.start
        rate = self.pixels * done / total / elapsed / 1e6
        print(f"    {self.name}: {done}/{total} tiles ({100 * done / total:.0f} %), {rate:.2f} Mpx/s, "
              f"ETA {_duration(elapsed * (total - done) / done)}", flush=True)


def _duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _interruptible(forward, device):
    """``forward`` run in a helper thread while the main thread waits for it.

    Python runs a signal handler only in the main thread, between bytecodes: during one network call
    SIGTERM would wait for the call to end, about 2 minutes for the default UNet on a 2,368 px tile
    on a 2-core CPU (measured), past Slurm's usual 30 s before SIGKILL. A main thread waiting here
    handles it at once; the call still running is abandoned (see the end of this file).
    """
    def call(batch):
        outcome = {}

        def work():
            try:
                with tf.device(device):  # device scopes are per thread
                    outcome["logits"] = forward(batch)
            except BaseException as exc:  # handed to the main thread, e.g. ResourceExhaustedError
                outcome["error"] = exc

        thread = threading.Thread(target=work, name="inference-forward", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.25)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["logits"]

    return call


def _segment_file(path, output_folder, loaded, forward, tile_size, device, config, tally=None):
    """Read, normalise, predict and write one image. Returns (outputs written, description).
    ``tally``: an uncertainty.ImageUncertainty fed with every pixel's normalised entropy, or None.

    Every per-image problem (unreadable, wrong channels, NaN, out of memory, unwritable output) is
    raised as ImageError naming the file, so the caller can go on with the next image.
    """
    first = loaded[0]
    source = open_image(path, first.input_channels)
    try:
        height, width, channels = source.shape
        # Statistics of the whole image, exactly as training normalises each source image, so that
        # every tile sees the same values and tiling cannot change the result.
        stats = image_statistics(source, path.name)
        stem = path.stem if not is_zarr_folder(path) else path.name[:-len(".zarr")]
        zarr_out = is_zarr_folder(path)
        streamed = zarr_out or height * width > STREAM_PIXELS

        def labels_of(logits):
            return np.argmax(logits, axis=-1).astype(label_dtype(first.number_classes))

        outputs = [labels_of] + ([softmax] if config.save_probabilities else [])
        if tally is not None:  # last, so the writers' results[0] / results[1] stay as they are
            outputs.append(uncertainty.normalized_entropy)
        tiles = predictor.count_tiles(height, width, first.name, tile_size, options=first.options)
        progress = Progress(path.name, height * width)

        def bands():
            with tf.device(device):
                for band in predictor.iter_bands(_interruptible(forward, device), source, stats,
                                                 first.name, tile_size,
                                                 config.batch_size, config.tta, outputs=outputs,
                                                 progress=progress, options=first.options):
                    if tally is not None:
                        tally.add(band[2][-1])
                    yield band

        try:
            if not streamed:
                labels = np.empty((height, width), label_dtype(first.number_classes))
                probabilities = (np.empty((height, width, first.number_classes), np.float32)
                                 if config.save_probabilities else None)
                for lo, hi, results in bands():
                    labels[lo:hi] = results[0]
                    if probabilities is not None:
                        probabilities[lo:hi] = results[1]
                targets = [output_folder / (stem + ".tif")]
                write_mask(targets[0], labels)
                if probabilities is not None:
                    targets.append(output_folder / (stem + PROBABILITIES_SUFFIX))
                    write_probabilities(targets[1], probabilities)
            else:
                targets = _write_streamed(bands(), output_folder, stem, zarr_out, (height, width),
                                          first.number_classes, config.save_probabilities)
        except tf.errors.ResourceExhaustedError as exc:
            raise ImageError(f"{path.name}: out of memory with {tile_size} px tiles in batches of "
                             f"{config.batch_size}; use a smaller --tile_size or --batch_size") from exc
        except OSError as exc:
            raise ImageError(f"{path.name}: cannot write its output: {exc}") from exc
    finally:
        source.close()
    layout = "tiled BigTIFF" if streamed and not zarr_out else "Zarr" if zarr_out else "TIFF"
    return targets, (f"{height}x{width}x{channels} {source.dtype} {source.kind} ({tiles} tile(s)"
                     f"{', TTA' if config.tta else ''}) -> {layout}")


def _write_streamed(bands, output_folder, stem, zarr_out, shape, number_classes, save_probabilities):
    """Write the bands of one image as they come: the mask as a tiled compressed BigTIFF (or a Zarr
    array), the probabilities as a Zarr array. Returns the targets written."""
    height, width = shape
    dtype = label_dtype(number_classes)
    mask_target = output_folder / (stem + (".zarr" if zarr_out else ".tif"))
    probability_target = output_folder / (stem + PROBABILITIES_ZARR_SUFFIX)
    with contextlib.ExitStack() as stack:
        probabilities = None
        if save_probabilities:
            folder = stack.enter_context(atomic_folder(probability_target))
            probabilities = _create_zarr(folder, (height, width, number_classes), np.float32)
        probability_blocks = RowBlocks(ZARR_CHUNK)

        def mask_blocks(rows):
            blocks = RowBlocks(rows)
            for _, _, results in bands:
                yield from blocks.add(results[0])
                if probabilities is not None:
                    for start, block in probability_blocks.add(results[1]):
                        probabilities[start:start + len(block)] = block
            # Before the mask's last block: tifffile stops pulling once it has every tile.
            if probabilities is not None:
                for start, block in probability_blocks.flush():
                    probabilities[start:start + len(block)] = block
            yield from blocks.flush()

        if zarr_out:
            with atomic_folder(mask_target) as folder:
                mask = _create_zarr(folder, (height, width), dtype)
                for start, block in mask_blocks(ZARR_CHUNK):
                    mask[start:start + len(block)] = block
        else:
            # maxworkers=1: with several, tifffile hands the tile iterator to ThreadPoolExecutor.map,
            # which pulls every tile at once, i.e. the whole image before writing any of it.
            image_io.atomic_write(mask_target, lambda f: tifffile.imwrite(
                f, _tiff_tiles(mask_blocks(TIFF_TILE), width), shape=(height, width), dtype=dtype,
                tile=(TIFF_TILE, TIFF_TILE), compression="zlib", bigtiff=True, maxworkers=1))
    return [mask_target] + ([probability_target] if save_probabilities else [])


def expected_outputs(path, output_folder, shape, number_classes, save_probabilities):
    """{target path: shape} of the complete outputs of the image at ``path`` (H x W x C ``shape``),
    named and laid out as _segment_file writes them."""
    zarr_out = is_zarr_folder(path)
    stem = path.name[:-len(".zarr")] if zarr_out else path.stem
    height, width = shape[:2]
    targets = {output_folder / (stem + (".zarr" if zarr_out else ".tif")): (height, width)}
    if save_probabilities:
        streamed = zarr_out or height * width > STREAM_PIXELS
        suffix = PROBABILITIES_ZARR_SUFFIX if streamed else PROBABILITIES_SUFFIX
        targets[output_folder / (stem + suffix)] = (height, width, number_classes)
    return targets


def outputs_complete(path, output_folder, loaded, config):
    """True when every output of ``path`` exists complete (sharding.output_is_complete): opens, has
    the image's shape, holds all its data. An unreadable input is never complete (it is then tried
    and reported by name)."""
    try:
        source = open_image(path, loaded.input_channels)
    except ImageError:
        return False
    source.close()
    targets = expected_outputs(path, output_folder, source.shape, loaded.number_classes,
                               config.save_probabilities)
    return all(sharding.output_is_complete(target, shape) for target, shape in targets.items())


def _open_shared_zarr(target, shape, dtype):
    """The Zarr array at ``target`` that the parts of a banded image write into: created by the first
    part to get there (built aside, then renamed: a rename onto an existing folder fails, so exactly
    one part's array wins), then opened by all. Raises ImageError when an existing one does not fit."""
    import zarr

    if not target.exists():
        temporary = image_io.scratch_path(target, "tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        _create_zarr(temporary, shape, dtype)
        try:
            os.rename(temporary, target)
        except OSError:  # another part created it first: use theirs
            shutil.rmtree(temporary, ignore_errors=True)
    try:
        array = zarr.open_array(str(target), mode="r+")
    except Exception as exc:
        raise ImageError(f"{target}: exists but is not a Zarr array ({type(exc).__name__}: {exc}); "
                         f"remove it and rerun the parts") from exc
    if (tuple(array.shape), np.dtype(array.dtype), array.chunks[0]) != (tuple(shape), np.dtype(dtype),
                                                                        ZARR_CHUNK):
        raise ImageError(f"{target}: holds a {array.dtype} array of shape {tuple(array.shape)} (chunks "
                         f"{array.chunks}), this image needs {np.dtype(dtype)} {tuple(shape)} in "
                         f"{ZARR_CHUNK}-row chunks: it is from another run; remove it and rerun the parts")
    return array


def _segment_band(path, output_folder, loaded, forward, tile_size, device, config):
    """Predict and write part I of N of one image: its row band, into the shared ``<stem>.zarr`` (and
    ``<stem>_probabilities.zarr``). Band borders are on Zarr chunk rows, so parts never write the
    same chunk; the tile plan is the whole image's, so each band equals those rows of a one-process
    run. A marker written last (sharding.write_band_marker) says the band is complete.

    Returns (outputs, description, skipped).
    """
    index, count = config.part
    first = loaded[0]
    source = open_image(path, first.input_channels)
    try:
        height, width, channels = source.shape
        stem = path.name[:-len(".zarr")] if is_zarr_folder(path) else path.stem
        lo, hi = sharding.band_rows(height, index, count, ZARR_CHUNK)
        targets = [output_folder / (stem + ".zarr")]
        if config.save_probabilities:
            targets.append(output_folder / (stem + PROBABILITIES_ZARR_SUFFIX))
        band = f"rows {lo}-{hi} of {height}x{width}x{channels} (band {index}/{count})"
        if config.skip_existing and sharding.band_marker(output_folder, stem, index, count).is_file():
            return targets, f"{band}: marked complete", True
        if lo == hi:  # more parts than chunk rows: nothing to predict
            sharding.write_band_marker(output_folder, stem, index, count, (lo, hi))
            return targets, f"{band}: empty band", False
        # Every part computes the whole image's statistics: normalisation must not depend on the band.
        stats = image_statistics(source, path.name)

        def labels_of(logits):
            return np.argmax(logits, axis=-1).astype(label_dtype(first.number_classes))

        outputs = [labels_of] + ([softmax] if config.save_probabilities else [])
        try:
            arrays = [_open_shared_zarr(targets[0], (height, width), label_dtype(first.number_classes))]
            if config.save_probabilities:
                arrays.append(_open_shared_zarr(targets[1], (height, width, first.number_classes),
                                                np.float32))
            blocks = [_blocks_from(lo) for _ in arrays]
            with tf.device(device):
                for _, _, results in predictor.iter_bands(
                        forward, source, stats, first.name, tile_size, config.batch_size, config.tta,
                        outputs=outputs, progress=Progress(path.name, width * (hi - lo)),
                        options=first.options, rows=(lo, hi)):
                    for array, rows, result in zip(arrays, blocks, results):
                        for start, block in rows.add(result):
                            array[start:start + len(block)] = block
            for array, rows in zip(arrays, blocks):
                for start, block in rows.flush():
                    array[start:start + len(block)] = block
            sharding.write_band_marker(output_folder, stem, index, count, (lo, hi))
        except tf.errors.ResourceExhaustedError as exc:
            raise ImageError(f"{path.name}: out of memory with {tile_size} px tiles in batches of "
                             f"{config.batch_size}; use a smaller --tile_size or --batch_size") from exc
        except OSError as exc:
            raise ImageError(f"{path.name}: cannot write its output: {exc}") from exc
    finally:
        source.close()
    done = sharding.bands_done(output_folder, stem, count)
    state = "all bands written" if len(done) == count else f"{len(done)} of {count} bands written"
    return targets, f"{band} -> shared Zarr ({state})", False


def _blocks_from(start):
    """RowBlocks of Zarr chunk height whose first block starts at image row ``start``."""
    blocks = RowBlocks(ZARR_CHUNK)
    blocks.start = start
    return blocks


def list_images(folder, extensions):
    """Images of ``folder``: files with these extensions and (with "zarr") ``*.zarr`` folders, sorted,
    hidden ones skipped; a ``.zarr`` folder given itself is one image."""
    folder = pathlib.Path(folder)
    if is_zarr_folder(folder):
        return [folder]
    found = image_io.list_files(folder, [e for e in extensions if e != "zarr"])
    if "zarr" in extensions:
        found += [p for p in folder.iterdir() if not p.name.startswith(".") and is_zarr_folder(p)]
    return sorted(found)


def resolve_tile_size(requested, loaded, batch_size, device):
    """Tile side to use: the requested one (validated), else predictor.default_tile_size for the
    free memory of ``device`` (its memory is asked for by the physical index, e.g. "/GPU:1")."""
    name, options = loaded[0].name, loaded[0].options
    if requested is None:
        return predictor.default_tile_size([m.model for m in loaded], name, batch_size, device=device,
                                           options=options)
    divisor, halo = predictor.size_divisor(name, options), predictor.halo_for(name, options)
    smallest = predictor.smallest_tile(name, options)
    if requested < smallest or requested % divisor:
        raise InferenceError(
            f"--tile_size {requested}: must be a multiple of {divisor} and at least {smallest} for "
            f"{name} (a halo of {halo} px on each side covers its receptive field of "
            f"{models.receptive_field(name, **options)} px); larger tiles are faster, e.g. {8 * halo}")
    return requested


def _check_folders(config):
    image_folder = pathlib.Path(config.image_folder)
    output_folder = pathlib.Path(config.output_folder)
    if not image_folder.is_dir():
        raise InferenceError(f"--image_folder {image_folder}: folder not found")
    if output_folder.exists() and not output_folder.is_dir():
        raise InferenceError(f"--output_folder {output_folder} is an existing file, not a folder: "
                             f"give a folder (it is created if missing)")
    if output_folder.resolve() == image_folder.resolve():
        raise InferenceError(f"--output_folder {output_folder} is the image folder: masks named "
                             f"<stem>.tif would overwrite the input TIFFs")
    images = list_images(image_folder, config.image_extensions)
    if not images:
        raise InferenceError(f"no images with extensions {','.join(config.image_extensions)} "
                             f"in {image_folder}")
    return image_folder, output_folder, images


def run_inference(config):
    """Segment every image of config.image_folder into config.output_folder.

    Returns:
      InferenceSummary. Raises InferenceError when the run cannot start (model, flags, folders);
      per-image problems are recorded in summary.failed and printed to stderr.
    """
    start_time = time.perf_counter()
    if config.batch_size < 1:
        raise InferenceError(f"--batch_size {config.batch_size}: must be at least 1")
    image_folder, output_folder, images = _check_folders(config)
    if config.uncertainty_csv and not os.path.isdir(os.path.dirname(os.path.abspath(config.uncertainty_csv))):
        raise InferenceError(f"--uncertainty_csv {config.uncertainty_csv}: its folder does not exist")
    banded = config.part is not None and config.part[1] > 1 and len(images) == 1
    if config.part is not None and not banded:
        images, part_pixels, all_pixels = sharding.select_part(images, *config.part)
        print(f"part {config.part[0]}/{config.part[1]}: {len(images)} image(s), "
              f"{part_pixels / 1e6:.2f} of {all_pixels / 1e6:.2f} Mpx")
        if not images:
            return InferenceSummary(written=[], failed={}, seconds=time.perf_counter() - start_time)

    device = resolve_device(config.gpu)
    with tf.device(device):
        loaded = load_models(config)
    first = loaded[0]
    # resolve_device renumbers the chosen GPU as GPU:0; its free memory is that of --gpu.
    memory_device = f"/GPU:{config.gpu or 0}" if "GPU" in device else "/CPU:0"
    tile_size = resolve_tile_size(config.tile_size, loaded, config.batch_size, memory_device)
    try:
        output_folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InferenceError(f"--output_folder {output_folder}: cannot create it: {exc}") from exc
    for action in image_io.remove_stale_scratch(output_folder):
        print(action)
    halo = predictor.halo_for(first.name, first.options)
    for member in loaded:
        print(f"model: {member.source} ({member.name}, {member.input_channels} channel(s) in, "
              f"{member.number_classes} classes out)")
    print(f"engine: {config.engine}; device: {device}; tiles up to {tile_size} px, halo {halo} px, "
          f"batch {config.batch_size}"
          f"{', test-time augmentation (8 transforms)' if config.tta else ''}"
          f"{f', ensemble of {len(loaded)} models' if len(loaded) > 1 else ''}; "
          f"{len(images)} image(s) from {image_folder} -> {output_folder}")
    try:
        forward = engines.make_forward(config.engine, loaded)
    except engines.EngineError as exc:
        raise InferenceError(str(exc)) from exc

    written, failed, owners, skipped, ranking = [], {}, {}, [], []
    for index, path in enumerate(images, start=1):
        image_start = time.perf_counter()
        stem = path.name[:-len(".zarr")] if is_zarr_folder(path) else path.stem
        tally = None  # the uncertainty of a whole-image run (a band of a shared image has none)
        try:
            if stem in owners:
                raise ImageError(f"{path.name}: same stem as {owners[stem]}, whose outputs "
                                 f"{stem}.* are already written")
            owners[stem] = path.name
            if banded:
                targets, description, was_done = _segment_band(path, output_folder, loaded, forward,
                                                               tile_size, device, config)
                if was_done:
                    skipped.append(path.name)
                    print(f"[{index}/{len(images)}] {path.name} {description}: skipped", flush=True)
                    continue
            elif config.skip_existing and outputs_complete(path, output_folder, first, config):
                skipped.append(path.name)
                print(f"[{index}/{len(images)}] {path.name}: complete outputs exist, skipped",
                      flush=True)
                continue
            else:
                if config.uncertainty_csv:
                    tally = uncertainty.ImageUncertainty()
                targets, description = _segment_file(path, output_folder, loaded, forward, tile_size,
                                                      device, config, tally)
        except ImageError as exc:
            failed[path.name] = str(exc)
            print(f"[{index}/{len(images)}] FAILED {exc}", file=sys.stderr, flush=True)
            continue
        except Interrupted as exc:
            exc.image = path.name
            raise
        written.append(str(targets[0]))
        if tally is not None:
            ranking.append(tally.row(path.name))
        elapsed = time.perf_counter() - start_time
        eta = (f", folder ETA {_duration(elapsed / index * (len(images) - index))}"
               if len(images) - index > 1 else "")
        print(f"[{index}/{len(images)}] {path.name} {description} {targets[0].name} "
              f"({time.perf_counter() - image_start:.2f} s{eta})", flush=True)

    if config.uncertainty_csv:
        uncertainty.write_ranking(config.uncertainty_csv, ranking)
        print(f"uncertainty: {len(ranking)} image(s) ranked, most uncertain first, in {config.uncertainty_csv}")
    summary = InferenceSummary(written=written, failed=failed, seconds=time.perf_counter() - start_time,
                               skipped=skipped)
    print(f"done: {summary.ok_count} mask(s) written to {output_folder}, {summary.failed_count} "
          f"failed{f', {len(skipped)} skipped (complete)' if skipped else ''}, {summary.seconds:.1f} s")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return summary


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def _side(pixels):
    side = int(pixels ** 0.5)
    return f"{side} x {side}"


def build_parser():
    halos = {name: predictor.halo_for(name) for name in models.MODEL_NAMES}
    parser = argparse.ArgumentParser(
        description="Segment every image of a folder (any size, also larger than memory) with a "
                    "trained model or an ensemble; writes <stem>.tif class masks (uint8, uint16 above "
                    "256 classes) of the same size into the output folder (tiled compressed BigTIFF "
                    f"above {_side(STREAM_PIXELS)} px; <stem>.zarr for Zarr input). Exit "
                    "code 1: some image failed; 2: the run could not start; 143 / 130: stopped by "
                    "SIGTERM / SIGINT (the interrupted image's partial output removed).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", nargs="+", help="trained model(s): a .keras file, or a training "
                        "output folder (uses its model.keras); several: an ensemble averaging their "
                        "softmax (same classes, channels and architecture)")
    source.add_argument("--checkpoint_filepath", nargs="+", help="training checkpoint directory "
                        "holding model.weights.h5 (e.g. OUTPUT/checkpoints/latest), or a training "
                        "output folder (then its checkpoints/best, else checkpoints/latest); the model "
                        "is rebuilt from the output folder's config.json; several: an ensemble")
    parser.add_argument("--image_folder", required=True, help="folder of images to segment "
                        "(H x W or H x W x C; any integer or float pixel type; TIFF, OME-TIFF, "
                        "PNG, JPEG files and *.zarr (OME-)Zarr folders), or one .zarr folder")
    parser.add_argument("--output_folder", required=True,
                        help="where masks go (created if missing; must differ from --image_folder)")
    parser.add_argument("--tile_size", type=int, default=None,
                        help="largest tile side sent to the network, a multiple of 16 (UNet) or 32 "
                        "(SegNet), at least 2 halos + 16/32 px (the halo, half the receptive field "
                        f"rounded up, is {halos['unet']} px for UNet and {halos['segnet']} px for "
                        "SegNet); each image axis then uses the smallest tile needing as many tiles. "
                        "Default: the largest tile whose activations fit half the free memory (GPU "
                        f"memory on a GPU, else RAM), at most {predictor.MAX_DEFAULT_TILE}")
    parser.add_argument("--batch_size", type=int, default=1, help="tiles per network call (default "
                        "1: the default tile already fills the memory)")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation: average the "
                        "softmax over the 8 flips / quarter turns of every tile (8x the compute)")
    parser.add_argument("--gpu", type=int, default=None,
                        help="index of the GPU to run on; -1 for the CPU (default: first GPU if "
                        "any, else the CPU)")
    parser.add_argument("--save_probabilities", action="store_true",
                        help="also write the float32 H x W x classes softmax maps: "
                        "<stem>_probabilities.npy (numpy.load) for images up to "
                        f"{_side(STREAM_PIXELS)} px, else and for Zarr input "
                        "<stem>_probabilities.zarr (zarr.open), written band by band")
    parser.add_argument("--part", default=None, metavar="I/N",
                        help="segment only part I of N (I from 0 to N-1) of the folder's images, "
                        "balanced by pixel count: run N processes (e.g. a Slurm array, "
                        "launch_inference_sbatch.sh) into the same --output_folder. A single image "
                        "is split into N row bands instead, written into one shared <stem>.zarr")
    parser.add_argument("--engine", choices=engines.ENGINES, default="tensorflow",
                        help="what runs the network: tensorflow (default; CPU or GPU) or onnxruntime "
                        "(CPU; the model is exported to ONNX once and cached beside it as "
                        "<model>.onnx); the same tiles, halos, --tta and ensembles, probabilities "
                        "within 1e-4 (docs/inference-at-scale.md has the measured speeds)")
    parser.add_argument("--skip_existing", action="store_true",
                        help="skip images whose outputs exist complete (open, right shape, all data); "
                        "a missing or truncated output is redone, so a failed or preempted run "
                        "just reruns")
    parser.add_argument("--image_extensions", default=",".join(DEFAULT_EXTENSIONS),
                        help="file extensions to process, separated by commas or spaces, "
                        f"case-insensitive (default {','.join(DEFAULT_EXTENSIONS)}; zarr: *.zarr "
                        "folders)")
    parser.add_argument("--uncertainty_csv", default=None, metavar="PATH",
                        help="also write PATH: one row per image, most uncertain first (mean softmax "
                        "entropy in units of log(classes), share of pixels above "
                        f"{uncertainty.UNCERTAIN_ENTROPY}): correct those masks first and retrain "
                        "(docs/sparse-labels.md)")
    return parser


def config_from_args(args):
    """InferenceConfig from parsed command-line arguments."""
    extensions = image_io.parse_extensions(args.image_extensions)
    if not extensions:
        raise InferenceError(f"--image_extensions {args.image_extensions!r}: no extension given")

    def paths(value):
        return None if value is None else value[0] if len(value) == 1 else list(value)

    try:
        part = None if args.part is None else sharding.parse_part(args.part)
    except sharding.PartError as exc:
        raise InferenceError(str(exc)) from exc

    return InferenceConfig(image_folder=args.image_folder, output_folder=args.output_folder,
                           model=paths(args.model), checkpoint_filepath=paths(args.checkpoint_filepath),
                           tile_size=args.tile_size, batch_size=args.batch_size, gpu=args.gpu,
                           save_probabilities=args.save_probabilities, tta=args.tta,
                           image_extensions=extensions, part=part, skip_existing=args.skip_existing,
                           engine=args.engine, uncertainty_csv=args.uncertainty_csv)


def _raise_interrupted(signum, frame):
    # Further signals are ignored while the scratch is removed; a second Ctrl-C would otherwise
    # break off the cleanup itself. main() restores the handlers.
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, signal.SIG_IGN)
    raise Interrupted(signum)


def main(argv=None):
    """Command-line entry point. Returns the exit code: 0 all written, 1 an image failed, 2 the run
    could not start (model, flags, folders), 128 + the signal number when SIGTERM (143) or SIGINT
    (130) stopped it."""
    args = build_parser().parse_args(argv)
    # SIGTERM's default action ends the process at once, leaving the scratch file of the image being
    # written; raised as an exception instead, the writers' cleanup runs.
    previous = {number: signal.signal(number, _raise_interrupted)
                for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        config = config_from_args(args)
        print("config: " + json.dumps(dataclasses.asdict(config)))
        summary = run_inference(config)
    except InferenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    except Interrupted as exc:
        where = (f"while segmenting {exc.image} (its partial output was removed)" if exc.image
                 else "before any image was segmented")
        print(f"interrupted by {signal.Signals(exc.signum).name} {where}; the masks written before it "
              f"are complete", file=sys.stderr, flush=True)
        return 128 + exc.signum
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return EXIT_IMAGE_FAILED if summary.failed_count else 0


if __name__ == "__main__":
    code = main()
    if code in (128 + signal.SIGTERM, 128 + signal.SIGINT):
        # A network call may still run in its helper thread (_interruptible): leave now, without
        # waiting for it or tearing TensorFlow down under it; this run's scratch is already removed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
