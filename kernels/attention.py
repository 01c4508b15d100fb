"""Fused softmax attention (flash-attention forward) in Triton, with its PyTorch reference beside it.

Layout [B, L, G, d] (batch, tokens, heads, head dim): the layout CoD's blocks produce, read through strides
without transposes or copies. The head dim is padded to the next power of two inside the kernel with masked
loads, so d = 72 (the released models) needs no padded copy of the inputs. Non-causal, no mask.

Under TRITON_INTERPRET=1 the kernel runs on CPU tensors (this is how it is tested without a GPU), but Triton's
interpreter cannot do bfloat16 dots (triton-lang/triton#11584), so bf16 is checked on GPUs only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS, CPU-only wheels: the reference path still works
    triton = None

# Triton decides when the kernel below is decorated, i.e. when this module is imported, whether it is compiled for
# a GPU or run by the NumPy interpreter; only the latter accepts CPU tensors.
INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOG2E = 1.4426950408889634


# Most bytes of attention scores (B x G x L x L) the reference may hold at once. SDPA's fused kernels (flash,
# memory-efficient) never hold them, but its math path materialises the scores and their softmax (~2x the
# scores at their peak): PyTorch takes it on CPU whenever an input's last dim is strided, as in the condition
# codec's attention, and ONNX graphs spell attention out that way. Above the budget the reference then takes the
# queries in chunks against all keys, which is exact: each query's softmax still runs over every key.
SCORE_BUDGET_BYTES = 256 * 2 ** 20


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v per head, [B, L, G, d] in and out.

    One SDPA call, unless that call would hold more than SCORE_BUDGET_BYTES of scores: then the queries go
    through in chunks into a preallocated output, so memory grows linearly with L instead of quadratically.
    """
    B, L, G, _ = q.shape
    # Scores counted in float32 at least: the math path takes the softmax of half-precision inputs in float32.
    row_bytes = B * G * k.shape[1] * max(q.element_size(), 4)
    rows = max(1, SCORE_BUDGET_BYTES // row_bytes)
    if rows >= L or not _sdpa_holds_scores(q, k, v, scale):
        return _sdpa(q, k, v, scale)
    out = q.new_empty(B, L, G, v.shape[-1])
    for start in range(0, L, rows):
        out[:, start:start + rows] = _sdpa(q[:, start:start + rows], k, v, scale)
    return out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def _sdpa_holds_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> bool:
    """Whether SDPA would run these [B, L, G, d] inputs through its math path, which holds all the scores.

    Chunking a fused kernel saves nothing and costs speed (CPU flash attention takes 1.3-2x longer on chunks
    below 768 queries, where it switches to smaller query blocks), so only math-path inputs are chunked.
    """
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True  # a graph runs wherever it is loaded, and ONNX spells attention out in full
    try:  # PyTorch tells its choice only through this private function
        choice = torch._fused_sdp_choice(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return SDPBackend(choice) == SDPBackend.MATH
    except (AttributeError, RuntimeError):  # a PyTorch without it, or a device it does not dispatch to
        return True


if triton is not None:

    @triton.jit
    def _flash_forward(Q, K, V, O, L, G, scale_log2,
                       sqb, sql, sqg, skb, skl, skg, svb, svl, svg, sob, sol, sog,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr):
        pid_m = tl.program_id(0)
        bg = tl.program_id(1)
        b = (bg // G).to(tl.int64)  # batch offsets pass 2**31 elements for large batches at L = 4096
        g = bg % G
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        q = tl.load(Q + b * sqb + g * sqg + offs_m[:, None] * sql + offs_d[None, :],
                    mask=(offs_m[:, None] < L) & d_mask[None, :], other=0.0)
        # Softmax in base 2 with log2(e) folded into the scale, so each score costs one exp2 and no extra multiply.
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
            # Keys past the end get exp2(-inf) = 0. Every tile holds at least one real key, so m_new is finite.
            qk = tl.where(n_mask[None, :], qk * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
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


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The kernel trusts its arguments (a k shorter than q would be read out of bounds), so check them here."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if q.dim() != 4 or not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must share one [B, L, G, d] shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q, k, v must share one dtype of {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("the Triton attention kernel needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "cod.kernels is first imported to run it on the CPU")


def attention_triton_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                             block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """The fused forward alone (no autograd), [B, L, G, d] in and out, in the input dtype."""
    _check_inputs(q, k, v)
    B, L, G, d = q.shape
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    block_d = max(16, triton.next_power_of_2(d))
    grid = (triton.cdiv(L, block_m), B * G)
    _flash_forward[grid](q, k, v, out, L, G, scale * LOG2E,
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
