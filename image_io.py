"""Image files in and out: the one reader of image/mask files, the lazy opener of images to segment,
the one extension syntax, and the one "write to a temporary file beside the target, then rename" helper.

    read_array(path, kind="image"|"mask")   numpy array as stored (TIFF: tifffile; masks: Pillow)
    list_images(folder)                      the images inference segments: files and *.zarr folders
    open_image(path, channels)               ImageSource H x W x C, read lazily by row bands (inference)
    image_statistics(image, name)            per-channel statistics of a whole image, streamed
    parse_extensions("tif,png" | "tif png" | [...])   ("tif", "png")
    list_files(folder, extensions)           sorted non-hidden files with those extensions
    atomic_write(path, write)                write(file) to a temporary file, then os.replace
    atomic_folder(path)                      with-block filling a scratch folder that then replaces path
    scratch_path(path, "tmp"|"old")          .<name>.<host>-<pid>.<kind> beside path (this process's)
    remove_stale_scratch(folder[, target])   scratch of processes of this host no longer running
    moved_aside(path)                        previous versions of path a killed swap left as ".old"
Every file or folder the project writes for keeps goes through atomic_write or atomic_folder, so all
scratch has the one name style and the one cleanup.
"""
import contextlib
import hashlib
import os
import pathlib
import re
import shutil
import socket

import numpy as np
import tifffile

import normalization
from errors import ImageError

TIFF_EXTENSIONS = ("tif", "tiff")
# What inference segments by default ("zarr": *.zarr folders).
IMAGE_EXTENSIONS = ("tif", "tiff", "png", "jpg", "jpeg", "zarr")
# The statistics pass reads blocks of at most this many values (float64 copies are made of them).
STATS_BLOCK_VALUES = 1024 ** 2
# Scratch beside a target: ".<name>.<host>-<pid>.tmp" (being written) or ".old" (the previous
# output, moved aside for the instant of a folder swap), optionally followed by the target's own
# extension (".tmp.keras": Keras chooses the format by the file name). Host and pid say whose it is,
# so a later run can tell scratch of a killed process from that of one still running (maybe on
# another host sharing the folder).
_SCRATCH_NAME = re.compile(
    r"^\.(?P<target>.+)\.(?P<host>[^.]+)-(?P<pid>\d+)\.(?P<kind>tmp|old)(?P<suffix>\.[A-Za-z0-9]+)?$")


class ImageFileError(Exception):
    """A file that cannot be read as an image or mask; the message starts with its path."""


def parse_extensions(extensions):
    """Lower-case extensions without dots from "tif,png", "tif png", ".TIF" or a list of those.

    Both separators are accepted everywhere (build_lmdb.py took spaces, inference.py commas).
    """
    if isinstance(extensions, str):
        extensions = [extensions]
    names = []
    for item in extensions:
        for part in str(item).replace(",", " ").split():
            part = part.lower().lstrip(".")
            if part and part not in names:
                names.append(part)
    return tuple(names)


def add_extensions_flag(parser):
    """inference.py's --image_extensions, defined once: the array summary (sharding.py) parses the
    tasks' flags with it to list the images they listed."""
    parser.add_argument("--image_extensions", default=",".join(IMAGE_EXTENSIONS),
                        help="file extensions to process, separated by commas or spaces, "
                        f"case-insensitive (default {','.join(IMAGE_EXTENSIONS)}; zarr: *.zarr "
                        "folders)")


def extension_of(path):
    return os.path.splitext(str(path))[1].lower().lstrip(".")


def list_files(folder, extensions):
    """Sorted files of ``folder`` (not recursive) whose extension is in ``extensions``.

    Hidden files are skipped: they include macOS "._name.tif" resource forks, which are not images.
    """
    wanted = set(parse_extensions(extensions))
    return sorted(p for p in pathlib.Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and extension_of(p) in wanted)


