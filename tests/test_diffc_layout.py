"""DiffC chunk layouts and the dimension partition: the release's examples, validity (no empty chunks, upstream
PR #5), the encoder's clamp, and the partition's definition."""
from __future__ import annotations

import numpy as np
import pytest

from cod.diffc import philox
from cod.diffc.layout import (LayoutError, StepLayout, chunk_bits, is_valid, layout, max_valid_budget, partition,
                              zipf_share)


@pytest.mark.parametrize("n,bits", [(0, []), (1, [3]), (14, [16]), (15, [10, 9]), (29, [12, 12, 11]),
                                    (30, [12, 12, 12])])
def test_chunk_sizes_of_the_release(n, bits):
    assert chunk_bits(n) == bits


def test_layout_dims_cover_every_dimension_once():
    lay = layout(29, 1000)
    assert lay.bits == (12, 12, 11) and lay.total_bits == 35
    assert lay.dims == (1000 * 12 // 35, 1000 * 12 // 35, 1000 - 2 * (1000 * 12 // 35))
    assert list(lay.starts) == [0, lay.dims[0], lay.dims[0] + lay.dims[1]]
    assert lay.counts == [4096, 4096, 2048]
    empty = layout(0, 10)
    assert empty.chunks == 0 and empty.dims == () and len(empty.starts) == 0


def test_zipf_share_is_the_rounded_integer_share():
    assert zipf_share(14, 16, 16) == 224          # 14 bits in 1/16 bit
    assert zipf_share(1, 3, 3) == 16
    assert zipf_share(15, 10, 19) == round(16 * 15 * 10 / 19)
    assert zipf_share(10 ** 6, 16, 16) == 256     # capped
    lay = layout(29, 1000)
    assert lay.shares == [zipf_share(29, b, 35) for b in lay.bits]


@pytest.mark.parametrize("max_bits,padding", [(16, 2), (8, 3), (4, 0), (16, 6)])
def test_validity_and_the_encoders_clamp_on_tiny_dimensions(max_bits, padding):
    for D in range(1, 33):
        valid = [n for n in range(0, max_bits * D + 20) if is_valid(n, D, max_bits, padding)]
        for n in range(0, max_bits * D + 20):
            assert max_valid_budget(n, D, max_bits, padding) == max(v for v in valid if v <= n)
        for n in valid:
            lay = layout(n, D, max_bits, padding)
            assert sum(lay.dims) == (D if n else 0) and min(lay.dims, default=1) >= 1 and lay.chunks <= D
            assert all(1 <= b <= max_bits for b in lay.bits)


def test_degenerate_layouts_are_refused_not_silent():
    with pytest.raises(LayoutError, match="chunks"):   # more chunks than dimensions
        layout(100, 3)
    D = 10  # 10 chunks of 16 bits over 10 dims is fine, one bit more needs an 11th chunk
    assert is_valid(140, D) and not is_valid(141, D)
    with pytest.raises(LayoutError, match="2\\^24"):
        layout(1 << 24, 10 ** 9)
    with pytest.raises(ValueError, match="padding"):
        layout(5, 10, max_bits=4, padding=4)


def test_partition_follows_its_definition():
    D, seed, k = 257, 3, 5
    lay = layout(40, D)
    order = partition(seed, k, lay, D)
    assert sorted(order) == list(range(D))
    keys = philox.partition_keys(seed, k, D)
    rank = np.empty(D, np.int64)
    rank[np.lexsort((np.arange(D), keys))] = np.arange(D)  # rank by (key, index)
    for c, (s, d) in enumerate(zip(lay.starts, lay.dims)):
        chunk = order[s:s + d]
        assert np.all(np.diff(chunk) > 0)  # ascending flat indices
        assert set(chunk) == set(np.flatnonzero((rank >= s) & (rank < s + d)))
    assert np.array_equal(order, partition(seed, k, lay, D))
    assert not np.array_equal(order, partition(seed, k + 1, lay, D))
    assert not np.array_equal(order, partition(seed + 1, k, lay, D))


def test_step_layout_is_plain_data():
    lay = StepLayout(3, (5,), (7,))
    assert lay.chunks == 1 and lay.counts == [32] and list(lay.starts) == [0]
