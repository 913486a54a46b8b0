"""The tiled predictor: logits of a whole image of any size, equal to one whole-image network pass.

Shared by ``inference.py`` (masks of new images) and the trainer's test pass (metrics of whole test
images), so the test metrics are those of the masks inference writes.

    geometry = models.geometry("unet", **options)       # size divisor, halo, smallest tile
    forward = make_predictor(model)                     # or make_predictor([model_a, model_b])
    tile = default_tile_size(model, geometry)           # from the memory this process may use
    logits = predict_image(forward, image, stats, geometry, tile)   # float32 H x W x K

How a whole image is predicted exactly by tiles:
  - the raw image (H x W x C, stored dtype) is normalised with its source image's statistics
    (``normalization.normalize``; elementwise, so per tile or whole gives the same values), and
    reflect-padded evenly to multiples of the network's size divisor (the "canvas");
  - the canvas is cut into overlapping tiles (``tiling.tile_starts`` with an overlap of two halos);
    the halo covers the receptive field, so a tile's centre sees everything the whole-image pass
    sees, and tile origins on the pooling grid keep the arithmetic identical. Only each tile's
    centre is kept; the first and last tiles keep their outer border, as the whole pass does;
  - each axis uses the smallest tile (a multiple of the divisor, at most ``tile_size``) that needs
    no more tiles than ``tile_size`` would, so little compute is spent on halos and the kept
    centre is as large as the memory allows.

Rows are produced band by band (one row of tiles at a time) by ``iter_bands``, so a caller that
writes each band out (inference on images larger than memory) never holds more than one band.
"""
import math
import os
import pathlib
import subprocess

import numpy as np

import normalization
import tiling

# Largest default tile side: beyond it tensors of wide networks near 2**31 elements, and a kept
# centre of ~3,800 px leaves < 7 % of a tile's compute to the halos.
MAX_DEFAULT_TILE = 4096
# Share of the free memory the default tile may use for network activations.
MEMORY_FRACTION = 0.5
# TensorFlow frees intermediate tensors while a graph runs: measured on the CPU, the peak of a
# UNet forward pass (base_filters 2 and 8, 2048 px) was 1/4.7 and 1/6.5 of the sum of all its
# layer outputs; 1/4 keeps a margin for convolution workspaces.
LIVE_ACTIVATION_SHARE = 0.25
# Assumed free GPU memory when nvidia-smi cannot be asked.
FALLBACK_GPU_BYTES = 2 * 1024 ** 3


# ----------------------------------------------------------------------------------------------
# Geometry: halo, canvas, tiles
# ----------------------------------------------------------------------------------------------

# Every function below that needs the network's size divisor or halo takes its models.Geometry,
# computed once by the caller from the model name and shape options (models.geometry).

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
    if tile <= 2 * halo:
        raise ValueError(f"tile {tile} leaves no centre after a halo of {halo} on both sides")
    starts = tiling.tile_starts(length, tile, overlap=2 * halo)
    plan = []
    for index, start in enumerate(starts):
        keep_start = 0 if index == 0 else plan[-1][2]
        keep_stop = length if index == len(starts) - 1 else start + tile - halo
        plan.append((start, keep_start, keep_stop))
    return plan


def fit_tile(length, tile_size, halo, divisor):
    """Tile length for a canvas axis: the smallest multiple of ``divisor`` needing no more tiles
    than ``tile_size`` would (less compute on halos for the same number of tiles)."""
    if length <= tile_size:
        return length
    count = math.ceil((length - 2 * halo) / (tile_size - 2 * halo))
    tile = math.ceil((length - 2 * halo) / count) + 2 * halo
    return min(tile_size, math.ceil(tile / divisor) * divisor)


def canvas_shape(height, width, divisor):
    """(canvas_h, canvas_w, top, left): the image padded evenly to multiples of ``divisor``."""
    extra_h, extra_w = -height % divisor, -width % divisor
    return height + extra_h, width + extra_w, extra_h // 2, extra_w // 2


def reflect_indices(start, stop, offset, length):
    """Source indices of canvas positions [start, stop) when the source (``length`` long) starts at
    canvas position ``offset``: numpy's "reflect" padding (edge not repeated), any pad width."""
    index = np.arange(start, stop) - offset
    if length == 1:
        return np.zeros_like(index)
    period = 2 * (length - 1)
    index = np.mod(index, period)
    return np.where(index >= length, period - index, index)


