"""The entropy-coded DiffC stream (spec §6.8, docs/diffc.md): per step the budget n_k, then its chunk indices,
coded with constriction's range coder (a FIFO queue: symbols are decoded in the order they were encoded) under
integer tables that depend only on symbols already decoded.

  budget   L_k = bit_length(n_k) (L_-1 = 4) as the difference L_k - L_(k-1) under a fixed 49-symbol table
           (total 2^16), then the L_k - 1 mantissa bits of n_k as raw bits.
  index    R = i + 1, octave e = floor(log2 R) under F[b][Dq] (the shipped Zipf octave table), then the e
           offset bits of R - 2^e as raw bits (none when e = b).
  raw bits m <= 12 bits: one uniform symbol; more: the high m - 12 bits, then the low 12.

The decoder checks every L_k, every layout, that the coder is exhausted, and that re-encoding what it decoded
gives the very same words: so every stream has one byte string, and any corruption is one BitstreamError.
"""
from __future__ import annotations

import math
from functools import lru_cache

import constriction
import numpy as np

from cod.codec.container import BitstreamError
from cod.diffc.layout import LayoutError, StepLayout, layout
from cod.diffc.tables import ZIPF_TOTAL, zipf_table

MAX_L = 24
FIRST_L = 4
RAW_CHUNK = 12
_model = constriction.stream.model
_queue = constriction.stream.queue


def budget_frequencies() -> np.ndarray:
    """int [49]: the frequency of L_k - L_(k-1) = delta at position delta + 24 (total 2^16)."""
    by_size = {0: 43660, 1: 8192, 2: 2048, 3: 512, 4: 128, 5: 32, 6: 8}
    freqs = np.array([by_size.get(abs(d), 1) for d in range(-MAX_L, MAX_L + 1)], dtype=np.int64)
    assert freqs.sum() == ZIPF_TOTAL
    return freqs


@lru_cache(maxsize=None)
def _budget_model():
    return _model.Categorical(budget_frequencies() / ZIPF_TOTAL, perfect=False)


@lru_cache(maxsize=4096)
def _octave_model(b: int, share: int):
    return _model.Categorical(octave_frequencies(b, share) / ZIPF_TOTAL, perfect=False)


@lru_cache(maxsize=None)
def _uniform(size: int):
    return _model.Uniform(size)


def octave_frequencies(b: int, share: int) -> np.ndarray:
    return zipf_table()[b - 1, share, : b + 1].astype(np.int64)


def _raw_pieces(m: int) -> list[int]:
    """Bit widths of the uniform symbols that code an m-bit value, most significant first."""
    if m == 0:
        return []
    return [m] if m <= RAW_CHUNK else [m - RAW_CHUNK, RAW_CHUNK]


def _encode_raw(encoder, value: int, m: int) -> None:
    pieces = _raw_pieces(m)
    if len(pieces) == 2:
        encoder.encode(value >> RAW_CHUNK, _uniform(1 << pieces[0]))
        encoder.encode(value & ((1 << RAW_CHUNK) - 1), _uniform(1 << RAW_CHUNK))
    elif pieces:
        encoder.encode(value, _uniform(1 << m))


def _decode_raw(decoder, m: int) -> int:
    value = 0
    for width in _raw_pieces(m):
        value = (value << width) | int(decoder.decode(_uniform(1 << width)))
    return value


def _octave(index: int) -> tuple[int, int]:
    rank = index + 1
    e = rank.bit_length() - 1
    return e, rank - (1 << e)


