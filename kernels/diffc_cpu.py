"""The compiled CPU path of DiffC's candidate scoring (kernels/diffc_cpu.c), built with the system C compiler
at first use and cached; cod.diffc.philox is its NumPy reference (bit-identical words and normals).

Built and cached by kernels/cbuild.py. Without a C compiler `available()` is
False and cod.diffc uses NumPy (about 10x slower). COD_DIFFC_CPU=numpy forces that.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from .cbuild import BASE_FLAGS, CompiledLibrary, pointer as _p

SOURCE = Path(__file__).with_name("diffc_cpu.c")
FLAGS = [*BASE_FLAGS, "-fopenmp"]


def _declare(dll: ctypes.CDLL) -> None:
    i64, u32, ptr = ctypes.c_int64, ctypes.c_uint32, ctypes.c_void_p
    dll.diffc_score.argtypes = [ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, u32, u32, ctypes.c_int]
    dll.diffc_stream.argtypes = [ptr, i64, ptr, ptr, i64, u32, u32, ptr, ctypes.c_int, ctypes.c_int]


_LIBRARY = CompiledLibrary(SOURCE, FLAGS, "COD_DIFFC_CPU", _declare)


def library() -> ctypes.CDLL | None:
    """The compiled library, or None (no compiler, a failed build, or COD_DIFFC_CPU=numpy); see error()."""
    return _LIBRARY.get()


def available() -> bool:
    return library() is not None


def error() -> str | None:
    return _LIBRARY.error


def _threads(threads: int | None) -> int:
    if threads is not None:
        return max(1, int(threads))
    import torch

    return max(1, torch.get_num_threads())


def score_chunks(r_perm: np.ndarray, starts, dims, counts, seed: int, c3: int, threads: int | None = None) -> np.ndarray:
    """float32 [sum(counts)]: the scores of every candidate of every chunk (see kernels/philox.score_chunks)."""
    from cod.diffc.tables import normal_table

    lib = _LIBRARY.require()
    r = np.ascontiguousarray(r_perm, dtype=np.float32)
    starts, dims, counts = (np.ascontiguousarray(a, dtype=np.int64) for a in (starts, dims, counts))
    outs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    table = np.ascontiguousarray(normal_table())
    scores = np.empty(int(counts.sum()), dtype=np.float32)
    if len(counts):
        lib.diffc_score(_p(r), _p(scores), len(counts), _p(starts), _p(dims), _p(counts), _p(outs), _p(table),
                        seed & 0xFFFFFFFF, c3, _threads(threads))
    return scores


def stream(seed: int, c3: int, c2, c1, length: int, normals: bool, threads: int | None = None) -> np.ndarray:
    """[rows, length] words (uint32) or normals (float32) of the streams (c2[i], c1[i]) of one domain."""
    from cod.diffc.tables import normal_table

    lib = _LIBRARY.require()
    c2, c1 = np.broadcast_arrays(np.atleast_1d(np.asarray(c2, dtype=np.uint64)),
                                 np.atleast_1d(np.asarray(c1, dtype=np.uint64)))
    c2 = np.ascontiguousarray(c2 & 0xFFFFFFFF, dtype=np.uint32)
    c1 = np.ascontiguousarray(c1 & 0xFFFFFFFF, dtype=np.uint32)
    out = np.empty((c1.size, length), dtype=np.float32 if normals else np.uint32)
    table = np.ascontiguousarray(normal_table())
    if out.size:
        lib.diffc_stream(_p(out), c1.size, _p(c2), _p(c1), length, c3, seed & 0xFFFFFFFF, _p(table), int(normals),
                         _threads(threads))
    return out