def read_array(path, kind="image"):
    """Read an image or mask file into a numpy array, as stored (bool becomes uint8).

    TIFF through tifffile; masks of other formats through Pillow directly, because palette PNG
    masks hold class ids as palette indices that imageio would turn into RGB colours; other images
    through imageio. Raises ImageFileError naming the file for any decoder error or an empty result.
    """
    ext = extension_of(path)
    if ext == "png" and _png_is_16_bit_colour(path):
        # Pillow (imageio's PNG reader) keeps only the high byte of 16-bit colour: 12-bit data in
        # 0-4095 would arrive as 0-15, silently.
        raise ImageFileError(f"{path}: a 16-bit colour PNG, which the PNG reader would cut to 8 bits; save it "
                             f"as TIFF (16-bit grayscale PNGs are read as they are)")
    try:
        if ext in TIFF_EXTENSIONS:
            array = np.asarray(tifffile.imread(path))
        elif kind == "mask":
            from PIL import Image
            with Image.open(path) as img:
                array = np.array(img)
        else:
            import imageio.v3 as iio
            array = np.asarray(iio.imread(path))
    except Exception as exc:  # decoders raise many types; all mean "cannot read this file"
        raise ImageFileError(f"{path}: cannot read {kind} ({type(exc).__name__}: {exc})") from exc
    if array.size == 0:
        # tifffile returns an empty array (and only logs a warning) for some damaged files.
        raise ImageFileError(f"{path}: cannot read {kind}: the file holds no pixels (damaged or empty?)")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    return array


def _png_is_16_bit_colour(path):
    """Whether the PNG header (IHDR) says 16 bits per sample with colour (RGB or RGBA)."""
    try:
        with open(path, "rb") as f:
            header = f.read(26)
    except OSError:
        return False  # the reader then names the problem
    if len(header) < 26 or header[:8] != b"\x89PNG\r\n\x1a\n" or header[12:16] != b"IHDR":
        return False
    bit_depth, colour_type = header[24], header[25]
    return bit_depth == 16 and colour_type in (2, 6)


def is_zarr_folder(path):
    path = pathlib.Path(path)
    return path.is_dir() and path.suffix.lower() == ".zarr"


def image_stem(path):
    """An image's name without its extension (a ``.zarr`` folder's without ``.zarr``): the name its
    outputs start with."""
    path = pathlib.Path(path)
    return path.name[:-len(".zarr")] if is_zarr_folder(path) else path.stem


def stem_owners(images):
    """{stem: name of the image whose outputs are named <stem>.*}: the first of ``images`` (in folder
    order) with that stem. Computed from the whole folder by every ``--part``, so of two images with
    one stem (a.tif, a.png) exactly one is segmented, whichever parts they fall in."""
    owners = {}
    for path in images:
        owners.setdefault(image_stem(path), pathlib.Path(path).name)
    return owners


def list_images(folder, extensions=IMAGE_EXTENSIONS):
    """Images of ``folder``: files with these extensions and (with "zarr") ``*.zarr`` folders, sorted,
    hidden ones skipped; a ``.zarr`` folder given itself is one image."""
    folder = pathlib.Path(folder)
    if is_zarr_folder(folder):
        return [folder]
    found = list_files(folder, [e for e in extensions if e != "zarr"])
    if "zarr" in extensions:
        found += [p for p in folder.iterdir() if not p.name.startswith(".") and is_zarr_folder(p)]
    return sorted(found)


class FileArray:
    """An uncompressed array stored contiguously at ``offset`` of an open file, read by positioned
    reads (os.pread) of the rows asked for: ``array[..., r0:r1 (axis y_axis), ...]``.

    Not a memory map: a file cut short or rewritten while it is read (a copy over it, acquisition
    software saving again) then gives a short read, an error for this image, where a memory map
    killed the whole process with SIGBUS. Nothing stays in memory between reads.
    """

    def __init__(self, fd, offset, shape, dtype, y_axis):
        self.fd, self.offset, self.shape = fd, int(offset), tuple(int(n) for n in shape)
        self.dtype, self.y_axis, self.ndim = np.dtype(dtype), y_axis, len(shape)

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (self.ndim - len(index))
        start, stop, _ = index[self.y_axis].indices(self.shape[self.y_axis])
        count = max(stop - start, 0)
        outer, inner = self.shape[:self.y_axis], self.shape[self.y_axis + 1:]
        row_bytes = int(np.prod(inner, dtype=np.int64)) * self.dtype.itemsize
        plane_bytes = self.shape[self.y_axis] * row_bytes  # per index of the axes before y
        block = np.empty((int(np.prod(outer, dtype=np.int64)), count) + inner, self.dtype)
        for number in range(block.shape[0]):
            data = os.pread(self.fd, count * row_bytes, self.offset + number * plane_bytes + start * row_bytes)
            if len(data) != count * row_bytes:
                raise OSError(f"the file ends before row {stop} (shorter than its header says)")
            block[number] = np.frombuffer(data, self.dtype).reshape((count,) + inner)
        block = block.reshape(outer + (count,) + inner)
        return block[tuple(slice(None) if axis == self.y_axis else item for axis, item in enumerate(index))]


