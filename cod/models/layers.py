"""Transformer building blocks shared by PixNerDiT and DDT (spec §4).

Every function here is written to reproduce the official numerics in float32; where the official choice is
unusual (max_period 10, RoPE positions spanning [0, 16]) a comment says so, because released checkpoints
were trained with it and must see exactly the same features.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from cod.cuda_graphs import hold
from cod.kernels import attention  # PyTorch's SDPA (chunked where it would hold every score); Triton on request


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


# --------------------------------------------------------------------------------------------------------------
# Normalisation and feed-forward
# --------------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """y = g * x / sqrt(mean(x^2) + eps), computed in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Normalise over dim (the last by default; PixNerDiT's channel-major stage normalises dim 1)."""
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim, keepdim=True) + self.eps)
        trailing = x.dim() - 1 - dim % x.dim()
        return normed.type_as(x) * self.weight.view(-1, *[1] * trailing)


class SwiGLU(nn.Module):
    """FFN(x) = W2(silu(W1 x) * W3 x), no biases; inner width floor(2 * 4D / 3) as in the release."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(2 * int(dim * mlp_ratio) / 3)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# --------------------------------------------------------------------------------------------------------------
# Time embedding
# --------------------------------------------------------------------------------------------------------------
def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10.0) -> torch.Tensor:
    """Sinusoidal features of flow time t in [0, 1], cosine half first.

    QUIRK kept for checkpoints: max_period is 10 (not 10000) because t is not scaled by 1000.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.max_period = max_period  # 10 for CoD's PixNerDiT / DDT, 10000 for CoD-Lite's DConv
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t, self.frequency_size, self.max_period).to(self.mlp[0].weight.dtype)
        return self.mlp(feats)


def patches_in_runs(decode, patches: torch.Tensor, cond_tokens: torch.Tensor, s: torch.Tensor, budgets: dict,
                    bytes_per_patch: int) -> torch.Tensor:
    """decode(patches, cond_tokens, s) -> [B, L, C p^2] for a per-pixel stage whose patches decode independently
    (PixNerDiT's NerF stage, CoD-Lite's per-pixel MLP), in runs of patches (all images of the batch at once) into a
    preallocated output, so the stage holds at most budgets["cpu" | "accelerator"] bytes as counted by
    bytes_per_patch (per patch and image). Under autograd every run's activations stay alive for the backward, so
    runs would save nothing there: one call."""
    B, L = patches.shape[:2]
    run = max(1, budgets["cpu" if patches.device.type == "cpu" else "accelerator"] // (B * bytes_per_patch))
    if run >= L or s.requires_grad:
        return decode(patches, cond_tokens, s)
    out = None  # allocated in the dtype of decode's output (float32 also when the stream runs in bf16)
    for start in range(0, L, run):
        end = start + run
        part = decode(patches[:, start:end], cond_tokens[:, start:end], s[:, start:end])
        if out is None:
            out = part.new_empty(B, L, part.shape[-1])
        out[:, start:end] = part
    return out


# --------------------------------------------------------------------------------------------------------------
# 2-D rotary position embedding
# --------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=32)
def _rope_cached(height: int, width: int, head_dim: int, device: str, theta: float, span: float,
                 step: float | None) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4, dtype=torch.float32)[: head_dim // 4] / head_dim))
    if step is None:
        # QUIRK kept for checkpoints: positions are normalised to span [0, span] whatever the grid size, so
        # neighbouring tokens are 16/15 apart at 256x256 and 16/31 at 512x512 (the model sees a different
        # geometry at every image size).
        xpos = torch.linspace(0, span, width, dtype=torch.float32)
        ypos = torch.linspace(0, span, height, dtype=torch.float32)
    else:  # the fix for models we train: a fixed distance between neighbouring tokens at every size
        xpos = torch.arange(width, dtype=torch.float32) * step
        ypos = torch.arange(height, dtype=torch.float32) * step
    ygrid, xgrid = torch.meshgrid(ypos, xpos, indexing="ij")
    x_angles = torch.outer(xgrid.flatten(), freqs)
    y_angles = torch.outer(ygrid.flatten(), freqs)
    # Axis-interleaved layout: rotation 2j turns with x, rotation 2j+1 with y.
    angles = torch.stack([x_angles, y_angles], dim=-1).reshape(height * width, head_dim // 2)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).to(device)


def rope_2d(height: int, width: int, head_dim: int, device: torch.device | str = "cpu",
            theta: float = 10000.0, span: float = 16.0, step: float | None = None) -> torch.Tensor:
    """Rotations [L, head_dim/2, 2] (cos, sin) for a height x width token grid (row-major tokens).

    step=None: the release's positions (linspace(0, span) per axis); a number: token i sits at i * step.

    Kept real-valued (no complex tensors) so that the model exports to ONNX and TorchScript.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    if torch.compiler.is_compiling():  # the cached table enters the compiled graph as an input (see _rope_eager)
        return _rope_eager(height, width, head_dim, str(device), theta, span, step)
    # a CUDA graph recorded now reads the cached table: it must outlive the cache entry (cod.cuda_graphs.hold)
    return hold(_rope_cached(height, width, head_dim, str(device), theta, span, step))


# Under torch.compile the table is looked up eagerly (a graph break), not computed inside the graph: a graph that
# computes it on the CPU and copies it to the GPU at every call cannot be recorded as a CUDA graph (host-to-device
# copies from pageable memory are refused during capture), and the cached table is the same values as eager mode's.
@torch.compiler.disable
def _rope_eager(*key) -> torch.Tensor:
    return hold(_rope_cached(*key))


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, G, d] in float32: pairs (2m, 2m+1) as complex numbers times exp(i angle_m)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(3)
    return out.type_as(x)


# --------------------------------------------------------------------------------------------------------------
# Attention + adaLN transformer block
# --------------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).unbind(2)
        q = apply_rope(self.q_norm(q), rope)
        k = apply_rope(self.k_norm(k), rope)
        out = attention(q, k, v)
        return self.proj(out.reshape(B, L, D))


class DiTBlock(nn.Module):
    """Pre-norm attention + SwiGLU block with adaLN modulation from an (already activated) conditioning c.

    c is [B, 1, D] (broadcast over tokens, the s stream) or [B, L, D] (per token, the DDT x stream).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        return self.modulated(x, self.modulation(c), rope)

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The six adaLN vectors (shift, scale, gate for attention, then for the MLP) for conditioning c."""
        return self.adaLN_modulation(c).chunk(6, dim=-1)

    def modulated(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...], rope: torch.Tensor) -> torch.Tensor:
        """The block with given modulation vectors (a one-step model folds them once, cod.models.onestep)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


# --------------------------------------------------------------------------------------------------------------
# Patchify / unpatchify (token n = patch (row, col), feature = ch * p^2 + ky * p + kx)
# --------------------------------------------------------------------------------------------------------------
def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: torch.Tensor, p: int, channels: int, height: int, width: int) -> torch.Tensor:
    B = tokens.shape[0]
    hp, wp = height // p, width // p
    x = tokens.reshape(B, hp, wp, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, channels, height, width)


def tokens_from_map(x: torch.Tensor) -> torch.Tensor:
    """[B, D, h, w] -> [B, h*w, D] (row-major)."""
    return x.flatten(2).transpose(1, 2)
