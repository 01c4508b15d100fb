"""One-step models (One-step CoD and CoD-Lite): a conditional generator evaluated once, at flow time t = 0 (spec one-step.md §4).

A one-step model is a CoD denoiser distilled (DMD, §6) to map pure noise straight to the image: the decode is
one forward pass at t = 0 with input x_0 = noise_level * eps (eps ~ N(0, I); noise_level 0 makes the decode
deterministic). With pred='x' the network output is the image; with pred='v' it is a velocity and the image is
x_0 + output (one Euler step over the whole interval).

Because t is always 0, every adaLN modulation of the condition ("s") stream is a constant: `fold_modulation`
computes those vectors once and removes the Linear layers that produced them, so a decode costs no time-embedding
work in the blocks. On CPU float32 the folded and live models are bitwise equal (fixtures `cache.*`).

Checkpoints are in the unfolded layout: load weights first, then fold. The folded layout (`blocks.i.block.*`,
no `adaLN_modulation`) is the one the release's `eval()` produces.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from cod.models.dconv import DConv
from cod.models.layers import DiTBlock
from cod.models.pixnerdit import PixNerDiT

PREDICTIONS = ("x", "v")


def model_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> uint8 as the one-step CLIs write PNGs: trunc(clamp((x + 1) 127.5 + 0.5, 0, 255))."""
    return torch.clamp((x.float() + 1) * 127.5 + 0.5, 0, 255).to(torch.uint8)


class FoldedDiTBlock(nn.Module):
    """A DiTBlock with its adaLN modulation fixed at one conditioning c (here silu(temb(0)), [1, 1, D]).

    The vectors are non-persistent buffers: `.to()` moves them (the release keeps plain attributes that stay
    behind), and they never enter a state dict, which therefore lists only `block.*` as the release's does.
    The conditioning argument of `forward` is accepted for interface compatibility and ignored.
    """

    NAMES = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")

    def __init__(self, block: DiTBlock, c: torch.Tensor):
        super().__init__()
        with torch.no_grad():
            mod = block.modulation(c)
        del block.adaLN_modulation
        self.block = block
        for name, value in zip(self.NAMES, mod):
            self.register_buffer(name, value.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None, rope: torch.Tensor) -> torch.Tensor:
        return self.block.modulated(x, tuple(getattr(self, n) for n in self.NAMES), rope)


