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


def check_jpeg_scans(data: bytes, name: str) -> None:
    """Refuse a JPEG with more scans than any encoder writes: each scan of a progressive JPEG makes the decoder
    pass over the whole image again, so a file of repeated tiny scans decodes for hours. Scan markers (FF DA)
    cannot occur inside entropy-coded data (0xFF is stuffed there), so counting them is enough."""
    scans = data.count(b"\xff\xda") if data[:2] == b"\xff\xd8" else 0
    if scans > MAX_JPEG_SCANS:
        raise InputError(f"{name}: a JPEG with {scans} scans (encoders write at most a few dozen; this many would "
                         f"take hours to decode)")


def decode_image(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Image file bytes -> HxWx3 uint8 RGB, for the formats in IMAGE_FORMATS only (ICO, ICNS, EPS and the like
    hold images Pillow decodes before or regardless of the declared size). The pixel count is checked from the
    header before decoding; every decoder failure becomes one InputError naming the file."""
    check_jpeg_scans(data, name)
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
