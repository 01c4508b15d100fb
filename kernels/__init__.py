"""cod.kernels: Triton kernels beside their PyTorch references (this folder is installed as `cod.kernels`)."""
from __future__ import annotations

import torch

from .attention import FusedAttention, attention_reference, attention_triton_forward, triton

BACKENDS = ("auto", "triton", "reference")


def has_triton() -> bool:
    return triton is not None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Softmax attention over [B, L, G, d] tensors.

    "auto" runs the Triton kernel on CUDA tensors and the reference elsewhere, and always the reference while
    tracing for TorchScript/ONNX export; "triton" forces the kernel (on CPU only under TRITON_INTERPRET=1).
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got '{backend}'")
    tracing = torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
    use_triton = backend == "triton" or (backend == "auto" and q.is_cuda and has_triton() and not tracing)
    if use_triton:
        return FusedAttention.apply(q, k, v, scale)
    return attention_reference(q, k, v, scale)


__all__ = ["attention", "attention_reference", "attention_triton_forward", "has_triton", "BACKENDS"]
