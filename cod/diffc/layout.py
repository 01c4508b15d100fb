"""Per-step budgets, chunk layouts and the dimension partition (spec §6.5-6.6; docs/diffc.md).

A step with budget n bits (an integer the file carries) is cut into J = ceil(n / (M - P)) chunks of b_c
candidate bits each (n + P J bits spread as evenly as possible, the first ones one bit larger); chunk c gets
d_c = floor(D b_c / B) dimensions (the last one the remainder). Everything here is integer arithmetic on the
transmitted budget, so encoder and decoder agree exactly; a layout with an empty chunk is invalid (the release's
silent degenerate partition, upstream PR #5).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from cod.diffc import philox

MAX_BUDGET = (1 << 24) - 1
MAX_CHUNK_BITS = 16
ZIPF_MAX_SHARE = 256  # Dq in 1/16 bit, capped at 16 bits


class LayoutError(ValueError):
    """A budget whose layout is invalid for this many dimensions (an empty chunk, or more chunks than dims)."""


def check_chunk_parameters(max_bits: int, padding: int) -> None:
    if not (0 <= padding < max_bits <= MAX_CHUNK_BITS):
        raise ValueError(f"chunk parameters need 0 <= padding < max chunk bits <= {MAX_CHUNK_BITS}; got max "
                         f"{max_bits}, padding {padding}")


def chunk_bits(n: int, max_bits: int = 16, padding: int = 2) -> list[int]:
    """Candidate bits of each chunk of a step with budget n (spec §4.1): [] for n = 0."""
    if n < 0:
        raise ValueError(f"a budget is a non-negative number of bits, got {n}")
    if n == 0:
        return []
    J = -(-n // (max_bits - padding))
    B = n + padding * J
    base, extra = divmod(B, J)
    return [base + 1] * extra + [base] * (J - extra)


def zipf_share(n: int, b: int, B: int) -> int:
    """A chunk's share of the budget for its index model, round(16 n b / B) in 1/16 bit, capped at 256."""
    return min(ZIPF_MAX_SHARE, (32 * n * b + B) // (2 * B))


@dataclass(frozen=True)
class StepLayout:
    budget: int              # n_k, bits
    bits: tuple[int, ...]    # b_c: chunk c has 2^b_c candidates
    dims: tuple[int, ...]    # d_c: chunk c codes this many dimensions

    @property
    def chunks(self) -> int:
        return len(self.bits)

    @property
    def total_bits(self) -> int:
        return sum(self.bits)

    @cached_property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.dims)[:-1]]).astype(np.int64) if self.dims else \
            np.zeros(0, np.int64)

    @property
    def counts(self) -> list[int]:
        return [1 << b for b in self.bits]

    @property
    def shares(self) -> list[int]:
        return [zipf_share(self.budget, b, self.total_bits) for b in self.bits]


def layout(n: int, D: int, max_bits: int = 16, padding: int = 2) -> StepLayout:
    """The layout of a step with budget n over D dimensions; LayoutError when it is invalid."""
    check_chunk_parameters(max_bits, padding)
    if not 0 <= n <= MAX_BUDGET:
        raise LayoutError(f"budget {n} is outside [0, 2^24)")
    bits = chunk_bits(n, max_bits, padding)
    if len(bits) > D:
        raise LayoutError(f"budget {n} needs {len(bits)} chunks but there are only {D} dimensions")
    B = sum(bits)
    dims = [D * b // B for b in bits[:-1]]
    if bits:
        dims.append(D - sum(dims))
    if dims and min(dims) < 1:
        raise LayoutError(f"budget {n} gives an empty chunk over {D} dimensions")
    return StepLayout(n, tuple(bits), tuple(dims))


def is_valid(n: int, D: int, max_bits: int = 16, padding: int = 2) -> bool:
    try:
        layout(n, D, max_bits, padding)
    except LayoutError:
        return False
    return True


def max_valid_budget(n: int, D: int, max_bits: int = 16, padding: int = 2) -> int:
    """The largest valid budget <= n (what an encoder clamps an oversized step to; spec §6.5).

    Valid means every chunk gets a dimension: with b_min = floor(B / J) the smallest chunk, that is
    D * b_min >= B (the last chunk then gets at least as many). For each chunk count J from the largest down, the
    largest n of that J passing the test is found in closed form."""
    check_chunk_parameters(max_bits, padding)
    n = min(n, MAX_BUDGET)
    if is_valid(n, D, max_bits, padding):
        return n
    info = max_bits - padding
    for J in range(min(-(-n // info), D), 0, -1):
        lo, hi = (J - 1) * info + 1, min(n, J * info)
        for q in range(max_bits, 0, -1):  # q = floor(B / J), largest first: larger q means larger B
            b_hi = min(q * J + J - 1, hi + padding * J, D * q)
            if b_hi >= max(q * J, lo + padding * J):
                best = b_hi - padding * J
                assert is_valid(best, D, max_bits, padding)
                return best
    return 0


def partition(seed: int, k: int, lay: StepLayout, D: int) -> np.ndarray:
    """int64 [D] `order`: chunk c's dimensions are order[starts[c] : starts[c] + dims[c]], ascending flat
    indices. The flat indices are ranked by their Philox keys (domain 4, ties by index) and chunk c takes the
    ranks [S_c, S_c + d_c)."""
    keys = philox.partition_keys(seed, k, D)
    ranked = np.argsort(keys, kind="stable")
    label = np.empty(D, dtype=np.int32)
    label[ranked] = np.repeat(np.arange(lay.chunks, dtype=np.int32), lay.dims)
    return np.argsort(label, kind="stable")
