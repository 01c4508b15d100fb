"""The deterministic weight fill rule of the golden fixtures (shared/fixtures/cod-reference/README.json).

Every state-dict entry gets values from a CPU generator seeded with the CRC32 of its key, so the official
implementation and ours hold bit-identical weights without shipping any.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn as nn


def fill_value(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
    r = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    if len(shape) >= 2:
        return r * (1 / math.sqrt(math.prod(shape[1:])))
    if key.endswith("weight"):
        return r * 0.1 + 1
    return r * 0.02


def fill_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: fill_value(k, tuple(v.shape)) for k, v in module.state_dict().items()}


@torch.no_grad()
def apply_fill_rule(module: nn.Module) -> nn.Module:
    module.load_state_dict(fill_state_dict(module), strict=True)
    return module
