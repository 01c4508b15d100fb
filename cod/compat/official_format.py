"""The `.cod` file written by the official CLI (spec §3.6): uint16 LE, uint16 LE, then the packed indices.

QUIRK: the official writer stores the height (rows) first and the width second, while its reader assigns
the fields to (W, H) — so the official decompressor transposes non-square images. We write byte-identical
files (H first) and read them correctly (first field = H).
"""
from __future__ import annotations

import struct

HEADER = struct.Struct("<HH")


def write_official(payload: bytes, height: int, width: int) -> bytes:
    if not (0 < height < 1 << 16 and 0 < width < 1 << 16):
        raise ValueError(f"the official .cod header cannot hold an image of {height}x{width}")
    return HEADER.pack(height, width) + bytes(payload)


def read_official(data: bytes) -> tuple[int, int, bytes]:
    """-> (height, width, payload)."""
    if len(data) < HEADER.size:
        raise ValueError(f"an official .cod file has a {HEADER.size}-byte header; got {len(data)} bytes")
    height, width = HEADER.unpack_from(data)
    if height == 0 or width == 0:
        raise ValueError(f"official .cod header holds an empty size {height}x{width}")
    return height, width, bytes(data[HEADER.size:])


# CoD-Lite's CLI (spec one-step.md §4.4) writes the width first and reads it back as the width: correct for any
# aspect ratio, and the opposite field order to the files above.
def write_official_lite(payload: bytes, height: int, width: int) -> bytes:
    return write_official(payload, width, height)


def read_official_lite(data: bytes) -> tuple[int, int, bytes]:
    """-> (height, width, payload)."""
    width, height, payload = read_official(data)
    return height, width, payload
