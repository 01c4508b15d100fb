"""What PixNerDiT and DDT share: the condition codec, the time embedding and the condition ("s") stream.

Both denoisers read the same way (spec §5-6): patchify x_t, embed t, run the codec on the condition image
(unless a precomputed condition map is given), then mix patches and condition tokens through
`num_cond_blocks` DiT blocks conditioned on silu(t_emb). They differ only in the decoder that follows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cod.models.layers import DiTBlock, patchify, rope_2d, tokens_from_map


@dataclass
class ConditionStream:
    patches: torch.Tensor      # [B, L, C p^2]
    temb: torch.Tensor         # [B, 1, D]
    cond: torch.Tensor         # [B, D, Hp, Wp] condition map from the codec
    cond_tokens: torch.Tensor  # [B, L, D]
    s: torch.Tensor            # [B, L, D] = silu(temb + s-stream output)
    rope: torch.Tensor         # [L, d/2, 2] rotary (cos, sin) table for the token grid
    codec_res: dict | None


class CoDDenoiser(nn.Module):
    """Base class: subclasses register y_embedder, s_embedder, t_embedder, blocks and set the fields below."""

    in_channels: int
    patch_size: int
    hidden_size: int
    num_groups: int
    num_cond_blocks: int
    rope_step: float | None = None  # None: the release's size-normalised RoPE positions (QUIRK 2)

    @property
    def codec(self):
        return self.y_embedder

    @property
    def token_grid_multiple(self) -> int:
        """Model-space input sizes must be multiples of this."""
        return self.patch_size

    def compile_regions(self, **options) -> None:
        """torch.compile the repeated regions in place (regional compilation): every DiT block, and what a
        subclass adds in `_compile_stage`. The blocks share their compiled code (their parameters are graph
        inputs): one graph per shape of their inputs (PixNerDiT: one; DDT: two, its x-stream blocks being
        modulated per token), not one per block. The glue between the regions (embedders, the final layer) stays
        eager, and CUDA graphs (cod.cuda_graphs) record the whole call either way. Like a compiled module's, the
        compiled regions are not copied with the model (deepcopy or pickle give an uncompiled copy)."""
        for block in self.blocks:
            if isinstance(block, DiTBlock):
                block.compile(**options)
        self._compile_stage(options)

    def _compile_stage(self, options: dict) -> None:
        """A subclass's other compiled region (PixNerDiT: the per-pixel stage)."""

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_compiled_stage", None)  # bound to this instance (nn.Module drops _compiled_call_impl likewise)
        return state

    def condition_stream(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                         cond: torch.Tensor | None) -> ConditionStream:
        B, _, H, W = x.shape
        p = self.patch_size
        hp, wp = H // p, W // p
        patches = patchify(x, p)
        temb = self.t_embedder(t.reshape(-1).expand(B) if t.numel() == 1 else t.reshape(B)).unsqueeze(1)
        codec_res = None
        if cond is None:
            if y is None:
                raise ValueError("the denoiser needs a condition image y or a precomputed condition map")
            cond, codec_res = self.y_embedder(y)
        if cond.shape[-2:] != (hp, wp):
            raise ValueError(f"condition grid {tuple(cond.shape[-2:])} does not match the token grid {(hp, wp)}")
        cond_tokens = tokens_from_map(cond)
        rope = rope_2d(hp, wp, self.hidden_size // self.num_groups, x.device, step=self.rope_step)
        s = self.s_embedder(torch.cat([patches, cond_tokens.to(patches.dtype)], dim=-1))
        c = F.silu(temb)
        for block in self.blocks[: self.num_cond_blocks]:
            s = block(s, c, rope)
        s = F.silu(temb + s)
        return ConditionStream(patches, temb, cond, cond_tokens, s, rope, codec_res)


class PatchEmbed(nn.Module):
    """Linear over [patch pixels, condition token] (the condition enters both streams, QUIRK 5)."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(in_features, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
