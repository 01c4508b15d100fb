"""The compiled CPU path of DiffC's candidate scoring (kernels/diffc_cpu.c), built with the system C compiler
at first use and cached; cod.diffc.philox is its NumPy reference (bit-identical words and normals).

The library is cached in cod's private cache folder (or, when there is none, built into a fresh private temporary
folder for this process) under a name that hashes the source, the compiler's
version, the flags and this CPU's feature flags (it is built for the machine it runs on: -march=native), so a
cache shared between machines never runs code built for another CPU. Without a C compiler `available()` is
False and cod.diffc uses NumPy (about 10x slower). COD_DIFFC_CPU=numpy forces that.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("diffc_cpu.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99", "-fno-fast-math"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu_flags().encode(),
                                     platform.machine().encode()])).hexdigest()[:24]
    from cod.files import private_cache_dir

    folder = private_cache_dir()
    if folder is not None:
        folder = folder / "kernels"
        folder.mkdir(exist_ok=True, mode=0o700)
    else:  # no private cache: a fresh folder of this process's own (a shared, predictable path could be planted)
        folder = Path(tempfile.mkdtemp(prefix="cod-kernels-"))
    lib = folder / f"diffc_cpu-{key}.so"
    if not lib.exists():
        tmp = folder / f".diffc_cpu-{key}-{os.getpid()}.so"
        result = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True,
                                timeout=300)
        if result.returncode:
            raise RuntimeError(f"{cc} failed: {' '.join(result.stderr.split())[:400]}")
        os.replace(tmp, lib)
    dll = ctypes.CDLL(str(lib))
    i64, u32, ptr = ctypes.c_int64, ctypes.c_uint32, ctypes.c_void_p
    dll.diffc_score.argtypes = [ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, u32, u32, ctypes.c_int]
    dll.diffc_stream.argtypes = [ptr, i64, ptr, ptr, i64, u32, u32, ptr, ctypes.c_int, ctypes.c_int]
    return dll


def library() -> ctypes.CDLL | None:
    """The compiled library, or None (no compiler, a failed build, or COD_DIFFC_CPU=numpy); see error()."""
    global _lib, _error
    if os.environ.get("COD_DIFFC_CPU", "").lower() == "numpy":
        return None
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = _build()
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _error = str(e)
    return _lib


def available() -> bool:
    return library() is not None


def error() -> str | None:
    return _error


def _threads(threads: int | None) -> int:
    if threads is not None:
        return max(1, int(threads))
    import torch

    return max(1, torch.get_num_threads())


def _p(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def score_chunks(r_perm: np.ndarray, starts, dims, counts, seed: int, c3: int, threads: int | None = None) -> np.ndarray:
    """float32 [sum(counts)]: the scores of every candidate of every chunk (see kernels/philox.score_chunks)."""
    from cod.diffc.tables import normal_table

    lib = library()
    if lib is None:
        raise RuntimeError(f"the compiled DiffC CPU kernel is unavailable ({_error or 'COD_DIFFC_CPU=numpy'})")
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

    lib = library()
    if lib is None:
        raise RuntimeError(f"the compiled DiffC CPU kernel is unavailable ({_error or 'COD_DIFFC_CPU=numpy'})")
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
