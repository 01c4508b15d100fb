"""Image files: reading any common layout into 8-bit RGB within limits, gathering inputs, writing PNGs atomically.

A user image is hostile until checked: it must be a regular file of at most MAX_IMAGE_FILE_BYTES, and its pixel
count (read from the header, before anything is decoded) must be within the caller's limit.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cod.errors import InputError, LimitError
from cod.files import GiB, atomic_write_bytes, read_bytes_bounded
from cod.limits import DEFAULT_MAX_PIXELS, check_pixels

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
MAX_IMAGE_FILE_BYTES = GiB
# The formats cod decodes: those whose header states the size of the image that will be decoded.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF", "PPM", "AVIF")
MAX_JPEG_SCANS = 256
MAX_SEGMENTS = 4096  # JPEG marker segments or PNG chunks
# Pillow's own decompression-bomb guard (it refuses twice this many pixels) stays as a second line behind ours.
Image.MAX_IMAGE_PIXELS = 1 << 28


def to_rgb8(img: Image.Image, name: str = "image") -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8, EXIF orientation applied; alpha is dropped with a warning."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
        gray = np.clip(np.round(arr / scale * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "F":  # float samples in [0, 1]; NaN becomes 0 and infinities the ends of the range
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        gray = np.clip(np.round(np.clip(values, 0, 1) * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        warnings.warn(f"{name}: alpha channel dropped (CoD codes RGB)", stacklevel=2)
    if img.mode != "RGB":
        img = img.convert("RGBA" if img.mode == "P" and "transparency" in img.info else img.mode).convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def as_rgb8(image) -> np.ndarray:
    """HxWx3 uint8 array, PIL image, or [3,H,W] tensor (uint8, or float in [0, 1]) -> HxWx3 uint8 array."""
    if isinstance(image, np.ndarray):
        arr = image
    elif isinstance(image, torch.Tensor):
        arr = image.detach().cpu()
        if arr.dtype.is_floating_point:
            arr = (arr.clamp(0, 1) * 255).round().to(torch.uint8)
        arr = arr.permute(1, 2, 0).numpy() if arr.ndim == 3 and arr.shape[0] == 3 else arr.numpy()
    else:  # PIL image
        arr = to_rgb8(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {arr.shape} and dtype {arr.dtype}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"empty image of shape {arr.shape}")
    return arr


def check_structure(data: bytes, name: str) -> None:
    """Refuse JPEG and PNG files whose structure costs far more than their size suggests, before a decoder sees
    them: a progressive JPEG of thousands of tiny scans decodes the whole image again for each; Pillow keeps every
    JPEG marker segment and walks every PNG chunk (a 64 MB flood of empty segments takes gigabytes or minutes).
    Both formats are walked segment by segment, by their own length fields (linear in the file size)."""
    if data[:2] == b"\xff\xd8":
        segments, scans = _jpeg_segments(data)
        if scans > MAX_JPEG_SCANS or segments > MAX_SEGMENTS:
            raise InputError(f"{name}: a JPEG with {scans} scans and {segments} marker segments (encoders write a "
                             f"few dozen; this many would take hours or gigabytes to decode)")
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        chunks, pos = 0, 8
        while pos + 8 <= len(data) and chunks <= MAX_SEGMENTS:
            length = int.from_bytes(data[pos:pos + 4], "big")
            if data[pos + 4:pos + 8] == b"IEND":
                break
            pos, chunks = pos + 12 + length, chunks + 1
        if chunks > MAX_SEGMENTS:
            raise InputError(f"{name}: a PNG of more than {MAX_SEGMENTS} chunks (encoders write a few dozen)")


def _jpeg_segments(data: bytes) -> tuple[int, int]:
    """(marker segments, scans) of a JPEG: headers are skipped by their lengths; after a scan header the
    entropy-coded data is skipped to the next marker (0xFF not followed by 0x00 or a restart marker: 0xFF is
    stuffed inside the data)."""
    segments = scans = 0
    pos = 2
    while pos + 4 <= len(data) and segments <= MAX_SEGMENTS:
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # end of image
            break
        segments += 1
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:
            scans += 1
            while True:  # entropy-coded data up to the next marker that is not stuffing or a restart
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= len(data):
                    return segments, scans
                if data[pos + 1] == 0 or 0xD0 <= data[pos + 1] <= 0xD7:
                    pos += 2
                    continue
                break
    return segments, scans


def decode_image(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Image file bytes -> HxWx3 uint8 RGB, for the formats in IMAGE_FORMATS only (ICO, ICNS, EPS and the like
    hold images Pillow decodes before or regardless of the declared size). The pixel count is checked from the
    header before decoding; every decoder failure becomes one InputError naming the file."""
    check_structure(data, name)
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            check_pixels(*img.size, max_pixels, name)
            img.load()
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                return to_rgb8(img, name)
    except (LimitError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - decoders raise many types for damaged files; each is this file's fault
        reason = " ".join(str(e).split()) or type(e).__name__
        raise InputError(f"{name}: cannot read image ({reason})") from None


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image file -> HxWx3 uint8 RGB (see to_rgb8). 16-bit RGB files reach us already reduced to 8 bits by
    Pillow (high byte); 16-bit grayscale is rescaled here. Any failure names the file."""
    path = Path(path)
    data = read_bytes_bounded(path, MAX_IMAGE_FILE_BYTES, "image file")
    if not data:
        raise InputError(f"{path}: empty file (0 bytes), not an image")
    return decode_image(data, str(path), max_pixels)


def collect_inputs(inputs: list[str], suffixes: set[str] = IMAGE_SUFFIXES, recursive: bool = False) -> list[Path]:
    """Files, directories (their files with one of `suffixes`, sorted; subfolders too when recursive) and glob
    patterns -> paths, in order, no duplicates. Files named explicitly are taken whatever their suffix."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            found = sorted(f for f in p.glob(pattern) if f.is_file() and f.suffix.lower() in suffixes)
            if not found:
                raise InputError(f"{p}: directory holds no matching files")
            out.extend(found)
        elif p.exists():
            out.append(p)
        elif any(ch in item for ch in "*?["):
            found = sorted(f for f in _glob(item) if f.is_file())
            if not found:
                raise InputError(f"{item}: pattern matches no files")
            out.extend(found)
        else:
            raise InputError(f"{item}: no such file or directory")
    seen, unique = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


MAX_GLOB_MATCHES = 1_000_000


def _glob(pattern: str) -> list[Path]:
    """Paths matching a shell pattern (`**` for any depth). pathlib's matching is used because it does not descend
    into symbolic links to folders: the glob module follows them, and two links to `.` make it run forever."""
    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
    base = Path(*parts[:first]) if first else Path(".")
    found = []
    for path in base.glob(str(Path(*parts[first:]))):
        found.append(path if first else Path(os.path.relpath(path)))
        if len(found) > MAX_GLOB_MATCHES:
            raise InputError(f"{pattern}: the pattern matches more than {MAX_GLOB_MATCHES} paths")
    return found


PNG_SOFTWARE = "cod"  # the tEXt Software value of PNGs cod writes: how --overwrite recognises its own outputs


def png_bytes(array: np.ndarray) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", PNG_SOFTWARE)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def is_cod_png(path: Path) -> bool:
    """A PNG that cod wrote (its text chunk says so): the only PNGs --overwrite replaces."""
    try:
        with Image.open(path, formats=["PNG"]) as img:
            return img.info.get("Software") == PNG_SOFTWARE
    except Exception:  # noqa: BLE001 - anything that is not a readable PNG is not ours
        return False


def write_png(path: str | os.PathLike, array: np.ndarray, overwrite: bool = False) -> None:
    atomic_write_bytes(Path(path), png_bytes(array), overwrite=overwrite)
