"""PLACEHOLDER until the rans branch lands (replaced by its tables.py)."""
from __future__ import annotations

import numpy as np

PRECISION = 16


def quantize_pmf(probs, precision: int = PRECISION) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    p = p / p.sum(-1, keepdims=True)
    total = 1 << precision
    K = p.shape[-1]
    f = np.maximum(1, np.floor(p * (total - K)).astype(np.int64))
    rest = total - f.sum(-1)
    idx = np.argmax(f, axis=-1)
    np.put_along_axis(f, idx[..., None], np.take_along_axis(f, idx[..., None], -1) + rest[..., None], -1)
    return f
