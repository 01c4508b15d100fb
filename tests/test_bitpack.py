"""Fixed-length index packing: MSB-first raster order, exact sizes, strict bounds."""
from __future__ import annotations

import numpy as np
import pytest

from cod.codec.bitpack import pack_indices, packed_size, unpack_indices


def test_four_bit_layout_is_two_indices_per_byte_high_nibble_first():
    assert pack_indices([1, 2, 15, 0, 7], 4) == bytes([0x12, 0xF0, 0x70])


@pytest.mark.parametrize("bits", range(1, 17))
def test_round_trip_and_size(bits):
    rng = np.random.default_rng(bits)
    for count in (0, 1, 7, 64, 333):
        idx = rng.integers(0, 1 << bits, size=count)
        data = pack_indices(idx, bits)
        assert len(data) == packed_size(count, bits) == (count * bits + 7) // 8
        assert np.array_equal(unpack_indices(data, count, bits), idx)


def test_padding_bits_are_zero():
    data = pack_indices([1], 3)
    assert data == bytes([0b00100000])


def test_out_of_range_and_short_input_are_rejected():
    with pytest.raises(ValueError, match="out of range"):
        pack_indices([16], 4)
    with pytest.raises(ValueError, match="out of range"):
        pack_indices([-1], 4)
    with pytest.raises(ValueError, match="needed"):
        unpack_indices(b"\x12", 3, 4)
