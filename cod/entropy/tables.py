"""Integer frequency tables for the rANS coder: float probabilities -> frequencies that sum exactly to 2^precision.

The rule (docs/entropy.md, "Tables"): every symbol gets at least 1; the symbols whose scaled probability is below 1
are pinned to 1 and the rest of the total is shared among the others in proportion to their weights (repeated
until no further symbol falls below 1, usually one or two rounds); each of those gets the floor of its share, and
the few units left over go, one each, to the largest remainders (ties to the lower symbol index). Only float64
multiplication, division, sequential sums and floor are used — no log or exp, whose results depend on the libm —
so every machine quantizes the same weights to the same table.
"""
from __future__ import annotations

import numpy as np

PRECISION = 16
MIN_PRECISION = 8
MAX_PRECISION = 16


def check_precision(precision: int) -> int:
    if isinstance(precision, bool) or not isinstance(precision, (int, np.integer)) \
            or not MIN_PRECISION <= precision <= MAX_PRECISION:
        raise ValueError(f"precision must be an integer in [{MIN_PRECISION}, {MAX_PRECISION}], got {precision!r}")
    return int(precision)


def _row_sum(a: np.ndarray) -> np.ndarray:
    """Left-to-right sum over the last axis: the same float64 result on every machine (np.sum's pairwise, possibly
    vectorised order is not promised to be)."""
    return np.cumsum(a, axis=-1)[..., -1]


def quantize_pmf(probs, precision: int = PRECISION) -> np.ndarray:
    """Non-negative finite weights [..., K] (normalised here) -> int64 frequencies [..., K], each >= 1, each row
    summing exactly to 2^precision."""
    precision = check_precision(precision)
    total = 1 << precision
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 0:
        raise ValueError("probs must have at least one dimension (the alphabet)")
    K = p.shape[-1]
    if K < 1 or K > total:
        raise ValueError(f"alphabet size must be in [1, 2^{precision}] = [1, {total}], got {K}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("probs must be finite and non-negative")
    rows = p.reshape(-1, K)
    if rows.shape[0] == 0:
        return np.zeros(p.shape, dtype=np.int64)
    s = _row_sum(rows)
    if np.any(s <= 0):
        raise ValueError("every row of probs needs a positive sum")
    target = rows * (total / s)[:, None]  # unrounded shares of the total
    pinned = target < 1.0
    share = target
    for _ in range(K):
        free = ~pinned
        mass = total - pinned.sum(axis=1)  # units left for the unpinned symbols
        free_weight = _row_sum(np.where(free, rows, 0.0))
        share = np.where(pinned, 1.0, rows * (mass / np.where(free_weight > 0, free_weight, 1.0))[:, None])
        grown = pinned | (share < 1.0)
        if np.array_equal(grown, pinned):
            break
        pinned = grown
    floor = np.where(pinned, 1.0, np.floor(share))
    freqs = floor.astype(np.int64)
    left = total - freqs.sum(axis=1)  # in [0, number of unpinned symbols)
    remainder = np.where(pinned, -1.0, share - floor)
    order = np.argsort(-remainder, axis=1, kind="stable")  # largest remainder first, ties: lower index
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(K)[None, :].repeat(len(order), 0), axis=1)
    freqs += rank < left[:, None]
    return freqs.reshape(p.shape)


def cdf_from_freqs(freqs) -> np.ndarray:
    """[..., K] frequencies -> [..., K+1] int64 cumulative frequencies, starting at 0 and ending at the total."""
    f = np.asarray(freqs)
    if f.ndim == 0 or not np.issubdtype(f.dtype, np.integer):
        raise ValueError("freqs must be an integer array [..., K]")
    f = f.astype(np.int64)
    cdf = np.zeros(f.shape[:-1] + (f.shape[-1] + 1,), dtype=np.int64)
    np.cumsum(f, axis=-1, out=cdf[..., 1:])
    return cdf


def ideal_bits(symbols, freqs, table_index=None) -> float:
    """Sum of -log2(f / 2^precision) over the symbols: the code length an ideal coder reaches with these tables
    (the precision is read from the tables' row sum)."""
    f = np.asarray(freqs)
    if f.ndim == 1:
        f = f[None]
    s = np.asarray(symbols, dtype=np.int64).reshape(-1)
    t = np.zeros_like(s) if table_index is None else np.asarray(table_index, dtype=np.int64).reshape(-1)
    if len(s) == 0:
        return 0.0
    total = f.astype(np.int64).sum(axis=1)
    chosen = f[t, s].astype(np.float64)
    if np.any(chosen <= 0):
        raise ValueError("a symbol has zero frequency in its table: it cannot be coded")
    return float(-np.log2(chosen / total[t]).sum())
