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
