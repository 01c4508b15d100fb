"""Shared randomness of DiffC: Philox-4x32-10 and an integer-exact uniform-word -> standard-normal transform.

Both are integer arithmetic only, so this NumPy reference, the compiled CPU kernel and the Triton kernel
(cod.kernels.philox) give bit-identical words and float32 normals (spec §6.2-6.3, docs/diffc.md).

Counter layout, one 32-bit word per variate: word q of a stream is word q & 3 of the Philox block with
c0 = q >> 2; c1, c2 name the stream inside a domain; c3 = domain * 2^24 + k (k = the 0-based DiffC step).
The key is (seed, 0). Candidate n of chunk c is its own stream (c1 = n, c2 = c), so no offset n * d_c is ever
formed: the release's 32-bit overflow of that product (upstream PR #6) cannot occur.
"""
from __future__ import annotations

import numpy as np

from cod.diffc.tables import normal_table

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10
MASK32 = 0xFFFFFFFF

# Domains (c3 >> 24)
CANDIDATES = 1    # c2 = chunk, c1 = candidate: the normals of a candidate
ARRIVALS = 2      # c2 = chunk, c1 = 0: word n = U_n, the encoder's private arrival uniforms
INITIAL = 3       # k = 0, the initial noise eps_j (flat index j)
PARTITION = 4     # sort keys of the flat indices at step k
FALLBACK = 5      # z_j at a step with budget 0
MAX_STEP = 1 << 24
NORMAL_SCALE = np.float32(2.0 ** -24)


def philox4x32(c0, c1, c2, c3, k0: int, k1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Philox-4x32-10 of counters (uint32 arrays, broadcast together) under the key (k0, k1)."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint32) for c in np.broadcast_arrays(c0, c1, c2, c3))
    m0, m1 = np.uint64(M0), np.uint64(M1)
    shift = np.uint64(32)
    for r in range(ROUNDS):
        key0 = np.uint32((k0 + r * W0) & MASK32)
        key1 = np.uint32((k1 + r * W1) & MASK32)
        p0 = c0.astype(np.uint64) * m0
        p1 = c2.astype(np.uint64) * m1
        hi0, lo0 = (p0 >> shift).astype(np.uint32), p0.astype(np.uint32)
        hi1, lo1 = (p1 >> shift).astype(np.uint32), p1.astype(np.uint32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ key0, lo1, hi0 ^ c3 ^ key1, lo0
    return c0, c1, c2, c3


def c3_word(domain: int, k: int) -> int:
    if not 0 <= k < MAX_STEP:
        raise ValueError(f"DiffC step index must be in [0, 2^24), got {k}")
    return (domain << 24) | k


def stream_words(seed: int, domain: int, k: int, c2, c1, length: int) -> np.ndarray:
    """Words 0..length-1 of the streams (c2, c1) (1-d arrays of equal length, or scalars) -> uint32 [rows, length]
    (one row per stream; scalars give one row)."""
    c2 = np.atleast_1d(np.asarray(c2, dtype=np.uint64))
    c1 = np.atleast_1d(np.asarray(c1, dtype=np.uint64))
    c2, c1 = np.broadcast_arrays(c2, c1)
    blocks = -(-length // 4)
    if blocks > 1 << 32:
        raise ValueError("a Philox stream holds at most 2^34 words")
    q = np.arange(blocks, dtype=np.uint64)[None, :]
    out = philox4x32(q, c1[:, None], c2[:, None], np.uint32(c3_word(domain, k)), seed & MASK32, 0)
    return np.stack(out, axis=-1).reshape(c1.shape[0], blocks * 4)[:, :length]


def normals(words: np.ndarray) -> np.ndarray:
    """uint32 words -> float32 standard normals, exactly (spec §6.3).

    The sign is the top bit; v = the low 31 bits is a tail position. |z| = G(v + 1/2) read from a table: directly
    for v < 256, else piecewise linear between 129 knots per octave e = floor(log2 v), in fixed point (2^-24)."""
    table = normal_table().astype(np.int64)
    u = np.asarray(words, dtype=np.uint32)
    v = (u & np.uint32(0x7FFFFFFF)).astype(np.int64)
    _, ex = np.frexp(np.maximum(v, 1).astype(np.float64))  # v = m 2^ex, m in [1/2, 1): floor(log2 v) = ex - 1
    e = np.clip(ex.astype(np.int64) - 1, 8, 30)
    h = e - 7
    i = np.maximum((v >> h) - 128, 0)
    f = v & ((np.int64(1) << h) - 1)
    p = np.minimum(h, 15)
    f = f >> (h - p)
    base = 256 + (e - 8) * 129 + i
    k0, k1 = table[base], table[base + 1]
    m = k0 - (((k0 - k1) * f) >> p)
    m = np.where(v < 256, table[np.minimum(v, 255)], m)
    z = np.where(u >> np.uint32(31), -m, m).astype(np.int32)
    return z.astype(np.float32) * NORMAL_SCALE


def stream_normals(seed: int, domain: int, k: int, c2, c1, length: int) -> np.ndarray:
    return normals(stream_words(seed, domain, k, c2, c1, length))


def candidate_normals(seed: int, k: int, chunk: int, candidates, dims: int) -> np.ndarray:
    """float32 [len(candidates), dims]: the normals of candidates n of chunk `chunk` at step k."""
    return stream_normals(seed, CANDIDATES, k, chunk, np.asarray(candidates, dtype=np.uint64), dims)


def initial_noise(seed: int, size: int) -> np.ndarray:
    """float32 [size]: eps_j for the flat indices j < size (the start of the chain at t = 0)."""
    return stream_normals(seed, INITIAL, 0, 0, 0, size)[0]


def fallback_normals(seed: int, k: int, size: int) -> np.ndarray:
    """float32 [size]: the shared prior draw z_j of a step whose budget is 0."""
    return stream_normals(seed, FALLBACK, k, 0, 0, size)[0]


def partition_keys(seed: int, k: int, size: int) -> np.ndarray:
    """uint32 [size]: the sort keys of the flat indices at step k."""
    return stream_words(seed, PARTITION, k, 0, 0, size)[0]


def arrival_uniforms(seed: int, k: int, chunk: int, count: int) -> np.ndarray:
    """uint32 [count]: U_n of chunk `chunk` at step k (the encoder's private arrival times)."""
    return stream_words(seed, ARRIVALS, k, chunk, 0, count)[0]


def candidate_normals_rows(seed: int, k: int, chunks, candidates, dims: int) -> np.ndarray:
    """float32 [rows, dims]: candidate candidates[i] of chunk chunks[i] (one row each): the decoder's
    regeneration, through the compiled kernel when there is one (identical bits)."""
    from cod.kernels import diffc_cpu

    if diffc_cpu.available():
        return diffc_cpu.stream(seed, c3_word(CANDIDATES, k), chunks, candidates, dims, True)
    return stream_normals(seed, CANDIDATES, k, chunks, candidates, dims)
