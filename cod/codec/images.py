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
Image.MAX_IMAGE_PIXELS = 1 << 28  # refuse decompression bombs beyond ~268 MP with a clear error


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


def _load_16bit_png(path: Path) -> np.ndarray | None:
    """Pillow opens 16-bit RGB PNGs as 8-bit; read those through scikit-image to keep their full range."""
    try:
        from skimage import io as skio

        arr = skio.imread(str(path))
    except Exception:  # noqa: BLE001 - Pillow's reading stays the source of truth
        return None
    if arr.dtype == np.uint16 and arr.ndim == 3 and arr.shape[2] in (3, 4):
        return np.round(arr[..., :3] / 257.0).astype(np.uint8)
    return None


def read_image(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not an image")
    try:
        with Image.open(path) as img:
            img.load()
            if path.suffix.lower() == ".png" and img.mode == "RGB" and img.info.get("bitdepth", 8) == 16:
                wide = _load_16bit_png(path)
                if wide is not None:
                    return wide
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                return to_rgb8(img, str(path))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None


def collect_inputs(inputs: list[str], suffixes: set[str] | None = IMAGE_SUFFIXES, recursive: bool = True) -> list[Path]:
    """Files, directories (their matching files, sorted) and glob patterns -> paths, in order, no duplicates."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            found = sorted(f for f in p.glob(pattern) if f.is_file() and (suffixes is None or f.suffix.lower() in suffixes))
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