class OneStepDecoding:
    """The one-step decode shared by both members: x0 = noise_level * eps, one pass at t = 0, pred x or v."""

    def initial_noise(self, shape, device=None, noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """noise_level * eps. `noise` supplies eps (the release draws it with randn_like, even at level 0)."""
        if noise is None:
            noise = torch.randn(tuple(shape), device=device, generator=generator)
        return self.noise_level * noise

    def inference(self, y: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                  noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """One decode. y: condition image [B, 3, H, W] in [0, 1] (the codec runs on it: the evaluate path), or
        cond: a decoded condition map [B, D, H/16, W/16] (the decompress path). Returns the image in [-1, 1]."""
        if cond is not None:
            B, _, hp, wp = cond.shape
            shape, device = (B, self.in_channels, hp * self.patch_size, wp * self.patch_size), cond.device
        elif y is not None:
            shape, device = (y.shape[0], self.in_channels, *y.shape[-2:]), y.device
        else:
            raise ValueError("one-step inference needs a condition image y or a condition map cond")
        x0 = self.initial_noise(shape, device, noise, generator)
        return self.image_from(x0, self.raw_prediction(x0, torch.zeros(shape[0], device=device), y, cond))

    def image_from(self, x0: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The decoded image from the network output: the output itself (pred x) or x0 + output (pred v)."""
        return out if self.pred == "x" else x0 + out

    def train_step(self, y: torch.Tensor, noise: torch.Tensor | None = None, fix_encoder: bool = True,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """The training forward of distillation (spec §6.3): the codec forward on y (its encoder and VQ without
        gradients when fix_encoder), one pass at t = 0. Returns (image in [-1, 1], the codec result: vq_loss, ...).
        Draws eps before the codec runs, as the release does."""
        B = y.shape[0]
        x0 = self.initial_noise((B, self.in_channels, *y.shape[-2:]), y.device, noise, generator)
        cond, codec_res = self.codec(y, fix_encoder=fix_encoder)
        return self.image_from(x0, self.raw_prediction(x0, torch.zeros(B, device=y.device), None, cond)), codec_res

    def decode_indices(self, indices: torch.Tensor, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """VQ indices [B, h, w] -> image [B, 3, H, W] in [-1, 1] (codebook rows, codec decoder, one pass)."""
        return self.inference(cond=self.codec.decode_indices(indices), noise=noise, generator=generator)


class OneStepCoD(OneStepDecoding, PixNerDiT):
    """One-step CoD: the CoD PixNerDiT (same weights layout, same codec) decoded in one pass at t = 0.

    noise_level: scale of the input noise (released models: 0, except `bpp_0_0039_noise_1` with 1).
    pred: 'x' (output is the image) or 'v' (image = input + output).
    """

    def __init__(self, *, noise_level: float = 0.0, pred: str = "x", **pixnerdit_kwargs):
        super().__init__(**pixnerdit_kwargs)
        if pred not in PREDICTIONS:
            raise ValueError(f"pred must be one of {PREDICTIONS}, got {pred!r}")
        self.noise_level, self.pred = float(noise_level), pred

    # ---------------------------------------------------------------------------------------------------------
    # adaLN folding
    # ---------------------------------------------------------------------------------------------------------
    @property
    def is_folded(self) -> bool:
        return isinstance(self.blocks[0], FoldedDiTBlock)

    @torch.no_grad()
    def time_conditioning(self) -> torch.Tensor:
        """silu(temb(0)) [1, 1, D]: what every condition-stream block sees during a one-step decode."""
        weight = self.t_embedder.mlp[0].weight
        return torch.nn.functional.silu(self.t_embedder(torch.zeros(1, device=weight.device)).unsqueeze(1))

    def fold_modulation(self) -> "OneStepCoD":
        """Replace the condition-stream blocks by their t = 0 folded form (idempotent). Load weights before."""
        if not self.is_folded:
            c = self.time_conditioning()
            for i in range(self.num_cond_blocks):
                self.blocks[i] = FoldedDiTBlock(self.blocks[i], c)
        return self

    def raw_prediction(self, x0: torch.Tensor, t: torch.Tensor, y, cond) -> torch.Tensor:
        return self(x0, t, y, cond=cond)[0]  # PixNerDiT returns its raw output (x or v by training)


# -------------------------------------------------------------------------------------------------------------
# CoD-Lite: DConv at t = 0 (spec §4.1)
# -------------------------------------------------------------------------------------------------------------
class FoldedDiCoBlock(FoldedDiTBlock):  # the same folding; only the block's call differs
    """A DiCoBlock with its adaLN modulation fixed at c = temb(0) [1, D] (the block applies its own SiLU).

    The vectors are [1, D, 1, 1] and broadcast over the batch; the release's cached block reshapes them to
    [B, D, 1, 1] and so accepts batch 1 only (its batch-2 call raises). Outputs are equal either way.
    """

    def forward(self, s: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.block.modulated(s, tuple(getattr(self, n) for n in self.NAMES))


class OneStepCoDLite(OneStepDecoding, DConv):
    """CoD-Lite: DConv decoded in one pass at t = 0 from noise_level * eps (released models: noise_level 0).

    pred 'x': the network's x-prediction is the image; pred 'v': image = input + raw output.
    """

    def __init__(self, *, noise_level: float = 0.0, **dconv_kwargs):
        super().__init__(**dconv_kwargs)
        self.noise_level = float(noise_level)

    @property
    def is_folded(self) -> bool:
        return isinstance(self.blocks[0], FoldedDiCoBlock)

    @torch.no_grad()
    def time_conditioning(self) -> torch.Tensor:
        """temb(0) [1, D]."""
        return self.t_embedder(torch.zeros(1, device=self.t_embedder.mlp[0].weight.device))

    def fold_modulation(self) -> "OneStepCoDLite":
        """Replace every DiCoBlock by its t = 0 folded form (idempotent). Load weights before."""
        if not self.is_folded:
            c = self.time_conditioning()
            for i in range(len(self.blocks)):
                self.blocks[i] = FoldedDiCoBlock(self.blocks[i], c)
        return self

    def raw_prediction(self, x0: torch.Tensor, t: torch.Tensor, y, cond) -> torch.Tensor:
        return self(x0, t, y, cond=cond, return_pred=True)[0]  # the network's output, not the derived velocity
