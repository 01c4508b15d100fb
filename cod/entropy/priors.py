"""Index priors: probability models over a CoD model's VQ indices, for entropy coding (docs/entropy.md).

The bitstream of a CoD model is a grid of codebook indices. A prior assigns every index a probability from what the
decoder already knows, and the rANS coder (cod.entropy.rans) spends about -log2 p bits on it instead of the fixed
`bits` of the plain packing. Two priors:

- `StaticPrior`: one learned distribution over the codebook (captures unequal codeword use).
- `ContextPrior`: the grid is coded in four passes over a 2x2 lattice (positions (0,0), then (1,1), then (0,1),
  then (1,0) of every 2x2 cell); the first pass uses a learned distribution of its own, every later position is
  predicted from its four nearest neighbours that earlier passes decoded (the diagonals for pass 1, the four
  direct neighbours for passes 2 and 3) by a low-rank log-bilinear model. Decoding takes four parallel passes
  whatever the image size.

What the coder uses are *integers*: freeze() rounds the trained parameters to fixed point, and group_tables turns
them into frequency tables with integer arithmetic only (exact sums, an exp table built by an integer recurrence,
integer normalisation). Float exp, softmax and matmul are not bit-identical across CPUs, GPUs and libraries; these
integers are, so a file decodes to the same indices on any machine.
"""
from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cod.entropy.tables import PRECISION

PRIOR_FILE = "prior.safetensors"
PRIOR_FORMAT = "cod-prior"
MAX_CODES = 1 << 12          # larger codebooks leave rANS tables of 2^16 too little room to be worth coding

# Neighbour offsets (drow, dcol) per pass of the 2x2 schedule; pass 0 has none.
PASS_PHASES = ((0, 0), (1, 1), (0, 1), (1, 0))
DIAGONALS = ((-1, -1), (-1, 1), (1, -1), (1, 1))
DIRECT = ((-1, 0), (0, -1), (0, 1), (1, 0))
PASS_NEIGHBOURS = ((), DIAGONALS, DIRECT, DIRECT)


