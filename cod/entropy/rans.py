"""The reference rANS coder: interleaved lanes, vectorised across lanes with NumPy. docs/entropy.md is the format.

In brief: 64-bit states, 32-bit renormalisation words, L = 2^32, frequency tables summing to 2^precision. Symbol i
goes to lane i mod J. Each lane is coded by its own rANS state, which starts at 255 (below L, so the final state
carries almost only information; 255 hides in the first coded symbol's unused slot room and gives the decoder a
value to end on) and is written in its fewest bytes (big-endian) in front of the lane's words (32-bit,
little-endian, in the order the decoder reads them); the decoder knows from the lane's word count when the words
are exhausted, which mirrors the encoder's first renormalisation. A one-lane stream is exactly that lane's bytes:
the split between state bytes and words follows from the length alone. A stream of J >= 2 lanes starts with a
0x00 byte (a one-lane stream never does), then J and the J lane lengths as LEB128 varints, then the lanes.

Cost: one lane (the default below 16 KiB of information) is the ideal code length plus about 2 bytes (the first
coded symbol's start-up and the last byte's rounding); each further lane adds about 4.5 bytes. The coding loss
per symbol is negligible (states stay >= 2^32 >> 2^precision).
"""
from __future__ import annotations

from bisect import bisect_right
from functools import cached_property, lru_cache

import numpy as np

from cod.errors import CodError

from .tables import PRECISION, check_precision

STATE_BITS = 64
WORD_BITS = 32
LOWER_BOUND = 1 << 32  # L: phase-1 states live in [L, 2^64)
MAX_LANES = 1 << 16
MULTI_LANE_MARKER = 0x00
START_STATE = 255
_U64 = np.uint64


class StreamError(CodError):
    """A malformed, truncated, extended or corrupted rANS stream, or one decoded with other tables or lanes."""


BYTES_PER_LANE = 1 << 13


def default_lanes(info_bits: int) -> int:
    """The lane count encode() picks for a stream of about `info_bits` bits of information (`information_bits`):
    one lane below 16 KiB (every image-sized stream: no lane header, ~2 bytes of flush), then a power of two giving
    each lane at least 8 KiB, at most 256 lanes. Each lane costs ~4.5 bytes of flush, so this keeps the flush
    under ~0.06% of the stream. The lane count is written in the stream, so the decoder never recomputes this."""
    lanes = int(info_bits) // (8 * BYTES_PER_LANE)
    if lanes < 2:
        return 1
    return min(256, 1 << lanes.bit_length() - 1)


@lru_cache(maxsize=None)
def _log2_table(precision: int) -> np.ndarray:
    """floor(256 * log2(f)) for f = 0 .. 2^precision (f = 0 reads as 1), by integer arithmetic alone (bit by bit,
    squaring a 31-bit fixed-point mantissa), so that the default lane count is the same on every machine."""
    f = np.arange((1 << precision) + 1, dtype=np.uint64)
    f[0] = 1
    e = (np.frexp(f.astype(np.float64))[1] - 1).astype(np.uint64)  # exact: integers below 2^53
    m = f << (np.uint64(31) - e)  # mantissa in [2^31, 2^32) = [1, 2) with 31 fractional bits
    out = e << np.uint64(8)
    for i in range(8):
        m = (m * m) >> np.uint64(31)  # < 2^64: m < 2^32
        bit = m >> np.uint64(32)  # 1 if m >= 2
        out += bit << np.uint64(7 - i)
        m >>= bit
    return out.astype(np.int64)


def information_bits(f: np.ndarray, precision: int) -> int:
    """sum(log2(2^precision / f)) over the symbols' frequencies f, in whole bits, by integer arithmetic (within
    n/256 bits of the exact value; ideal_bits() is the float figure)."""
    if len(f) == 0:
        return 0
    return _information_bits(len(f), int(_log2_table(precision)[f.astype(np.int64)].sum()), precision)


def _information_bits(n: int, log2_sum: int, precision: int) -> int:
    return int((n * (precision << 8) - log2_sum) >> 8)


def _compiled():
    """kernels/rans_cpu (the same coder compiled), or None: no C compiler, or COD_RANS_CPU=numpy."""
    from cod.kernels import rans_cpu

    return rans_cpu if rans_cpu.available() else None


# ----------------------------------------------------------------------------------------------------- validation

