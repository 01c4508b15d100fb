"""Condition codec: convolutional encoder -> VQ bottleneck -> decoder to the denoiser's token grid (spec §3).

Rate geometry. The index grid has stride s = ds when up2x is on, else ds/2 (QUIRK of the release: the
stage-1 configs named "ds=32" really code one index per 16x16 pixels). The decoder always brings the index
grid to the token grid, whose stride is 16 pixels for every released model (pixel p=16; latent 8*p=16):
stride 32 -> one trailing Up (`ada`), 128 -> two Ups inside `block` plus `ada`, 64 -> the two Ups only,
16 -> nothing, 8 -> a strided conv_out, 4 -> conv s2, ResBlock, conv s2. For the released layouts this rule
gives exactly the official modules; for the non-released ds<=16 rates it is our documented generalisation
(docs/compat.md).

The CoD-Lite codec (spec one-step.md §2) is the same codec with two options: `light=True` drops the last
attention/ResBlock pair of the decoder block, and `attention_window=32` makes every attention block attend within
32x32 windows in evaluation mode when the grid is larger than a window (a QUIRK of the release, see
SpatialAttention). `lite_condition_codec` builds it.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from cod.kernels import attention
from cod.models.vq import VectorQuantizer

TOKEN_STRIDE = 16  # pixels per condition token for every CoD configuration

# Bytes of one activation above which the encoder's convolutions run in strips of rows when no gradient is needed.
# At full resolution (a 12-megapixel photo is 2000x1504 positions after the first conv) an eager ResBlock holds four
# activations besides its input (measured: +2.9 GiB over a 0.72 GiB input for pixel-s), and each convolution
# converts its input and output to oneDNN's blocked layout; in strips it holds one activation besides its input
# (normalised, then convolved in place), and the conversions are strip-sized. The strips compute exactly what the
# whole layers do, bit for bit (tests/test_bounded_memory.py), and run faster (in cache; docs/benchmarks.md).
STRIP_ABOVE_BYTES = 64 * 2 ** 20
STRIP_BYTES = 16 * 2 ** 20  # input bytes per strip
MIN_STRIP_ROWS = 8


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def in_strips(x: torch.Tensor) -> bool:
    """Whether the convolutions over x run in strips (a large activation, no autograd)."""
    return not (torch.is_grad_enabled() and x.requires_grad) and x.numel() * x.element_size() > STRIP_ABOVE_BYTES \
        and x.device.type == "cpu" and not torch.jit.is_tracing() and not torch.compiler.is_compiling()


def conv2d_strips(conv: nn.Conv2d, x: torch.Tensor, pad: tuple[int, int, int, int], add: torch.Tensor | None = None,
                  channels_last: bool = False, inplace: bool = False) -> torch.Tensor:
    """conv(x zero-padded by pad = (left, right, top, bottom)) [+ add], computed in strips of output rows; each
    strip reads its rows of x and the kernel's halo. The output is one preallocated tensor, or x itself (inplace:
    a stride-1 convolution that keeps the shape; the input rows a strip overwrites that the next strip still reads
    are kept aside first). channels_last: run the strips in that layout (what oneDNN picks for a whole convolution
    of few input channels, so the strips round the same way)."""
    k, s = conv.kernel_size[0], conv.stride[0]
    left, right, top, bottom = pad
    B, C, H, W = x.shape
    Ho, Wo = (H + top + bottom - k) // s + 1, (W + left + right - k) // s + 1
    if inplace and (s != 1 or (Ho, Wo, conv.out_channels) != (H, W, C)):
        raise ValueError("an in-place strip convolution must keep the shape of its input")
    out = x if inplace else x.new_empty(B, conv.out_channels, Ho, Wo)
    # Strips of near-equal height, at least MIN_STRIP_ROWS: oneDNN computes a one-row output with other
    # arithmetic than the whole convolution (measured: it then differs by rounding), from two rows on the same.
    rows = max(MIN_STRIP_ROWS, STRIP_BYTES // (B * C * (W + left + right) * s * x.element_size()))
    rows = -(-Ho // -(-Ho // rows))
    kept, kept_from = None, 0  # inplace: original rows [kept_from, ...) that the previous strip overwrote
    for r0 in range(0, Ho, rows):
        r1 = min(Ho, r0 + rows)
        i0, i1 = r0 * s - top, (r1 - 1) * s - top + k
        lo, hi = max(0, i0), min(H, i1)
        if kept is not None and lo < r0:
            strip = torch.cat([kept[:, :, lo - kept_from:], x[:, :, r0:hi]], dim=2)
        else:
            strip = x[:, :, lo:hi]
        if left == right:  # the convolution's own padding on the sides, as the whole convolution has it
            strip = F.pad(strip, (0, 0, lo - i0, i1 - hi))
            padding = (0, left)
        else:
            strip = F.pad(strip, (left, right, lo - i0, i1 - hi))
            padding = 0
        if channels_last:
            strip = strip.contiguous(memory_format=torch.channels_last)
        o = F.conv2d(strip, conv.weight, conv.bias, stride=s, padding=padding)
        if add is not None:
            o += add[:, :, r0:r1]
        if inplace:
            kept_from = max(0, r1 - top)
            kept = x[:, :, kept_from:r1].clone()
        out[:, :, r0:r1] = o
    return out


def group_norm_silu(norm: nn.GroupNorm, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """silu(norm(x)) written into out (x itself, or a tensor of its shape), one image and group at a time: the same
    kernel as the whole GroupNorm on the same contiguous rows (so the same bits), holding one group's output."""
    B, C = x.shape[:2]
    n = C // norm.num_groups
    for b in range(B):
        for g in range(0, C, n):
            y = F.group_norm(x[b:b + 1, g:g + n], 1, norm.weight[g:g + n], norm.bias[g:g + n], norm.eps)
            out[b:b + 1, g:g + n] = F.silu(y, inplace=True)
    return out


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int | None = None):
        super().__init__()
        out_ch = out_ch or in_ch
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if in_strips(x):
            return self.forward_in_strips(x)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h

    def forward_in_strips(self, x: torch.Tensor) -> torch.Tensor:
        """forward, the same arithmetic in one activation besides x: each normalisation + SiLU group by group
        (group_norm_silu), the 3x3 convolutions in strips over it in place (conv2d_strips), the residual added
        strip by strip."""
        h = group_norm_silu(self.norm1, x, torch.empty_like(x))
        h = conv2d_strips(self.conv1, h, (1, 1, 1, 1), inplace=self.nin_shortcut is None)
        h = group_norm_silu(self.norm2, h, h)
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return conv2d_strips(self.conv2, h, (1, 1, 1, 1), add=skip, inplace=True)


