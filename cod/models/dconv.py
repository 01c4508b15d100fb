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
from cod.models.layers import TimestepEmbedder, modulate, patches_in_runs, patchify, tokens_from_map, unpatchify
from cod.models.pixnerdit import NerfEmbedder, PixelFinalLayer

VELOCITY_MIN_DENOMINATOR = 0.05  # QUIRK: pred='x' velocity divides by max(1 - t, 0.05)
# Bytes the per-pixel stream may hold at once (pixel_stage_bytes_per_patch counts them): an image goes through in
# runs of patches, which bounds memory at every size the limits allow. On a CPU the runs are short: at 32 MiB each
# tensor of a run is a few MB, below glibc's mmap threshold, so freed blocks are reused warm from its heap instead of
# every layer's output being a fresh mapping faulted in page by page (and the run stays in the last-level cache).
# CoD-Lite at 720x480 on the 2-core CPU, eager, side by side, identical output (tools/bench_onestep.py
# --stream-budgets-mib 1024,32): bf16 0.713 s whole, 0.550 s in 32 MiB runs; fp32 1.297 s, 0.961 s. A GPU keeps
# the image whole (1 GiB holds 720x480 in float32).
PIXEL_STREAM_BUDGET_BYTES = {"cpu": 32 * 2 ** 20, "accelerator": 1 << 30}


def per_channel(v: torch.Tensor) -> torch.Tensor:
    """[B, D] modulation vector -> [B, D, 1, 1] (broadcast over pixels; a [1, D] vector broadcasts over batch)."""
    return v.reshape(v.shape[0], v.shape[1], 1, 1)


def pointwise(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 convolution applied to channels-last features [..., C_in] as the matrix product it is (same weights)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


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
        self.ca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, dim, 1))  # keys ca.1.*; applied in modulated
        self.conv4 = nn.Conv2d(dim, hidden, 1)
        self.conv5 = nn.Conv2d(hidden, dim, 1)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.modulated(s, self.modulation(c))

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(shift1, scale1, gate1, shift2, scale2, gate2), each [B, D, 1, 1], from the time embedding c [B, D]."""
        return tuple(per_channel(v) for v in self.adaLN_modulation(c).chunk(6, dim=-1))

    def modulated(self, s: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """s [B, D, H, W]; returns the same shape in channels-last memory. The block runs channels-last: its 1x1
        convolutions are matrix products over [B, H, W, D], the LayerNorms and modulations run along contiguous
        channels, and only the depthwise 3x3 sees the image layout (a view). On a CPU this is 2-3x faster than
        the NCHW convolutions, for the same function (float rounding aside)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (m.reshape(m.shape[0], 1, 1, -1) for m in mod)
        h = s.permute(0, 2, 3, 1)  # [B, H, W, D]; free when s is channels-last (every block's output is)
        u = pointwise(modulated_norm(h, shift1, scale1), self.conv1)
        u = F.gelu(self.conv2(u.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        u = u.mul_(torch.sigmoid(pointwise(u.mean((1, 2), keepdim=True), self.ca[1])))  # pooled over the image
        h = torch.addcmul(h, gate1, pointwise(u, self.conv3))
        u = F.gelu(pointwise(modulated_norm(h, shift2, scale2), self.conv4))
        return torch.addcmul(h, gate2, pointwise(u, self.conv5)).permute(0, 3, 1, 2)


def modulated_norm(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """modulate(LayerNorm(h), shift, scale) for a non-affine LayerNorm (eps 1e-6) over h's last dimension. With one
    modulation for the whole batch (a one-step decode, folded or live) the modulation is the LayerNorm's affine
    transform, one fused kernel instead of four passes over h (on a loaded 2-core CPU each pass costs more in thread
    synchronisation than in arithmetic)."""
    norm = (h.shape[-1],)
    if shift.shape[0] == 1:
        return F.layer_norm(h, norm, (1 + scale).reshape(-1), shift.reshape(-1), eps=1e-6)
    return modulate(F.layer_norm(h, norm, eps=1e-6), shift, scale)


class PixelResBlock(nn.Module):
    """X += a * MLP(LN(X) (1 + g) + b), (b, g, a) from the per-pixel condition Y; LN affine (eps 1e-6)."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor, act_y: torch.Tensor | None = None) -> torch.Tensor:
        """act_y: silu(y) when the caller has it (the same for every res-block of a patch, so SimpleMLPAdaLN computes
        it once).
        Fewer passes over the per-pixel tensors than the textbook form: LN(x) (1 + g) + b as LN(x) g + b + LN(x)
        (no [pixels, Dx] tensor of 1 + g, which in bfloat16 would also round g against 1) and x + a h as one
        addcmul."""
        act_y = F.silu(y) if act_y is None else act_y
        shift, scale, gate = self.adaLN_modulation[1](act_y).chunk(3, dim=-1)
        xn = self.in_ln(x)
        return torch.addcmul(x, gate, self.mlp(torch.addcmul(shift, xn, scale).add_(xn)))


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
        act_y = F.silu(y)
        for block in self.res_blocks:
            x = block(x, y, act_y)
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

        # Every patch decodes its pixels independently, so a large image goes through in runs of patches (as in
        # PixNerDiT), which bounds the per-pixel working set (about 10 Dx values a pixel).
        patches, cond_tokens, s_tokens = patchify(x, p), tokens_from_map(cond), tokens_from_map(s)
        out = patches_in_runs(self.decode_patches, patches, cond_tokens, s_tokens, PIXEL_STREAM_BUDGET_BYTES,
                              self.pixel_stage_bytes_per_patch(x.element_size()))
        out = unpatchify(out, p, C, H, W)

        if not return_pred and self.pred == "x":
            tb = t.reshape(-1, 1, 1, 1).to(out.dtype) if t.numel() > 1 else t.reshape(1, 1, 1, 1).to(out.dtype)
            out = (out - x) / (1 - tb).clamp_min(VELOCITY_MIN_DENOMINATOR)
        if return_codec_res:
            return out, cond, codec_res
        return out, cond

    def decode_patches(self, patches: torch.Tensor, cond_tokens: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The per-pixel stream of n patches: pixels [B, n, C p^2], condition tokens and s vectors [B, n, D] ->
        [B, n, C p^2]. Input per pixel: [x_t pixels, y_embedder_x(cond)] channel-major (feature j p^2 + k),
        transposed to [B n, p^2, 3 + Dx]."""
        B, n, Cp2 = patches.shape
        p2 = self.patch_size ** 2
        px = torch.cat([patches, pointwise(cond_tokens, self.y_embedder_x)], dim=-1)
        px = px.reshape(B * n, self.in_channels + self.hidden_size_x, p2).transpose(1, 2)
        px = self.dec_net(self.x_embedder(px), s.reshape(B * n, self.hidden_size))
        return self.final_layer(px).transpose(1, 2).reshape(B, n, Cp2)

    def pixel_stage_bytes_per_patch(self, element_size: int) -> int:
        """An upper bound on the per-pixel stream's working set per patch: per pixel its input (3 + Dx, then the
        transposed copy), the embedding, the per-pixel condition Y, one res-block's 3 Dx modulation and two Dx
        temporaries."""
        dx, c = self.hidden_size_x, self.in_channels
        return element_size * self.patch_size ** 2 * (2 * (c + dx) + 7 * dx)