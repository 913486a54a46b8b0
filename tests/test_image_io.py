"""image_io.py: one reader, one extension syntax, one atomic write."""
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

import image_io


def test_parse_extensions_accepts_commas_spaces_dots_and_lists():
    assert image_io.parse_extensions("tif,PNG") == ("tif", "png")
    assert image_io.parse_extensions("tif png .jpg") == ("tif", "png", "jpg")
    assert image_io.parse_extensions(["tif", ".TIFF,png", "tif"]) == ("tif", "tiff", "png")


def test_read_tiff_png_palette_mask_and_errors(tmp_path):
    image = np.arange(12, dtype=np.uint16).reshape(3, 4)
    tifffile.imwrite(tmp_path / "a.tif", image)
    assert np.array_equal(image_io.read_array(tmp_path / "a.tif"), image)
    palette = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.save(tmp_path / "m.png")
    assert np.array_equal(image_io.read_array(tmp_path / "m.png", "mask"), [[0, 1], [2, 1]])
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    with pytest.raises(image_io.ImageFileError, match=r"bad\.tif: cannot read image"):
        image_io.read_array(tmp_path / "bad.tif")


def test_list_files_skips_hidden_and_other_extensions(tmp_path):
    for name in ("b.TIF", "a.png", "._a.tif", "c.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in image_io.list_files(tmp_path, "tif,png")] == ["a.png", "b.TIF"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.bin"
    image_io.atomic_write(target, lambda f: f.write(b"old"))

    def failing(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        image_io.atomic_write(target, failing)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def _dead_pid():
    """A pid of this host that no process has (the highest free one below the kernel's limit)."""
    pid = 4_000_000
    while image_io.process_running(pid):
        pid -= 1
    return pid


def test_atomic_folder_swaps_only_a_complete_folder_and_cleans_a_killed_runs_scratch(tmp_path):
    target = tmp_path / "out.zarr"
    target.mkdir()
    (target / "good").write_text("kept")
    # A run killed between the two renames of a swap, and one killed while filling its scratch.
    dead = image_io.scratch_path(target, "tmp").name.replace(f"-{os.getpid()}.", f"-{_dead_pid()}.")
    (tmp_path / dead).mkdir()
    with pytest.raises(OSError, match="disk full"):
        with image_io.atomic_folder(target) as folder:
            folder.mkdir()
            (folder / "half").write_text("x")
            raise OSError("disk full")
    assert sorted(os.listdir(tmp_path)) == ["out.zarr"] and os.listdir(target) == ["good"]
    with image_io.atomic_folder(target) as folder:
        folder.mkdir()
        (folder / "new").write_text("y")
    assert sorted(os.listdir(tmp_path)) == ["out.zarr"] and os.listdir(target) == ["new"]
    # replace=False: the first folder in place wins, the later one is dropped.
    with image_io.atomic_folder(target, replace=False) as folder:
        folder.mkdir()
    assert os.listdir(target) == ["new"] and sorted(os.listdir(tmp_path)) == ["out.zarr"]


def test_atomic_write_by_path_keeps_the_extension_and_moved_aside_finds_old_copies(tmp_path):
    target = tmp_path / "model.keras"
    seen = []
    image_io.atomic_write(target, lambda path: (seen.append(path.name), path.write_text("m")), mode=None)
    assert seen[0].endswith(".tmp.keras") and target.read_text() == "m"
    old = image_io.scratch_path(target, "old")
    old.write_text("previous")
    assert image_io.moved_aside(target) == [old]


def _png_16_bit(path, array):
    """A 16-bit PNG (grayscale, RGB or RGBA by the channel count) written byte by byte: Pillow
    cannot write 16-bit colour."""
    import struct
    import zlib

    height, width = array.shape[:2]
    colour = {1: 0, 3: 2, 4: 6}[1 if array.ndim == 2 else array.shape[2]]
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16_bit_colour_pngs_are_refused_not_cut_to_8_bits(tmp_path):
    data = (np.arange(20 * 30 * 3).reshape(20, 30, 3) * 97 % 4096).astype(np.uint16)  # 12-bit RGB
    _png_16_bit(tmp_path / "rgb16.png", data)
    with pytest.raises(image_io.ImageFileError, match="rgb16.png: a 16-bit colour PNG, which the PNG reader "
                                                      "would cut to 8 bits; save it as TIFF"):
        image_io.read_array(tmp_path / "rgb16.png")
    _png_16_bit(tmp_path / "gray16.png", data[..., 0])
    np.testing.assert_array_equal(image_io.read_array(tmp_path / "gray16.png"), data[..., 0])


def test_an_uncompressed_tiff_is_read_by_rows_and_a_file_cut_short_meanwhile_fails_by_name(tmp_path):
    # Read by positioned reads, not a memory map: a file truncated while it is read (rewritten in
    # place) killed the whole process with SIGBUS.
    from errors import ImageError

    interleaved = (np.arange(60 * 50 * 3) % 65521).reshape(60, 50, 3).astype(np.uint16)
    tifffile.imwrite(tmp_path / "yxc.tif", interleaved)
    planar = np.moveaxis(interleaved, -1, 0).copy()
    tifffile.imwrite(tmp_path / "cyx.tif", planar, photometric="rgb", planarconfig="separate")
    for name in ("yxc.tif", "cyx.tif"):
        source = image_io.open_image(tmp_path / name, 3)
        assert source.kind == "contiguous TIFF"
        np.testing.assert_array_equal(source[7:23], interleaved[7:23])
        np.testing.assert_array_equal(source[55:80], interleaved[55:60])
        source.close()
    source = image_io.open_image(tmp_path / "yxc.tif", 3)
    os.truncate(tmp_path / "yxc.tif", 4000)
    with pytest.raises(ImageError, match=r"yxc.tif: cannot read rows 10-40 .*shorter than its header says"):
        source[10:40]
    source.close()