def _check_lanes(lanes) -> int:
    if isinstance(lanes, bool) or not isinstance(lanes, (int, np.integer)) or not 1 <= lanes <= MAX_LANES:
        raise ValueError(f"lanes must be an integer in [1, {MAX_LANES}], got {lanes!r}")
    return int(lanes)


class Tables:
    """Validated frequency tables [T, K] with their cumulative frequencies, as the coder loops want them."""

    def __init__(self, freqs, precision: int, uses: int | None = None):
        """uses: how many symbols will be coded with these tables (None: unknown). The compiled coder builds the
        cumulative tables only when the symbols use each table several times on average; per-symbol tables are
        summed from their rows as they are used, which reads each table once instead of writing and reading a
        cumulative copy."""
        self.precision = check_precision(precision)
        self.total = 1 << self.precision
        f = np.asarray(freqs)
        if f.ndim == 1:
            f = f[None]
        if f.ndim != 2 or f.shape[1] < 1:  # T = 0 is fine for zero symbols (an empty piece of a stream)
            raise ValueError(f"freqs must be a [T, K] (or [K]) integer array with K >= 1, got shape {f.shape}")
        if not (np.issubdtype(f.dtype, np.integer) or f.size == 0):
            raise ValueError(f"freqs must hold integers, got dtype {f.dtype}")
        if f.shape[1] > self.total:
            raise ValueError(f"an alphabet of {f.shape[1]} symbols does not fit precision {self.precision}")
        self.T, self.K = f.shape
        self.freqs = f  # as given (any integer dtype): nothing of size T x K is copied but the cumulative table
        kernel = _compiled() if f.size else None
        if kernel is not None:  # checks (and cumulative tables) in one pass, same messages
            self.freqs64 = np.ascontiguousarray(f, dtype=np.int64)
            cumulative = self.T == 1 or uses is None or uses >= 4 * self.T
            status, bad, self.cdf = kernel.tables(self.freqs64, self.total, cumulative)
            if status == kernel.BAD_ENTRY:
                raise ValueError(f"frequencies must be in [0, 2^{self.precision}]")
            if status == kernel.BAD_SUM:
                raise ValueError(f"every table must sum to 2^{self.precision} = {self.total}; table {bad} sums to "
                                 f"{int(f[bad].sum())}")
            self.flat_cdf = None if self.cdf is None else self.cdf.reshape(-1)
            return
        if f.size and (f.min() < 0 or f.max() > self.total):  # also keeps the sums below 2^63
            raise ValueError(f"frequencies must be in [0, 2^{self.precision}]")
        # exclusive cumulative frequencies [T, K + 1] in one pass: c = cdf[r, s], f = cdf[r, s + 1] - cdf[r, s]
        self.cdf = np.zeros((self.T, self.K + 1), dtype=np.int64)
        np.cumsum(f, axis=1, out=self.cdf[:, 1:])
        sums = self.cdf[:, -1]
        if np.any(sums != self.total):
            bad = int(np.flatnonzero(sums != self.total)[0])
            raise ValueError(f"every table must sum to 2^{self.precision} = {self.total}; table {bad} sums to "
                             f"{int(sums[bad])}")
        self.flat_cdf = self.cdf.reshape(-1)

    def lookup(self, rows: np.ndarray, symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(f, c) as uint64 of each (table row, symbol) pair."""
        if self.T == 1:  # the common case: two gathers from K-entry tables
            if not hasattr(self, "_row"):
                self._row = (np.diff(self.cdf[0]).astype(_U64), self.cdf[0, :-1].astype(_U64))
            return np.take(self._row[0], symbols), np.take(self._row[1], symbols)
        i = rows * (self.K + 1) + symbols
        c = self.flat_cdf[i]
        return (self.flat_cdf[i + 1] - c).astype(_U64), c.astype(_U64)


def _table_rows(table_index, n: int | None, T: int) -> tuple[np.ndarray, int]:
    """The table of each symbol as int64 [n] (and n), validated."""
    if table_index is None:
        if T != 1:
            raise ValueError(f"table_index is required when there are {T} tables")
        if n is None:
            raise ValueError("give n or table_index")
        n = _check_count(n)
        return np.zeros(n, dtype=np.int64), n
    t = np.asarray(table_index)
    if t.ndim != 1 or not (np.issubdtype(t.dtype, np.integer) or t.size == 0):
        raise ValueError(f"table_index must be a 1-D integer array, got shape {t.shape} dtype {t.dtype}")
    if n is not None and _check_count(n) != len(t):
        raise ValueError(f"n = {n} does not match len(table_index) = {len(t)}")
    t = t.astype(np.int64)
    if len(t) and (t.min() < 0 or t.max() >= T):
        raise ValueError(f"table_index values must be in [0, {T})")
    return t, len(t)


def _check_count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return int(n)


# ------------------------------------------------------------------------------------------------- byte format

def _leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_leb128(data: bytes, pos: int, limit: int) -> tuple[int, int]:
    """A canonical (shortest-form) unsigned LEB128 varint at data[pos], at most `limit`."""
    value = shift = 0
    start = pos
    while True:
        if pos >= len(data):
            raise StreamError("stream ends inside its lane header (truncated)")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if value > limit:
            raise StreamError("lane header holds an impossible count (corrupted)")
        if not byte & 0x80:
            if byte == 0 and pos - start > 1:
                raise StreamError("lane header holds a non-canonical varint (corrupted)")
            return value, pos


def split_lane(length: int) -> tuple[int, int]:
    """A lane of `length` bytes -> (state bytes, 32-bit words). A lane that wrote words has a state in [2^32, 2^64)
    (5 to 8 bytes) and at least one word, so at least 9 bytes; a shorter lane is all state."""
    if length <= 8:
        return length, 0
    k = 5 + (length - 5) % 4
    return k, (length - k) // 4


def _state_bytes(x: int) -> bytes:
    return x.to_bytes((x.bit_length() + 7) // 8, "big")


def assemble(states: np.ndarray, words: np.ndarray, counts: np.ndarray) -> bytes:
    """Lanes -> stream bytes. states: uint64 [J] final states; words: uint32, every lane's words in decoder order,
    lane after lane; counts: int [J] words per lane."""
    J = len(states)
    offsets = np.zeros(J + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    raw = np.asarray(words, dtype="<u4").tobytes()
    lanes = [_state_bytes(int(states[j])) + raw[4 * offsets[j]:4 * offsets[j + 1]] for j in range(J)]
    if J == 1:
        return lanes[0]
    header = bytes([MULTI_LANE_MARKER]) + _leb128(J) + b"".join(_leb128(len(lane)) for lane in lanes)
    return header + b"".join(lanes)


class Layout:
    """A parsed stream: the lanes' final states (where decoding starts), word counts and words (lane after lane).
    Everything is checked against len(data) before anything is allocated."""

    def __init__(self, data: bytes, lanes: int | None = None):
        data = bytes(data) if not isinstance(data, bytes) else data
        D = len(data)
        if D and data[0] == MULTI_LANE_MARKER:
            J, pos = _read_leb128(data, 1, min(MAX_LANES, D))
            if J < 2:
                raise StreamError("lane header declares fewer than 2 lanes (corrupted)")
            lengths = []
            for _ in range(J):
                length, pos = _read_leb128(data, pos, D)
                lengths.append(length)
            if pos + sum(lengths) != D:
                what = "truncated" if pos + sum(lengths) > D else "trailing bytes"
                raise StreamError(f"stream length does not match its lane header ({what})")
        elif D == 0 and lanes is not None:  # the empty stream (no symbols) has every lane count
            J = _check_lanes(lanes)
            pos, lengths = 0, [0] * J
        else:
            J, pos, lengths = 1, 0, [D]
        if lanes is not None and _check_lanes(lanes) != J:
            raise StreamError(f"stream has {J} lane(s), {lanes} expected")
        self.lanes = J
        lengths = np.asarray(lengths, dtype=np.int64)
        k = np.where(lengths <= 8, lengths, 5 + (lengths - 5) % 4)  # split_lane, for every lane at once
        self.counts = (lengths - k) // 4
        lane_pos = pos + np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64)
        raw = np.frombuffer(data, dtype=np.uint8)
        if D and np.any((k > 0) & (raw[np.minimum(lane_pos, D - 1)] == 0)):
            raise StreamError("a lane's state is not in its shortest form (corrupted)")
        states = [int.from_bytes(data[p:p + n], "big") for p, n in zip(lane_pos.tolist(), k.tolist())]
        self.states = np.array(states, dtype=_U64)
        if np.any((self.counts > 0) & (self.states < LOWER_BOUND)):
            raise StreamError("a lane's state is too small for its words (corrupted)")
        # every lane's words, lane after lane: byte offsets gathered in one go
        total = int(self.counts.sum())
        self.starts = np.zeros(J, dtype=np.int64)
        np.cumsum(self.counts[:-1], out=self.starts[1:])
        first = np.repeat(lane_pos + k - 4 * self.starts, self.counts) + 4 * np.arange(total)
        self.words32 = raw[first[:, None] + np.arange(4)].copy().view("<u4").reshape(-1).astype(np.uint32)

    @property
    def words(self) -> np.ndarray:
        """The words as uint64 (what the NumPy loops compute with)."""
        return self.words32.astype(_U64)


# ------------------------------------------------------------------------------------------------------ encoder

def encode_lanes(f: np.ndarray, c: np.ndarray, lanes: int, precision: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The coding loop. f, c: uint64 [n] frequency and cumulative frequency of each symbol. Returns the final states
    uint64 [J], the words uint32 (lane after lane, each in decoder order) and the word count of each lane."""
    n, J = len(f), lanes
    S = -(-n // J)
    pad = S * J - n
    if pad:  # the last step's missing symbols: frequency 2^precision, the identity (never renormalises)
        f = np.concatenate([f, np.full(pad, 1 << precision, dtype=_U64)])
        c = np.concatenate([c, np.zeros(pad, dtype=_U64)])
    f = f.reshape(S, J)
    c = c.reshape(S, J)
    x = np.full(J, START_STATE, dtype=_U64)
    low = np.empty((S, J), dtype=np.uint32)
    emit = np.empty((S, J), dtype=bool)
    top, word, prec = _U64(STATE_BITS - precision), _U64(WORD_BITS), _U64(precision)
    tmp, q, r, shift = (np.empty(J, dtype=_U64) for _ in range(4))
    for t in range(S - 1, -1, -1):
        # renormalise: x must be < f * 2^(64 - precision) so that the new state fits in 64 bits
        np.right_shift(x, top, out=tmp)
        np.greater_equal(tmp, f[t], out=emit[t])
        low[t] = x  # the low word (kept only where emitted)
        np.multiply(emit[t], word, out=shift)  # shift by 32 where emitted, by 0 elsewhere (faster than where=)
        np.right_shift(x, shift, out=x)
        # x <- (x // f) * 2^precision + x % f + c
        np.divmod(x, f[t], out=(q, r))
        np.left_shift(q, prec, out=x)
        x += r
        x += c[t]
    counts = emit.sum(axis=0).astype(np.int64)
    x[min(n, J):] = 0  # lanes without symbols (n < J) are empty
    words = low.T[emit.T]  # lane after lane, steps ascending = the decoder's reading order
    return x, words, counts


def _symbols_and_rows(symbols, table_index, tables: Tables) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(symbols)
    if s.ndim != 1 or not (np.issubdtype(s.dtype, np.integer) or s.size == 0):
        raise ValueError(f"symbols must be a 1-D integer array, got shape {s.shape} dtype {s.dtype}")
    s = np.ascontiguousarray(s, dtype=np.int64)
    rows, _ = _table_rows(table_index, len(s) if table_index is None else None, tables.T)
    if len(rows) != len(s):
        raise ValueError(f"len(table_index) = {len(rows)} does not match len(symbols) = {len(s)}")
    return s, rows


def _symbol_error(kernel, status: int, bad: int, s: np.ndarray, rows: np.ndarray, K: int) -> None:
    if status == kernel.BAD_SYMBOL:
        raise ValueError(f"symbols must be in [0, {K})")
    if status == kernel.ZERO_FREQUENCY:
        raise ValueError(f"symbol {int(s[bad])} at position {bad} has frequency 0 in its table {int(rows[bad])}")


def encode(symbols, freqs, table_index=None, *, lanes=None, precision: int = PRECISION) -> bytes:
    """Symbols [n] coded with tables freqs [T, K] (table_index [n] picks each symbol's table; None needs T = 1)."""
    tables = Tables(freqs, precision, uses=np.size(symbols))
    s, rows = _symbols_and_rows(symbols, table_index, tables)
    if lanes is not None:
        lanes = _check_lanes(lanes)
    if len(s) == 0:
        return b""
    kernel = _compiled()
    if kernel is None:
        f, c = _lookup_reference(tables, s, rows)
        return encode_frequencies(f, c, lanes=lanes, precision=precision)
    r = None if tables.T == 1 else np.ascontiguousarray(rows)
    if lanes is None:
        status, log2_sum, bad = kernel.information(tables.freqs64, tables.cdf, tables.K, r, s,
                                                   _log2_table(tables.precision))
        _symbol_error(kernel, status, bad, s, rows, tables.K)
        lanes = default_lanes(_information_bits(len(s), log2_sum, tables.precision))
    status, bad, states, words, counts = kernel.encode(tables.freqs64, tables.cdf, tables.K, r, s, lanes,
                                                       tables.precision)
    _symbol_error(kernel, status, bad, s, rows, tables.K)
    return assemble(states, words, counts)


def _lookup_reference(tables: Tables, s: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(s) and (s.min() < 0 or s.max() >= tables.K):
        raise ValueError(f"symbols must be in [0, {tables.K})")
    f, c = tables.lookup(rows, s)
    if np.any(f == 0):
        i = int(np.flatnonzero(f == 0)[0])
        raise ValueError(f"symbol {int(s[i])} at position {i} has frequency 0 in its table {int(rows[i])}")
    return f, c


def frequencies(symbols, freqs, table_index=None, *, precision: int = PRECISION) -> tuple[np.ndarray, np.ndarray]:
    """The frequency f and cumulative frequency c (uint64 [n]) of each symbol under its table, checked as encode()
    checks them. With encode_frequencies(), a long stream can be coded from tables computed piece by piece (only
    16 bytes per symbol are kept, not the tables): encode(s, freqs, t) == encode_frequencies(*frequencies(s, freqs,
    t))."""
    tables = Tables(freqs, precision, uses=np.size(symbols))
    s, rows = _symbols_and_rows(symbols, table_index, tables)
    kernel = _compiled()
    if kernel is None or len(s) == 0:
        if len(s) == 0:
            return np.zeros(0, dtype=_U64), np.zeros(0, dtype=_U64)
        return _lookup_reference(tables, s, rows)
    status, bad, f, c = kernel.lookup(tables.freqs64, tables.cdf, tables.K,
                                      None if tables.T == 1 else np.ascontiguousarray(rows), s)
    _symbol_error(kernel, status, bad, s, rows, tables.K)
    return f, c


def encode_frequencies(f, c, *, lanes=None, precision: int = PRECISION) -> bytes:
    """The stream of symbols given by their frequencies f and cumulative frequencies c ([n] each, see
    frequencies()): the same bytes as encode() of those symbols."""
    precision = check_precision(precision)
    f, c = np.asarray(f), np.asarray(c)
    if f.shape != c.shape or f.ndim != 1 or not all(np.issubdtype(a.dtype, np.integer) or a.size == 0
                                                    for a in (f, c)):
        raise ValueError(f"f and c must be 1-D integer arrays of one length, got shapes {f.shape} and {c.shape}")
    if lanes is not None:
        lanes = _check_lanes(lanes)
    if len(f) == 0:
        return b""
    total = 1 << precision
    if f.min() < 1 or c.min() < 0 or f.max() > total or np.any(c.astype(np.int64) + f.astype(np.int64) > total):
        raise ValueError(f"every symbol needs 1 <= f and c + f <= 2^{precision}")
    f, c = np.ascontiguousarray(f, dtype=_U64), np.ascontiguousarray(c, dtype=_U64)
    kernel = _compiled()
    if lanes is None:
        lanes = default_lanes(information_bits(f, precision))
    if kernel is not None:
        _, _, states, words, counts = kernel.encode(None, None, 0, None, None, lanes, precision, f=f, c=c, n=len(f))
        return assemble(states, words, counts)
    if lanes == 1:
        return assemble(*encode_one_lane(f.tolist(), c.tolist(), precision))
    return assemble(*encode_lanes(f, c, lanes, precision))


def encode_one_lane(f: list, c: list, precision: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """encode_lanes for one lane with Python integers: the same arithmetic, much faster than NumPy steps of one
    element (the usual case: one image's stream)."""
    x, out = START_STATE, []
    top, mask = STATE_BITS - precision, (1 << WORD_BITS) - 1
    for fi, ci in zip(reversed(f), reversed(c)):
        if x >> top >= fi:
            out.append(x & mask)
            x >>= WORD_BITS
        x = (x // fi << precision) + x % fi + ci
    words = np.array(out[::-1], dtype=np.uint32)
    return np.array([x], dtype=_U64), words, np.array([len(out)], dtype=np.int64)


# ------------------------------------------------------------------------------------------------------ decoder

class _Lookup:
    """slot -> symbol for the tables of one decode call: a flat table of 2^precision entries per table when that
    costs no more than the decoding itself, otherwise a binary search in the cumulative frequencies."""

    def __init__(self, tables: Tables, rows: np.ndarray):
        self.tables = tables
        M, K, T = tables.total, tables.K, tables.T
        self.use_table = T * M <= max(1 << 16, 16 * len(rows)) and T * M <= 1 << 24
        if self.use_table:
            dtype = np.uint16 if K <= 1 << 16 else np.int64
            self.table = np.repeat(np.tile(np.arange(K, dtype=dtype), T), tables.freqs.reshape(-1))
        self.steps = max(1, int(K).bit_length())

    def __call__(self, rows: np.ndarray, slot: np.ndarray) -> np.ndarray:
        """rows: int64 table of each lane, slot: uint64 in [0, 2^precision) -> the symbol (int64) whose
        [c, c + f) holds the slot: the largest s with cdf[s] <= slot."""
        K = self.tables.K
        if self.use_table:
            return self.table[(rows << self.tables.precision) + slot.astype(np.int64)].astype(np.int64)
        cdf = self.tables.flat_cdf
        base = rows * (K + 1)
        lo = np.zeros(len(rows), dtype=np.int64)
        hi = np.full(len(rows), K, dtype=np.int64)
        s = slot.astype(np.int64)
        for _ in range(self.steps):  # invariant cdf[lo] <= slot < cdf[hi]
            mid = (lo + hi) >> 1
            below = cdf[base + mid] <= s
            lo = np.where(below, mid, lo)
            hi = np.where(below, hi, mid)
        return lo


class Decoder:
    """Decodes a stream in pieces: each decode() call returns the next n symbols, lane assignment continuing as if
    all symbols had gone through one encode() call; finish() checks that the stream ended exactly there."""

    def __init__(self, data: bytes, *, lanes=None, precision: int = PRECISION):
        self.precision = check_precision(precision)
        self.layout = Layout(data, lanes)
        self.lanes = self.layout.lanes
        self.x = self.layout.states.copy()
        self.ptr = self.layout.starts.copy()
        self.remaining = self.layout.counts.copy()
        self.position = 0  # symbols decoded so far
        self._broken = False

    @cached_property
    def _words(self) -> np.ndarray:
        """The NumPy loops' words: uint64 with one spare, so that reads stay in range (the compiled loop reads
        layout.words32 directly)."""
        return np.concatenate([self.layout.words, np.zeros(1, dtype=_U64)])

    def decode(self, freqs, table_index=None, n=None) -> np.ndarray:
        if self._broken:
            raise StreamError("stream is corrupted or was decoded with other tables")
        uses = np.size(table_index) if table_index is not None else n if isinstance(n, (int, np.integer)) else None
        tables = Tables(freqs, self.precision, uses=uses)
        if tables.precision != self.precision:
            raise ValueError("tables and decoder precision differ")
        rows, n = _table_rows(table_index, n, tables.T)
        out = np.empty(n, dtype=np.int64)
        if n == 0:
            return out
        kernel = _compiled()
        if kernel is not None:
            return self._decode_compiled(kernel, tables, rows, out)
        if self.lanes == 1:
            return self._decode_one_lane(tables, rows, out)
        lookup = _Lookup(tables, rows)
        J, i0 = self.lanes, self.position
        M1, prec, top, word = _U64(tables.total - 1), _U64(self.precision), _U64(STATE_BITS - self.precision), \
            _U64(WORD_BITS)
        bad = False
        for t in range(i0 // J, (i0 + n - 1) // J + 1):
            a, b = max(i0 - t * J, 0), min(i0 + n - t * J, J)  # lanes [a, b) of step t
            o = t * J + a - i0
            x = self.x[a:b]
            rem = self.remaining[a:b]
            ptr = self.ptr[a:b]
            slot = x & M1
            r = rows[o:o + b - a]
            sym = lookup(r, slot)
            out[o:o + b - a] = sym
            f, c = tables.lookup(r, sym)
            y = f * (x >> prec) + slot - c
            need = (y < LOWER_BOUND) & (rem > 0)
            w = self._words[ptr]
            y = np.where(need, (y << word) | w, y)
            # the encoder renormalised exactly when its state was >= f * 2^(64 - precision)
            bad |= bool(np.any(((y >> top) >= f) != need))
            self.x[a:b] = y
            ptr += need
            rem -= need
        self.position += n
        if bad:
            self._broken = True
            raise StreamError("stream is corrupted or was decoded with other tables (inconsistent renormalisation)")
        return out

    def _decode_compiled(self, kernel, tables: Tables, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """decode() by kernels/rans_cpu: the same arithmetic and checks. A slot -> symbol table (2^precision entries
        per table) when the symbols amortise it, else a binary search in the cumulative frequencies."""
        n = len(out)
        slot_table = None
        if tables.cdf is not None and tables.T * tables.total <= 4 * n:
            slot_table = np.repeat(np.tile(np.arange(tables.K, dtype=np.uint16), tables.T),
                                   tables.freqs.reshape(-1))
        r = None if tables.T == 1 else np.ascontiguousarray(rows)
        status, _ = kernel.decode(tables.freqs64, tables.cdf, tables.K, r, n, self.position, self.lanes, self.precision, self.x,
                                  self.ptr, self.remaining, self.layout.words32, slot_table, out)
        self.position += n
        if status != kernel.OK:
            self._broken = True
            raise StreamError("stream is corrupted or was decoded with other tables (inconsistent renormalisation)")
        return out

    def _decode_one_lane(self, tables: Tables, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """decode() for one lane with Python integers (the same arithmetic and checks as the NumPy steps)."""
        prec, top, M1 = self.precision, STATE_BITS - self.precision, tables.total - 1
        cdf, freqs, K = tables.cdf, tables.freqs, tables.K
        x, ptr, rem = int(self.x[0]), int(self.ptr[0]), int(self.remaining[0])
        words = self._words
        bad = False
        # per table: its cumulative frequencies as a list, searched with bisect
        cache: dict[int, tuple[list, list]] = {}
        for i, row in enumerate(rows.tolist()):
            entry = cache.get(row)
            if entry is None:
                entry = cache[row] = (cdf[row].tolist(), freqs[row].tolist())
            cum, fr = entry
            slot = x & M1
            s = bisect_right(cum, slot, 0, K) - 1
            f = fr[s]
            x = f * (x >> prec) + slot - cum[s]
            need = x < LOWER_BOUND and rem > 0
            if need:
                x = x << WORD_BITS | int(words[ptr])
                ptr += 1
                rem -= 1
            if (x >> top >= f) != need:
                bad = True
            out[i] = s
        self.x[0], self.ptr[0], self.remaining[0] = x, ptr, rem
        self.position += len(rows)
        if bad:
            self._broken = True
            raise StreamError("stream is corrupted or was decoded with other tables (inconsistent renormalisation)")
        return out

    def finish(self) -> None:
        """Raise StreamError unless every word was read and every lane is back at its starting state 0."""
        if self._broken:
            raise StreamError("stream is corrupted or was decoded with other tables")
        if np.any(self.remaining != 0):
            raise StreamError("stream has data left after the last symbol (trailing bytes, corrupted, or more "
                              "symbols than were decoded)")
        # a lane that coded symbols started at START_STATE; one that coded none (n < lanes) is empty: state 0
        coded = (self.position - np.arange(self.lanes) + self.lanes - 1) // self.lanes > 0
        if np.any(self.x != np.where(coded, START_STATE, 0).astype(_U64)):
            raise StreamError("stream does not end where it should (truncated or corrupted)")


def decode(data: bytes, freqs, table_index=None, n=None, *, lanes=None, precision: int = PRECISION) -> np.ndarray:
    """One Decoder, one decode() of all n symbols, then finish()."""
    decoder = Decoder(data, lanes=lanes, precision=precision)
    out = decoder.decode(freqs, table_index, n)
    decoder.finish()
    return out
