"""Image input/output for the codec: every common file layout becomes HxWx3 uint8 RGB, inputs are gathered
from files, folders and globs in a stable order, and unreadable files fail with a message naming them."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cod.errors import InputError
from cod.images import IMAGE_SUFFIXES, collect_inputs, read_image, write_png


def rand_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def save(path, array, **kw):
    Image.fromarray(array).save(path, **kw)
    return path


def write_png16(path, array: np.ndarray):
    """A 16-bit-per-channel PNG written by hand (Pillow cannot write 48/64-bit PNGs)."""
    h, w, c = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def test_8bit_modes_become_rgb(tmp_path):
    rgb = rand_image(20, 30)
    gray = read_image(save(tmp_path / "g.png", rgb[..., 0]))
    assert gray.shape == (20, 30, 3) and np.array_equal(gray[..., 2], rgb[..., 0])
    palette = Image.fromarray(rgb).convert("P")
    palette.save(tmp_path / "p.png")
    assert np.array_equal(read_image(tmp_path / "p.png"), np.asarray(palette.convert("RGB")))
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "c.tiff")
    assert np.array_equal(read_image(tmp_path / "c.tiff"), np.asarray(cmyk.convert("RGB")))
    assert np.array_equal(read_image(save(tmp_path / "w.webp", rgb, lossless=True)), rgb)
    assert np.array_equal(read_image(save(tmp_path / "b.bmp", rgb)), rgb)
    assert read_image(save(tmp_path / "j.jpg", rgb, quality=95)).shape == (20, 30, 3)


def test_16bit_images_are_reduced_to_8_bits(tmp_path):
    rng = np.random.default_rng(1)
    rgb16 = rng.integers(0, 65536, size=(10, 12, 3), dtype=np.uint16)
    expected = np.round(rgb16 / 257.0)
    out = read_image(write_png16(tmp_path / "rgb16.png", rgb16))
    assert out.dtype == np.uint8 and np.abs(out - expected).max() <= 1  # Pillow keeps the high byte
    gray16 = rgb16[..., 0]
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert np.array_equal(read_image(tmp_path / "g16.png")[..., 1], expected[..., 0])
    dark = np.full((4, 4), 200, np.uint16)  # a 16-bit image whose values all fit in 8 bits is still 16-bit
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    assert (read_image(tmp_path / "dark16.png") == 1).all()


def test_alpha_is_dropped_with_a_warning(tmp_path):
    rgb = rand_image(6, 7)
    alpha = np.full((6, 7), 128, np.uint8)
    with pytest.warns(UserWarning, match="alpha channel dropped"):
        assert np.array_equal(read_image(save(tmp_path / "a.png", np.dstack([rgb, alpha]))), rgb)
    with pytest.warns(UserWarning, match="alpha channel dropped"):
        out = read_image(save(tmp_path / "la.png", np.dstack([rgb[..., 0], alpha])))
    assert np.array_equal(out[..., 0], rgb[..., 0])
    with pytest.warns(UserWarning, match="alpha channel dropped"):
        assert read_image(write_png16(tmp_path / "rgba16.png", np.zeros((3, 3, 4), np.uint16))).shape == (3, 3, 3)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise on display"
    rgb = rand_image(20, 30)
    rgb[0, 0] = 255
    Image.fromarray(rgb).save(tmp_path / "o.jpg", exif=exif, quality=100)
    out = read_image(tmp_path / "o.jpg")
    assert out.shape == (30, 20, 3)
    assert out[0, -1].min() > 200  # the top-left pixel is now top-right


@pytest.mark.parametrize("content,message", [(b"", "empty file"), (b"not an image", "cannot read image"),
                                             (None, "cannot read image")])
def test_unreadable_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.png"
    if content is None:  # a PNG cut short
        content = (save(tmp_path / "ok.png", rand_image(30, 30))).read_bytes()[:80]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        read_image(path)
    assert str(path) in str(e.value)
    with pytest.raises(InputError, match="no such image file"):
        read_image(tmp_path / "missing.png")


def test_inputs_from_files_folders_and_globs(tmp_path):
    for name in ("b.png", "a.JPG", "notes.txt", "sub/c.webp"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in collect_inputs([str(tmp_path)])] == ["a.JPG", "b.png"]
    assert [p.name for p in collect_inputs([str(tmp_path)], recursive=True)] == ["a.JPG", "b.png", "c.webp"]
    assert [p.name for p in collect_inputs([str(tmp_path / "*.png"), str(tmp_path / "b.png")])] == ["b.png"]
    assert [p.name for p in collect_inputs([str(tmp_path / "notes.txt")])] == ["notes.txt"]  # named: taken
    with pytest.raises(ValueError, match="no matching files"):
        collect_inputs([str(tmp_path / "sub")], {".cod"})
    with pytest.raises(ValueError, match="matches no files"):
        collect_inputs([str(tmp_path / "*.tif")])
    with pytest.raises(InputError, match="no such file or directory"):
        collect_inputs([str(tmp_path / "nothing.png")])
    assert {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff"} <= IMAGE_SUFFIXES


def test_write_png_is_atomic_and_lossless(tmp_path):
    rgb = rand_image(9, 11)
    write_png(tmp_path / "out" / "x.png", rgb)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "x.png")), rgb)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.png"]  # no temporary file left behind
