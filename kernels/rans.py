"""Batched rANS coding in Triton: many independent streams at once, byte-identical to `cod.entropy.rans`.

The reference is the NumPy coder `cod.entropy.rans` (`encode_batch_reference` / `decode_batch_reference` below just
loop over it); docs/entropy.md specifies the bytes both produce. Every lane of every stream is independent in the
format (a lane's words are contiguous and its final state is its own), so the kernels give each lane of the batch
one element of a Triton block: no communication between lanes, one program per BLOCK lanes. The host does the
byte framing (states, varint lane header) with the reference's own `assemble` and `Layout`, so only the coding
loops run on the device.

Tensor layouts (all flat, int64 offsets, built by `_plan`):
  symbols / table rows  int32 [N]       every stream's symbols, stream after stream
  freqs / cdf           int64 [T*K], [T*(K+1)]   one table set shared by the batch
  per lane (all lanes of all streams, stream after stream, lane order within a stream):
    first  int64   flat index of the lane's first symbol (stream offset + lane)
    stride int64   the stream's lane count J (symbol i of the lane is at first + i * stride)
    count  int64   symbols in the lane
  encode: words int64 [N] (a lane may emit one word per symbol: its region is [base, base + count)), and per lane
          the final state and the index where its words begin inside its region.
  decode: words int64 [W + 1] (every lane's words, lane after lane), per lane the initial state, first word and
          word count; out int32 [N] symbols, and per lane the final state, words left and a corruption flag.
States are uint64 in the kernels and travel as int64 bit patterns. Under TRITON_INTERPRET=1 the kernels run on
CPU tensors (how tests/test_kernels_rans.py checks them without a GPU).

Measured on one H200 (docs/benchmarks.md, 2026-11-26): correct, but 16-20 Msym/s for 1024 streams of 1024 symbols,
about 10x below the compiled CPU coder on one core: one thread per lane walking its symbols in sequence leaves the
GPU nearly idle. So backend="auto" runs the CPU coder; backend="triton" runs these kernels.
"""
from __future__ import annotations

import numpy as np
import torch

from cod.entropy import rans as ref
from cod.entropy.tables import PRECISION

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path still works
    triton = None

INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)
BACKENDS = ("auto", "triton", "reference")
BLOCK = 32  # lanes per program: one warp, so that a batch of one-lane streams still spreads over many SMs


