"""Fused softmax attention (flash-attention forward) in Triton, with its PyTorch reference beside it.

Layout [B, L, G, d] (batch, tokens, heads, head dim): the layout CoD's blocks produce, read through strides
without transposes or copies. The head dim is padded to the next power of two inside the kernel with masked
loads, so d = 72 (the released models) needs no padded copy of the inputs. Non-causal, no mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS, CPU-only wheels: the reference path still works
    triton = None


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v per head, [B, L, G, d] in and out."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


if triton is not None:

    @triton.jit
    def _flash_forward(Q, K, V, O, L, G, scale,
                       sqb, sql, sqg, skb, skl, skg, svb, svl, svg, sob, sol, sog,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr):
        pid_m = tl.program_id(0)
        bg = tl.program_id(1)
        b = bg // G
        g = bg % G
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        q = tl.load(Q + b * sqb + g * sqg + offs_m[:, None] * sql + offs_d[None, :],
                    mask=(offs_m[:, None] < L) & d_mask[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start in range(0, L, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < L
            k = tl.load(K + b * skb + g * skg + offs_n[None, :] * skl + offs_d[:, None],
                        mask=n_mask[None, :] & d_mask[:, None], other=0.0)
            if FP32_DOT:
                qk = tl.dot(q, k, input_precision="ieee")
            else:
                qk = tl.dot(q, k)
            qk = tl.where(n_mask[None, :], qk * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp(qk - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * svb + g * svg + offs_n[:, None] * svl + offs_d[None, :],
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            if FP32_DOT:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(O + b * sob + g * sog + offs_m[:, None] * sol + offs_d[None, :], acc.to(O.dtype.element_ty),
                 mask=(offs_m[:, None] < L) & d_mask[None, :])


def attention_triton_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                             block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("triton is not installed")
    B, L, G, d = q.shape
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    block_d = max(16, triton.next_power_of_2(d))
    grid = (triton.cdiv(L, block_m), B * G)
    _flash_forward[grid](q, k, v, out, L, G, scale,
                         q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                         v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                         HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
                         FP32_DOT=q.dtype == torch.float32)
    return out


class FusedAttention(torch.autograd.Function):
    """Triton forward; the backward recomputes through the reference (correct gradients; a fused backward
    kernel is future work — inference, the hot path of a codec, needs only the forward)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        return attention_triton_forward(q, k, v, scale)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = (t.detach().requires_grad_(True) for t in ctx.saved_tensors)
        with torch.enable_grad():
            out = attention_reference(q, k, v, ctx.scale)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
        return dq, dk, dv, None
