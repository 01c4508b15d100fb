"""Named model presets (as DiT names its sizes) and the rate table.

The XL presets are the released CoD models; `*-b` and `*-s` are smaller trainable sizes; `mini-pixel` is the
embedded demo model; `tiny-*` are for CPU tests (a 25-step decode of a 512x512 image takes seconds on one core).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from cod.models.condition_codec import SUPPORTED_DS, bits_per_pixel, index_stride


@dataclass(frozen=True)
class Preset:
    family: str                    # "pixel" (PixNerDiT) or "latent" (DDT over an SD-VAE latent)
    denoiser: dict                 # constructor kwargs of the denoiser class
    description: str
    vae_preset: str | None = None  # latent family only: which VAE layout (cod.models.vae.VAE_PRESETS)
    sampling: dict = field(default_factory=dict)  # overrides of DEFAULT_SAMPLING

    @property
    def denoiser_class(self) -> str:
        return "PixNerDiT" if self.family == "pixel" else "DDT"


DEFAULT_SAMPLING = {"sampler": "adam2", "steps": 25, "cfg": 3.0, "guidance_interval": [0.1, 1.0],
                    "last_step": 0.04, "timeshift": 1.0}


def _pixel(hidden, heads, blocks, cond_blocks, hidden_x=64, ratio=2, width=128, ds=32):
    return dict(in_channels=3, patch_size=16, hidden_size=hidden, num_groups=heads, num_blocks=blocks,
                num_cond_blocks=cond_blocks, hidden_size_x=hidden_x, nerf_mlpratio=ratio, codebook_bits=4, ds=ds,
                up2x=True, encoder_width=width)


def _latent(hidden, heads, blocks, cond_blocks, width=128, ds=32):
    return dict(in_channels=4, patch_size=2, hidden_size=hidden, num_groups=heads, num_blocks=blocks,
                num_cond_blocks=cond_blocks, codebook_bits=4, ds=ds, up2x=True, encoder_width=width)


PRESETS: dict[str, Preset] = {
    "pixel-xl": Preset("pixel", _pixel(1152, 16, 30, 26),
                       "released CoD pixel model (PixNerDiT-XL/16), 0.0039 bpp at 512x512"),
    "latent-xl": Preset("latent", _latent(1152, 16, 28, 22), "released CoD latent model (DDT-XL/2), 0.0039 bpp",
                        vae_preset="sd-vae", sampling={"cfg": 1.25}),
    "latent-xl-64bit": Preset("latent", _latent(1152, 16, 28, 22, ds=128),
                              "released CoD latent model (DDT-XL/2), 64 bits per 512x512 image (0.00024 bpp)",
                              vae_preset="sd-vae"),
    "pixel-b": Preset("pixel", _pixel(768, 12, 16, 12, hidden_x=32), "PixNerDiT-B/16, trainable on one GPU"),
    "latent-b": Preset("latent", _latent(768, 12, 16, 12), "DDT-B/2, trainable on one GPU", vae_preset="sd-vae"),
    "pixel-s": Preset("pixel", _pixel(384, 6, 12, 10, hidden_x=32, width=64), "PixNerDiT-S/16"),
    "latent-s": Preset("latent", _latent(384, 6, 12, 10, width=64), "DDT-S/2", vae_preset="sd-vae"),
    "mini-pixel": Preset("pixel", _pixel(128, 4, 10, 8, hidden_x=16, width=32),
                         "small enough to ship: the embedded demo model (cod demo), 7 M parameters"),
    "tiny-pixel": Preset("pixel", _pixel(64, 4, 10, 8, hidden_x=8, width=32),
                         "CPU test/demo size (fixture depth; narrow condition encoder and per-pixel MLP)"),
    "tiny-latent": Preset("latent", _latent(64, 4, 10, 8, width=32), "CPU test/demo size with a tiny VAE",
                          vae_preset="tiny"),
}


def get_preset(name: str, ds: int | None = None, bits: int | None = None, up2x: bool | None = None,
               rope_step: float | None = None) -> Preset:
    """A preset, optionally moved to another rate of the rate table. rope_step: place RoPE positions a fixed
    distance apart at every image size instead of the release's size-normalised positions (QUIRK 2; for new
    models trained at one size and used at others)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; available: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    kwargs = dict(preset.denoiser)
    for key, value in (("ds", ds), ("codebook_bits", bits), ("up2x", up2x), ("rope_step", rope_step)):
        if value is not None:
            kwargs[key] = value
    validate_rate(kwargs["ds"], kwargs["codebook_bits"], kwargs["up2x"])
    return replace(preset, denoiser=kwargs)


def validate_rate(ds: int, bits: int, up2x: bool) -> None:
    if ds not in SUPPORTED_DS:
        raise ValueError(f"ds must be one of {SUPPORTED_DS}, got {ds}")
    if not 1 <= bits <= 16:
        raise ValueError(f"codebook bits must be 1-16, got {bits}")
    if index_stride(ds, up2x) < 4:
        raise ValueError(f"ds={ds} with up2x=False gives an index stride below 4, which no decoder supports")


def rate_table() -> list[dict]:
    """Every supported (ds, bits, up2x) with its real rate; ds 32/128 with 4 bits and up2x are the released."""
    rows = []
    for ds in SUPPORTED_DS:
        for bits in (4, 8):
            for up2x in (True, False):
                if index_stride(ds, up2x) < 4:
                    continue
                rows.append({"ds": ds, "bits": bits, "up2x": up2x, "index_stride": index_stride(ds, up2x),
                             "bpp": bits_per_pixel(ds, bits, up2x), "nominal_bpp": bits / ds ** 2,
                             "bits_512": bits * (512 // index_stride(ds, up2x)) ** 2})
    return rows
