"""DDT: CoD's latent-space denoiser (spec §6), a decoupled diffusion transformer over SD-VAE latents.

The condition ("s") stream encodes patches + condition tokens; the velocity decoder is a second run of DiT
blocks over x tokens, modulated per token by the s stream's output.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from cod.models.condition_codec import ConditionCodec
from cod.models.denoiser import CoDDenoiser, PatchEmbed
from cod.models.layers import DiTBlock, TimestepEmbedder, modulate, unpatchify


class LatentFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_features: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_features)
        self.adaLN_modulation = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DDT(CoDDenoiser):
    def __init__(self, in_channels: int = 4, patch_size: int = 2, hidden_size: int = 1152, num_groups: int = 16,
                 num_blocks: int = 28, num_cond_blocks: int = 22, codebook_bits: int = 4, ds: int = 32,
                 up2x: bool = True, encoder_width: int = 128,
                 rope_step: float | None = None):
        super().__init__()
        self.in_channels, self.patch_size, self.hidden_size = in_channels, patch_size, hidden_size
        self.num_groups, self.num_blocks, self.num_cond_blocks = num_groups, num_blocks, num_cond_blocks
        self.rope_step = rope_step
        patch_features = in_channels * patch_size ** 2

        self.y_embedder = ConditionCodec(hidden_size, ds=ds, bits=codebook_bits, up2x=up2x,
                                         encoder_width=encoder_width)
        self.x_embedder = PatchEmbed(patch_features + hidden_size, hidden_size)
        self.s_embedder = PatchEmbed(patch_features + hidden_size, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.final_layer = LatentFinalLayer(hidden_size, patch_features)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_groups) for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, return_codec_res: bool = False):
        B, C, H, W = x.shape
        st = self.condition_stream(x, t, y, cond)
        h = self.x_embedder(torch.cat([st.patches, st.cond_tokens.to(x.dtype)], dim=-1))
        for block in self.blocks[self.num_cond_blocks:]:
            h = block(h, st.s, st.rope)
        out = unpatchify(self.final_layer(h, st.s), self.patch_size, C, H, W)
        if return_codec_res:
            return out, st.cond, st.codec_res
        return out, st.cond
