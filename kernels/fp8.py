"""FP8 (e4m3) inference linear layers on `torch._scaled_mm`, with per-row scales on both sides.

The same arithmetic as torchao's `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`, which is what
precision "fp8" uses by default (cod.precision): the weight is quantised once, one scale per output channel; each
activation row is quantised at run time with its own scale (amax / 448); the product runs on the float8 tensor
cores and leaves in the activation's dtype. What differs is the form: plain tensors and one aten call instead of
torchao's tensor subclass, so torch.compile traces a few elementwise ops and `_scaled_mm`, which inductor fuses
(the activation's amax and cast into the kernel before it) and lowers directly. On an H200 with torch 2.11 the
subclass's compile did not finish in 200 s (docs/benchmarks.md); this form is the alternative to measure
(`COD_FP8=scaled_mm`, read by cod.precision when a model is converted).

CUDA needs compute capability 8.9+ (cod.precision checks it) and both sides of the weight a multiple of 16;
PyTorch also runs `_scaled_mm` on the CPU (slowly), which is how the tests check the arithmetic here.
"""
from __future__ import annotations

import torch
import torch.nn as nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
MIN_SCALE = 1e-12  # an all-zero row gets a tiny scale, not a division by zero


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] float8 e4m3, scale [M, 1] float32) with x ≈ q * scale row by row. The scale is
    computed in x's dtype, then widened, as torchao does: the same scales and codes as its PerRow quantisation,
    except for rows whose amax is below ~4.5e-10 (the scale's floor; torchao divides 0 by 0 on an all-zero row)."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).float().clamp(min=MIN_SCALE)
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    # Row-major whatever x's layout (a transposed view keeps its strides through the ops above): CUDA's scaled
    # product takes the activation row-major only (torchao makes it contiguous likewise).
    return q.contiguous(), scale


class Float8Linear(nn.Module):
    """y = x W^T + b with W stored in float8 e4m3 (one scale per output channel) and x quantised per row at each
    call. Built from a trained nn.Linear by `from_linear`; inference only (no gradient flows to the weight), and
    one-way: casting the module (`.to(dtype)`, `.half()`) would cast the float8 weight too, which `_scaled_mm`
    then refuses."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        out_features, in_features = weight.shape
        if in_features % 16 or out_features % 16:
            raise ValueError(f"a float8 linear layer needs both sides a multiple of 16, got {out_features}x"
                             f"{in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", weight)              # [N, K] float8, row-major: weight.t() is column-major
        self.register_buffer("weight_scale", weight_scale)  # [1, N] float32
        self.register_buffer("bias", bias)                  # [N] in the compute dtype, or None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Float8Linear":
        with torch.no_grad():
            q, scale = quantize_rows(linear.weight)
            bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale.t().contiguous(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        q, scale = quantize_rows(x.reshape(-1, self.in_features))
        # As torchao calls it: the bias added inside the product (a float32 output cannot take one), and fast
        # accumulation (Hopper's float8 tensor cores accumulating in reduced precision between promotions).
        fused_bias = self.bias if x.dtype != torch.float32 else None
        y = torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=fused_bias,
                             out_dtype=x.dtype, use_fast_accum=True)
        if self.bias is not None and fused_bias is None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def swap_linears(module: nn.Module, chosen) -> int:
    """Replace every nn.Linear `layer` of module (qualified name `name`) with chosen(layer, name) true by a
    Float8Linear, in place; returns how many were replaced."""
    targets = [name for name, layer in module.named_modules() if isinstance(layer, nn.Linear) and chosen(layer, name)]
    for name in targets:
        parent, _, child = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        setattr(owner, child, Float8Linear.from_linear(getattr(owner, child)))
    return len(targets)
