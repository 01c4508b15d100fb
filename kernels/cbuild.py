"""Building cod's small C kernels (kernels/*.c) with the system C compiler at first use, and caching them.

A library is cached in cod's private cache folder (or, when there is none, built into a fresh private temporary
folder for this process: a shared, predictable path could be planted) under a name that hashes the source, the
compiler's version, the flags and this CPU's feature flags (it is built for the machine it runs on:
-march=native), so a cache shared between machines never runs code built for another CPU. Every kernel has a
NumPy reference that gives the same results; `CompiledLibrary.get()` is None when the kernel cannot be built (no
compiler, a failed build) or when the user asked for the reference with the kernel's environment variable
(e.g. COD_RANS_CPU=numpy), and callers then use the reference.
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
from typing import Callable

import numpy as np

BASE_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c99", "-fno-fast-math"]


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


def build(source: Path, flags: list[str]) -> ctypes.CDLL:
    """Compile `source` into a shared library (or reuse the cached one) and load it."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([source.read_bytes(), " ".join(flags).encode(), version.encode(),
                                     _cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:24]
    from cod.files import private_cache_dir

    folder = private_cache_dir()
    if folder is not None:
        folder = folder / "kernels"
        folder.mkdir(exist_ok=True, mode=0o700)
    else:
        folder = Path(tempfile.mkdtemp(prefix="cod-kernels-"))
    lib = folder / f"{source.stem}-{key}.so"
    if not lib.exists():
        tmp = folder / f".{source.stem}-{key}-{os.getpid()}.so"
        result = subprocess.run([cc, *flags, str(source), "-o", str(tmp)], capture_output=True, text=True,
                                timeout=300)
        if result.returncode:
            raise RuntimeError(f"{cc} failed: {' '.join(result.stderr.split())[:400]}")
        os.replace(tmp, lib)
    return ctypes.CDLL(str(lib))


class CompiledLibrary:
    """One C kernel: built once per process on first use, thread-safe; `declare` sets the functions' argtypes."""

    def __init__(self, source: Path, flags: list[str], env: str, declare: Callable[[ctypes.CDLL], None]):
        self.source, self.flags, self.env, self.declare = source, flags, env, declare
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self.error: str | None = None

    def get(self) -> ctypes.CDLL | None:
        if os.environ.get(self.env, "").lower() == "numpy":
            return None
        with self._lock:
            if self._lib is None and self.error is None:
                try:
                    lib = build(self.source, self.flags)
                    self.declare(lib)
                    self._lib = lib
                except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
                    self.error = str(e)
        return self._lib

    def require(self) -> ctypes.CDLL:
        lib = self.get()
        if lib is None:
            raise RuntimeError(f"the compiled kernel {self.source.name} is unavailable "
                               f"({self.error or self.env + '=numpy'})")
        return lib


def pointer(a: np.ndarray | None):
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)