class StreamEncoder:
    """Steps in order -> the stream; code_length() is the exact model cost so far (rate control)."""

    def __init__(self, D: int, max_bits: int = 16, padding: int = 2):
        self.D, self.max_bits, self.padding = D, max_bits, padding
        self._encoder = _queue.RangeEncoder()
        self._last_l = FIRST_L
        self.bits = 0.0  # sum of -log2 model probabilities of everything encoded

    def add_step(self, n: int, indices) -> StepLayout:
        lay = layout(n, self.D, self.max_bits, self.padding)
        if len(indices) != lay.chunks:
            raise ValueError(f"a step with budget {n} has {lay.chunks} chunks, got {len(indices)} indices")
        self.bits += step_code_length(self._last_l, lay, indices)
        L = n.bit_length()
        self._encoder.encode(L - self._last_l + MAX_L, _budget_model())
        if L >= 2:
            _encode_raw(self._encoder, n - (1 << (L - 1)), L - 1)
        self._last_l = L
        for b, share, index in zip(lay.bits, lay.shares, indices):
            index = int(index)
            if not 0 <= index < 1 << b:
                raise ValueError(f"chunk index {index} outside [0, 2^{b})")
            e, offset = _octave(index)
            self._encoder.encode(e, _octave_model(b, share))
            if e < b:
                _encode_raw(self._encoder, offset, e)
        return lay

    def words(self) -> np.ndarray:
        return self._encoder.get_compressed()

    def to_bytes(self) -> bytes:
        return self.words().astype("<u4").tobytes()


def step_code_length(last_l: int, lay: StepLayout, indices) -> float:
    """Bits one step costs under the models: -log2 of every modelled symbol's probability, plus its raw bits."""
    L = lay.budget.bit_length()
    bits = -math.log2(budget_frequencies()[L - last_l + MAX_L] / ZIPF_TOTAL) + max(L - 1, 0)
    for b, share, index in zip(lay.bits, lay.shares, indices):
        e, _ = _octave(int(index))
        bits += -math.log2(octave_frequencies(b, share)[e] / ZIPF_TOTAL) + (e if e < b else 0)
    return bits


def encode_steps(steps, D: int, max_bits: int = 16, padding: int = 2) -> bytes:
    """[(n_k, [i_0, ..., i_(J-1)]), ...] -> the stream's bytes (4 per word, little-endian)."""
    encoder = StreamEncoder(D, max_bits, padding)
    for n, indices in steps:
        encoder.add_step(int(n), indices)
    return encoder.to_bytes()


def decode_steps(data: bytes, K: int, D: int, max_bits: int = 16, padding: int = 2) -> list[tuple[StepLayout, list[int]]]:
    """The stream of K steps -> [(layout, indices)] per step; BitstreamError for anything but a stream this
    format's encoder writes for K steps over D dimensions."""
    if len(data) % 4:
        raise BitstreamError(f"malformed DiffC payload: the coded stream has {len(data)} bytes, not whole 32-bit "
                             f"words (truncated or corrupted file)")
    words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    out: list[tuple[StepLayout, list[int]]] = []
    try:
        decoder = _queue.RangeDecoder(words)
        last_l = FIRST_L
        for k in range(K):
            L = last_l + int(decoder.decode(_budget_model())) - MAX_L
            if not 0 <= L <= MAX_L:
                raise BitstreamError(f"malformed DiffC payload: step {k} has a budget of {L} bits' length")
            n = 0 if L == 0 else (1 << (L - 1)) + (_decode_raw(decoder, L - 1) if L >= 2 else 0)
            last_l = L
            try:
                lay = layout(n, D, max_bits, padding)
            except LayoutError as e:
                raise BitstreamError(f"malformed DiffC payload: step {k}: {e}") from None
            indices = []
            for b, share in zip(lay.bits, lay.shares):
                e = int(decoder.decode(_octave_model(b, share)))
                rank = (1 << e) + _decode_raw(decoder, e) if e < b else 1 << b
                indices.append(rank - 1)
            out.append((lay, indices))
        exhausted = decoder.maybe_exhausted()
    except BitstreamError:
        raise
    except Exception as e:  # noqa: BLE001 - constriction reports damaged data in its own exception types
        raise BitstreamError(f"malformed DiffC payload: the coded stream cannot be decoded ({e})") from None
    if not exhausted:
        raise BitstreamError("malformed DiffC payload: data left in the coded stream after the last step "
                             "(corrupted file)")
    if encode_steps([(lay.budget, idx) for lay, idx in out], D, max_bits, padding) != bytes(data):
        raise BitstreamError("malformed DiffC payload: the coded stream is not the one its symbols encode "
                             "(corrupted file)")
    return out