def pad_to_divisor(image, divisor):
    """Reflect-pad H x W x C evenly on both sides to multiples of ``divisor``.

    Returns:
      (padded, (top, left)): the original sits at padded[top:top+H, left:left+W].
    """
    height, width = image.shape[:2]
    canvas_h, canvas_w, top, left = canvas_shape(height, width, divisor)
    padded = np.pad(image, ((top, canvas_h - height - top), (left, canvas_w - width - left), (0, 0)),
                    mode="reflect")
    return padded, (top, left)


# ----------------------------------------------------------------------------------------------
# The default tile size from memory
# ----------------------------------------------------------------------------------------------

def activation_bytes_per_pixel(model):
    """Estimated peak bytes of network activations per input pixel of one tile (forward only).

    The sum of every layer's output size per input pixel (shape inference on a small probe input,
    no computation), times LIVE_ACTIVATION_SHARE.
    """
    import keras

    outputs = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        out = layer.output
        outputs += list(out) if isinstance(out, (list, tuple)) else [out]
    probe = 256
    specs = keras.Model(model.inputs, outputs).compute_output_spec(
        keras.KerasTensor((1, probe, probe, int(model.input_shape[-1]))))
    total = sum(int(np.prod(spec.shape[1:])) * np.dtype(spec.dtype).itemsize for spec in specs)
    return LIVE_ACTIVATION_SHARE * total / probe ** 2


def _cgroup_free_bytes():
    """Memory left under this process's cgroup v2 limit (Slurm jobs, containers), or None."""
    try:
        relative = pathlib.Path("/proc/self/cgroup").read_text().strip().split("::")[-1]
        folder = pathlib.Path("/sys/fs/cgroup") / relative.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((folder / "memory.current").read_text())
    except (OSError, ValueError, IndexError):
        return None


def available_memory_bytes(device="/CPU:0"):
    """Free memory for one prediction on ``device``: a GPU's free memory (nvidia-smi), else the
    RAM available to this process (MemAvailable, capped by a cgroup limit)."""
    if "GPU" in device.upper():
        index = device.rsplit(":", 1)[-1]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:  # nvidia-smi numbers GPUs physically, TensorFlow after CUDA_VISIBLE_DEVICES.
            index = visible.split(",")[int(index)].strip()
        try:
            answer = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,"
                                     "nounits", "-i", index], capture_output=True, text=True, timeout=20)
            return int(answer.stdout.split()[0]) * 1024 ** 2
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return FALLBACK_GPU_BYTES
    free = None
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        free = None  # no /proc/meminfo (not Linux): sysconf below
    if free is None:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _cgroup_free_bytes()
    return free if limit is None else min(free, limit)


def default_memory_device():
    """The device a network call runs on by default, named as available_memory_bytes expects: the
    first visible GPU by its physical index (what nvidia-smi numbers, after CUDA_VISIBLE_DEVICES; the
    trainer's --gpus may have hidden the others), else the CPU. The trainer's test pass sizes its
    tile from it: from the host's RAM, 64 GB would give a tile needing ~29 GB on a 16 GB GPU."""
    import tensorflow as tf

    gpus = tf.config.get_visible_devices("GPU")
    return "/GPU:" + gpus[0].name.rsplit(":", 1)[-1] if gpus else "/CPU:0"


def default_tile_size(model, geometry, batch_size=1, memory_bytes=None, device="/CPU:0"):
    """The default (largest) tile side for ``model``: the biggest multiple of the size divisor whose
    batch of ``batch_size`` tiles needs at most MEMORY_FRACTION of ``memory_bytes`` (default: the
    free memory of ``device``) for activations, between geometry.smallest_tile and MAX_DEFAULT_TILE.

    ``model`` may be a list (an ensemble runs its members one after the other: the largest counts).
    Inference and the trainer's test pass both use this rule, and tiling never changes the result,
    only the speed.
    """
    members = model if isinstance(model, (list, tuple)) else [model]
    per_pixel = max(activation_bytes_per_pixel(m) for m in members)
    if memory_bytes is None:
        memory_bytes = available_memory_bytes(device)
    side = math.isqrt(int(MEMORY_FRACTION * memory_bytes / (batch_size * per_pixel)))
    side -= side % geometry.size_divisor
    return int(min(MAX_DEFAULT_TILE, max(geometry.smallest_tile, side)))


# ----------------------------------------------------------------------------------------------
# The network call: one model or an ensemble, optionally test-time augmented
# ----------------------------------------------------------------------------------------------

