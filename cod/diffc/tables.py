"""The integer tables DiffC needs, shipped as data files and checked by SHA-256 before use (docs/diffc.md).

They are built once, offline, in high precision by tools/build_diffc_tables.py; cod never rebuilds them at run
time, because libm's last bits differ between machines and these tables decide which candidates a file selects
and how its symbols are coded.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources

import numpy as np

SHA256 = {
    "normal.i32": "a534807c9cdd58c1bfeb40eaa1858249fd9287320dc21e4a20867234f9235218",
    "zipf.u16": "c9f317bb54cee79489ca71ae5c07fb3caaf0611dff28718e616aa7a254d0f32e",
}
NORMAL_ENTRIES = 256 + 23 * 129  # 3,223: 256 direct entries, then 129 knots for each octave e = 8..30
ZIPF_SHAPE = (16, 257, 17)       # [b - 1][Dq][e]
ZIPF_TOTAL = 1 << 16


class TableError(RuntimeError):
    """A shipped table that is missing or not the one this cod was released with (a damaged installation)."""


def _read(name: str) -> bytes:
    try:
        data = resources.files("cod.diffc").joinpath("data", name).read_bytes()
    except OSError as e:
        raise TableError(f"cod/diffc/data/{name} cannot be read ({e}); reinstall cod") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256[name]:
        raise TableError(f"cod/diffc/data/{name} has sha256 {digest[:16]}..., not the recorded "
                         f"{SHA256[name][:16]}...: the installation is damaged; reinstall cod")
    return data


@lru_cache(maxsize=1)
def normal_table() -> np.ndarray:
    """int32 [3223]: round(2^24 G) at the direct entries and the knots (see cod.diffc.philox.normals)."""
    table = np.frombuffer(_read("normal.i32"), dtype="<i4").astype(np.int32)
    assert table.size == NORMAL_ENTRIES
    table.setflags(write=False)
    return table


@lru_cache(maxsize=1)
def zipf_table() -> np.ndarray:
    """uint16 [16, 257, 17]: F[b - 1][Dq][e], the octave frequencies (total 2^16 over e = 0..b)."""
    table = np.frombuffer(_read("zipf.u16"), dtype="<u2").astype(np.uint32).reshape(ZIPF_SHAPE)
    table.setflags(write=False)
    return table
