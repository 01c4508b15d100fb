"""DConv: CoD-Lite's convolutional diffusion network (spec one-step.md §3).

Reads like PixNerDiT with the transformer swapped for convolutions:
  * condition ("s") stream in image layout [B, D, H/16, W/16]: a 16x16 patch projection of x_t concatenated with
    the codec's condition map, then DiCo blocks (1x1 convs, a depthwise 3x3, global channel attention) modulated
    by the time embedding (adaLN);
  * per-pixel stream: each 16x16 patch decodes its pixels with a small MLP (SimpleMLPAdaLN) whose adaLN
    modulation comes per pixel from that patch's s vector.
The only interactions between patches are the depthwise convs and the channel attention, which pools over the
whole image (QUIRK: outputs are not tiling-invariant).

Numerics follow the release in float32: time features with max_period 10000 (PixNerDiT: 10), non-affine
LayerNorms in the DiCo blocks, affine LayerNorm in the pixel MLP, RMSNorm before the output layer.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cod.models.condition_codec import lite_condition_codec
from cod.models.layers import TimestepEmbedder, modulate, patchify, tokens_from_map, unpatchify
from cod.models.pixnerdit import NerfEmbedder, PixelFinalLayer

VELOCITY_MIN_DENOMINATOR = 0.05  # QUIRK: pred='x' velocity divides by max(1 - t, 0.05)


def layer_norm_2d(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the channel axis at every pixel of [B, C, H, W], no affine parameters."""
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=eps).permute(0, 3, 1, 2)


def per_channel(v: torch.Tensor) -> torch.Tensor:
    """[B, D] modulation vector -> [B, D, 1, 1] (broadcast over pixels; a [1, D] vector broadcasts over batch)."""
    return v.reshape(v.shape[0], v.shape[1], 1, 1)


