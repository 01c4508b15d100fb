"""PixNerDiT: CoD's pixel-space denoiser (spec §5).

A DiT over 16x16 patches produces one vector per patch (the s stream); a per-patch hyper-network ("NerF"
blocks) then decodes every pixel of the patch from its 3 noisy values, a condition embedding and 8x8 DCT
position features, with MLP weights generated from that patch's s vector.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cod.models.condition_codec import ConditionCodec
from cod.models.denoiser import CoDDenoiser, PatchEmbed
from cod.models.layers import DiTBlock, RMSNorm, TimestepEmbedder, patches_in_runs, unpatchify

# Bytes the per-pixel ("NerF") stage may hold at once, as PixNerDiT.pixel_stage_bytes_per_patch counts them;
# larger inputs go through in runs of patches. On CPU short runs cost nothing: they stay in cache, and the stage
# of a 1024x1024 decode step ran 2.8x faster in 64 MiB runs than whole. On an accelerator every run costs its
# kernel launches and must fill the device, so runs there are larger (an XL decode at 512x512 stays in one).
PIXEL_STAGE_BUDGET_BYTES = {"cpu": 64 * 2 ** 20, "accelerator": 2 * 2 ** 30}


def dct_position_features(patch_size: int, device=None) -> torch.Tensor:
    """[p*p, 64] features cos(pi px phi_a) cos(pi py phi_b) / (1 + phi_a phi_b), feature index 8a + b.

    QUIRK kept for checkpoints: the frequencies are linspace(0, 8, 8), not the integers 0..7.
    """
    pos = torch.linspace(0, 1, patch_size, dtype=torch.float32, device=device)
    py, px = torch.meshgrid(pos, pos, indexing="ij")
    px, py = px.reshape(-1, 1, 1), py.reshape(-1, 1, 1)
    phi = torch.linspace(0, 8, 8, dtype=torch.float32, device=device)
    fa, fb = phi.view(1, 8, 1), phi.view(1, 1, 8)
    feats = torch.cos(torch.pi * px * fa) * torch.cos(torch.pi * py * fb) / (1 + fa * fb)
    return feats.reshape(patch_size * patch_size, 64)


class NerfEmbedder(nn.Module):
    """Per-pixel input layer: Linear([pixel values, condition channels, 64 DCT features]) -> Dx.

    The release concatenates the three inputs per pixel; we apply the weight's column blocks separately
    (same function, float-rounding differences only), which saves materialising a [pixels, 3 + Dx + 64] tensor:
    the DCT term is the same for every patch and is computed once per call.
    """

    def __init__(self, in_features: int, hidden_size_x: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.in_features = in_features
        self.embedder = nn.Sequential(nn.Linear(in_features + 64, hidden_size_x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, p*p, in_features] per-pixel features (pixel values first) -> [N, p*p, Dx]."""
        linear = self.embedder[0]
        w_in, w_dct = linear.weight[:, : self.in_features], linear.weight[:, self.in_features:]
        dct = dct_position_features(self.patch_size, x.device).to(x.dtype)
        position = torch.addmm(linear.bias, dct, w_dct.t())  # [p*p, Dx]
        return torch.matmul(x, w_in.t()) + position

    def channel_major(self, x: torch.Tensor) -> torch.Tensor:
        """forward in the per-patch channel-major layout: x [N, in_features, p*p] -> [N, Dx, p*p]."""
        linear = self.embedder[0]
        w_in, w_dct = linear.weight[:, : self.in_features], linear.weight[:, self.in_features:]
        dct = dct_position_features(self.patch_size, x.device).to(x.dtype)
        position = torch.addmm(linear.bias, dct, w_dct.t()).t()  # [Dx, p*p]
        return torch.baddbmm(position, w_in.expand(x.shape[0], -1, -1), x)  # (matmul would copy x transposed)


