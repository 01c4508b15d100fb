"""DiffC's shared randomness on the GPU: Philox-4x32-10, the integer uniform -> normal transform, and the fused
candidate-scoring kernel of the encoder, in Triton. The NumPy reference is cod.diffc.philox; both give
bit-identical words and float32 normals (tests/test_diffc_philox.py runs this file under TRITON_INTERPRET=1).

Everything here is 32-bit integer arithmetic (umulhi for Philox's high products; a table gather and a 32-bit
multiply for the normal), so no libm function decides a bit. Offsets into the ragged score and residual arrays
are int64; a candidate is identified by its own counter (c1 = n), never by an offset n * d_c.
"""
from __future__ import annotations

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installations: cod.diffc falls back to its NumPy / compiled CPU paths
    triton = None

INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)

if triton is not None:

    @triton.jit
    def _philox(c0, c1, c2, c3, k0, k1):
        """Philox-4x32-10 of uint32 tensors of one shape under the uint32 key (k0, k1)."""
        m0 = tl.full(c0.shape, 0xD2511F53, tl.uint32)
        m1 = tl.full(c0.shape, 0xCD9E8D57, tl.uint32)
        w0 = tl.full([], 0x9E3779B9, tl.uint32)
        w1 = tl.full([], 0xBB67AE85, tl.uint32)
        k0 = k0.to(tl.uint32)
        k1 = k1.to(tl.uint32)
        for _ in tl.static_range(10):
            hi0 = tl.umulhi(c0, m0)
            lo0 = c0 * m0
            hi1 = tl.umulhi(c2, m1)
            lo1 = c2 * m1
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
            k0 = k0 + w0
            k1 = k1 + w1
        return c0, c1, c2, c3

    @triton.jit
    def _normal(u, table):
        """uint32 words -> float32 standard normals (cod.diffc.philox.normals, the same integers)."""
        v = (u & 0x7FFFFFFF).to(tl.int32)
        # floor(log2 v): the exponent of float32(v), one less where rounding carried it up to the next power of 2
        e = ((v.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.minimum(tl.maximum(e, 8), 31)
        e = tl.where((tl.full(u.shape, 1, tl.uint32) << e.to(tl.uint32)) > v.to(tl.uint32), e - 1, e)
        e = tl.minimum(tl.maximum(e, 8), 30)
        h = e - 7
        i = tl.maximum((v >> h) - 128, 0)
        f = v & ((1 << h) - 1)
        p = tl.minimum(h, 15)
        f = f >> (h - p)
        base = 256 + (e - 8) * 129 + i
        k0 = tl.load(table + base)
        k1 = tl.load(table + base + 1)
        delta = ((k0 - k1).to(tl.uint32) * f.to(tl.uint32)) >> p.to(tl.uint32)  # < 2^17 * 2^15: fits
        m = k0 - delta.to(tl.int32)
        m = tl.where(v < 256, tl.load(table + tl.minimum(v, 255)), m)
        z = tl.where((u >> 31) != 0, -m, m)
        return z.to(tl.float32) * 5.9604644775390625e-08

    @triton.jit
    def _stream_kernel(out_ptr, c2_ptr, c1_ptr, length, c3, seed, table, NORMALS: tl.constexpr,
                       BLOCK_Q: tl.constexpr):
        row = tl.program_id(0)
        q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        c0 = q.to(tl.uint32)
        c1 = tl.zeros([BLOCK_Q], tl.uint32) + tl.load(c1_ptr + row).to(tl.uint32)
        c2 = tl.zeros([BLOCK_Q], tl.uint32) + tl.load(c2_ptr + row).to(tl.uint32)
        # seed and c3 may arrive as constexprs (Triton specialises some integer values): make them uint32 tensors
        c3v = tl.zeros([BLOCK_Q], tl.uint32) + (c3 + tl.zeros([], tl.int64)).to(tl.uint32)
        key0 = (seed + tl.zeros([], tl.int64)).to(tl.uint32)
        w0, w1, w2, w3 = _philox(c0, c1, c2, c3v, key0, tl.zeros([], tl.uint32))
        base = out_ptr + row.to(tl.int64) * length
        j = q.to(tl.int64) * 4
        if NORMALS:
            tl.store(base + j, _normal(w0, table), mask=j < length)
            tl.store(base + j + 1, _normal(w1, table), mask=j + 1 < length)
            tl.store(base + j + 2, _normal(w2, table), mask=j + 2 < length)
            tl.store(base + j + 3, _normal(w3, table), mask=j + 3 < length)
        else:
            tl.store(base + j, w0.to(tl.int32, bitcast=True), mask=j < length)
            tl.store(base + j + 1, w1.to(tl.int32, bitcast=True), mask=j + 1 < length)
            tl.store(base + j + 2, w2.to(tl.int32, bitcast=True), mask=j + 2 < length)
            tl.store(base + j + 3, w3.to(tl.int32, bitcast=True), mask=j + 3 < length)

    @triton.jit
    def _score_kernel(r_ptr, score_ptr, tile_chunk_ptr, tile_n0_ptr, chunk_start_ptr, chunk_dims_ptr,
                      chunk_count_ptr, chunk_out_ptr, table, seed, c3, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr):
        """One program: BLOCK_N candidates of one chunk. w_n = sum_j z_{n,j} r[start + j], z generated in
        registers, four dims per Philox block (j = 4q + word)."""
        tile = tl.program_id(0)
        c = tl.load(tile_chunk_ptr + tile)
        n = tl.load(tile_n0_ptr + tile) + tl.arange(0, BLOCK_N)
        start = tl.load(chunk_start_ptr + c)  # int64
        d = tl.load(chunk_dims_ptr + c)
        count = tl.load(chunk_count_ptr + c)
        out = tl.load(chunk_out_ptr + c)      # int64
        c1 = tl.zeros([BLOCK_N, BLOCK_Q], tl.uint32) + n.to(tl.uint32)[:, None]
        c2 = tl.zeros([BLOCK_N, BLOCK_Q], tl.uint32) + c.to(tl.uint32)
        c3v = tl.zeros([BLOCK_N, BLOCK_Q], tl.uint32) + (c3 + tl.zeros([], tl.int64)).to(tl.uint32)
        key0 = (seed + tl.zeros([], tl.int64)).to(tl.uint32)
        key1 = tl.zeros([], tl.uint32)
        acc = tl.zeros([BLOCK_N, BLOCK_Q], tl.float32)
        for q0 in range(0, (d + 3) // 4, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            c0 = tl.zeros([BLOCK_N, BLOCK_Q], tl.uint32) + q.to(tl.uint32)[None, :]
            w0, w1, w2, w3 = _philox(c0, c1, c2, c3v, key0, key1)
            j = 4 * q
            rp = r_ptr + start + j
            r0 = tl.load(rp, mask=j < d, other=0.0)
            r1 = tl.load(rp + 1, mask=j + 1 < d, other=0.0)
            r2 = tl.load(rp + 2, mask=j + 2 < d, other=0.0)
            r3 = tl.load(rp + 3, mask=j + 3 < d, other=0.0)
            acc += _normal(w0, table) * r0[None, :] + _normal(w1, table) * r1[None, :]
            acc += _normal(w2, table) * r2[None, :] + _normal(w3, table) * r3[None, :]
        tl.store(score_ptr + out + n, tl.sum(acc, axis=1), mask=n < count)


def _check(device: torch.device) -> None:
    if triton is None:
        raise RuntimeError("triton is not installed")
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("the Triton DiffC kernels need a CUDA device, or TRITON_INTERPRET=1 set before "
                           "cod.kernels is first imported to run them on the CPU")


def _table(device: torch.device) -> torch.Tensor:
    from cod.diffc.tables import normal_table

    return torch.from_numpy(normal_table().copy()).to(device)


def stream(seed: int, c3: int, c2, c1, length: int, normals: bool, device="cuda", block_q: int = 64) -> torch.Tensor:
    """Rows (c2[i], c1[i]) of a Philox domain (c3 = domain * 2^24 + k): words 0..length-1 as int32 bit patterns
    (normals=False) or as float32 normals -> [rows, length] on `device`."""
    device = torch.device(device)
    _check(device)
    c2 = torch.as_tensor(np.asarray(c2, dtype=np.int64).reshape(-1), device=device)
    c1 = torch.as_tensor(np.asarray(c1, dtype=np.int64).reshape(-1), device=device)
    c2, c1 = torch.broadcast_tensors(c2, c1)
    out = torch.empty((c1.numel(), length), dtype=torch.float32 if normals else torch.int32, device=device)
    if out.numel():
        grid = (c1.numel(), triton.cdiv(triton.cdiv(length, 4), block_q))
        _stream_kernel[grid](out, c2.contiguous(), c1.contiguous(), length, c3, seed, _table(device),
                             NORMALS=normals, BLOCK_Q=block_q)
    return out


def score_chunks(r_perm: torch.Tensor, starts, dims, counts, seed: int, c3: int, block_n: int = 128,
                 block_q: int = 16) -> torch.Tensor:
    """Scores of every candidate of every chunk of one step: float32 [sum(counts)], chunk after chunk.

    r_perm: the float32 residual in chunk order (chunk c = r_perm[starts[c] : starts[c] + dims[c]]) on the
    device; counts[c] = 2^b_c candidates."""
    device = r_perm.device
    _check(device)
    counts = np.asarray(counts, dtype=np.int64)
    tiles_per_chunk = -(-counts // block_n)
    tile_chunk = np.repeat(np.arange(len(counts), dtype=np.int32), tiles_per_chunk)
    tile_n0 = (np.arange(tile_chunk.size) - np.repeat(np.cumsum(tiles_per_chunk) - tiles_per_chunk,
                                                       tiles_per_chunk)) * block_n
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    scores = torch.empty(int(counts.sum()), dtype=torch.float32, device=device)
    if tile_chunk.size == 0:
        return scores

    def dev(a, dtype):
        return torch.as_tensor(np.ascontiguousarray(a, dtype=dtype), device=device)

    _score_kernel[(tile_chunk.size,)](r_perm.contiguous().float(), scores, dev(tile_chunk, np.int32),
                                      dev(tile_n0, np.int32), dev(starts, np.int64), dev(dims, np.int32),
                                      dev(counts, np.int32), dev(offsets, np.int64), _table(device), seed, c3,
                                      BLOCK_N=block_n, BLOCK_Q=block_q)
    return scores
