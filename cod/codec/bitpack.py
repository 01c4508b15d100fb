"""Fixed-length index packing: each index as a `bits`-bit MSB-first number, raster order, bytes filled from
their most significant bit, the last byte zero-padded (spec §3.5). The one place that packs indices."""
from __future__ import annotations

import numpy as np


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_indices(indices, bits: int) -> bytes:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if not 1 <= bits <= 16:
        raise ValueError(f"bits per index must be 1-16, got {bits}")
    if idx.size and (idx.min() < 0 or idx.max() >= 1 << bits):
        raise ValueError(f"index out of range for {bits}-bit packing")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    bitplane = ((idx[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(bitplane).tobytes()


def unpack_indices(data: bytes, count: int, bits: int) -> np.ndarray:
    """The first `count` indices of `data`; raises ValueError if `data` is too short."""
    need = packed_size(count, bits)
    if len(data) < need:
        raise ValueError(f"bitstream holds {len(data)} bytes, {need} needed for {count} {bits}-bit indices")
    bitplane = np.unpackbits(np.frombuffer(bytes(data[:need]), dtype=np.uint8))[: count * bits]
    weights = 1 << np.arange(bits - 1, -1, -1, dtype=np.int64)
    return bitplane.reshape(count, bits).astype(np.int64) @ weights
