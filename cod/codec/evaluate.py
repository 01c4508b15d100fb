"""`cod evaluate`: rate and distortion of CoD next to classical codecs at matched file size.

Per image: payload bpp and whole-file bpp, PSNR and MS-SSIM always; LPIPS when the AlexNet backbone weights are
given by local path. The anchors (JPEG, WebP, AVIF through Pillow) are searched for the quality whose file is
the largest not above CoD's file; at CoD's rates they usually cannot get that small, and then their smallest
file is reported and flagged (`matched = False`).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cod.model import atomic_write_bytes

ANCHORS = {"jpeg": ("JPEG", 1, 95), "webp": ("WEBP", 0, 100), "avif": ("AVIF", 0, 100)}
LPIPS_HINT = ("LPIPS needs the torchvision AlexNet weights: download "
              "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth and pass it with --lpips-weights")
UNSUPPORTED = {
    "dists": "DISTS is not implemented in this version of cod",
    "fid": "patch FID/KID is not implemented in this version of cod (it needs Inception weights and torch-fidelity)",
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """MS-SSIM (5 scales, 11x11 Gaussian window); NaN for images too small for 5 scales (side < 161)."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as msssim

    if min(a.shape[:2]) < 161:
        return float("nan")
    ta, tb = (torch.from_numpy(np.array(x)).permute(2, 0, 1)[None].double() for x in (a, b))
    return float(msssim(ta, tb, data_range=255.0))


class LPIPSMetric:
    """torchmetrics' LPIPS (AlexNet) with the backbone read from a local file; never downloads."""

    def __init__(self, weights: str | os.PathLike):
        weights = Path(weights)
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found. {LPIPS_HINT}")
        self._home = tempfile.mkdtemp(prefix="cod-torchhub-")
        ckpt = Path(self._home) / "hub" / "checkpoints"
        ckpt.mkdir(parents=True)
        shutil.copy(weights, ckpt / "alexnet-owt-7be5be79.pth")
        old = os.environ.get("TORCH_HOME")
        os.environ["TORCH_HOME"] = self._home
        try:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            self.metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
        finally:
            if old is None:
                os.environ.pop("TORCH_HOME", None)
            else:
                os.environ["TORCH_HOME"] = old

    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        ta, tb = (torch.from_numpy(np.array(x)).permute(2, 0, 1)[None].float() / 255 for x in (a, b))
        with torch.no_grad():
            return float(self.metric(ta, tb))


def encode_anchor(image: np.ndarray, codec: str, quality: int) -> bytes:
    fmt = ANCHORS[codec][0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def matched_anchor(image: np.ndarray, codec: str, target_bytes: int) -> dict:
    """Binary search for the highest quality whose file fits in target_bytes (sizes grow with quality)."""
    _, lo, hi = ANCHORS[codec]
    smallest = encode_anchor(image, codec, lo)
    if len(smallest) > target_bytes:
        best, quality, matched = smallest, lo, False
    else:
        best, quality = smallest, lo
        while lo <= hi:
            mid = (lo + hi) // 2
            data = encode_anchor(image, codec, mid)
            if len(data) <= target_bytes:
                best, quality, lo = data, mid, mid + 1
            else:
                hi = mid - 1
        matched = True
    with Image.open(io.BytesIO(best)) as im:
        recon = np.asarray(im.convert("RGB"))
    return {"bytes": len(best), "quality": quality, "matched": matched, "recon": recon}


def evaluate(model, paths: list[Path], out_dir: Path, anchors: tuple[str, ...] = ("jpeg", "webp", "avif"),
             lpips_weights: str | None = None, progress=None, **sampling) -> dict:
    from cod.codec import api
    from cod.codec.images import read_image

    lpips = LPIPSMetric(lpips_weights) if lpips_weights else None
    rows = []
    iterator = progress(paths) if progress else paths
    for path in iterator:
        image = read_image(path)
        H, W = image.shape[:2]
        data = api.compress(model, [image], **sampling)[0]
        recon = api.decompress(model, data)
        header_bytes = len(data) - api.payload_size(model, H, W)
        row = {"image": str(path), "method": "cod", "height": H, "width": W, "bytes": len(data),
               "bpp_file": 8 * len(data) / (H * W), "bpp_payload": 8 * (len(data) - header_bytes) / (H * W),
               "psnr": psnr(image, recon), "ms_ssim": ms_ssim(image, recon), "matched": True, "quality": ""}
        if lpips:
            row["lpips"] = lpips(image, recon)
        rows.append(row)
        for codec in anchors:
            a = matched_anchor(image, codec, len(data))
            arow = {"image": str(path), "method": codec, "height": H, "width": W, "bytes": a["bytes"],
                    "bpp_file": 8 * a["bytes"] / (H * W), "bpp_payload": 8 * a["bytes"] / (H * W),
                    "psnr": psnr(image, a["recon"]), "ms_ssim": ms_ssim(image, a["recon"]),
                    "matched": a["matched"], "quality": a["quality"]}
            if lpips:
                arow["lpips"] = lpips(image, a["recon"])
            rows.append(arow)
    summary = summarize(rows)
    write_reports(rows, summary, out_dir)
    return {"rows": rows, "summary": summary}


def summarize(rows: list[dict]) -> dict:
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        entry = {"images": len(sel), "all_matched": all(r["matched"] for r in sel)}
        for key in ("bpp_file", "bpp_payload", "psnr", "ms_ssim", "lpips"):
            values = [r[key] for r in sel if key in r and not (isinstance(r[key], float) and math.isnan(r[key]))]
            if values:
                entry[key] = float(np.mean(values))
        out[method] = entry
    return out


def write_reports(rows: list[dict], summary: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out_dir / "per_image.csv", buf.getvalue().encode())
    atomic_write_bytes(out_dir / "per_image.json", (json.dumps(rows, indent=1) + "\n").encode())
    atomic_write_bytes(out_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    atomic_write_bytes(out_dir / "rd.png", rd_plot(rows))


def rd_plot(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        for ax, key in zip(axes, ("psnr", "ms_ssim")):
            points = [(r["bpp_file"], r[key]) for r in sel if math.isfinite(r[key])]  # NaN: image too small
            if points:
                ax.scatter(*zip(*points), label=method, s=18)
    for ax, key in zip(axes, ("PSNR (dB)", "MS-SSIM")):
        if ax.collections:
            ax.set_xscale("log")
        else:
            ax.text(0.5, 0.5, "no finite values", ha="center", transform=ax.transAxes)
        ax.set_xlabel("bits per pixel (whole file)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    if axes[0].collections:
        axes[0].legend()
    fig.suptitle("CoD vs classical codecs at matched file size (unmatched anchors: their smallest file)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