class IndexPrior(nn.Module):
    """A prior over [h, w] index grids: a coding schedule (groups of flat positions decoded together) and, per
    group, integer frequency tables computed only from indices of earlier groups (group_tables)."""

    kind: ClassVar[str]

    def __init__(self, num_codes: int):
        super().__init__()
        if not 2 <= num_codes <= MAX_CODES:
            raise ValueError(f"an index prior needs a codebook of 2..{MAX_CODES} codes, got {num_codes}")
        self.num_codes = num_codes

    # ---- coding: integers only ------------------------------------------------------------------------------
    def schedule(self, h: int, w: int) -> list[np.ndarray]:
        raise NotImplementedError

    def group_tables(self, grid: np.ndarray, group: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(frequency tables [T, K], table of each position [n]) for `positions` (flat, of group `group`),
        reading only entries of earlier groups in `grid`."""
        raise NotImplementedError

    # ---- training: float torch ---------------------------------------------------------------------------
    def position_logits(self, indices: torch.Tensor) -> torch.Tensor:
        """[B, h, w] indices -> [B, h, w, K] logits, each position seeing only what the decoder will have."""
        raise NotImplementedError

    def freeze(self) -> None:
        """Round the trained parameters to the integers coding uses (stored in prior.safetensors)."""
        raise NotImplementedError

    def bits(self, indices: torch.Tensor) -> torch.Tensor:
        """Ideal code length in bits of each index under the float model, [B, h, w] (the training loss)."""
        logits = self.position_logits(indices)
        return F.cross_entropy(logits.flatten(0, -2), indices.reshape(-1), reduction="none").view(indices.shape) \
            / math.log(2)

    def table_bits(self, indices: np.ndarray) -> float:
        """Ideal code length in bits of an [h, w] grid under the frozen integer tables (what the coder spends,
        up to its own few bytes)."""
        grid = np.asarray(indices, dtype=np.int64)
        flat = grid.reshape(-1)
        total = 0.0
        for g, pos in enumerate(self.schedule(*grid.shape)):
            freqs, rows = self.group_tables(grid, g, pos)
            total += float(-np.log2(freqs[rows, flat[pos]] / (1 << PRECISION)).sum())
        return total

    def hyper(self) -> dict:
        """What the constructor needs, stored in the model's config.json."""
        return {"num_codes": self.num_codes}


class StaticPrior(IndexPrior):
    """One learned distribution for every index; raster order, a single group."""

    kind = "static"

    def __init__(self, num_codes: int):
        super().__init__(num_codes)
        self.logits = nn.Parameter(torch.zeros(num_codes))
        self.register_buffer("logits_q", torch.zeros(num_codes, dtype=torch.int32))  # set by freeze()
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))

    def schedule(self, h: int, w: int) -> list[np.ndarray]:
        return [np.arange(h * w, dtype=np.int64)]

    def group_tables(self, grid: np.ndarray, group: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not bool(self.frozen):
            raise RuntimeError("this prior has no frozen tables yet: call freeze() after training")
        return integer_freqs(self.logits_q.cpu().numpy().astype(np.int64)[None]), \
            np.zeros(len(positions), dtype=np.int64)

    def position_logits(self, indices: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*indices.shape, self.num_codes)

    @torch.no_grad()
    def freeze(self) -> None:
        self.logits_q.copy_(torch.round(self.logits.double() * LOGIT_ONE).clamp(-2 ** 30, 2 ** 30).to(torch.int32))
        self.frozen.fill_(True)


# Integer-exact evaluation of the context prior. Logits are fixed point in units of 1/LOGIT_ONE nat; probabilities
# come from EXP_LUT, a table of 2^30 exp(-i / LOGIT_ONE) defined by an integer recurrence (no libm), so every
# machine turns the same integers into the same frequencies.
LOGIT_ONE = 64
EXP_RANGE = 24 * LOGIT_ONE          # logits more than 24 nats below the maximum get the floor frequency
_EXP_STEP = 1057095000              # round(2^30 exp(-1/64)), computed once in 50-digit decimal arithmetic


def _exp_lut() -> np.ndarray:
    lut = [1 << 30]
    for _ in range(EXP_RANGE):
        lut.append((lut[-1] * _EXP_STEP) >> 30)
    return np.array(lut, dtype=np.int64)


EXP_LUT = _exp_lut()
WEIGHT_SHIFT = 8                     # embeddings and output weights are stored as round(x * 2^8) in int16


def integer_freqs(logits: np.ndarray, precision: int = PRECISION) -> np.ndarray:
    """Fixed-point logits [n, K] (int64, units of 1/LOGIT_ONE nat) -> frequencies [n, K] summing to 2^precision,
    every one >= 1, by integer arithmetic only: w = EXP_LUT[max - logit], f = 1 + floor(w (2^p - K) / sum w), the
    units left go to the largest w (ties: the lowest index)."""
    n, K = logits.shape
    delta = np.minimum(logits.max(axis=1, keepdims=True) - logits, EXP_RANGE)
    w = EXP_LUT[delta]
    total = (1 << precision) - K
    freqs = 1 + (w * total) // w.sum(axis=1, keepdims=True)
    left = (1 << precision) - freqs.sum(axis=1)
    freqs[np.arange(n), w.argmax(axis=1)] += left
    return freqs


class ContextPrior(IndexPrior):
    """Four-pass 2x2 schedule. Pass 0 uses one learned distribution; every later position's logits are
    b[pass] + (sum over its four decoded neighbours j of E[pass, j, neighbour]) @ O[pass], with E a `dim`-wide
    embedding per neighbour slot (index K = outside the image) - a low-rank log-bilinear model of how each
    neighbour's index predicts this one. Coding evaluates it in integers: E and O rounded to int16 at freeze(),
    products summed exactly (float64 holds every partial sum exactly: integers far below 2^53), then
    integer_freqs. So the tables are a function of integers alone, identical on every machine."""

    kind = "context"

    def __init__(self, num_codes: int, dim: int = 32):
        super().__init__(num_codes)
        if not 1 <= dim <= 256:
            raise ValueError(f"dim must be 1..256, got {dim}")
        self.dim = dim
        self.base = nn.Parameter(torch.zeros(4, num_codes))
        self.embed = nn.Parameter(torch.randn(3, 4, num_codes + 1, dim) * 0.05)
        self.out = nn.Parameter(torch.randn(3, dim, num_codes) * 0.05)
        # what coding uses, set by freeze(): fixed-point base logits, int16 embeddings and output weights
        self.register_buffer("base_q", torch.zeros(4, num_codes, dtype=torch.int32))
        self.register_buffer("embed_q", torch.zeros(3, 4, num_codes + 1, dim, dtype=torch.int16))
        self.register_buffer("out_q", torch.zeros(3, dim, num_codes, dtype=torch.int16))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))

    def hyper(self) -> dict:
        return {"num_codes": self.num_codes, "dim": self.dim}

    # ---- coding -----------------------------------------------------------------------------------------
    def schedule(self, h: int, w: int) -> list[np.ndarray]:
        rows, cols = np.divmod(np.arange(h * w, dtype=np.int64), w)
        return [np.flatnonzero((rows % 2 == a) & (cols % 2 == b)) for a, b in PASS_PHASES]

    def neighbours(self, grid: np.ndarray, group: int, positions: np.ndarray) -> np.ndarray:
        """[n, 4] indices of each position's neighbours of this pass (K = outside the image)."""
        h, w = grid.shape
        rows, cols = np.divmod(np.asarray(positions, dtype=np.int64), w)
        flat = grid.reshape(-1)
        out = np.full((len(positions), 4), self.num_codes, dtype=np.int64)
        for j, (dr, dc) in enumerate(PASS_NEIGHBOURS[group]):
            r, c = rows + dr, cols + dc
            inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            out[inside, j] = flat[r[inside] * w + c[inside]]
        return out

    def group_tables(self, grid: np.ndarray, group: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not bool(self.frozen):
            raise RuntimeError("this prior has no frozen tables yet: call freeze() after training")
        base = self.base_q.cpu().numpy().astype(np.int64)
        if group == 0:
            return integer_freqs(base[:1]), np.zeros(len(positions), dtype=np.int64)
        nb = self.neighbours(grid, group, positions)
        embed = self.embed_q[group - 1].cpu().numpy().astype(np.float64)  # [4, K+1, dim]
        hidden = sum(embed[j][nb[:, j]] for j in range(4))  # [n, dim], exact integers
        acc = hidden @ self.out_q[group - 1].cpu().numpy().astype(np.float64)  # exact: |.| < 2^40
        logits = base[group][None] + np.floor_divide(acc.astype(np.int64), 1 << (2 * WEIGHT_SHIFT - 6))
        return integer_freqs(logits), np.arange(len(positions), dtype=np.int64)

    # ---- training ---------------------------------------------------------------------------------------
    def position_logits(self, indices: torch.Tensor) -> torch.Tensor:
        B, h, w = indices.shape
        padded = F.pad(indices, (1, 1, 1, 1), value=self.num_codes)  # [B, h+2, w+2]
        logits = self.base[0].expand(B, h, w, -1)
        rows = torch.arange(h, device=indices.device)[:, None] % 2
        cols = torch.arange(w, device=indices.device)[None] % 2
        for g in range(1, 4):
            a, b = PASS_PHASES[g]
            hidden = sum(self.embed[g - 1, j][padded[:, 1 + dr:1 + dr + h, 1 + dc:1 + dc + w]]
                         for j, (dr, dc) in enumerate(PASS_NEIGHBOURS[g]))
            term = self.base[g] + hidden @ self.out[g - 1]
            mask = ((rows == a) & (cols == b))[None, :, :, None]
            logits = torch.where(mask, term, logits)
        return logits

    @torch.no_grad()
    def freeze(self) -> None:
        scale = float(1 << WEIGHT_SHIFT)
        self.base_q.copy_(torch.round(self.base.double() * LOGIT_ONE).clamp(-2 ** 30, 2 ** 30).to(torch.int32))
        self.embed_q.copy_(torch.round(self.embed.double() * scale).clamp(-32767, 32767).to(torch.int16))
        self.out_q.copy_(torch.round(self.out.double() * scale).clamp(-32767, 32767).to(torch.int16))
        self.frozen.fill_(True)


PRIORS: dict[str, type[IndexPrior]] = {"static": StaticPrior, "context": ContextPrior}


def build_prior(kind: str, num_codes: int, **hyper) -> IndexPrior:
    if kind not in PRIORS:
        raise ValueError(f"unknown prior kind '{kind}' (choose one of {list(PRIORS)})")
    return PRIORS[kind](num_codes, **hyper)


def prior_state(prior: IndexPrior) -> dict[str, torch.Tensor]:
    """What prior.safetensors holds: the float parameters (to train further) and the integers coding uses."""
    if not bool(prior.frozen):
        raise RuntimeError("this prior has no frozen tables yet: call freeze() after training")
    return {k: v.detach().contiguous().cpu() for k, v in prior.state_dict().items()}


def prior_from_state(kind: str, num_codes: int, hyper: dict, tensors: dict[str, torch.Tensor]) -> IndexPrior:
    """Rebuild a prior from its file's tensors, refusing (ValueError) anything else: wrong names, shapes or dtypes,
    non-finite parameters, a prior that was never frozen."""
    prior = build_prior(kind, num_codes, **hyper)
    expected = prior.state_dict()
    if set(tensors) != set(expected):
        missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"holds the wrong tensors for a {kind} prior (missing {missing}, unexpected {unknown})")
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(f"tensor {name} is {got.dtype} {list(got.shape)}, a {kind} prior of {num_codes} codes "
                             f"needs {want.dtype} {list(want.shape)}")
        if got.dtype.is_floating_point and not torch.isfinite(got).all():
            raise ValueError(f"tensor {name} holds non-finite values")
    if not bool(tensors["frozen"]):
        raise ValueError("it was never frozen (no integer tables)")
    for name in ("base_q", "logits_q"):
        if name in tensors and tensors[name].abs().max() > 2 ** 30:
            raise ValueError(f"tensor {name} is out of range")
    prior.load_state_dict(tensors, strict=True)
    return prior.eval().requires_grad_(False)
