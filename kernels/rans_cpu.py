"""The compiled CPU path of cod's rANS coder (kernels/rans_cpu.c), built at first use by kernels/cbuild.py;
cod/entropy/rans.py is its NumPy reference and dispatches here when it is available (same bytes, same symbols,
same errors). COD_RANS_CPU=numpy forces the reference."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from .cbuild import BASE_FLAGS, CompiledLibrary, pointer

SOURCE = Path(__file__).with_name("rans_cpu.c")
OK, BAD_SYMBOL, ZERO_FREQUENCY, BAD_STREAM, BAD_ENTRY, BAD_SUM, NO_MEMORY = 0, 1, 2, 3, 4, 5, 6


def _declare(dll: ctypes.CDLL) -> None:
    i64, p, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    dll.rans_tables.argtypes = [p, i64, i64, i64, p, p]
    dll.rans_lookup.argtypes = [p, p, i64, p, p, i64, p, p, p]
    dll.rans_information.argtypes = [p, p, i64, p, p, p, p, i64, p, p, p]
    dll.rans_encode.argtypes = [p, p, i64, p, p, p, p, i64, i64, c_int, p, p, p, p]
    dll.rans_decode.argtypes = [p, p, i64, p, i64, i64, i64, c_int, p, p, p, p, p, p, p]
    for f in (dll.rans_tables, dll.rans_lookup, dll.rans_information, dll.rans_encode, dll.rans_decode):
        f.restype = c_int


_LIBRARY = CompiledLibrary(SOURCE, BASE_FLAGS, "COD_RANS_CPU", _declare)


def available() -> bool:
    return _LIBRARY.get() is not None


def error() -> str | None:
    return _LIBRARY.error


def tables(freqs: np.ndarray, total: int, cumulative: bool) -> tuple[int, int, np.ndarray | None]:
    """(status, first bad row, cdf int64 [T, K + 1] or None) of int64 tables freqs [T, K]: checked, and their
    cumulative frequencies when asked for."""
    T, K = freqs.shape
    cdf = np.empty((T, K + 1), dtype=np.int64) if cumulative else None
    bad = ctypes.c_int64(-1)
    status = _LIBRARY.require().rans_tables(pointer(freqs), T, K, total, pointer(cdf), ctypes.byref(bad))
    return status, bad.value, cdf


def lookup(freqs: np.ndarray, cdf: np.ndarray | None, K: int, rows: np.ndarray | None, symbols: np.ndarray
           ) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(status, first bad position, f uint64 [n], c uint64 [n]) of the symbols under their tables."""
    n = len(symbols)
    f, c = np.empty(n, dtype=np.uint64), np.empty(n, dtype=np.uint64)
    bad = ctypes.c_int64(-1)
    status = _LIBRARY.require().rans_lookup(pointer(freqs), pointer(cdf), K, pointer(rows), pointer(symbols), n,
                                            pointer(f), pointer(c), ctypes.byref(bad))
    return status, bad.value, f, c


def information(freqs, cdf, K: int, rows, symbols, log2_table: np.ndarray, f=None, c=None, n: int | None = None
                ) -> tuple[int, int, int]:
    """(status, sum of log2_table[f] over the symbols, first bad position): symbols under their tables, or the
    frequencies f (with c) already looked up."""
    n = len(symbols) if n is None else n
    total, bad = ctypes.c_int64(0), ctypes.c_int64(-1)
    status = _LIBRARY.require().rans_information(pointer(freqs), pointer(cdf), K, pointer(rows), pointer(symbols),
                                                 pointer(f), pointer(c), n, pointer(log2_table), ctypes.byref(total),
                                                 ctypes.byref(bad))
    return status, total.value, bad.value


def encode(freqs, cdf, K: int, rows, symbols, lanes: int, precision: int, f=None, c=None, n: int | None = None):
    """(status, first bad position, states uint64 [J], words uint32, counts int64 [J]): symbols under their tables,
    or the frequencies f and cumulative frequencies c already looked up."""
    n = len(symbols) if n is None else n
    states = np.empty(lanes, dtype=np.uint64)
    words = np.empty(n, dtype=np.uint32)
    counts = np.empty(lanes, dtype=np.int64)
    bad = ctypes.c_int64(-1)
    status = _LIBRARY.require().rans_encode(pointer(freqs), pointer(cdf), K, pointer(rows), pointer(symbols),
                                            pointer(f), pointer(c), n, lanes, precision, pointer(states),
                                            pointer(words), pointer(counts), ctypes.byref(bad))
    if status == NO_MEMORY:
        raise MemoryError(f"rANS encoder: no memory for {lanes} lanes")
    return status, bad.value, states, words[:int(counts.sum())] if status == OK else words[:0], counts


def decode(freqs: np.ndarray, cdf: np.ndarray | None, K: int, rows: np.ndarray | None, n: int, i0: int, lanes: int, precision: int,
           x: np.ndarray, ptr: np.ndarray, remaining: np.ndarray, words: np.ndarray, slot_table: np.ndarray | None,
           out: np.ndarray) -> tuple[int, int]:
    """(status, first bad position); x, ptr, remaining (per lane) and out are updated in place."""
    bad = ctypes.c_int64(-1)
    status = _LIBRARY.require().rans_decode(pointer(freqs), pointer(cdf), K, pointer(rows), n, i0, lanes, precision, pointer(x),
                                            pointer(ptr), pointer(remaining), pointer(words), pointer(slot_table),
                                            pointer(out), ctypes.byref(bad))
    return status, bad.value
