"""PSNR and MS-SSIM of HxWxC uint8 images in bounded memory: the one implementation, used by `cod evaluate`,
the demo and training's validation.

MS-SSIM is torchmetrics' `multiscale_structural_similarity_index_measure` with its default arguments and
data_range 255 (which stacks five padded float64 copies of the whole image and its filtered moments: ~5 GB per
megapixel), recomputed one channel at a time: the channel's scales are float32 planes (exact for 8-bit data and
its 2x2 means), and the Gaussian moments are computed in float64 on strips of rows with a 5-row halo. Memory is
the two uint8 images, two float32 planes and one strip's buffers (~10 MB), whatever the image size.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# torchmetrics' check for 5 scales and an 11-pixel window: side // 16 > 10.
MS_SSIM_MIN_SIDE = 176
# The exponents of the scales' terms, as torchmetrics applies them: a float32 tensor.
BETAS = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333], dtype=np.float32)
C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
PAD = 5  # half the 11-pixel window: torchmetrics' size for sigma 1.5 is int(3.5 * sigma + 0.5) * 2 + 1
# Output pixels filtered at once: ~20 float64 buffers of 512 KB, ~10 MB. Buffers this small stay in cache: on
# a 2-core CPU this ran 1.5x faster than 2^19 pixels per strip.
STRIP_PIXELS = 1 << 16
ROW_BLOCK = 1 << 22  # PSNR: uint8 values differenced at once


def _check(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 3 or a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"expected two HxWxC uint8 images of the same shape, got {a.shape} {a.dtype} and "
                         f"{b.shape} {b.dtype}")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB for data range 255; inf for identical images. The squared error is summed in integers, a
    block of rows at a time, so it is exact and no float copy of the images is made."""
    _check(a, b)
    rows = max(1, ROW_BLOCK // a[0].size)
    sse = 0
    for r in range(0, a.shape[0], rows):
        d = a[r:r + rows].astype(np.int32) - b[r:r + rows]
        sse += int(np.square(d).sum(dtype=np.int64))
    return float("inf") if sse == 0 else 10 * math.log10(255.0 ** 2 / (sse / a.size))


def _window() -> list[float]:
    """torchmetrics' 1-D Gaussian (sigma 1.5, sum 1); its 11x11 window is the outer product of this one, so
    filtering the rows and then the columns with it is the same filter."""
    g = [math.exp(-((k / 1.5) ** 2) / 2) for k in range(-PAD, PAD + 1)]
    return [v / sum(g) for v in g]


WINDOW = _window()


def _blur(maps: torch.Tensor) -> torch.Tensor:
    """The Gaussian over the last two dimensions, valid region only: per dimension, 11 shifted multiply-adds
    (on CPU several times faster than a one-channel conv2d)."""
    for dim in (-1, -2):
        n = maps.shape[dim] - 2 * PAD
        out = maps.narrow(dim, 0, n) * WINDOW[0]
        for k in range(1, 2 * PAD + 1):
            out.add_(maps.narrow(dim, k, n), alpha=WINDOW[k])
        maps = out
    return maps


def _strip(x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows r0 - PAD .. r1 + PAD of x in float64, reflect-padded by PAD on every side as torchmetrics pads the
    whole image (reflection without repeating the edge pixel)."""
    H = x.shape[0]
    rows = torch.arange(r0 - PAD, r1 + PAD).abs()
    rows = torch.where(rows >= H, 2 * (H - 1) - rows, rows)
    return F.pad(x[rows][None].double(), (PAD, PAD), mode="reflect")[0]


def _ssim_cs_means(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean SSIM over the whole HxW map and mean contrast-sensitivity term over its interior (the map less PAD
    pixels on each side), torchmetrics' two per-scale reductions, for one channel of the two images.

    The strips are float64: in float32, var = E[x^2] - E[x]^2 cancels badly on flat bright areas (a flat 250
    image with sparse 249s came out 8e-5 off torchmetrics), and a strip is small anyway."""
    H, W = x.shape
    ssim_sum = cs_sum = 0.0
    step = max(1, STRIP_PIXELS // W)
    for r0 in range(0, H, step):
        r1 = min(H, r0 + step)
        xs, ys = _strip(x, r0, r1), _strip(y, r0, r1)
        mu_x, mu_y, xx, yy, xy = _blur(torch.stack((xs, ys, xs * xs, ys * ys, xs * ys)))
        var_x = (xx - mu_x * mu_x).clamp_(min=0)
        var_y = (yy - mu_y * mu_y).clamp_(min=0)
        cs = (2 * (xy - mu_x * mu_y) + C2) / (var_x + var_y + C2)
        ssim = (2 * mu_x * mu_y + C1) / (mu_x * mu_x + mu_y * mu_y + C1) * cs
        ssim_sum += ssim.sum().item()
        lo, hi = max(r0, PAD), min(r1, H - PAD)
        if lo < hi:
            cs_sum += cs[lo - r0:hi - r0, PAD:W - PAD].sum().item()
    return ssim_sum / (H * W), cs_sum / ((H - 2 * PAD) * (W - 2 * PAD))


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """MS-SSIM (5 scales, 11x11 Gaussian window, sigma 1.5) as torchmetrics defines it; NaN for images whose
    shorter side is below MS_SSIM_MIN_SIDE (the window must fit the coarsest scale).

    Per scale torchmetrics averages over channels and pixels at once; the channels have equal sizes, so the
    mean of the per-channel means is the same figure. Scales 1-4 give their contrast-sensitivity mean, scale 5
    its SSIM mean; each is clamped at 0 (torchmetrics' default normalize="relu") before the power."""
    _check(a, b)
    if min(a.shape[:2]) < MS_SSIM_MIN_SIDE:
        return float("nan")
    terms = np.zeros(len(BETAS))
    for c in range(a.shape[2]):
        x, y = (torch.from_numpy(im[..., c].astype(np.float32)) for im in (a, b))
        for s in range(len(BETAS)):
            if s:  # 2x2 average pooling, odd last row/column dropped; exact in float32 for 8-bit data
                x, y = (F.avg_pool2d(t[None], 2)[0] for t in (x, y))
            ssim_mean, cs_mean = _ssim_cs_means(x, y)
            terms[s] += ssim_mean if s == len(BETAS) - 1 else cs_mean
    terms = np.maximum(terms / a.shape[2], 0)
    return float(np.prod(terms ** BETAS))