class ImageSource:
    """One image as H x W x C, read lazily: ``source[r0:r1]`` reads rows r0..r1 only.

    ``array`` is anything sliceable numpy-style (ndarray, FileArray, zarr array); ``axes`` names
    each of its axes: "y", "x", "c" or "-" (a length-1 axis that is dropped).
    """

    def __init__(self, name, array, axes, kind, on_close=None):
        self.name, self.array, self.axes, self.kind = name, array, axes, kind
        self._on_close = on_close or []
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
            block = np.asarray(self.array[index])
        except Exception as exc:  # decoders raise many types, e.g. tifffile's "corrupted tile"
            # Damage past the header shows only when its chunks are decoded, at any point of the
            # statistics pass or the prediction: this image fails by name, the others go on.
            raise ImageError(f"{self.name}: cannot read rows {rows.start}-{rows.stop} "
                             f"({type(exc).__name__}: {exc}); the file is damaged or truncated") from exc
        kept = [a for a in self.axes if a != "-"]
        block = np.transpose(block, [kept.index(a) for a in "yxc" if a in kept])
        if "c" not in kept:
            block = block[:, :, np.newaxis]
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


def _make_source(path, array, channels, kind, on_close=(), axes=None, names=None):
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
    return ImageSource(path.name, array, axes, kind, list(on_close))


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
        if level.dataoffset is not None and level.dtype is not None and "Y" in level.axes:
            # Uncompressed and contiguous in the file: read row ranges where they lie.
            array = FileArray(tif.filehandle.fileno(), level.dataoffset, level.shape,
                              level.dtype.newbyteorder(tif.byteorder), level.axes.index("Y"))
            return _make_source(path, array, channels, "contiguous TIFF", [tif.close], names=level.axes)
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

    TIFF: read by rows (FileArray) when uncompressed and contiguous, else read by chunks (tiled, compressed,
    pyramidal at level 0, OME-TIFF); Zarr / OME-Zarr folders by chunks; other formats whole.
    Raises ImageError naming the file.
    """
    path = pathlib.Path(path)
    if is_zarr_folder(path):
        source = _open_zarr(path, channels)
    elif extension_of(path) in TIFF_EXTENSIONS:
        source = _open_tiff(path, channels)
    else:
        try:
            array = read_array(path, kind="image")
        except ImageFileError as exc:
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
    # Values whose squares overflow float64 give inf statistics, refused below by name: numpy's
    # overflow warnings before that error would only confuse.
    with np.errstate(over="ignore", invalid="ignore"):
        for top in range(0, height, rows):
            block = np.asarray(image[top:top + rows])
            if np.issubdtype(block.dtype, np.floating):
                bad = ~np.isfinite(block).all(axis=-1)
                non_finite += int(bad.sum())
                if non_finite:
                    continue
            running.update(block)
        statistics = None if non_finite else running.result()
    if non_finite:
        raise ImageError(f"{name}: {non_finite} pixel(s) with NaN or Inf values (of {height * width}); "
                         f"replace them (e.g. by the image's median) before segmenting")
    if not np.isfinite(statistics.mean + statistics.std).all():  # float64 values beyond ~1e154
        raise ImageError(f"{name}: values too large to normalise (their variance overflows float64); "
                         f"rescale the image")
    return statistics


def atomic_write(path, write, mode="wb"):
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``.

    The rename is atomic within a folder, so ``path`` is always either the old file or the complete
    new one; the temporary file is removed when writing fails or is interrupted. ``mode`` None:
    ``write(temporary_path)`` instead, for writers that open the file themselves; the temporary name
    then ends in ``path``'s extension (Keras picks the format by it).
    """
    path = pathlib.Path(path)
    temporary = scratch_path(path, "tmp", suffix=path.suffix if mode is None else "")
    try:
        if mode is None:
            write(temporary)
        else:
            with open(temporary, mode) as f:
                write(f)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def atomic_folder(path, replace=True):
    """Yield this process's scratch folder beside ``path`` (scratch_path(path, "tmp"), not created)
    to fill; when the block completes, it becomes ``path``.

    ``replace``: an existing ``path`` is moved aside (scratch ".old") only once the new folder is
    complete, and removed after the swap, so ``path`` is always the old folder or the complete new
    one. Without it the first process to finish wins: the rename onto an existing folder fails, and
    this process's folder is dropped. On failure the scratch is removed and a previous folder moved
    aside is put back; for a process killed outright, the next atomic_folder of ``path`` does both
    (remove_stale_scratch). atomic_write leaves that to its callers: it may be called for every file
    of a large folder, which would then be listed as often.
    """
    path = pathlib.Path(path)
    remove_stale_scratch(path.parent, target=path.name)
    temporary, old = scratch_path(path, "tmp"), scratch_path(path, "old")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        yield temporary
        if not replace:
            try:
                os.rename(temporary, path)
            except OSError:  # another process's folder is there first: theirs stays
                shutil.rmtree(temporary, ignore_errors=True)
            return
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