class NerfBlock(nn.Module):
    """X <- X + silu(RMSNorm(X) M1) M2 with per-patch M1, M2 generated from the patch's s vector and
    column-normalised (each column unit L2 norm over the input dimension)."""

    def __init__(self, hidden_size: int, hidden_size_x: int, mlp_ratio: int):
        super().__init__()
        self.hidden_size_x = hidden_size_x
        self.mlp_ratio = mlp_ratio
        self.param_generator1 = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size_x ** 2 * mlp_ratio))
        self.norm = RMSNorm(hidden_size_x)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        m1, m2 = self.weights(s)
        return x + torch.bmm(F.silu(torch.bmm(self.norm(x), m1)), m2)

    def weights(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-patch M1 [n, Dx, Dx r] and M2 [n, Dx r, Dx] generated from s [n, D]."""
        n, dx, r = s.shape[0], self.hidden_size_x, self.mlp_ratio
        m1, m2 = self.param_generator1(s).chunk(2, dim=-1)
        return F.normalize(m1.reshape(n, dx, dx * r), dim=-2), F.normalize(m2.reshape(n, dx * r, dx), dim=-2)

    def channel_major(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """forward in the per-patch channel-major layout x [N, Dx, p*p]: the products become [Dx r, Dx] x
        [Dx, p*p] (long rows; 5-9x faster on a CPU than [p*p, Dx] x [Dx, Dx r] for Dx = 8, measured), the SiLU in
        place and the residual fused into the second product."""
        m1, m2 = self.weights(s)
        h = F.silu(torch.bmm(m1.transpose(1, 2), self.norm(x, dim=1)), inplace=True)
        return torch.baddbmm(x, m2.transpose(1, 2), h)


class PixelFinalLayer(nn.Module):
    def __init__(self, hidden_size_x: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(hidden_size_x)
        self.linear = nn.Linear(hidden_size_x, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))

    def channel_major(self, x: torch.Tensor) -> torch.Tensor:
        """forward for x [N, Dx, p*p] -> [N, out_channels, p*p], the product in the velocity layer's dtype (it stays
        float32 in every precision, cod.precision)."""
        w = self.linear.weight
        normed = self.norm(x, dim=1).to(w.dtype)
        return torch.baddbmm(self.linear.bias[:, None], w.expand(x.shape[0], -1, -1), normed)


class PixNerDiT(CoDDenoiser):
    reference_pixel_stage = False  # True: the per-pixel stage in the release's layout (benchmarks' baseline)

    def __init__(self, in_channels: int = 3, patch_size: int = 16, hidden_size: int = 1152, num_groups: int = 16,
                 num_blocks: int = 30, num_cond_blocks: int = 26, hidden_size_x: int = 64, nerf_mlpratio: int = 2,
                 codebook_bits: int = 4, ds: int = 32, up2x: bool = True, encoder_width: int = 128,
                 rope_step: float | None = None):
        super().__init__()
        self.in_channels, self.patch_size, self.hidden_size = in_channels, patch_size, hidden_size
        self.num_groups, self.num_blocks, self.num_cond_blocks = num_groups, num_blocks, num_cond_blocks
        self.rope_step = rope_step
        self.hidden_size_x, self.nerf_mlpratio = hidden_size_x, nerf_mlpratio
        pix = in_channels * patch_size ** 2

        self.y_embedder = ConditionCodec(hidden_size, ds=ds, bits=codebook_bits, up2x=up2x,
                                         encoder_width=encoder_width)
        self.x_embedder = NerfEmbedder(in_channels + hidden_size_x, hidden_size_x, patch_size)
        self.s_embedder = PatchEmbed(pix + hidden_size, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder_x = nn.Linear(hidden_size, hidden_size_x * patch_size ** 2)
        self.final_layer = PixelFinalLayer(hidden_size_x, in_channels)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_groups) for _ in range(num_cond_blocks)]
            + [NerfBlock(hidden_size, hidden_size_x, nerf_mlpratio) for _ in range(num_blocks - num_cond_blocks)]
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, return_codec_res: bool = False):
        B, C, H, W = x.shape
        st = self.condition_stream(x, t, y, cond)
        cond_tokens = st.cond_tokens.to(x.dtype)
        # Every patch decodes independently, so a large image goes through in runs of patches: the stage then holds
        # a bounded working set, not hundreds of bytes per pixel of the whole batch.
        out = patches_in_runs(self.pixel_stage, st.patches, cond_tokens, st.s, PIXEL_STAGE_BUDGET_BYTES,
                              self.pixel_stage_bytes_per_patch(x.element_size()))
        out = unpatchify(out, self.patch_size, C, H, W)
        if return_codec_res:
            return out, st.cond, st.codec_res
        return out, st.cond

    @property
    def pixel_stage(self):
        """decode_patches, compiled where compile_regions compiled it."""
        return self.__dict__.get("_compiled_stage") or self.decode_patches

    def _compile_stage(self, options: dict) -> None:
        # Shapes left to dynamo (automatic dynamic): the stage runs on runs of patches whose count varies with the
        # image size (patches_in_runs), which static graphs would multiply past dynamo's recompilation limit.
        self._compiled_stage = torch.compile(self.decode_patches, **{**options, "dynamic": None})

    def decode_patches(self, patches: torch.Tensor, cond_tokens: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The per-pixel stage for n patches: patches [B, n, C p^2], condition tokens and s vectors [B, n, D]
        -> pixels [B, n, C p^2].

        Computed channel-major, one [features, p^2] matrix per patch, which is the layout patches and the
        condition embedding already have (channel-major per patch): no per-pixel transposes or copies in or out,
        and the NerF products have long rows. The same function as decode_patches_reference (the release's
        pixel-major layout) up to float rounding (tests/test_pixel_stage.py)."""
        if self.reference_pixel_stage:
            return self.decode_patches_reference(patches, cond_tokens, s)
        B, n, Cp2 = patches.shape
        N = B * n
        emb = self.y_embedder_x(cond_tokens)
        px = torch.cat([patches, emb], dim=-1).view(N, self.in_channels + self.hidden_size_x, self.patch_size ** 2)
        px = self.x_embedder.channel_major(px)
        s = s.reshape(N, self.hidden_size)
        for block in self.blocks[self.num_cond_blocks:]:
            px = block.channel_major(px, s)
        return self.final_layer.channel_major(px).reshape(B, n, Cp2)

    def decode_patches_reference(self, patches: torch.Tensor, cond_tokens: torch.Tensor,
                                 s: torch.Tensor) -> torch.Tensor:
        """decode_patches as the release computes it: one row per pixel (transposed in and out)."""
        B, n, Cp2 = patches.shape
        p2 = self.patch_size ** 2
        # Per-pixel stream: [pixel values, condition embedding] laid out channel-major per patch, then
        # transposed to one row per pixel.
        emb = self.y_embedder_x(cond_tokens)
        px = torch.cat([patches, emb], dim=-1).reshape(B * n, self.in_channels + self.hidden_size_x, p2)
        px = self.x_embedder(px.transpose(1, 2))
        s = s.reshape(B * n, self.hidden_size)
        for block in self.blocks[self.num_cond_blocks:]:
            px = block(px, s)
        return self.final_layer(px).transpose(1, 2).reshape(B, n, Cp2)

    def pixel_stage_bytes_per_patch(self, element_size: int) -> int:
        """An upper bound on the per-pixel stage's working set per patch (measured peaks are 0.6-0.7 of it for
        the tiny, S and XL presets): per pixel, the stream's input (concatenated, then copied for the embedder's
        matmul), four Dx-wide temporaries (RMSNorm, residual) and the two Dx*r-wide hidden activations of a NerF
        block; per patch, its s vector and the generated weights before and after normalisation."""
        dx, r, c = self.hidden_size_x, self.nerf_mlpratio, self.in_channels
        per_pixel = 2 * (c + dx) + 4 * dx + 2 * dx * r
        return element_size * (self.patch_size ** 2 * per_pixel + 4 * dx * dx * r + self.hidden_size)
