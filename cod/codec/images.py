"""Reading user images into 8-bit RGB, gathering inputs, writing PNGs atomically."""
from __future__ import annotations

import glob
import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cod.model import atomic_write_bytes

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
# Pillow warns above this many pixels and refuses twice as many (a decompression bomb): 268 MP still opens.
Image.MAX_IMAGE_PIXELS = 1 << 28


def to_rgb8(img: Image.Image, name: str = "image") -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8, EXIF orientation applied; alpha is dropped with a warning."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
        gray = np.clip(np.round(arr / scale * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "F":
        gray = np.clip(np.round(np.asarray(img) * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        warnings.warn(f"{name}: alpha channel dropped (CoD codes RGB)", stacklevel=2)
    if img.mode != "RGB":
        img = img.convert("RGBA" if img.mode == "P" and "transparency" in img.info else img.mode).convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file -> HxWx3 uint8 RGB (see to_rgb8). 16-bit RGB files reach us already reduced to 8 bits by
    Pillow (high byte); 16-bit grayscale is rescaled here. Any failure names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not an image")
    try:
        with Image.open(path) as img:
            img.load()
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                return to_rgb8(img, str(path))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None


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
                raise ValueError(f"{p}: directory holds no matching files")
            out.extend(found)
        elif p.exists():
            out.append(p)
        elif any(ch in item for ch in "*?["):
            found = sorted(Path(f) for f in glob.glob(item, recursive=True) if Path(f).is_file())
            if not found:
                raise ValueError(f"{item}: pattern matches no files")
            out.extend(found)
        else:
            raise FileNotFoundError(f"{item}: no such file or directory")
    seen, unique = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    atomic_write_bytes(Path(path), png_bytes(array))