def _softmax(logits, axis=-1):
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def make_predictor(model):
    """Callable float32 [B, H, W, C] -> numpy float32 logits [B, H, W, classes].

    ``model`` is a keras.Model or a list of them (an ensemble): then the result is the log of the
    members' mean softmax, so softmax / argmax / cross-entropy of it are those of the average.
    BatchNorm must use its moving statistics (training=False): with batch statistics a tile's
    result would depend on the other tiles in its batch and tiling would no longer be exact.
    """
    import tensorflow as tf

    members = model if isinstance(model, (list, tuple)) else [model]
    calls = []
    for member in members:
        channels = int(member.input_shape[-1])
        calls.append(tf.function(lambda x, m=member: m(x, training=False),
                                 input_signature=[tf.TensorSpec([None, None, None, channels],
                                                                tf.float32)]))

    return combine_members([lambda batch, call=call: call(tf.constant(batch, tf.float32))
                            for call in calls])


def combine_members(calls):
    """One forward function from the network calls of an ensemble's members (any engine: a
    tf.function, an ONNX Runtime session): the logits of one, else the log of their mean softmax."""
    def forward(batch):
        if len(calls) == 1:
            return np.asarray(calls[0](batch), dtype=np.float32)
        mean = sum(_softmax(np.asarray(call(batch), dtype=np.float64)) for call in calls) / len(calls)
        return np.log(np.maximum(mean, np.finfo(np.float64).tiny)).astype(np.float32)

    return forward


# The 8 symmetries of the square: (quarter turns, mirror left-right first). Each is undone exactly.
DIHEDRAL = tuple((turns, mirror) for mirror in (False, True) for turns in range(4))


def _transform(batch, turns, mirror):
    if mirror:
        batch = batch[:, :, ::-1]
    return np.rot90(batch, turns, axes=(1, 2))


def _untransform(batch, turns, mirror):
    batch = np.rot90(batch, -turns, axes=(1, 2))
    return batch[:, :, ::-1] if mirror else batch


