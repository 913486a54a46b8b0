"""Outputs of inference: class masks and probabilities, written whole or streamed band by band, and
always complete or absent (written beside the target and renamed over it, image_io.atomic_write /
atomic_folder).

    write_mask(path, labels)                        H x W class ids -> TIFF
    write_probabilities(path, probabilities)        H x W x K float32 -> .npy
    write_whole(bands, output_folder, stem, ...)    the bands of one image collected, then written
    write_streamed(bands, output_folder, stem, ...) the bands of one image as they come: tiled
                                                    BigTIFF (or Zarr) mask, Zarr probabilities
    write_shared_band(bands, targets, ...)          one row band into the Zarr arrays the parts of a
                                                    banded image share (open_shared_zarr)
    expected_outputs / outputs_complete             what a finished image leaves in the output folder

Imports no TensorFlow: the band iterators come from the caller.
"""
import contextlib
import uuid

import numpy as np
import tifffile

import image_io
import sharding
from errors import ImageError

PROBABILITIES_SUFFIX = "_probabilities.npy"
PROBABILITIES_ZARR_SUFFIX = "_probabilities.zarr"
# Above this many pixels an image's outputs are streamed (tiled BigTIFF / Zarr), below it written
# whole as a plain TIFF (and .npy), which every tool opens.
STREAM_PIXELS = 2048 * 2048
TIFF_TILE = 256
ZARR_CHUNK = 512


def is_streamed(path, height, width):
    """Whether the outputs of the H x W image at ``path`` are streamed (Zarr input, or above
    STREAM_PIXELS) rather than written whole."""
    return image_io.is_zarr_folder(path) or height * width > STREAM_PIXELS


def label_dtype(number_classes):
    """Smallest unsigned type holding class ids 0 .. number_classes - 1."""
    return np.uint8 if number_classes <= 256 else np.uint16


def write_mask(path, labels):
    """Write an H x W class-id mask as a TIFF, atomically."""
    image_io.atomic_write(path, lambda f: tifffile.imwrite(f, labels))


def write_probabilities(path, probabilities):
    """Write H x W x classes float32 probabilities as .npy, atomically."""
    image_io.atomic_write(path, lambda f: np.save(f, probabilities))


def write_whole(bands, output_folder, stem, shape, number_classes, save_probabilities):
    """Collect the bands of one image (predictor.iter_bands: class ids, then probabilities if saved)
    in memory, then write ``<stem>.tif`` (and ``<stem>_probabilities.npy``). Returns the targets."""
    height, width = shape
    labels = np.empty((height, width), label_dtype(number_classes))
    probabilities = np.empty((height, width, number_classes), np.float32) if save_probabilities else None
    for lo, hi, results in bands:
        labels[lo:hi] = results[0]
        if probabilities is not None:
            probabilities[lo:hi] = results[1]
    targets = [output_folder / (stem + ".tif")]
    write_mask(targets[0], labels)
    if probabilities is not None:
        targets.append(output_folder / (stem + PROBABILITIES_SUFFIX))
        write_probabilities(targets[1], probabilities)
    return targets


def _create_zarr(folder, shape, dtype):
    import zarr  # optional: only Zarr input and streamed probabilities need it

    chunks = (ZARR_CHUNK, ZARR_CHUNK) + tuple(shape[2:])
    return zarr.create_array(store=str(folder), shape=shape, chunks=chunks, dtype=dtype)


class RowBlocks:
    """Collects bands of rows in order and hands them on in blocks of ``rows`` rows (the last one
    may be shorter), so writers get chunk-aligned blocks whatever the tile bands' heights. ``start``:
    the image row of the first block (a band of a shared image starts inside it)."""

    def __init__(self, rows, start=0):
        self.rows, self.start, self.pending = rows, start, None

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


