"""Named presets of the one-step models (spec one-step.md §1, §3), as data beside cod.models.presets.

Released sizes: One-step CoD = the CoD pixel model (PixNerDiT-XL/16) at three rates; CoD-Lite = DConv
(D 384, Dx 32, 24 blocks of which 21 DiCo blocks) at six rates. `tiny-*` are the fixture sizes (CPU tests);
`mini-onestep-cod` is the embedded demo model's size (the CPU distillation recipe, conf/dmd-tiny.yaml).
The rate is part of the preset because every released file has its own codec layout; `noise_level` and `pred`
of released files come from their YAML and must be checked against these defaults at import.
"""
from __future__ import annotations

from dataclasses import dataclass

from cod.models.presets import DEFAULT_SAMPLING, PRESETS

# Model-directory family of each member (cod/model_config.py) and the denoiser class it builds.
FAMILIES = {"cod": "onestep-cod", "lite": "cod-lite"}
DENOISER_CLASSES = {"cod": "OneStepCoD", "lite": "OneStepCoDLite"}
# A one-step decode is one Euler step over the whole interval [0, 1] without guidance (exactly so for pred='v';
# pred='x' outputs the image directly): what a model directory of these families records as its sampling, so
# that .cod files, limits and `cod info` describe it in the terms of every other model.
ONESTEP_SAMPLING = {**DEFAULT_SAMPLING, "sampler": "euler", "steps": 1, "cfg": 1.0}


@dataclass(frozen=True)
class OneStepPreset:
    member: str        # "cod" (OneStepCoD over PixNerDiT) or "lite" (OneStepCoDLite over DConv)
    kwargs: dict       # constructor kwargs, noise_level and pred included
    description: str

    def build(self):
        from cod.models.onestep import OneStepCoD, OneStepCoDLite

        return (OneStepCoD if self.member == "cod" else OneStepCoDLite)(**self.kwargs)

    # The interface of cod.models.presets.Preset, so that cod.model.build_config writes either kind.
    @property
    def family(self) -> str:
        return FAMILIES[self.member]

    @property
    def denoiser_class(self) -> str:
        return DENOISER_CLASSES[self.member]

    @property
    def denoiser(self) -> dict:
        return self.kwargs

    vae_preset = None
    sampling = ONESTEP_SAMPLING


def _cod(ds: int, bits: int, noise_level: float = 0.0, size: str = "pixel-xl") -> dict:
    return dict(PRESETS[size].denoiser, ds=ds, codebook_bits=bits, noise_level=noise_level, pred="x")


def _lite(ds: int, bits: int, hidden=384, hidden_x=32, blocks=24, cond_blocks=21, light=True) -> dict:
    return dict(in_channels=3, patch_size=16, hidden_size=hidden, hidden_size_x=hidden_x, mlp_ratio=4.0,
                num_blocks=blocks, num_cond_blocks=cond_blocks, bottleneck_dim=128, pred="x", ds=ds,
                codebook_bits=bits, up2x=True, light=light, noise_level=0.0)


_TINY_COD = dict(in_channels=3, patch_size=16, num_groups=4, hidden_size=64, hidden_size_x=16, num_blocks=10,
                 num_cond_blocks=8, nerf_mlpratio=2, up2x=True, encoder_width=128, noise_level=0.0, pred="x")

ONESTEP_PRESETS: dict[str, OneStepPreset] = {
    # One-step CoD (HF zhaoyangjia/CoD, finetuned_one_step_cod/)
    "onestep-cod-0.0039": OneStepPreset("cod", _cod(32, 4), "One-step CoD bpp_0_0039 (deterministic)"),
    "onestep-cod-0.0039-noise1": OneStepPreset("cod", _cod(32, 4, noise_level=1.0),
                                               "One-step CoD bpp_0_0039_noise_1 (noise level 1: stochastic decode)"),
    "onestep-cod-0.0312": OneStepPreset("cod", _cod(16, 8), "One-step CoD bpp_0_0312"),
    "onestep-cod-0.1250": OneStepPreset("cod", _cod(8, 8), "One-step CoD bpp_0_1250"),
    # CoD-Lite (HF zhaoyangjia/CoD_Lite, CoD_Lite_bpp_*.pt)
    "cod-lite-0.0039": OneStepPreset("lite", _lite(32, 4), "CoD-Lite bpp_0_0039 (102.0 M parameters)"),
    "cod-lite-0.0078": OneStepPreset("lite", _lite(32, 8), "CoD-Lite bpp_0_0078"),
    "cod-lite-0.0156": OneStepPreset("lite", _lite(16, 4), "CoD-Lite bpp_0_0156"),
    "cod-lite-0.0312": OneStepPreset("lite", _lite(16, 8), "CoD-Lite bpp_0_0312"),
    "cod-lite-0.1250": OneStepPreset("lite", _lite(8, 8), "CoD-Lite bpp_0_1250"),
    "cod-lite-0.5000": OneStepPreset("lite", _lite(4, 8), "CoD-Lite bpp_0_5000"),
    # fixture sizes (shared/fixtures/one-step-reference)
    "tiny-onestep-cod": OneStepPreset("cod", dict(_TINY_COD, ds=32, codebook_bits=4),
                                      "fixture size of One-step CoD (onestep_cod_ds32_b4)"),
    "tiny-cod-lite": OneStepPreset("lite", _lite(32, 4, hidden=64, hidden_x=16, blocks=10, cond_blocks=8),
                                   "fixture size of CoD-Lite (lite_ds32_b4_light)"),
    # the embedded demo model's size (cod/assets/demo-model): conf/dmd-tiny.yaml distils that model into one step
    "mini-onestep-cod": OneStepPreset("cod", dict(PRESETS["mini-pixel"].denoiser, ds=16, codebook_bits=8,
                                                  rope_step=1.0, noise_level=0.0, pred="v"),
                                      "One-step CoD at the demo model's size (mini-pixel, 8 bits per 16x16 pixels)"),
}


def get_onestep_preset(name: str, ds: int | None = None, bits: int | None = None) -> OneStepPreset:
    """A one-step preset, optionally at another (ds, bits) (the tiny presets at the other fixture rates)."""
    if name not in ONESTEP_PRESETS:
        raise ValueError(f"unknown one-step preset '{name}'; available: {', '.join(ONESTEP_PRESETS)}")
    preset = ONESTEP_PRESETS[name]
    kwargs = dict(preset.kwargs)
    if ds is not None:
        kwargs["ds"] = ds
    if bits is not None:
        kwargs["codebook_bits"] = bits
    return OneStepPreset(preset.member, kwargs, preset.description)


DECODE_KEYS = ("noise_level", "pred")  # settings a released file may choose differently from its preset


def matching_preset(member: str, kwargs: dict) -> tuple[str | None, dict]:
    """The preset of this member (released sizes before tiny ones) whose constructor arguments equal kwargs, else
    the one that differs only in the decode settings noise_level / pred, with those differences as
    {key: (preset's, kwargs')}; (None, {}) when no preset has this architecture and rate."""
    names = sorted((n for n, p in ONESTEP_PRESETS.items() if p.member == member), key=lambda n: n.startswith("tiny"))
    exact = [n for n in names if ONESTEP_PRESETS[n].kwargs == kwargs]
    if exact:
        return exact[0], {}
    for name in names:
        preset = ONESTEP_PRESETS[name].kwargs
        if set(preset) == set(kwargs) and all(preset[k] == v for k, v in kwargs.items() if k not in DECODE_KEYS):
            return name, {k: (preset[k], kwargs[k]) for k in DECODE_KEYS if preset[k] != kwargs[k]}
    return None, {}