class SpatialAttention(nn.Module):
    """Single-head self-attention over all positions; scale 1/sqrt(channels) as in the release.

    window (CoD-Lite only): in evaluation mode, a grid larger than window x window in either direction attends
    within non-overlapping window x window tiles instead. QUIRK kept for parity: Q, K and V are each padded on the
    bottom/right by edge replication to whole windows and the padded positions take part as keys and values
    (duplicates of the edge pixels), then the output is cropped. Training mode is always global.
    """

    def __init__(self, channels: int, window: int | None = None):
        super().__init__()
        self.window = window
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        u = self.norm(x)
        d = self.window
        if d is not None and not self.training and (H > d or W > d):
            return x + self.proj_out(self.windowed(self.q(u), self.k(u), self.v(u), d))
        # One head of C channels in the [B, L, G, d] layout of cod.kernels, read in place from the conv outputs.
        # This strided layout sends PyTorch's CPU SDPA down its math path, which materialises the HW x HW scores;
        # the reference's query chunking is what keeps large images within its score budget.
        q, k, v = (m(u).reshape(B, C, H * W).transpose(1, 2).unsqueeze(2) for m in (self.q, self.k, self.v))
        # The reference, not the Triton kernel: the kernel keeps a whole head dim per tile, and C is up to 1024.
        o = attention(q, k, v, backend="reference")
        return x + self.proj_out(o.reshape(B, H * W, C).transpose(1, 2).reshape(B, C, H, W))

    @staticmethod
    def windowed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: int) -> torch.Tensor:
        """Attention within d x d windows of [B, C, H, W] maps (replicate-padded to whole windows, row-major
        windows, row-major positions inside a window) -> [B, C, H, W]."""
        B, C, H, W = q.shape
        nh, nw = -(-H // d), -(-W // d)
        pad = (0, nw * d - W, 0, nh * d - H)

        def tiles(t: torch.Tensor) -> torch.Tensor:  # -> [B * nh * nw, d * d, 1, C]
            t = F.pad(t, pad, mode="replicate").reshape(B, C, nh, d, nw, d)
            return t.permute(0, 2, 4, 3, 5, 1).reshape(B * nh * nw, d * d, 1, C)

        o = attention(tiles(q), tiles(k), tiles(v), backend="reference")
        o = o.reshape(B, nh, nw, d, d, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, nh * d, nw * d)
        return o[:, :, :H, :W]


class Downsample(nn.Module):
    """Zero-pad one row at the bottom and one column at the right, then a 3x3 stride-2 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if in_strips(x):
            return conv2d_strips(self.conv, x, (0, 1, 0, 1))
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a ResBlock."""

    def __init__(self, channels: int):
        super().__init__()
        self.block = ResBlock(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def index_stride(ds: int, up2x: bool) -> int:
    """Pixels per VQ index along each axis (QUIRK: up2x=False halves the nominal ds)."""
    return ds if up2x else ds // 2


def bits_per_pixel(ds: int, bits: int, up2x: bool) -> float:
    """The real rate of the fixed-length code, not the nominal bits/ds^2 that the release reports."""
    return bits / index_stride(ds, up2x) ** 2


SUPPORTED_DS = (4, 8, 16, 32, 128)


class ConditionEncoder(nn.Module):
    """Image in [0, 1] -> continuous latent [B, latent_dim, H/s, W/s]."""

    def __init__(self, ds: int = 32, up2x: bool = True, width: int = 128, latent_dim: int = 128,
                 attention_window: int | None = None):
        super().__init__()
        Attn = partial(SpatialAttention, window=attention_window)
        if ds not in SUPPORTED_DS:
            raise ValueError(f"condition encoder supports ds in {SUPPORTED_DS}, got {ds}")
        c1, c2, c4 = width, 2 * width, 4 * width
        self.conv_in = nn.Conv2d(3, c1, 3, stride=2 if up2x else 1, padding=1)
        self.down_block_0 = nn.Sequential(ResBlock(c1), ResBlock(c1), Downsample(c1))
        self.down_block_1 = nn.Sequential(ResBlock(c1), ResBlock(c1), *([Downsample(c1)] if ds >= 8 else []))
        self.down_block_2 = nn.Sequential(ResBlock(c1, c2), ResBlock(c2), *([Downsample(c2)] if ds >= 16 else []))
        self.down_block_3 = nn.Sequential(ResBlock(c2), ResBlock(c2), *([Downsample(c2)] if ds >= 32 else []))
        if ds == 128:
            c8 = 8 * width
            self.down_block_4 = nn.Sequential(
                ResBlock(c2, c4), Attn(c4), ResBlock(c4), Attn(c4), Downsample(c4),
                ResBlock(c4, c8), Attn(c8), ResBlock(c8), Attn(c8), Downsample(c8),
            )
            top = c8
        else:
            self.down_block_4 = nn.Sequential(ResBlock(c2, c4), Attn(c4), ResBlock(c4), Attn(c4))
            top = c4
        self.mid_block = nn.Sequential(ResBlock(top), Attn(top), ResBlock(top))
        self.norm_out = group_norm(top)
        self.conv_out = nn.Conv2d(top, latent_dim, 3, padding=1)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if in_strips(y):  # the output has width/3 times the image's bytes: it is the encoder's largest activation
            p = self.conv_in.padding[0]
            h = conv2d_strips(self.conv_in, y, (p, p, p, p), channels_last=True)
        else:
            h = self.conv_in(y)
        for block in (self.down_block_0, self.down_block_1, self.down_block_2, self.down_block_3,
                      self.down_block_4, self.mid_block):
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class ConditionDecoder(nn.Module):
    """Quantised latent [B, latent_dim, H/s, W/s] -> condition map [B, D, H/16, W/16]."""

    def __init__(self, stride: int, hidden_size: int, latent_dim: int = 128, light: bool = False,
                 attention_window: int | None = None):
        super().__init__()
        Attn = partial(SpatialAttention, window=attention_window)
        D = hidden_size
        self.conv_in = nn.Conv2d(latent_dim, D, 3, padding=1)
        if stride >= 64:
            if light:
                raise ValueError("the light decoder exists only for index strides up to 32")
            self.block = nn.Sequential(
                ResBlock(D), Attn(D), Upsample(D), ResBlock(D), Attn(D), Upsample(D),
                ResBlock(D), Attn(D), ResBlock(D),
            )
            stride //= 4
        else:  # light (CoD-Lite): Res, Attn, Res, Attn, Res; full: two more (Attn, Res)
            self.block = nn.Sequential(
                ResBlock(D), Attn(D), ResBlock(D), Attn(D), ResBlock(D),
                *([] if light else [Attn(D), ResBlock(D)]),
            )
        self.norm_out = group_norm(D)
        if stride == 4:
            self.conv_out = nn.Sequential(
                nn.Conv2d(D, D, 3, stride=2, padding=1), ResBlock(D), nn.Conv2d(D, D, 3, stride=2, padding=1)
            )
        elif stride in (8, 16, 32):
            self.conv_out = nn.Conv2d(D, D, 3, stride=2 if stride == 8 else 1, padding=1)
        else:
            raise ValueError(f"no decoder layout maps index stride {stride} to the token stride {TOKEN_STRIDE}")
        self.ada = Upsample(D) if stride == 32 else None

    def forward(self, zq: torch.Tensor) -> torch.Tensor:
        h = self.block(self.conv_in(zq))
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h if self.ada is None else self.ada(h)


class ConditionCodec(nn.Module):
    """Encoder + VQ + decoder. `forward` is the training / evaluate path; `encode_indices` and
    `decode_indices` are the compress / decompress halves (the latter uses exact codebook rows)."""

    def __init__(self, hidden_size: int, ds: int = 32, bits: int = 4, up2x: bool = True,
                 encoder_width: int = 128, latent_dim: int = 128, light: bool = False,
                 attention_window: int | None = None):
        super().__init__()
        self.ds, self.bits, self.up2x = ds, bits, up2x
        self.light, self.attention_window = light, attention_window
        self.stride = index_stride(ds, up2x)
        self.encoder = ConditionEncoder(ds, up2x, encoder_width, latent_dim, attention_window)
        self.bottleneck = VectorQuantizer(2 ** bits, latent_dim)
        self.decoder = ConditionDecoder(self.stride, hidden_size, latent_dim, light, attention_window)

    @property
    def bpp(self) -> float:
        return bits_per_pixel(self.ds, self.bits, self.up2x)

    def index_grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.stride, width // self.stride

    def forward(self, y: torch.Tensor, fix_encoder: bool = False) -> tuple[torch.Tensor, dict]:
        """fix_encoder: run the encoder and VQ without gradients (a frozen encoder, CoD-Lite stage 2)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not fix_encoder):
            zq, vq_loss, indices = self.bottleneck(self.encoder(y))
        cond = self.decoder(zq)
        # bpp_hard is the nominal rate the release logs; bpp is the real one (they differ when up2x is off).
        return cond, {"vq_loss": vq_loss, "indices": indices.flatten(), "bpp_hard": self.bits / self.ds ** 2,
                      "bpp": self.bpp}

    @torch.no_grad()
    def encode_indices(self, y: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> indices [B, H/s, W/s]."""
        return self.bottleneck.nearest(self.encoder(y))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B, h, w] -> condition map [B, D, Hp, Wp]."""
        return self.decoder(self.bottleneck.lookup(indices).to(self.decoder.conv_in.weight.dtype))


LITE_ATTENTION_WINDOW = 32


def lite_condition_codec(hidden_size: int, ds: int = 32, bits: int = 4, light: bool = True) -> ConditionCodec:
    """The CoD-Lite codec (spec one-step.md §2): always up2x (ds in 4, 8, 16, 32), windowed attention in eval mode."""
    if ds not in (4, 8, 16, 32):
        raise ValueError(f"the CoD-Lite codec supports ds 4, 8, 16 and 32, got {ds}")
    return ConditionCodec(hidden_size, ds=ds, bits=bits, up2x=True, light=light,
                          attention_window=LITE_ATTENTION_WINDOW)


def check_image_size(height: int, width: int, multiple: int) -> None:
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} must be a positive multiple of {multiple}")


def required_multiple(codec_stride: int, pixel_multiple: int) -> int:
    return math.lcm(codec_stride, pixel_multiple)
