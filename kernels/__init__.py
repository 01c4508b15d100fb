"""cod.kernels: Triton kernels beside their PyTorch references (this folder is installed as `cod.kernels`)."""
from __future__ import annotations

import os

import torch

from .attention import FusedAttention, attention_reference, attention_triton_forward, triton
from .rans import decode_batch, decode_batch_reference, encode_batch, encode_batch_reference

BACKENDS = ("auto", "triton", "reference")


def has_triton() -> bool:
    return triton is not None


def common_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v in one dtype for the kernel. Under autocast (bf16-mixed training) the RMS-normalised q and k come out
    in float32 and v in bfloat16: compute in the autocast dtype, as PyTorch's own attention does under autocast;
    outside autocast, in the widest of the three."""
    if q.dtype == k.dtype == v.dtype:
        return q, k, v
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Softmax attention over [B, L, G, d] tensors.

    "auto" runs the reference (PyTorch's scaled_dot_product_attention, chunked where it would hold all the scores)
    on every device: on Hopper its fused kernels beat ours 2.8x in bf16 at the released shape and a whole bf16 XL
    decode ran 8 % faster with them (docs/kernels.md, one H200, 2026-11-26); "triton" forces the Triton kernel (on
    CPU only under TRITON_INTERPRET=1). The environment variable COD_ATTENTION (auto, triton, reference) replaces
    "auto" for every call made eagerly (benchmarks, debugging); traced, exported and compiled graphs always get
    the reference, which they can rebuild.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got '{backend}'")
    if backend == "auto" and not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
                                  or torch.compiler.is_compiling()):
        backend = os.environ.get("COD_ATTENTION", "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"COD_ATTENTION must be one of {BACKENDS}, got '{os.environ['COD_ATTENTION']}'")
    if backend == "triton":
        return FusedAttention.apply(*common_dtype(q, k, v), scale)
    return attention_reference(q, k, v, scale)


__all__ = ["attention", "attention_reference", "attention_triton_forward", "has_triton", "BACKENDS", "encode_batch",
           "decode_batch", "encode_batch_reference", "decode_batch_reference"]
