"""Image files in and out: the one reader of image/mask files, the one extension syntax, and the
one "write to a temporary file beside the target, then rename" helper.

    read_array(path, kind="image"|"mask")   numpy array as stored (TIFF: tifffile; masks: Pillow)
    parse_extensions("tif,png" | "tif png" | [...])   ("tif", "png")
    list_files(folder, extensions)           sorted non-hidden files with those extensions
    atomic_write(path, write)                write(file) to a temporary file, then os.replace
    scratch_path(path, "tmp"|"old")          .<name>.<host>-<pid>.<kind> beside path (this process's)
    remove_stale_scratch(folder)             scratch of processes of this host no longer running
"""
import contextlib
import hashlib
import os
import pathlib
import re
import shutil
import socket

import numpy as np

TIFF_EXTENSIONS = ("tif", "tiff")
# Scratch beside a target: ".<name>.<host>-<pid>.tmp" (being written) or ".old" (the previous
# output, moved aside for the instant of a folder swap). Host and pid say whose it is, so a later
# run can tell scratch of a killed process from that of one still running (maybe on another host
# sharing the folder).
_SCRATCH_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<host>[^.]+)-(?P<pid>\d+)\.(?P<kind>tmp|old)$")


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
    try:
        if ext in TIFF_EXTENSIONS:
            import tifffile
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


def atomic_write(path, write, mode="wb"):
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``.

    The rename is atomic within a folder, so ``path`` is always either the old file or the complete
    new one; the temporary file is removed when writing fails or is interrupted.
    """
    path = pathlib.Path(path)
    temporary = scratch_path(path, "tmp")
    try:
        with open(temporary, mode) as f:
            write(f)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _host():
    # "-" separates host from pid and "." the name's parts: neither may occur in the host part.
    return socket.gethostname().replace("-", "_").replace(".", "_") or "host"


def scratch_path(path, kind="tmp"):
    """This process's scratch name beside ``path``: ``.<name>.<host>-<pid>.<kind>``."""
    path = pathlib.Path(path)
    return path.with_name(f".{path.name}.{_host()}-{os.getpid()}.{kind}")


def process_running(pid):
    """Whether process ``pid`` of this host exists (also when another user owns it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_scratch(folder):
    """Remove the scratch files and folders (see scratch_path) of processes of this host that are
    no longer running, as build_lmdb.remove_stale_scratch does for its scratch folders.

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
        if not match or match["host"] != _host() or process_running(int(match["pid"])):
            continue
        target = folder / match["target"]
        if match["kind"] == "old" and not os.path.lexists(target):
            os.rename(entry, target)
            actions.append(f"restored {target} from {entry.name}, left by process {match['pid']} "
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
