"""cod.metrics: PSNR exactly as the float64 formula, MS-SSIM as torchmetrics' float64 reference (to float64
rounding), NaN where MS-SSIM is undefined, and a 12-megapixel pair in bounded memory."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

from cod import metrics
from conftest import ROOT

# Measured worst case over the pairs below: 6e-13 (float64 summed in another order); torchmetrics itself is
# that far from 1 on identical flat images.
TOLERANCE = 1e-10
SIZES = [(176, 176), (177, 203), (256, 256), (401, 599), (600, 400)]


def reference_ms_ssim(a, b):
    ta, tb = (torch.tensor(x).permute(2, 0, 1)[None].double() for x in (a, b))
    return float(multiscale_structural_similarity_index_measure(ta, tb, data_range=255.0))


def pair(kind, h, w):
    rng = np.random.default_rng(h * 1000 + w)
    y, x = np.mgrid[0:h, 0:w]
    smooth = np.stack([x * 255 / w, y * 255 / h, 128 + 100 * np.sin(x / 7) * np.cos(y / 5)], axis=-1)
    if kind == "independent":
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if kind == "noisy":
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        return a, np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    a = np.clip(smooth, 0, 255).astype(np.uint8)
    if kind == "smooth":
        return a, np.clip(smooth + rng.normal(0, 3, smooth.shape), 0, 255).astype(np.uint8)
    if kind == "inverted":  # negative contrast terms: torchmetrics clamps them at 0, so MS-SSIM is 0
        return a, 255 - a
    # bright and nearly flat: E[x^2] - E[x]^2 cancels badly here (float32 was 8e-5 off)
    a = np.full((h, w, 3), 250, np.uint8)
    b = a.copy()
    b[::7, ::5] = 249
    return a, b


@pytest.mark.parametrize("kind,h,w", [
    ("independent", 176, 176), ("independent", 600, 400), ("noisy", 177, 203), ("noisy", 401, 599),
    ("smooth", 256, 256), ("smooth", 600, 400), ("inverted", 177, 203), ("bright_flat", 176, 176),
    ("bright_flat", 401, 599),
])
def test_ms_ssim_matches_torchmetrics_float64(kind, h, w, monkeypatch):
    a, b = pair(kind, h, w)
    expected = reference_ms_ssim(a, b)
    assert abs(metrics.ms_ssim(a, b) - expected) <= TOLERANCE
    monkeypatch.setattr(metrics, "STRIP_PIXELS", 3000)  # many strips, some thinner than the 5-row halo
    assert abs(metrics.ms_ssim(a, b) - expected) <= TOLERANCE


@pytest.mark.parametrize("h,w", SIZES)
def test_psnr_is_the_float64_formula_exactly(h, w, monkeypatch):
    a, b = pair("noisy", h, w)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    expected = 10 * math.log10(255.0 ** 2 / mse)
    assert metrics.psnr(a, b) == expected
    monkeypatch.setattr(metrics, "ROW_BLOCK", 1000)  # many row blocks
    assert metrics.psnr(a, b) == expected


def test_identical_images_and_small_images():
    for kind in ("independent", "smooth", "bright_flat"):
        a, _ = pair(kind, 180, 240)
        assert metrics.psnr(a, a) == math.inf
        assert abs(metrics.ms_ssim(a, a) - 1) <= 1e-12  # torchmetrics: 1 - 5e-13 on a flat 255 image
    a, b = pair("noisy", 400, 400)
    assert math.isnan(metrics.ms_ssim(a[:175], b[:175])) and math.isnan(metrics.ms_ssim(a[:, :175], b[:, :175]))
    assert not math.isnan(metrics.ms_ssim(a[:176, :176], b[:176, :176]))
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(a, b[:-1])
    with pytest.raises(ValueError, match="uint8"):
        metrics.ms_ssim(a.astype(np.float32), b.astype(np.float32))


def test_12_megapixel_ms_ssim_in_bounded_memory():
    """Peak RSS of a child process (torch imported: ~0.6 GiB of it) measuring a 4000x3000 pair: ours peaks at
    0.8 GiB. The float64 torchmetrics path this replaces already peaks at 2.7 GiB on a 0.4 MP pair and at
    7.2 GiB on 1.3 MP (~4.9 GiB per megapixel, ~59 GiB extrapolated here; docs/benchmarks.md)."""
    child = textwrap.dedent("""
        import numpy as np
        from cod.metrics import ms_ssim, psnr
        rng = np.random.default_rng(0)
        a, b = (rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8) for _ in range(2))
        print(ms_ssim(a, b), psnr(a, b))
        status = open("/proc/self/status").read()
        print(next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two threads on the shared 2-core machine can take minutes
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    scores, peak_kib = out.stdout.split("\n")[:2]
    assert all(math.isfinite(float(s)) for s in scores.split())
    assert int(peak_kib) < 1.5 * 2 ** 20, f"peak RSS {int(peak_kib) / 2 ** 20:.2f} GiB"
