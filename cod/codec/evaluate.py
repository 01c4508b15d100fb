"""`cod evaluate`: rate and distortion of CoD next to classical codecs at matched file size.

Per image: payload bpp and whole-file bpp, PSNR and MS-SSIM always; LPIPS (AlexNet) and DISTS (VGG16) when their
ImageNet backbone weights are given by local path (nothing is ever downloaded). The anchors (JPEG, WebP, AVIF
through Pillow) are searched for the quality whose file is the largest not above CoD's file; at CoD's rates they
usually cannot get that small, and then their smallest file is reported and flagged (`matched = False`).

Patch FID/KID (HiFiC protocol) is not available: torchmetrics computes them through the torch-fidelity package,
which this environment does not ship.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cod.metrics import MS_SSIM_MIN_SIDE, ms_ssim, psnr  # noqa: F401 - MS_SSIM_MIN_SIDE: re-exported
from cod.errors import describe_error, is_out_of_memory
from cod.files import atomic_write_bytes
from cod.limits import Limits
from cod.models.state_dict import check_torch_file

ANCHORS = {"jpeg": ("JPEG", 1, 95), "webp": ("WEBP", 0, 100), "avif": ("AVIF", 0, 100)}
# Perceptual metrics: the torchvision backbone file torchmetrics loads, and where to get it.
BACKBONES = {
    "lpips": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "dists": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
}
FID_UNAVAILABLE = ("patch FID/KID needs the torch-fidelity package (torchmetrics computes them through it), which "
                   "is not installed; install torch-fidelity to use --inception-weights")
METRICS = ("psnr", "ms_ssim", *BACKBONES)
REPORT_FILES = ("per_image.csv", "per_image.json", "summary.json", "rd.png")


def weights_hint(metric: str) -> str:
    filename, url = BACKBONES[metric]
    return f"{metric.upper()} needs the torchvision weights {filename}: download {url} and pass its path with " \
           f"--{metric}-weights"


@contextlib.contextmanager
def _local_torch_hub(weights: Path, filename: str) -> Iterator[None]:
    """torchvision looks for pretrained backbones in $TORCH_HOME/hub/checkpoints/<filename> and downloads them
    when absent: a private TORCH_HOME holding the user's file under that name makes it load that file and never
    touch the network."""
    with tempfile.TemporaryDirectory(prefix="cod-torchhub-") as home:
        target = Path(home, "hub", "checkpoints", filename)
        target.parent.mkdir(parents=True)
        try:
            target.symlink_to(weights.resolve())
        except OSError:  # no symlinks (some Windows setups)
            shutil.copy(weights, target)
        old = os.environ.get("TORCH_HOME")
        os.environ["TORCH_HOME"] = home
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("TORCH_HOME", None)
            else:
                os.environ["TORCH_HOME"] = old


class PerceptualMetric:
    """LPIPS or DISTS as implemented by torchmetrics, its backbone read from a local weights file."""

    def __init__(self, metric: str, weights: str | os.PathLike):
        weights = Path(weights)
        if not os.path.lexists(weights):
            raise FileNotFoundError(f"{weights} not found. {weights_hint(metric)}")
        check_torch_file(weights, f"{metric.upper()} backbone")  # torchvision loads it with torch.load
        with _local_torch_hub(weights, BACKBONES[metric][0]):
            try:
                if metric == "lpips":
                    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

                    lpips = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).net
                    self.net = lambda x, y: lpips(x, y, normalize=True)
                else:
                    from torchmetrics.functional.image.dists import DISTSNetwork

                    self.net = DISTSNetwork().eval()
            except Exception as e:  # noqa: BLE001 - any failure here means the file is not the expected backbone
                reason = " ".join(str(e).split())  # the CLI error stays on one line
                raise ValueError(f"{weights}: cannot load it as the {metric.upper()} backbone ({reason}). "
                                 f"{weights_hint(metric)}") from None

    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        ta, tb = (torch.tensor(x).permute(2, 0, 1)[None].float() / 255 for x in (a, b))
        with torch.no_grad():
            return float(self.net(ta, tb))


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


def evaluate(model, paths: list[Path], out_dir: Path, anchors: tuple[str, ...] = tuple(ANCHORS),
             weights: dict[str, str] | None = None, progress=None, limits: Limits = Limits(),
             overwrite: bool = False, **sampling) -> dict:
    """Compress and decompress each image with CoD (sampling: sampler/steps/cfg/seed, stored in the file), run
    the anchors at matched size, and write per_image.csv/json, summary.json and rd.png to out_dir (when at least
    one image was evaluated; existing reports are replaced only with overwrite).
    weights: {"lpips" | "dists": local backbone file} for the perceptual metrics to report.
    An image that cannot be read, is over the limits or fails to code is skipped and listed in "failures"."""
    from cod.codec import api
    from cod.images import read_image

    perceptual = {name: PerceptualMetric(name, path) for name, path in (weights or {}).items() if path}
    rows, failures, notes = [], [], []
    for path in progress(paths) if progress else paths:
        try:
            image = read_image(path, limits.max_pixels)
            H, W = image.shape[:2]
            data = api.compress(model, [image], limits=limits, **sampling)[0]
            recon = api.decompress(model, data, limits=limits)
        except Exception as e:  # noqa: BLE001 - one failing image must not stop the evaluation of the others
            if not isinstance(e, (ValueError, OSError)) and not is_out_of_memory(e):
                raise
            message = describe_error(e)
            failures.append(message if message.startswith(str(path)) else f"{path}: {message}")
            continue
        rows.append(_row(path, "cod", image, recon, len(data), api.payload_size(model, H, W), True, "", perceptual))
        for codec in anchors:
            try:
                a = matched_anchor(image, codec, len(data))
            except Exception as e:  # noqa: BLE001 - an encoder's own limits (WebP: 16383 pixels a side)
                notes.append(f"{path}: no {codec.upper()} anchor ({describe_error(e)})")
                continue
            rows.append(_row(path, codec, image, a["recon"], a["bytes"], a["bytes"], a["matched"], a["quality"],
                             perceptual))
    summary = summarize(rows)
    if rows:
        write_reports(rows, summary, out_dir, overwrite)
    return {"rows": rows, "summary": summary, "failures": failures, "notes": notes}


def _row(path: Path, method: str, image: np.ndarray, recon: np.ndarray, file_bytes: int, payload_bytes: int,
         matched: bool, quality, perceptual: dict) -> dict:
    pixels = image.shape[0] * image.shape[1]
    row = {"image": str(path), "method": method, "height": image.shape[0], "width": image.shape[1],
           "bytes": file_bytes, "bpp_file": 8 * file_bytes / pixels, "bpp_payload": 8 * payload_bytes / pixels,
           "psnr": psnr(image, recon), "ms_ssim": ms_ssim(image, recon)}
    row.update({name: metric(image, recon) for name, metric in perceptual.items()})
    return {**row, "matched": matched, "quality": quality}


def summarize(rows: list[dict]) -> dict:
    """Mean per method of every metric over the images where it is finite (MS-SSIM is NaN for small images)."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        entry = {"images": len(sel), "all_matched": all(r["matched"] for r in sel)}
        for key in ("bpp_file", "bpp_payload", *METRICS):
            values = [r[key] for r in sel if key in r and math.isfinite(r[key])]
            if values:
                entry[key] = float(np.mean(values))
        out[method] = entry
    return out


def _json(obj) -> bytes:
    """JSON with null for NaN/inf (which strict JSON readers refuse)."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return (json.dumps(clean(obj), indent=1) + "\n").encode("utf-8", "surrogateescape")


def write_reports(rows: list[dict], summary: dict, out_dir: Path, overwrite: bool = False) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    # surrogateescape: file names that are not valid UTF-8 are written back as the bytes they were
    reports = dict(zip(REPORT_FILES, (buf.getvalue().encode("utf-8", "surrogateescape"), _json(rows),
                                      _json(summary), rd_plot(rows))))
    for name, data in reports.items():
        atomic_write_bytes(out_dir / name, data, overwrite=overwrite)


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
