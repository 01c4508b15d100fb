"""Resource limits, decided from what a file or image declares before anything is allocated or computed.

A .cod file of a few hundred bytes can declare a 65536x65536 image and 256 sampling steps; a PNG header can
declare 400 megapixels. Every such request is measured against three limits that the user can raise:

  max_pixels  pixels of one image, encoding or decoding (memory grows linearly with it: attention and the
              per-pixel stage run in bounded chunks)
  max_steps   sampling steps of one decode
  max_tflop   the estimated work of one decode in TFLOP (10^12 floating-point operations): every network pass
              at that size, including attention's quadratic term, from a FLOP count of the model's own graph
              (`decode_tflop`). The default depends on the device type (not on how busy it is): a CPU gets a
              budget that admits the released XL models at Kodak size with 25 steps.

Nothing here measures time or load, so whether a file is accepted never depends on the machine's state.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from functools import lru_cache

from cod.errors import LimitError
from cod.files import atomic_write_bytes, private_cache_dir, read_cache_json

COST_MODEL_VERSION = 2  # bump when the count changes, to invalidate cached polynomials

DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_STEPS = 100
# A pixel-xl decode of a 768x512 Kodak image with 25 steps is ~91 TFLOP; a 4096x4096 decode with the tiny preset
# and 25 steps ~440 TFLOP (hours of CPU). GPUs run 100-1000x faster.
DEFAULT_MAX_TFLOP = {"cpu": 150.0, "cuda": 20000.0}


def _tflop(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.3g}"


def check_pixels(width: int, height: int, max_pixels: int, name: str) -> None:
    """Refuse an image of width x height with more than max_pixels pixels."""
    if width * height > max_pixels:
        raise LimitError(f"{name}: {width}x{height} is {width * height / 1e6:.1f} megapixels, over the limit of "
                         f"{max_pixels / 1e6:.1f} (--max-pixels {max_pixels}); pass a larger --max-pixels to allow "
                         f"it (memory grows with the pixel count)")


@dataclass(frozen=True)
class Limits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_steps: int = DEFAULT_MAX_STEPS
    max_tflop: float | None = None  # None: DEFAULT_MAX_TFLOP of the device type

    def __post_init__(self):
        if not (isinstance(self.max_pixels, int) and self.max_pixels >= 1):
            raise ValueError(f"max_pixels must be a positive integer, got {self.max_pixels!r}")
        if not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        if self.max_tflop is not None and not (math.isfinite(self.max_tflop) and self.max_tflop > 0):
            raise ValueError(f"max_tflop must be a positive number, got {self.max_tflop!r}")

    def tflop_budget(self, device) -> float:
        if self.max_tflop is not None:
            return float(self.max_tflop)
        return DEFAULT_MAX_TFLOP.get(getattr(device, "type", str(device)).split(":")[0], DEFAULT_MAX_TFLOP["cpu"])

    def check_encode(self, model, height: int, width: int, name: str) -> None:
        """Refuse encoding one height x width image over the pixel or work limit."""
        check_pixels(width, height, self.max_pixels, name)
        work = encode_tflop(model, height, width)
        budget = self.tflop_budget(model.device)
        if work > budget:
            raise LimitError(f"{name}: encoding this {width}x{height} image is estimated at {_tflop(work)} TFLOP, over "
                             f"the limit of {_tflop(budget)} TFLOP for a {model.device.type} device (--max-tflop); "
                             f"pass --max-tflop {math.ceil(work)} to run it anyway")

    def check_decode(self, model, height: int, width: int, steps: int, name: str) -> None:
        """Refuse decoding one height x width image with `steps` steps when it is over any limit. The pixel and
        step checks come first: the work estimate is only computed for sizes that could fit."""
        check_pixels(width, height, self.max_pixels, name)
        if steps > self.max_steps:
            raise LimitError(f"{name}: decoding with {steps} sampling steps is over the limit of {self.max_steps} "
                             f"(--max-steps); pass --max-steps {steps} to allow it, or decode with fewer --steps")
        work = decode_tflop(model, height, width, steps)
        budget = self.tflop_budget(model.device)
        if work > budget:
            raise LimitError(f"{name}: decoding this {width}x{height} image with {steps} steps is estimated at "
                             f"{_tflop(work)} TFLOP, over the limit of {_tflop(budget)} TFLOP for a {model.device.type} "
                             f"device (--max-tflop); pass --max-tflop {math.ceil(work)} to run it anyway, or "
                             f"decode with fewer --steps")


# --------------------------------------------------------------------------------------------------------------
# The cost model
# --------------------------------------------------------------------------------------------------------------
def decode_tflop(model, height: int, width: int, steps: int) -> float:
    """Estimated TFLOP to decode one height x width image with `steps` sampling steps: the condition map and the
    unconditional one (the condition encoder on a blank image, then the decoder), `steps` guidance-pair passes of
    the denoiser (on the image, or on each of its windows when the model tiles decodes at this size), and the VAE
    decoder for latent models. A one-step model (steps = 1): its condition map and one pass of the generator."""
    parts = _work(model, height, width)
    step = parts["step"]
    m = model.size_multiple
    net = model.network(-(-height // m) * m, -(-width // m) * m) if hasattr(model, "network") else None
    if hasattr(net, "windows"):  # a tiled decode (cod.diffusion.tiling): every step runs the windows, not the image
        f = model.pixels_per_cell
        cells = net.windows(*(s // f for s in model.model_shape(-(-height // m) * m, -(-width // m) * m)[1:]))
        step = sum(_work(model, h * f, w * f)["step"] for _, _, h, w in cells)
    return (steps * step + parts["once"]) / 1e12


def encode_tflop(model, height: int, width: int) -> float:
    """Estimated TFLOP to encode one height x width image (the condition encoder and the codebook search)."""
    return _work(model, height, width)["encode"] / 1e12


def _work(model, height: int, width: int) -> dict[str, float]:
    """FLOPs of each part of coding an image, at its padded size.

    Every part is a quadratic polynomial in the number of 16x16-pixel tokens L (convolutions and linear layers
    grow with L, attention with L^2), so the FLOPs of the model's own graph, counted on the meta device (shapes
    only: no memory, no arithmetic) at three sizes, fix the polynomial exactly. Counting takes a second or two
    the first time a process meets a model, so the polynomials are also cached on disk per model config."""
    m = model.size_multiple
    tokens = (-(-height // m) * m // 16) * (-(-width // m) * m // 16)
    polynomials = _polynomials(json.dumps(model.config["denoiser"], sort_keys=True),
                               json.dumps(model.config.get("latent"), sort_keys=True), model.family, m)
    return {part: c[0] + c[1] * tokens + c[2] * tokens * tokens for part, c in polynomials.items()}


PARTS = ("step", "once", "encode")


@lru_cache(maxsize=16)
def _polynomials(denoiser_json: str, latent_json: str, family: str, multiple: int) -> dict[str, tuple]:
    key = hashlib.sha256(f"{COST_MODEL_VERSION}|{denoiser_json}|{latent_json}|{family}|{multiple}".encode()).hexdigest()
    folder = private_cache_dir()
    cache = folder / "flops" / f"{key[:32]}.json" if folder is not None else None
    try:
        data = read_cache_json(cache) if cache is not None else {}
        polynomials = {part: tuple(float(v) for v in data[part]) for part in PARTS}
        # every part costs something per token and nothing is negative: anything else is not our cache
        if all(len(c) == 3 and all(map(math.isfinite, c)) and min(c) >= 0 and c[1] > 0
               for c in polynomials.values()):
            return polynomials
    except (ValueError, KeyError, TypeError):
        pass
    polynomials = _count_polynomials(denoiser_json, latent_json, family, multiple)
    if cache is not None:
        with contextlib.suppress(OSError):
            cache.parent.mkdir(mode=0o700, exist_ok=True)
            atomic_write_bytes(cache, json.dumps(polynomials).encode(), overwrite=True)
    return polynomials


def _count_polynomials(denoiser_json: str, latent_json: str, family: str, multiple: int) -> dict[str, tuple]:
    import numpy as np
    import torch

    from cod.flops import count_flops
    from cod.model import LATENT_DOWNSAMPLE, build_denoiser
    from cod.model_config import ONESTEP_FAMILIES

    with torch.device("meta"):
        denoiser = build_denoiser({"denoiser": json.loads(denoiser_json)})
        latent = json.loads(latent_json)
        vae = None
        if family == "latent" and latent:
            from cod.models.vae import VAE_PRESETS, AutoencoderKL

            vae = AutoencoderKL(VAE_PRESETS[latent["vae_preset"]])

    codec, f = denoiser.codec, 1 if family == "pixel" or family in ONESTEP_FAMILIES else LATENT_DOWNSAMPLE
    sizes = [multiple * k for k in (1, 2, 3)]
    window = getattr(codec, "attention_window", None)
    if window:  # CoD-Lite: in eval mode (as decoded) its codec attends within windows, a cost linear in the pixels;
        denoiser.eval()  # counted at whole windows, the polynomial is exact there and no quadratic term is invented
        sizes = [s * window for s in sizes]
    counts = {part: [] for part in PARTS}
    for side in sizes:
        def meta(*shape, dtype=torch.float32):
            return torch.empty(*shape, dtype=dtype, device="meta")

        h, w = codec.index_grid(side, side)
        image, indices = meta(1, 3, side, side), meta(1, h, w, dtype=torch.long)
        encode = count_flops(codec.encode_indices, image)
        if family in ONESTEP_FAMILIES:  # one pass of batch 1 on the file's condition map (no guidance pair)
            cond = meta(1, denoiser.hidden_size, side // 16, side // 16)
            counts["step"].append(count_flops(denoiser.raw_prediction, meta(1, 3, side, side), meta(1), None, cond))
            counts["once"].append(count_flops(codec.decode_indices, indices))
            counts["encode"].append(encode)
            continue
        x, cond = meta(2, denoiser.in_channels, side // f, side // f), meta(2, denoiser.hidden_size, side // 16,
                                                                           side // 16)
        counts["step"].append(count_flops(denoiser, x, meta(2), cond=cond))
        once = 2 * count_flops(codec.decode_indices, indices) + encode  # the file's map, and the blank image's
        if vae is not None:
            once += count_flops(vae.decode, meta(1, vae.config.latent_channels, side // f, side // f))
        counts["once"].append(once)
        counts["encode"].append(encode)
    tokens = np.array([(s // 16) ** 2 for s in sizes], dtype=np.float64)
    basis = np.stack([np.ones(3), tokens, tokens ** 2], axis=1)
    return {part: tuple(float(c) for c in np.linalg.solve(basis, np.array(v, dtype=np.float64)))
            for part, v in counts.items()}