def tta_forward(forward, batch):
    """Log of the mean softmax of ``forward`` over the 8 flips / quarter turns of ``batch``, each
    prediction mapped back to the original orientation before averaging."""
    total = None
    for turns, mirror in DIHEDRAL:
        logits = forward(np.ascontiguousarray(_transform(batch, turns, mirror)))
        probabilities = _untransform(_softmax(logits.astype(np.float64)), turns, mirror)
        total = probabilities if total is None else total + probabilities
    return np.log(np.maximum(total / len(DIHEDRAL), np.finfo(np.float64).tiny)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Tiled prediction
# ----------------------------------------------------------------------------------------------

def tile_grid(height, width, geometry, tile_size, halo=None):
    """The tiles of an H x W image: (rows, cols, tile_h, tile_w, top, left) where rows / cols are
    plan_tiles lists on the canvas and (top, left) is where the image sits in it."""
    divisor = geometry.size_divisor
    halo = geometry.halo if halo is None else halo
    if tile_size < 2 * halo + divisor or tile_size % divisor:
        raise ValueError(f"tile size {tile_size}: must be a multiple of {divisor} and at least "
                         f"{2 * halo + divisor} for {geometry.name} (a halo of {halo} px per side)")
    canvas_h, canvas_w, top, left = canvas_shape(height, width, divisor)
    tile_h = fit_tile(canvas_h, tile_size, halo, divisor)
    tile_w = fit_tile(canvas_w, tile_size, halo, divisor)
    return (plan_tiles(canvas_h, tile_h, halo), plan_tiles(canvas_w, tile_w, halo),
            min(tile_h, canvas_h), min(tile_w, canvas_w), top, left)


def count_tiles(height, width, geometry, tile_size, halo=None):
    rows, cols, *_ = tile_grid(height, width, geometry, tile_size, halo)
    return len(rows) * len(cols)


def iter_bands(forward, image, stats, geometry, tile_size, batch_size=1, tta=False, halo=None,
               outputs=None, progress=None, rows=None):
    """Predict ``image`` one row of tiles at a time.

    Args:
      forward: float32 [B, h, w, C] -> logits [B, h, w, K] (make_predictor).
      image: the raw H x W x C image in its stored dtype: a numpy array or any object with
        ``shape`` (H, W, C) whose ``image[r0:r1]`` gives rows r0..r1 as an (r1-r0) x W x C array
        (a lazy reader); only the rows of one band of tiles are read at a time.
      stats: normalization.ChannelStatistics of the whole source image.
      geometry: the network's models.Geometry (size divisor, halo).
      tile_size: largest tile side (a multiple of the divisor, at least geometry.smallest_tile).
      batch_size: tiles per network call.
      tta: average the softmax over the 8 flips / quarter turns (then logits = log mean softmax).
      halo: override of geometry.halo (tests show that too small a halo leaves seams).
      outputs: functions mapping a tile's kept float32 logits (h x w x K) to the arrays to keep
        (e.g. argmax class ids); default: the logits themselves.
      progress: called as progress(tiles_done, tiles_total) after every network call.
      rows: (lo, hi) to produce only image rows lo..hi (a row band of one huge image shared by
        several processes): the tile plan stays that of the whole image and only the tile rows
        whose kept rows meet [lo, hi) run, so the band equals those rows of the whole result.
    Yields:
      (row_start, row_stop, bands): image rows [row_start, row_stop) in order, covering the image
      (or ``rows``) once; ``bands`` holds one (rows x W x ...) array per output function.
    """
    height, width = image.shape[:2]
    outputs = outputs or [lambda logits: logits]
    halo = geometry.halo if halo is None else halo
    rows_plan, cols, tile_h, tile_w, top, left = tile_grid(height, width, geometry, tile_size, halo)
    wanted = (0, height) if rows is None else rows
    rows = [row for row in rows_plan
            if min(row[2], top + height) - top > wanted[0] and max(row[1], top) - top < wanted[1]]
    total, done = len(rows) * len(cols), 0
    for row_start, keep_lo, keep_hi in rows:
        # Image rows of this band of canvas rows, read once (reflection only touches rows inside it).
        row_index = reflect_indices(row_start, row_start + tile_h, top, height)
        first = int(row_index.min())
        band_rows = np.asarray(image[first:int(row_index.max()) + 1])
        if not np.array_equal(row_index, np.arange(first, first + tile_h)):  # reflected rows
            band_rows = band_rows[row_index - first]
        # Kept image rows of this band, clipped to the image (the canvas padding is dropped).
        out_lo, out_hi = max(keep_lo, top) - top, min(keep_hi, top + height) - top
        bands = None
        for group_start in range(0, len(cols), batch_size):
            group = cols[group_start:group_start + batch_size]
            # Normalised tile by tile (elementwise, so equal to normalising the whole image): the
            # band is held in its stored dtype, not as float32.
            batch = np.stack([normalization.normalize(band_rows[:, reflect_indices(c, c + tile_w, left,
                                                                                    width)], stats)
                              for c, _, _ in group])
            logits = tta_forward(forward, batch) if tta else forward(batch)
            for (col_start, c_lo, c_hi), tile_logits in zip(group, logits):
                lo, hi = max(c_lo, left) - left, min(c_hi, left + width) - left
                if out_hi <= out_lo or hi <= lo:
                    continue
                kept = tile_logits[out_lo + top - row_start:out_hi + top - row_start,
                                   lo + left - col_start:hi + left - col_start]
                results = [np.asarray(fn(kept)) for fn in outputs]
                if bands is None:
                    bands = [np.empty((out_hi - out_lo, width) + r.shape[2:], r.dtype) for r in results]
                for band, result in zip(bands, results):
                    band[:, lo:hi] = result
            done += len(group)
            if progress is not None:
                progress(done, total)
        if bands is not None:
            # A band's first and last tile rows may reach past it: keep only its own rows.
            lo, hi = max(out_lo, wanted[0]), min(out_hi, wanted[1])
            yield lo, hi, [band[lo - out_lo:hi - out_lo] for band in bands]


def predict_image(forward, image, stats, geometry, tile_size, batch_size=1, tta=False, halo=None,
                  progress=None):
    """Logits of one whole image, exactly as inference.py computes them.

    Args:
      forward: make_predictor(model) (or of a list of models: an ensemble).
      image: raw H x W x C (or H x W) image in its stored dtype, numpy or a lazy row reader.
      stats: normalization.ChannelStatistics of the whole source image.
      geometry: the network's models.Geometry (size divisor and halo).
      tile_size: largest tile side; default_tile_size(model, geometry) gives inference's default.
      batch_size: tiles per network call.
      tta: average the softmax over the 8 flips / quarter turns.
    Returns:
      float32 H x W x K logits (with tta or an ensemble: the log of the averaged softmax).
    """
    if getattr(image, "ndim", 3) == 2:
        image = np.asarray(image)[:, :, np.newaxis]
    out = None
    for row_lo, row_hi, (band,) in iter_bands(forward, image, stats, geometry, tile_size,
                                              batch_size, tta, halo, progress=progress):
        if out is None:
            out = np.empty((image.shape[0], image.shape[1], band.shape[-1]), np.float32)
        out[row_lo:row_hi] = band
    return out
