"""Index priors: probability models over a CoD model's VQ indices, for entropy coding (docs/entropy.md).

The bitstream of a CoD model is a grid of codebook indices. A prior assigns every index a probability from what the
decoder already knows, and the rANS coder (cod.entropy.rans) spends about -log2 p bits on it instead of the fixed
`bits` of the plain packing. Two priors:

- `StaticPrior`: one learned distribution over the codebook (captures unequal codeword use).
- `ContextPrior`: the grid is coded in four passes over a 2x2 lattice (positions (0,0), then (1,1), then (0,1),
  then (1,0) of every 2x2 cell); the first pass uses a learned distribution of its own, every later position is
  predicted from its four nearest neighbours that earlier passes decoded (the diagonals for pass 1, the four
  direct neighbours for passes 2 and 3). Decoding takes four parallel passes whatever the image size.

Neighbours enter through a *cluster map*: the codebook is partitioned into C clusters (k-means on the codewords,
so similar-looking codes share statistics), and a context is the tuple of its neighbours' clusters (C + 1 values
each: a cluster, or "outside the image"). The model is log-linear - logits = b[pass] + sum over the four
neighbour slots of W[pass, slot, cluster] - so it trains from little data, but what the coder uses is its
*integer tables*: one quantized frequency table per context, computed once when the prior is frozen and stored
in prior.safetensors. Coding never evaluates a float model: encoder and decoder look the same integers up on any
machine, so a file decodes identically everywhere (floating-point exp and matmul are not bit-identical across
CPUs and GPUs; table lookups are).

Everything the coder calls here is integer NumPy; the float parameters exist for training (cod fit-prior).
"""
from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cod.entropy.tables import PRECISION, quantize_pmf

PRIOR_FILE = "prior.safetensors"
PRIOR_FORMAT = "cod-prior"
MAX_CODES = 1 << 12          # larger codebooks leave rANS tables of 2^16 too little room to be worth coding
MAX_TABLE_ENTRIES = 1 << 20  # contexts x codes stored per prior (4 MiB of int32)

# Neighbour offsets (drow, dcol) per pass of the 2x2 schedule; pass 0 has none.
PASS_PHASES = ((0, 0), (1, 1), (0, 1), (1, 0))
DIAGONALS = ((-1, -1), (-1, 1), (1, -1), (1, 1))
DIRECT = ((-1, 0), (0, -1), (0, 1), (1, 0))
PASS_NEIGHBOURS = ((), DIAGONALS, DIRECT, DIRECT)


class IndexPrior(nn.Module):
    """A prior over [h, w] index grids: a coding schedule (groups of flat positions decoded together), integer
    context ids per position computed only from earlier groups, and integer frequency tables per context."""

    kind: ClassVar[str]

    def __init__(self, num_codes: int):
        super().__init__()
        if not 2 <= num_codes <= MAX_CODES:
            raise ValueError(f"an index prior needs a codebook of 2..{MAX_CODES} codes, got {num_codes}")
        self.num_codes = num_codes
        self.register_buffer("tables", torch.zeros(0, num_codes, dtype=torch.int32), persistent=True)

    # ---- coding: integer NumPy ---------------------------------------------------------------------------
    def schedule(self, h: int, w: int) -> list[np.ndarray]:
        raise NotImplementedError

    def contexts(self, grid: np.ndarray, group: int, positions: np.ndarray) -> np.ndarray:
        """Table ids for `positions` (flat, of group `group`), reading only entries of earlier groups in `grid`."""
        raise NotImplementedError

    @property
    def num_tables(self) -> int:
        raise NotImplementedError

    def frequency_tables(self) -> np.ndarray:
        if self.tables.shape[0] != self.num_tables:
            raise RuntimeError("this prior has no frozen tables yet: call freeze() after training")
        return self.tables.cpu().numpy()

    # ---- training: float torch --------------------------------------------------------------------------
    def table_logits(self) -> torch.Tensor:
        """[num_tables, K] logits of every context (what freeze() quantizes)."""
        raise NotImplementedError

    def position_logits(self, indices: torch.Tensor) -> torch.Tensor:
        """[B, h, w] indices -> [B, h, w, K] logits, each position seeing only what the decoder will have."""
        raise NotImplementedError

    def bits(self, indices: torch.Tensor) -> torch.Tensor:
        """Ideal code length in bits of each index under the float model, [B, h, w] (the training loss)."""
        logits = self.position_logits(indices)
        return F.cross_entropy(logits.flatten(0, -2), indices.reshape(-1), reduction="none").view(indices.shape) \
            / math.log(2)

    def table_bits(self, indices: np.ndarray) -> float:
        """Ideal code length in bits of an [h, w] grid under the frozen integer tables (what the coder spends,
        up to its own overhead)."""
        freqs = self.frequency_tables().astype(np.float64)
        flat = np.asarray(indices, dtype=np.int64).reshape(-1)
        total = 0.0
        for g, pos in enumerate(self.schedule(*indices.shape)):
            ctx = self.contexts(indices, g, pos)
            total += float(-np.log2(freqs[ctx, flat[pos]] / (1 << PRECISION)).sum())
        return total

    @torch.no_grad()
    def freeze(self) -> None:
        """Quantize every context's distribution to integer frequencies (rows summing to 2^PRECISION) once; from
        here on the coder uses only these integers."""
        probs = torch.softmax(self.table_logits().double(), dim=-1).cpu().numpy()
        self.tables = torch.from_numpy(quantize_pmf(probs).astype(np.int32))

    def hyper(self) -> dict:
        """What the constructor needs, stored in the prior file's metadata."""
        return {"num_codes": self.num_codes}


