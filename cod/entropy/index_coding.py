"""Index grids <-> rANS streams under an index prior: the prior's schedule says which positions are coded together,
its contexts which integer table each position uses, and the decoder runs the schedule group by group, so every
context it computes reads only indices it has already decoded (the same integers the encoder used)."""
from __future__ import annotations

import numpy as np

from cod.entropy import rans
from cod.entropy.priors import IndexPrior


def _grid(indices, num_codes: int) -> np.ndarray:
    grid = np.asarray(indices, dtype=np.int64)
    if grid.ndim != 2:
        raise ValueError(f"an index grid is 2-D, got shape {grid.shape}")
    if grid.size and (grid.min() < 0 or grid.max() >= num_codes):
        raise ValueError(f"indices must lie in 0..{num_codes - 1}")
    return grid


TABLE_ENTRIES = 1 << 20  # per piece of a group: at most this many table entries exist at once (8 MiB of int64)


def _pieces(prior: IndexPrior, height: int, width: int):
    """The schedule's groups, each cut into pieces of at most TABLE_ENTRIES / K positions: a prior's tables can
    be one row per position, and a large grid's tables must not all exist at once."""
    step = max(1, TABLE_ENTRIES // prior.num_codes)
    for g, pos in enumerate(prior.schedule(height, width)):
        for a in range(0, len(pos), step):
            yield g, pos[a:a + step]


def encode_grid(prior: IndexPrior, indices) -> bytes:
    """An [h, w] index grid -> the rANS stream of its indices in the prior's schedule."""
    grid = _grid(indices, prior.num_codes)
    flat = grid.reshape(-1)
    f, c = [], []
    for g, pos in _pieces(prior, *grid.shape):
        freqs, rows = prior.group_tables(grid, g, pos)
        fi, ci = rans.frequencies(flat[pos], freqs, rows)
        f.append(fi)
        c.append(ci)
    if not f:
        return b""
    return rans.encode_frequencies(np.concatenate(f), np.concatenate(c))


def decode_grid(prior: IndexPrior, data: bytes, height: int, width: int) -> np.ndarray:
    """The rANS stream of an [height, width] grid -> the grid; rans.StreamError when the stream is not one the
    encoder wrote for a grid of this size under this prior (malformed, truncated, trailing bytes)."""
    grid = np.zeros((height, width), dtype=np.int64)  # entries of later groups are never read (see contexts)
    flat = grid.reshape(-1)
    decoder = rans.Decoder(data)
    for g, pos in _pieces(prior, height, width):
        freqs, rows = prior.group_tables(grid, g, pos)
        flat[pos] = decoder.decode(freqs, rows)
    decoder.finish()
    return grid