class BottleneckPatchEmbed(nn.Module):
    """s = Conv1x1([Conv16x16/16(x_t) (no bias), cond]) in image layout."""

    def __init__(self, in_channels: int, patch_size: int, hidden_size: int, bottleneck_dim: int = 128):
        super().__init__()
        self.proj1 = nn.Conv2d(in_channels, bottleneck_dim, patch_size, stride=patch_size, bias=False)
        self.proj2 = nn.Conv2d(bottleneck_dim + hidden_size, hidden_size, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.proj2(torch.cat([self.proj1(x), cond], dim=1))


class DiCoBlock(nn.Module):
    """Conv block with adaLN: s += a1 * conv3(CA(gelu(dw3x3(conv1(mod(LN s)))))); s += a2 * conv5(gelu(conv4(mod(LN s))))."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.conv3 = nn.Conv2d(dim, dim, 1)
        self.ca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, dim, 1))
        self.conv4 = nn.Conv2d(dim, hidden, 1)
        self.conv5 = nn.Conv2d(hidden, dim, 1)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.modulated(s, self.modulation(c))

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(shift1, scale1, gate1, shift2, scale2, gate2), each [B, D, 1, 1], from the time embedding c [B, D]."""
        return tuple(per_channel(v) for v in self.adaLN_modulation(c).chunk(6, dim=-1))

    def modulated(self, s: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = mod
        u = F.gelu(self.conv2(self.conv1(modulate(layer_norm_2d(s), shift1, scale1))))
        u = u * torch.sigmoid(self.ca(u))  # channel attention: pooled over the whole image
        s = s + gate1 * self.conv3(u)
        return s + gate2 * self.conv5(F.gelu(self.conv4(modulate(layer_norm_2d(s), shift2, scale2))))


class PixelResBlock(nn.Module):
    """X += a * MLP(LN(X) (1 + g) + b), (b, g, a) from the per-pixel condition Y; LN affine (eps 1e-6)."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """Per-pixel MLP of a patch, modulated per pixel by cond_embed(s) (the same Y for every res-block)."""

    def __init__(self, hidden_size: int, hidden_size_x: int, patch_size: int, num_res_blocks: int):
        super().__init__()
        self.hidden_size_x, self.pixels = hidden_size_x, patch_size ** 2
        self.cond_embed = nn.Linear(hidden_size, self.pixels * hidden_size_x)
        self.input_proj = nn.Linear(hidden_size_x, hidden_size_x)
        self.res_blocks = nn.ModuleList(PixelResBlock(hidden_size_x) for _ in range(num_res_blocks))

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """x [N, p^2, Dx], s [N, D] -> [N, p^2, Dx]. cond_embed's output is pixel-major (feature k Dx + j)."""
        x = self.input_proj(x)
        y = self.cond_embed(s).reshape(s.shape[0], self.pixels, self.hidden_size_x)
        for block in self.res_blocks:
            x = block(x, y)
        return x


class DConv(nn.Module):
    """CoD-Lite's denoiser. forward(x_t, t, y, cond) -> (velocity or x-prediction, cond[, codec result])."""

    def __init__(self, in_channels: int = 3, patch_size: int = 16, hidden_size: int = 384, hidden_size_x: int = 32,
                 mlp_ratio: float = 4.0, num_blocks: int = 24, num_cond_blocks: int = 21, bottleneck_dim: int = 128,
                 pred: str = "x", ds: int = 32, codebook_bits: int = 4, up2x: bool = True, light: bool = True):
        super().__init__()
        if pred not in ("x", "v"):
            raise ValueError(f"pred must be 'x' or 'v', got {pred!r}")
        if not up2x:  # the 256x256 pre-training stage used up2x=False; every released file is up2x
            raise ValueError("DConv is built with up2x=True only (every released CoD-Lite model)")
        self.in_channels, self.patch_size, self.hidden_size = in_channels, patch_size, hidden_size
        self.hidden_size_x, self.num_cond_blocks, self.pred = hidden_size_x, num_cond_blocks, pred

        # Registration order = the release's state-dict order.
        self.y_embedder = lite_condition_codec(hidden_size, ds=ds, bits=codebook_bits, light=light)
        self.t_embedder = TimestepEmbedder(hidden_size, max_period=10000.0)
        self.y_embedder_x = nn.Conv2d(hidden_size, hidden_size_x * patch_size ** 2, 1)
        self.x_embedder = NerfEmbedder(in_channels + hidden_size_x, hidden_size_x, patch_size)
        self.s_embedder = BottleneckPatchEmbed(in_channels, patch_size, hidden_size, bottleneck_dim)
        self.blocks = nn.ModuleList(DiCoBlock(hidden_size, mlp_ratio) for _ in range(num_cond_blocks))
        self.dec_net = SimpleMLPAdaLN(hidden_size, hidden_size_x, patch_size, num_blocks - num_cond_blocks)
        self.final_layer = PixelFinalLayer(hidden_size_x, in_channels)

    @property
    def codec(self):
        return self.y_embedder

    def time_embedding(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        return self.t_embedder(t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(batch))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, return_codec_res: bool = False, return_pred: bool = False,
                fix_encoder: bool = False):
        B, C, H, W = x.shape
        p = self.patch_size
        codec_res = None
        if cond is None:
            if y is None:
                raise ValueError("DConv needs a condition image y or a precomputed condition map")
            cond, codec_res = self.y_embedder(y, fix_encoder=fix_encoder)
        if cond.shape[-2:] != (H // p, W // p):
            raise ValueError(f"condition grid {tuple(cond.shape[-2:])} does not match the token grid {(H // p, W // p)}")
        temb = self.time_embedding(t, B)

        s = self.s_embedder(x, cond)
        for block in self.blocks:
            s = block(s, temb)

        # Per-pixel stream, one row per patch (row-major tokens): [x_t pixels, y_embedder_x(cond)] channel-major
        # per pixel (feature j p^2 + k), transposed to [B L, p^2, 3 + Dx].
        L = (H // p) * (W // p)
        px = torch.cat([patchify(x, p), tokens_from_map(self.y_embedder_x(cond))], dim=-1)
        px = px.reshape(B * L, C + self.hidden_size_x, p * p).transpose(1, 2)
        px = self.dec_net(self.x_embedder(px), tokens_from_map(s).reshape(B * L, self.hidden_size))
        out = self.final_layer(px).transpose(1, 2).reshape(B, L, C * p * p)
        out = unpatchify(out, p, C, H, W)

        if not return_pred and self.pred == "x":
            tb = t.reshape(-1, 1, 1, 1).to(out.dtype) if t.numel() > 1 else t.reshape(1, 1, 1, 1).to(out.dtype)
            out = (out - x) / (1 - tb).clamp_min(VELOCITY_MIN_DENOMINATOR)
        if return_codec_res:
            return out, cond, codec_res
        return out, cond