class StaticPrior(IndexPrior):
    """One learned distribution for every index; raster order, a single group."""

    kind = "static"

    def __init__(self, num_codes: int):
        super().__init__(num_codes)
        self.logits = nn.Parameter(torch.zeros(num_codes))

    @property
    def num_tables(self) -> int:
        return 1

    def schedule(self, h: int, w: int) -> list[np.ndarray]:
        return [np.arange(h * w, dtype=np.int64)]

    def contexts(self, grid: np.ndarray, group: int, positions: np.ndarray) -> np.ndarray:
        return np.zeros(len(positions), dtype=np.int64)

    def table_logits(self) -> torch.Tensor:
        return self.logits[None]

    def position_logits(self, indices: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*indices.shape, self.num_codes)


def default_clusters(num_codes: int, max_entries: int = MAX_TABLE_ENTRIES) -> int:
    """The most clusters whose context tables (1 + 3 (C+1)^4 contexts x K codes) fit in max_entries; never more
    than the codebook has codes."""
    c = min(num_codes, 64)
    while c > 1 and (1 + 3 * (c + 1) ** 4) * num_codes > max_entries:
        c -= 1
    return c


def kmeans_clusters(codebook: np.ndarray, clusters: int, iterations: int = 25) -> np.ndarray:
    """Codeword -> cluster id [K], by k-means on the codewords (deterministic farthest-point start), relabelled so
    cluster ids follow their smallest member (a canonical labelling)."""
    x = np.asarray(codebook, dtype=np.float64)
    K = x.shape[0]
    if clusters >= K:
        return np.arange(K, dtype=np.int64)
    centres = [x[0]]
    dist = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, clusters):
        centres.append(x[int(dist.argmax())])
        dist = np.minimum(dist, ((x - centres[-1]) ** 2).sum(1))
    c = np.stack(centres)
    for _ in range(iterations):
        assign = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        for j in range(clusters):
            if (assign == j).any():
                c[j] = x[assign == j].mean(0)
    assign = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    _, first = np.unique(assign, return_index=True)
    order = np.argsort(first)  # clusters in order of their smallest member; empty clusters vanish
    relabel = np.empty(assign.max() + 1, dtype=np.int64)
    relabel[np.unique(assign)[order]] = np.arange(len(order))
    return relabel[assign]


