"""The entropy-coded DiffC stream: round trips of random budgets and indices, exact rate accounting, and
truncated, extended or flipped streams refused with one BitstreamError."""
from __future__ import annotations

import numpy as np
import pytest

from cod.codec.container import BitstreamError
from cod.diffc import stream
from cod.diffc.layout import is_valid, layout


def random_steps(rng, K: int, D: int):
    steps = []
    for _ in range(K):
        kind = rng.integers(0, 4)
        n = int([0, rng.integers(1, 15), rng.integers(15, 200), rng.integers(200, 3000)][kind])
        while not is_valid(n, D):
            n //= 2
        lay = layout(n, D)
        # indices Zipf-like, with the extremes 0 and 2^b - 1 present
        idx = [int(min((1 << b) - 1, rng.zipf(1.1) - 1)) for b in lay.bits]
        if idx:
            idx[0], idx[-1] = 0, (1 << lay.bits[-1]) - 1
        steps.append((n, idx))
    return steps


def test_budget_table_sums_to_2_16():
    f = stream.budget_frequencies()
    assert f.size == 49 and f.sum() == 1 << 16 and f[24] == 43660 and f[0] == f[-1] == 1


@pytest.mark.parametrize("seed", range(4))
def test_round_trip_of_random_steps(seed):
    rng = np.random.default_rng(seed)
    D = int(rng.integers(50, 5000))
    steps = random_steps(rng, int(rng.integers(1, 30)), D)
    data = stream.encode_steps(steps, D)
    assert len(data) % 4 == 0
    decoded = stream.decode_steps(data, len(steps), D)
    assert [(lay.budget, idx) for lay, idx in decoded] == steps
    # the file's size is the model cost within the coder's termination (a word or two)
    encoder = stream.StreamEncoder(D)
    for n, idx in steps:
        encoder.add_step(n, idx)
    assert encoder.to_bytes() == data
    assert encoder.bits <= 8 * len(data) <= encoder.bits + 64


def test_other_chunk_parameters_round_trip():
    steps = [(5, [0]), (40, [3, 4, 5, 6, 7, 8, 9, 10]), (0, [])]
    data = stream.encode_steps(steps, 100, max_bits=8, padding=3)
    assert [(lay.budget, i) for lay, i in stream.decode_steps(data, 3, 100, 8, 3)] == steps


def test_corruptions_are_one_error():
    rng = np.random.default_rng(7)
    D = 800
    steps = random_steps(rng, 12, D)
    data = stream.encode_steps(steps, D)
    bad = [data[:-4], data + b"\0\0\0\0", data[:-1], data + b"\x01"]
    for i in range(0, len(data), max(1, len(data) // 40)):
        flipped = bytearray(data)
        flipped[i] ^= 1 << (i % 8)
        bad.append(bytes(flipped))
    for b in bad:
        with pytest.raises(BitstreamError, match="DiffC payload"):
            stream.decode_steps(b, len(steps), D)
    with pytest.raises(BitstreamError):  # the right bytes, the wrong geometry: another layout is implied
        stream.decode_steps(data, len(steps) + 1, D)


def test_encoder_refuses_what_it_cannot_code():
    enc = stream.StreamEncoder(10)
    with pytest.raises(ValueError, match="chunks"):
        enc.add_step(14, [0, 1])
    with pytest.raises(ValueError, match="outside"):
        stream.StreamEncoder(10).add_step(14, [1 << 16])
    with pytest.raises(ValueError):
        stream.StreamEncoder(3).add_step(100, [0] * 8)  # an invalid layout is never written
