"""Rate-distortion sweep of DiffC: one encode per image up to the largest K, then for each K of the sweep the
K-step file (a prefix of the chain, exactly what `cod diffc compress --steps K` writes) and the decoder's
image from the state x_K (the encoder's own chain: the decoder reproduces it bit for bit on the same device,
tests/test_diffc_codec.py). PSNR and MS-SSIM are measured on the uint8 images, against the uint8 original.
"""
from __future__ import annotations

import math
import time

import numpy as np

from cod.diffc import codec, schedule
from cod.metrics import ms_ssim, psnr


def sweep_steps(model, recon_ts=None, steps=None) -> list[int]:
    """The K of an RD sweep: given steps, or those of recon timesteps (default: the release's list for the model
    family, 17 points for pixel models and 26 for latent ones)."""
    if steps:
        return sorted(set(int(k) for k in steps))
    ts = recon_ts or schedule.RECON_TIMESTEPS[model.family]
    return sorted({schedule.steps_for_recon_t(T) for T in ts})


def evaluate_image(model, image: np.ndarray, ks: list[int], seed: int = 0, conditional: bool = True,
                   backend: str = "auto", on_step=None, limits=None) -> list[dict]:
    """One image -> a row per K: bpp of the K-step file, PSNR, MS-SSIM, and the seconds it took."""
    from cod.limits import Limits

    H, W = image.shape[:2]
    limits = limits or Limits()
    start = time.perf_counter()
    enc = codec.compress(model, image, steps=max(ks), seed=seed, conditional=conditional, backend=backend,
                         keep=set(ks), on_step=on_step, limits=limits)
    encode_s = time.perf_counter() - start
    geo = codec.geometry(model, H, W)
    import torch

    cond_idx = None
    if conditional:
        from cod.codec.bitpack import unpack_indices

        h, w = geo.index_grid(model)
        cond_idx = torch.from_numpy(unpack_indices(enc.vq, h * w, model.codec.bits).reshape(1, h, w).astype(np.int64))
    cond, uncond = codec._conditions(model, geo, cond_idx)
    rows = []
    for K in ks:
        t0 = time.perf_counter()
        data = codec.prefix_file(model, H, W, enc, K)
        fields = codec.Fields(conditional, 0, enc.fields.max_bits, enc.fields.padding, K)
        params = None
        if seed:
            from cod.codec.container import read_header

            params = read_header(enc.data)[0].params
            data = codec.prefix_file(model, H, W, enc, K, params)
        sampler, grid, cfg = codec.denoise_plan(model, fields, params)
        x = codec.denoise(model, enc.states[K], grid, sampler, cfg, cond, uncond)
        out = codec._to_image(model, x, geo)
        try:
            ssim = ms_ssim(out, image)
        except ValueError:
            ssim = math.nan  # smaller than MS-SSIM's five scales
        rows.append({"K": K, "T_K": schedule.last_noise_level(K), "bytes": len(data), "bpp": 8 * len(data) / (H * W),
                     "psnr": psnr(out, image), "ms_ssim": ssim, "denoise_steps": len(grid) - 1,
                     "encode_s": encode_s, "denoise_s": time.perf_counter() - t0})
    return rows
