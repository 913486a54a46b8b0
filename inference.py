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

An image that cannot be read, has the wrong number of channels or holds NaN/Inf pixels is reported
(naming the file) and skipped; the others are still processed, and the exit code is 1 if any image
failed. A run that cannot start (model, flags, folders) exits with code 2.
"""
import argparse
import contextlib
import dataclasses
import json
import mmap
import os
import pathlib
import shutil
import sys
import time

import keras
import numpy as np
import tensorflow as tf
import tifffile

import checkpoints
import image_io
import models
import normalization
import predictor
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
    uncertainty_csv: str | None = None  # rank the images by uncertainty here (uncertainty.py)


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
    """The "normalization" entry of the training config.json beside a loaded model, or None."""
    folder = pathlib.Path(source).parent
    for candidate in (folder, folder.parent, folder.parent.parent):
        path = candidate / "config.json"
        if path.is_file():
            with contextlib.suppress(OSError, ValueError):
                return json.loads(path.read_text()).get("normalization")
            return None
    return None


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
        block = self.array[index]
        # A copy detaches the rows from a memory map (zarr already returns a new array).
        block = np.array(block) if self._mapping is not None else np.asarray(block)
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


def _make_source(path, array, channels, kind, on_close=(), mapping=None, axes=None):
    axes = axes or _axes_from_shape(tuple(array.shape), channels)
    if axes is None:
        for close in on_close:
            close()
        raise ImageError(f"{path.name}: shape {tuple(array.shape)} is not H x W or H x W x C")
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
        if level.dataoffset is not None and level.dtype is not None:
            # Uncompressed and contiguous in the file: memory-map it.
            mapping = mmap.mmap(tif.filehandle.fileno(), 0, access=mmap.ACCESS_READ)
            array = np.ndarray(level.shape, level.dtype.newbyteorder(tif.byteorder), buffer=mapping,
                               offset=level.dataoffset)
            return _make_source(path, array, channels, "memory-mapped TIFF",
                                [mapping.close, tif.close], mapping)
        try:
            import zarr
        except ImportError:  # without zarr a compressed TIFF can only be read whole
            return _make_source(path, level.asarray(), channels, "TIFF", [tif.close])
        store = tif.aszarr(series=0, level=0)
        array = zarr.open(store, mode="r")
        return _make_source(path, array, channels, "chunked TIFF", [store.close, tif.close])
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
    names = [axis["name"] if isinstance(axis, dict) else axis for axis in first.get("axes", [])]
    if len(names) != array.ndim:
        return array, None
    axes = ""
    for name, size in zip(names, array.shape):
        name = name.lower()
        if name in ("y", "x", "c"):
            axes += name
        elif size == 1:
            axes += "-"
        else:
            raise ImageError(f"{path.name}: has {size} planes along axis {name!r} (shape "
                             f"{tuple(array.shape)}); only 2-D images (y, x, channels) are segmented")
    return array, axes


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
    except ImageError:
        raise
    except Exception as exc:  # zarr raises many types for damaged or foreign folders
        raise ImageError(f"{path.name}: cannot read Zarr image ({type(exc).__name__}: {exc})") from exc
    return _make_source(path, array, channels, "Zarr", axes=axes)


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
        source = _make_source(path, array, channels, "in memory")
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
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        yield temporary
        if path.exists() or path.is_symlink():
            os.replace(path, old)
        os.replace(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
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
                for band in predictor.iter_bands(forward, source, stats, first.name, tile_size,
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
    halo = predictor.halo_for(first.name, first.options)
    for member in loaded:
        print(f"model: {member.source} ({member.name}, {member.input_channels} channel(s) in, "
              f"{member.number_classes} classes out)")
    print(f"device: {device}; tiles up to {tile_size} px, halo {halo} px, batch {config.batch_size}"
          f"{', test-time augmentation (8 transforms)' if config.tta else ''}"
          f"{f', ensemble of {len(loaded)} models' if len(loaded) > 1 else ''}; "
          f"{len(images)} image(s) from {image_folder} -> {output_folder}")
    forward = predictor.make_predictor([member.model for member in loaded])

    written, failed, owners, ranking = [], {}, {}, []
    for index, path in enumerate(images, start=1):
        image_start = time.perf_counter()
        stem = path.name[:-len(".zarr")] if is_zarr_folder(path) else path.stem
        try:
            if stem in owners:
                raise ImageError(f"{path.name}: same stem as {owners[stem]}, whose outputs "
                                 f"{stem}.* are already written")
            owners[stem] = path.name
            tally = uncertainty.ImageUncertainty() if config.uncertainty_csv else None
            targets, description = _segment_file(path, output_folder, loaded, forward, tile_size,
                                                  device, config, tally)
        except ImageError as exc:
            failed[path.name] = str(exc)
            print(f"[{index}/{len(images)}] FAILED {exc}", file=sys.stderr, flush=True)
            continue
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
    summary = InferenceSummary(written=written, failed=failed, seconds=time.perf_counter() - start_time)
    print(f"done: {summary.ok_count} mask(s) written to {output_folder}, {summary.failed_count} "
          f"failed, {summary.seconds:.1f} s")
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
                    "code 1: some image failed; 2: the run could not start.")
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

    return InferenceConfig(image_folder=args.image_folder, output_folder=args.output_folder,
                           model=paths(args.model), checkpoint_filepath=paths(args.checkpoint_filepath),
                           tile_size=args.tile_size, batch_size=args.batch_size, gpu=args.gpu,
                           save_probabilities=args.save_probabilities, tta=args.tta,
                           image_extensions=extensions, uncertainty_csv=args.uncertainty_csv)


def main(argv=None):
    """Command-line entry point. Returns the exit code: 0 all written, 1 an image failed, 2 the run
    could not start (model, flags, folders)."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        print("config: " + json.dumps(dataclasses.asdict(config)))
        summary = run_inference(config)
    except InferenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    return EXIT_IMAGE_FAILED if summary.failed_count else 0


if __name__ == "__main__":
    sys.exit(main())