if triton is not None:

    @triton.jit
    def _encode_kernel(SYM, ROWS, F, C, FIRST, STRIDE, COUNT, BASE, WORDS, STATE, WSTART, ITERS, n_lanes, K,
                       PREC: tl.constexpr, START: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        lane = pid * BLOCK + tl.arange(0, BLOCK)
        live = lane < n_lanes
        first = tl.load(FIRST + lane, mask=live, other=0)
        stride = tl.load(STRIDE + lane, mask=live, other=0)
        count = tl.load(COUNT + lane, mask=live, other=0)
        base = tl.load(BASE + lane, mask=live, other=0)
        x = tl.full([BLOCK], START, tl.uint64)
        wp = count  # words are written downwards from the end of the lane's region [base, base + count)
        top = tl.full([BLOCK], 64 - PREC, tl.uint64)
        word = tl.full([BLOCK], 32, tl.uint64)
        low = tl.full([BLOCK], 0xFFFFFFFF, tl.uint64)
        n_iter = tl.load(ITERS + pid)
        for i in range(0, n_iter):
            t = count - 1 - i
            active = live & (t >= 0)
            idx = first + t * stride
            s = tl.load(SYM + idx, mask=active, other=0).to(tl.int64)
            r = tl.load(ROWS + idx, mask=active, other=0).to(tl.int64)
            f = tl.load(F + r * K + s, mask=active, other=1).to(tl.uint64)
            c = tl.load(C + r * K + s, mask=active, other=0).to(tl.uint64)
            emit = active & ((x >> top) >= f)
            wp = tl.where(emit, wp - 1, wp)
            tl.store(WORDS + base + wp, (x & low).to(tl.int64), mask=emit)
            x = tl.where(emit, x >> word, x)
            q = x // f
            y = (q << PREC) + (x - q * f) + c
            x = tl.where(active, y, x)
        x = tl.where(count > 0, x, tl.zeros([BLOCK], tl.uint64))
        tl.store(STATE + lane, x.to(tl.int64, bitcast=True), mask=live)
        tl.store(WSTART + lane, wp, mask=live)

    @triton.jit
    def _decode_kernel(WORDS, ROWS, F, CDF, FIRST, STRIDE, COUNT, STATE, WPTR, WCOUNT, OUT, BAD, ITERS, n_lanes,
                       K, PREC: tl.constexpr, SEARCH: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        lane = pid * BLOCK + tl.arange(0, BLOCK)
        live = lane < n_lanes
        first = tl.load(FIRST + lane, mask=live, other=0)
        stride = tl.load(STRIDE + lane, mask=live, other=0)
        count = tl.load(COUNT + lane, mask=live, other=0)
        x = tl.load(STATE + lane, mask=live, other=0).to(tl.uint64, bitcast=True)
        ptr = tl.load(WPTR + lane, mask=live, other=0)
        rem = tl.load(WCOUNT + lane, mask=live, other=0)
        bad = tl.zeros([BLOCK], tl.int32)
        top = tl.full([BLOCK], 64 - PREC, tl.uint64)
        word = tl.full([BLOCK], 32, tl.uint64)
        slot_mask = tl.full([BLOCK], (1 << PREC) - 1, tl.uint64)
        bound = tl.full([BLOCK], 1 << 32, tl.uint64)
        n_iter = tl.load(ITERS + pid)
        for i in range(0, n_iter):
            active = live & (i < count)
            idx = first + i * stride
            r = tl.load(ROWS + idx, mask=active, other=0).to(tl.int64)
            slot = x & slot_mask
            islot = slot.to(tl.int64)
            lo = tl.zeros([BLOCK], tl.int64)
            hi = tl.zeros([BLOCK], tl.int64) + K
            for _ in tl.static_range(SEARCH):  # largest s with cdf[s] <= slot (invariant cdf[lo] <= slot < cdf[hi])
                mid = (lo + hi) >> 1
                v = tl.load(CDF + r * (K + 1) + mid, mask=active, other=0)
                below = v <= islot
                lo = tl.where(below, mid, lo)
                hi = tl.where(below, hi, mid)
            f = tl.load(F + r * K + lo, mask=active, other=1).to(tl.uint64)
            c = tl.load(CDF + r * (K + 1) + lo, mask=active, other=0).to(tl.uint64)
            y = f * (x >> PREC) + slot - c
            need = active & (y < bound) & (rem > 0)
            w = tl.load(WORDS + ptr, mask=need, other=0).to(tl.uint64)
            y = tl.where(need, (y << word) | w, y)
            # the encoder renormalised exactly when its state was >= f * 2^(64 - precision)
            bad = bad | (active & (((y >> top) >= f) != need)).to(tl.int32)
            x = tl.where(active, y, x)
            ptr = tl.where(need, ptr + 1, ptr)
            rem = tl.where(need, rem - 1, rem)
            tl.store(OUT + idx, lo.to(tl.int32), mask=active)
        tl.store(STATE + lane, x.to(tl.int64, bitcast=True), mask=live)
        tl.store(WCOUNT + lane, rem, mask=live)
        tl.store(BAD + lane, bad, mask=live)


# ------------------------------------------------------------------------------------------------- host side

def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(device: str) -> torch.device:
    if triton is None:
        raise RuntimeError("triton is not installed")
    dev = torch.device(device)
    if dev.type != "cuda" and not INTERPRETED:
        raise RuntimeError("the Triton rANS kernels need a CUDA device, or TRITON_INTERPRET=1 set before "
                           "cod.kernels is first imported to run them on the CPU")
    return dev


def _plan(lengths: list[int], lanes_list: list[int], block: int):
    """Per-lane first/stride/count arrays (numpy int64) for streams of these lengths and lane counts, and each
    program's loop count (its longest lane)."""
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    J = np.asarray(lanes_list, dtype=np.int64)
    n = np.asarray(lengths, dtype=np.int64)
    stream = np.repeat(np.arange(len(lengths)), J)
    lane = np.arange(int(J.sum())) - np.repeat(np.cumsum(J) - J, J)
    first = starts[stream] + lane
    stride = J[stream]
    count = np.maximum(0, (n[stream] - lane + stride - 1) // stride)
    n_lanes = len(first)
    padded = -(-n_lanes // block) * block
    iters = np.pad(count, (0, padded - n_lanes)).reshape(-1, block).max(axis=1) if n_lanes else np.zeros(0, np.int64)
    return starts, first, stride, count, iters


def _tables(freqs, precision: int, device) -> tuple[ref.Tables, torch.Tensor, torch.Tensor, torch.Tensor]:
    tables = ref.Tables(freqs, precision)
    F = torch.from_numpy(tables.freqs.astype(np.int64).reshape(-1)).to(device)
    C = torch.from_numpy(tables.cdf[:, :-1].reshape(-1).copy()).to(device)
    CDF = torch.from_numpy(tables.cdf.reshape(-1).copy()).to(device)
    return tables, F, C, CDF


def _rows_list(table_index_list, lengths, T):
    if table_index_list is None:
        table_index_list = [None] * len(lengths)
    if len(table_index_list) != len(lengths):
        raise ValueError("give one table_index per stream")
    return [ref._table_rows(t, n, T)[0] for t, n in zip(table_index_list, lengths)]


def encode_batch(symbols_list, freqs, table_index_list=None, lanes=None, *, precision: int = PRECISION,
                 backend: str = "auto", device: str | None = None) -> list[bytes]:
    """Each stream of symbols_list coded with the shared tables freqs [T, K]; the same bytes as
    cod.entropy.rans.encode(symbols, freqs, table_index, lanes=lanes) for each stream."""
    if backend not in BACKENDS:
        raise ValueError(f"rans backend must be one of {BACKENDS}, got '{backend}'")
    device = device or _default_device()
    if backend in ("reference", "auto"):  # auto: the CPU coder, faster than this kernel on an H200 (module doc)
        return encode_batch_reference(symbols_list, freqs, table_index_list, lanes, precision=precision)
    dev = _check_device(device)
    tables, F, C, _ = _tables(freqs, precision, dev)
    syms = [np.asarray(s) for s in symbols_list]
    lengths = [len(s) for s in syms]
    rows = _rows_list(table_index_list, lengths, tables.T)
    for s, r in zip(syms, rows):  # the reference's validation: the kernel trusts its inputs
        if s.ndim != 1 or not (np.issubdtype(s.dtype, np.integer) or s.size == 0) or len(r) != len(s):
            raise ValueError("every stream needs 1-D integer symbols and a table_index of the same length")
        if len(s) and (s.min() < 0 or s.max() >= tables.K or np.any(tables.freqs[r, s] == 0)):
            raise ValueError("symbols must be in [0, K) with non-zero frequency in their tables")
    lanes_list = [ref._check_lanes(lanes) if lanes is not None else
                  ref.default_lanes(ref.information_bits(tables.lookup(r, s.astype(np.int64))[0], tables.precision))
                  for s, r in zip(syms, rows)]
    starts, first, stride, count, iters = _plan(lengths, lanes_list, BLOCK)
    N, n_lanes = int(starts[-1]), len(first)
    out = [b""] * len(syms)
    if N == 0:
        return out
    as_t = lambda a, dt=torch.int64: torch.from_numpy(np.ascontiguousarray(a)).to(dt).to(dev)  # noqa: E731
    SYM = as_t(np.concatenate(syms).astype(np.int32), torch.int32)
    ROWS = as_t(np.concatenate(rows).astype(np.int32), torch.int32)
    WORDS = torch.zeros(N, dtype=torch.int64, device=dev)
    STATE = torch.zeros(n_lanes, dtype=torch.int64, device=dev)
    WSTART = torch.zeros(n_lanes, dtype=torch.int64, device=dev)
    base = np.zeros(n_lanes, dtype=np.int64)
    np.cumsum(count[:-1], out=base[1:])
    _encode_kernel[(len(iters),)](SYM, ROWS, F, C, as_t(first), as_t(stride), as_t(count), as_t(base), WORDS, STATE,
                                  WSTART, as_t(iters), n_lanes, tables.K, PREC=tables.precision,
                                  START=ref.START_STATE, BLOCK=BLOCK, num_warps=1)
    words = WORDS.cpu().numpy()
    states = STATE.cpu().numpy().view(np.uint64)
    wstart = WSTART.cpu().numpy()
    # lane l's words are words[base_l + wstart_l : base_l + count_l], in the decoder's order; regions lie lane after
    # lane, so one mask keeps every lane's words in the order assemble() wants
    used = np.arange(N) - np.repeat(base, count) >= np.repeat(wstart, count)
    kept = words[used].astype(np.uint32)
    emitted = count - wstart
    lane_start = np.zeros(len(syms) + 1, dtype=np.int64)
    np.cumsum(lanes_list, out=lane_start[1:])
    word_start = np.zeros(n_lanes + 1, dtype=np.int64)
    np.cumsum(emitted, out=word_start[1:])
    for b in range(len(syms)):
        if lengths[b] == 0:
            continue
        a, z = lane_start[b], lane_start[b + 1]
        out[b] = ref.assemble(states[a:z], kept[word_start[a]:word_start[z]], emitted[a:z])
    return out


def decode_batch(data_list, freqs, table_index_list=None, n_list=None, lanes=None, *,
                 precision: int = PRECISION, backend: str = "auto", device: str | None = None) -> list[np.ndarray]:
    """Each stream of data_list decoded with the shared tables freqs [T, K] (table_index_list[b] gives stream b's
    tables and length; or n_list[b] its length when T = 1). Raises cod.entropy.StreamError naming the first bad
    stream, exactly where cod.entropy.rans.decode would raise for it."""
    if backend not in BACKENDS:
        raise ValueError(f"rans backend must be one of {BACKENDS}, got '{backend}'")
    device = device or _default_device()
    if backend in ("reference", "auto"):  # auto: the CPU coder, faster than this kernel on an H200 (module doc)
        return decode_batch_reference(data_list, freqs, table_index_list, n_list, lanes, precision=precision)
    dev = _check_device(device)
    tables, F, _, CDF = _tables(freqs, precision, dev)
    B = len(data_list)
    if table_index_list is None:
        if n_list is None or len(n_list) != B:
            raise ValueError("give table_index_list or n_list, one entry per stream")
        rows = [ref._table_rows(None, n, tables.T)[0] for n in n_list]
    else:
        if len(table_index_list) != B:
            raise ValueError("give one table_index per stream")
        rows = [ref._table_rows(t, None if n_list is None else n_list[b], tables.T)[0]
                for b, t in enumerate(table_index_list)]
    layouts = []
    for b, data in enumerate(data_list):
        try:
            layouts.append(ref.Layout(data, lanes))
        except ref.StreamError as e:
            raise ref.StreamError(f"stream {b}: {e}") from None
    lengths = [len(r) for r in rows]
    lanes_list = [lay.lanes for lay in layouts]
    starts, first, stride, count, iters = _plan(lengths, lanes_list, BLOCK)
    N, n_lanes = int(starts[-1]), len(first)
    if n_lanes == 0 or N == 0:
        out = [np.zeros(0, dtype=np.int64) for _ in range(B)]
        _check_ends(layouts, [lay.states for lay in layouts], [lay.counts for lay in layouts], lengths, None)
        return out
    word_counts = np.concatenate([lay.counts for lay in layouts])
    word_ptr = np.zeros(n_lanes, dtype=np.int64)
    np.cumsum(word_counts[:-1], out=word_ptr[1:])
    words = np.concatenate([lay.words for lay in layouts] + [np.zeros(1, np.uint64)]).astype(np.int64)
    as_t = lambda a, dt=torch.int64: torch.from_numpy(np.ascontiguousarray(a)).to(dt).to(dev)  # noqa: E731
    STATE = as_t(np.concatenate([lay.states for lay in layouts]).view(np.int64))
    WCOUNT = as_t(word_counts)
    OUT = torch.zeros(N, dtype=torch.int32, device=dev)
    BAD = torch.zeros(n_lanes, dtype=torch.int32, device=dev)
    _decode_kernel[(len(iters),)](as_t(words), as_t(np.concatenate(rows).astype(np.int32), torch.int32), F, CDF,
                                  as_t(first), as_t(stride), as_t(count), STATE, as_t(word_ptr), WCOUNT, OUT, BAD,
                                  as_t(iters), n_lanes, tables.K, PREC=tables.precision,
                                  SEARCH=max(1, int(tables.K).bit_length()), BLOCK=BLOCK, num_warps=1)
    symbols = OUT.cpu().numpy().astype(np.int64)
    states = STATE.cpu().numpy().view(np.uint64)
    left = WCOUNT.cpu().numpy()
    bad = BAD.cpu().numpy()
    lane_start = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(lanes_list, out=lane_start[1:])
    split = lambda a: [a[lane_start[b]:lane_start[b + 1]] for b in range(B)]  # noqa: E731
    _check_ends(layouts, split(states), split(left), lengths, split(bad))
    return [symbols[starts[b]:starts[b + 1]] for b in range(B)]


def _check_ends(layouts, states, left, lengths, bad) -> None:
    """The reference Decoder's decode() and finish() checks, per stream, in the same order."""
    for b, lay in enumerate(layouts):
        J = lay.lanes
        if bad is not None and np.any(bad[b]):
            raise ref.StreamError(f"stream {b}: stream is corrupted or was decoded with other tables "
                                  "(inconsistent renormalisation)")
        if np.any(left[b] != 0):
            raise ref.StreamError(f"stream {b}: stream has data left after the last symbol (trailing bytes, "
                                  "corrupted, or more symbols than were decoded)")
        coded = (lengths[b] - np.arange(J) + J - 1) // J > 0
        if np.any(states[b] != np.where(coded, ref.START_STATE, 0).astype(np.uint64)):
            raise ref.StreamError(f"stream {b}: stream does not end where it should (truncated or corrupted)")


def encode_batch_reference(symbols_list, freqs, table_index_list=None, lanes=None, *,
                           precision: int = PRECISION) -> list[bytes]:
    rows = [None] * len(symbols_list) if table_index_list is None else table_index_list
    return [ref.encode(s, freqs, t, lanes=lanes, precision=precision) for s, t in zip(symbols_list, rows)]


def decode_batch_reference(data_list, freqs, table_index_list=None, n_list=None, lanes=None, *,
                           precision: int = PRECISION) -> list[np.ndarray]:
    out = []
    for b, data in enumerate(data_list):
        t = None if table_index_list is None else table_index_list[b]
        n = None if n_list is None else n_list[b]
        try:
            out.append(ref.decode(data, freqs, t, n, lanes=lanes, precision=precision))
        except ref.StreamError as e:
            raise ref.StreamError(f"stream {b}: {e}") from None
    return out