class ContextPrior(IndexPrior):
    """Four-pass 2x2 schedule; each position's table is chosen by the clusters of its four decoded neighbours."""

    kind = "context"

    def __init__(self, num_codes: int, clusters: int | None = None):
        super().__init__(num_codes)
        clusters = default_clusters(num_codes) if clusters is None else int(clusters)
        if not 1 <= clusters <= num_codes:
            raise ValueError(f"clusters must be 1..{num_codes}, got {clusters}")
        if (1 + 3 * (clusters + 1) ** 4) * num_codes > 4 * MAX_TABLE_ENTRIES:
            raise ValueError(f"{clusters} clusters make context tables of more than {4 * MAX_TABLE_ENTRIES} "
                             f"entries for {num_codes} codes; use fewer")
        self.clusters = clusters
        self.radix = clusters + 1  # value `clusters` = outside the image
        self.register_buffer("cluster_of", torch.arange(num_codes, dtype=torch.int64) % clusters)
        self.base = nn.Parameter(torch.zeros(4, num_codes))
        self.slot = nn.Parameter(torch.zeros(3, 4, self.radix, num_codes))

    def hyper(self) -> dict:
        return {"num_codes": self.num_codes, "clusters": self.clusters}

    def set_clusters(self, cluster_of: np.ndarray) -> None:
        cluster_of = torch.as_tensor(np.asarray(cluster_of), dtype=torch.int64)
        if cluster_of.shape != (self.num_codes,) or cluster_of.min() < 0 or cluster_of.max() >= self.clusters:
            raise ValueError(f"a cluster map needs {self.num_codes} ids in 0..{self.clusters - 1}")
        self.cluster_of.copy_(cluster_of)

    @property
    def num_tables(self) -> int:
        return 1 + 3 * self.radix ** 4

    # ---- coding -----------------------------------------------------------------------------------------
    def schedule(self, h: int, w: int) -> list[np.ndarray]:
        rows, cols = np.divmod(np.arange(h * w, dtype=np.int64), w)
        return [np.flatnonzero((rows % 2 == a) & (cols % 2 == b)) for a, b in PASS_PHASES]

    def contexts(self, grid: np.ndarray, group: int, positions: np.ndarray) -> np.ndarray:
        if group == 0:
            return np.zeros(len(positions), dtype=np.int64)
        h, w = grid.shape
        rows, cols = np.divmod(np.asarray(positions, dtype=np.int64), w)
        cluster_of = self.cluster_of.cpu().numpy()
        flat = grid.reshape(-1)
        ctx = np.zeros(len(positions), dtype=np.int64)
        for dr, dc in PASS_NEIGHBOURS[group]:
            r, c = rows + dr, cols + dc
            inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            value = np.full(len(positions), self.clusters, dtype=np.int64)
            value[inside] = cluster_of[flat[r[inside] * w + c[inside]]]
            ctx = ctx * self.radix + value
        return 1 + (group - 1) * self.radix ** 4 + ctx

    # ---- training ---------------------------------------------------------------------------------------
    def table_logits(self) -> torch.Tensor:
        R = self.radix
        digits = torch.arange(R ** 4, device=self.base.device)
        slots = [(digits // R ** (3 - j)) % R for j in range(4)]  # most significant digit = first neighbour
        out = [self.base[0][None]]
        for g in range(3):
            logits = self.base[g + 1][None] + sum(self.slot[g, j][slots[j]] for j in range(4))
            out.append(logits)
        return torch.cat(out)

    def position_logits(self, indices: torch.Tensor) -> torch.Tensor:
        B, h, w = indices.shape
        clusters = F.pad(self.cluster_of[indices], (1, 1, 1, 1), value=self.clusters)  # [B, h+2, w+2]
        logits = self.base[0].expand(B, h, w, -1).clone()
        rows = torch.arange(h, device=indices.device)[:, None] % 2
        cols = torch.arange(w, device=indices.device)[None] % 2
        for g in range(1, 4):
            a, b = PASS_PHASES[g]
            mask = ((rows == a) & (cols == b))  # [h, w]
            term = self.base[g].expand(B, h, w, -1)
            for j, (dr, dc) in enumerate(PASS_NEIGHBOURS[g]):
                neighbour = clusters[:, 1 + dr:1 + dr + h, 1 + dc:1 + dc + w]
                term = term + self.slot[g - 1, j][neighbour]
            logits = torch.where(mask[None, :, :, None], term, logits)
        return logits


PRIORS: dict[str, type[IndexPrior]] = {"static": StaticPrior, "context": ContextPrior}


def build_prior(kind: str, num_codes: int, **hyper) -> IndexPrior:
    if kind not in PRIORS:
        raise ValueError(f"unknown prior kind '{kind}' (choose one of {list(PRIORS)})")
    return PRIORS[kind](num_codes, **hyper)


def prior_state(prior: IndexPrior) -> dict[str, torch.Tensor]:
    """What prior.safetensors holds: the float parameters (to train further) and the integer tables and cluster
    map (what coding uses)."""
    prior.frequency_tables()  # refuses an unfrozen prior
    return {k: v.detach().contiguous().cpu() for k, v in prior.state_dict().items()}


def prior_from_state(kind: str, num_codes: int, hyper: dict, tensors: dict[str, torch.Tensor]) -> IndexPrior:
    """Rebuild a prior from its file's tensors, refusing (ValueError) anything the coder could trip over: wrong
    names, shapes or dtypes, tables whose rows do not sum to 2^PRECISION or hold a zero frequency, cluster ids
    out of range."""
    prior = build_prior(kind, num_codes, **hyper)
    expected = {k: v for k, v in prior.state_dict().items()}
    expected["tables"] = torch.zeros(prior.num_tables, num_codes, dtype=torch.int32)
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
    tables = tensors["tables"]
    if tables.min() < 1 or (tables.sum(1, dtype=torch.int64) != 1 << PRECISION).any():
        raise ValueError(f"its frequency tables are not valid (every entry >= 1, rows summing to 2^{PRECISION})")
    if "cluster_of" in tensors and (tensors["cluster_of"].min() < 0
                                    or tensors["cluster_of"].max() >= hyper.get("clusters", num_codes)):
        raise ValueError("its cluster map holds ids outside the prior's clusters")
    prior.tables = torch.zeros_like(tables)  # the frozen shape, so the strict load below can fill it
    prior.load_state_dict(tensors, strict=True, assign=True)
    return prior.eval().requires_grad_(False)
