"""Counting the floating-point operations of a forward pass, by the shapes of its matrix products.

A light `TorchFunctionMode` (no dispatcher-level tracing, so it is cheap to import and to run, also on the meta
device where no memory is allocated): linear layers, convolutions, matrix products and attention are counted
as 2 FLOPs per multiply-add, the usual convention (elementwise work is not counted). It agrees with
`torch.utils.flop_counter.FlopCounterMode` on CoD's denoisers (tests/test_limits.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


class FlopCounter(TorchFunctionMode):
    """with FlopCounter() as c: model(x)  ->  c.flops"""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            self.flops += 2 * _rows(args[0]) * args[1].numel()
        elif func is F.conv2d:
            weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
            self.flops += 2 * (out.numel() // out.shape[1]) * weight.numel()
        elif func in (torch.bmm, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm):
            self.flops += 2 * out.numel() * args[0].shape[-1]
        elif func in (torch.addmm, torch.baddbmm):
            self.flops += 2 * out.numel() * args[1].shape[-1]
        elif func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            self.flops += 4 * _rows(q) * k.shape[-2] * q.shape[-1]  # q k^T and p v
        return out


def count_flops(fn, *args, **kwargs) -> int:
    with FlopCounter() as counter, torch.no_grad():
        fn(*args, **kwargs)
    return counter.flops