def write_streamed(bands, output_folder, stem, zarr_out, shape, number_classes, save_probabilities):
    """Write the bands of one image as they come: the mask as a tiled compressed BigTIFF (or a Zarr
    array), the probabilities as a Zarr array. Returns the targets written."""
    height, width = shape
    dtype = label_dtype(number_classes)
    mask_target = output_folder / (stem + (".zarr" if zarr_out else ".tif"))
    probability_target = output_folder / (stem + PROBABILITIES_ZARR_SUFFIX)
    with contextlib.ExitStack() as stack:
        probabilities = None
        if save_probabilities:
            folder = stack.enter_context(image_io.atomic_folder(probability_target))
            probabilities = _create_zarr(folder, (height, width, number_classes), np.float32)
        probability_blocks = RowBlocks(ZARR_CHUNK)

        def mask_blocks(rows):
            blocks = RowBlocks(rows)
            for _, _, results in bands:
                # The probabilities first: tifffile stops pulling once it has every tile, so nothing
                # may wait behind the mask's last block (an image whose height is a multiple of the
                # block rows gets that block here, not from flush).
                if probabilities is not None:
                    for start, block in probability_blocks.add(results[1]):
                        probabilities[start:start + len(block)] = block
                yield from blocks.add(results[0])
            if probabilities is not None:
                for start, block in probability_blocks.flush():
                    probabilities[start:start + len(block)] = block
            yield from blocks.flush()

        blocks = mask_blocks(ZARR_CHUNK if zarr_out else TIFF_TILE)
        if zarr_out:
            with image_io.atomic_folder(mask_target) as folder:
                mask = _create_zarr(folder, (height, width), dtype)
                for start, block in blocks:
                    mask[start:start + len(block)] = block
        else:
            # maxworkers=1: with several, tifffile hands the tile iterator to ThreadPoolExecutor.map,
            # which pulls every tile at once, i.e. the whole image before writing any of it.
            def write_tiff(f):
                tifffile.imwrite(f, _tiff_tiles(blocks, width), shape=(height, width), dtype=dtype,
                                 tile=(TIFF_TILE, TIFF_TILE), compression="zlib", bigtiff=True, maxworkers=1)
                # Run the bands to their end (the last probabilities, the predictor's own end): a
                # mask row left over would mean the TIFF missed it.
                for start, _ in blocks:
                    raise RuntimeError(f"{stem}: mask rows from {start} on were not written")

            image_io.atomic_write(mask_target, write_tiff)
    return [mask_target] + ([probability_target] if save_probabilities else [])


def write_shared_band(bands, targets, shape, number_classes, start):
    """Write the bands of one row band of an image (predictor.iter_bands with ``rows``, starting at
    image row ``start``) into the shared Zarr arrays at ``targets``: the mask, and the probabilities
    when a second target is given (open_shared_zarr creates them if no part has yet)."""
    height, width = shape
    arrays = [open_shared_zarr(targets[0], (height, width), label_dtype(number_classes))]
    if len(targets) > 1:
        arrays.append(open_shared_zarr(targets[1], (height, width, number_classes), np.float32))
    blocks = [RowBlocks(ZARR_CHUNK, start=start) for _ in arrays]
    for _, _, results in bands:
        for array, rows, result in zip(arrays, blocks, results):
            for top, block in rows.add(result):
                array[top:top + len(block)] = block
    for array, rows in zip(arrays, blocks):
        for top, block in rows.flush():
            array[top:top + len(block)] = block


def expected_outputs(path, output_folder, shape, number_classes, save_probabilities):
    """{target path: shape} of the complete outputs of the image at ``path`` (H x W x C ``shape``),
    named and laid out as inference writes them."""
    stem = image_io.image_stem(path)
    height, width = shape[:2]
    mask_suffix = ".zarr" if image_io.is_zarr_folder(path) else ".tif"
    targets = {output_folder / (stem + mask_suffix): (height, width)}
    if save_probabilities:
        suffix = PROBABILITIES_ZARR_SUFFIX if is_streamed(path, height, width) else PROBABILITIES_SUFFIX
        targets[output_folder / (stem + suffix)] = (height, width, number_classes)
    return targets


def outputs_complete(path, output_folder, input_channels, number_classes, save_probabilities):
    """True when every output of ``path`` exists complete (sharding.output_is_complete): opens, has
    the image's shape, holds all its data. An unreadable input is never complete (it is then tried
    and reported by name)."""
    try:
        source = image_io.open_image(path, input_channels)
    except ImageError:
        return False
    source.close()
    targets = expected_outputs(path, output_folder, source.shape, number_classes, save_probabilities)
    return all(sharding.output_is_complete(target, shape) for target, shape in targets.items())


def open_shared_zarr(target, shape, dtype):
    """The Zarr array at ``target`` that the parts of a banded image write into: created by the first
    part to get there (built aside, then renamed: a rename onto an existing folder fails, so exactly
    one part's array wins), then opened by all. Raises ImageError when an existing one does not fit."""
    import zarr  # optional: only Zarr input and streamed probabilities need it

    if not target.exists():
        with image_io.atomic_folder(target, replace=False) as folder:
            # The id lets a band's marker name this very array (sharding.band_complete).
            _create_zarr(folder, shape, dtype).attrs[sharding.ARRAY_ID] = uuid.uuid4().hex
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