def _host():
    # "-" separates host from pid and "." the name's parts: neither may occur in the host part.
    return socket.gethostname().replace("-", "_").replace(".", "_") or "host"


def scratch_path(path, kind="tmp", suffix=""):
    """This process's scratch name beside ``path``: ``.<name>.<host>-<pid>.<kind><suffix>``."""
    path = pathlib.Path(path)
    return path.with_name(f".{path.name}.{_host()}-{os.getpid()}.{kind}{suffix}")


def moved_aside(path):
    """The previous versions of ``path`` that a swap moved aside and a kill between its two renames
    left behind (scratch ".old" of any process, and the ``.<name>.old`` of older versions of
    checkpoints.save_checkpoint), sorted by name."""
    path = pathlib.Path(path)
    if not path.parent.is_dir():
        return []
    found = []
    for entry in sorted(path.parent.iterdir()):
        match = _SCRATCH_NAME.match(entry.name)
        if entry.name == f".{path.name}.old" or (match and match["kind"] == "old"
                                                 and match["target"] == path.name):
            found.append(entry)
    return found


def process_running(pid):
    """Whether process ``pid`` of this host exists (also when another user owns it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_scratch(folder, target=None):
    """Remove the scratch files and folders (see scratch_path) of processes of this host that are
    no longer running, as build_lmdb.remove_stale_scratch does for its scratch folders; with
    ``target`` (a name in ``folder``), only that target's scratch.

    A run killed with SIGKILL (or by a crash, or a node failure) cannot clean up after itself. An
    ``.old`` previous output whose target is missing (killed between the two renames of a swap) is
    moved back rather than deleted. Scratch of other hosts and of running processes is left alone.
    Returns one line per action, for the user.
    """
    folder = pathlib.Path(folder)
    actions = []
    if not folder.is_dir():
        return actions
    for entry in sorted(folder.iterdir()):
        match = _SCRATCH_NAME.match(entry.name)
        if (not match or match["host"] != _host() or process_running(int(match["pid"]))
                or target not in (None, match["target"])):
            continue
        owner = folder / match["target"]
        if match["kind"] == "old" and not os.path.lexists(owner):
            os.rename(entry, owner)
            actions.append(f"restored {owner} from {entry.name}, left by process {match['pid']} "
                           f"that is no longer running")
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        actions.append(f"removed {entry}, left by process {match['pid']} that is no longer running")
    return actions


def sha256(path):
    """Hex SHA-256 of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
