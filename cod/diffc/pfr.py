"""Reverse-channel coding of one step: the truncated Poisson functional representation over shared candidates
(spec §4.4, §6.7).

Chunk c of a step offers N = 2^b_c candidates z_n ~ N(0, I_{d_c}) (Philox domain 1). The encoder scores them,
w_n = <z_n, r_c>, draws private arrival times T_n = E_0 + ... + E_n (domain 2) and sends
n* = argmin_n (ln T_n - w_n) (lowest n on ties); the decoder regenerates candidate n* alone. Scoring runs on one
of three backends that generate identical candidates: "triton" (CUDA), "cpu" (the compiled kernel) and "numpy"
(the reference). Only the reduction order of the scores differs, so a near-tie may resolve differently
between backends: both choices are valid files.
"""
from __future__ import annotations

import numpy as np

from cod.diffc import philox
from cod.diffc.layout import StepLayout

BACKENDS = ("auto", "triton", "cpu", "numpy")
NUMPY_TILE = 1 << 22  # candidate-dims per NumPy tile (16 MB of normals)


def log_arrival_times(seed: int, k: int, chunk: int, count: int) -> np.ndarray:
    """float64 [count]: ln T_n of a chunk's candidates (encoder only; never in a file)."""
    u = philox.arrival_uniforms(seed, k, chunk, count).astype(np.float64)
    return np.log(np.cumsum(-np.log((u + 0.5) / 2.0 ** 32)))


def resolve_backend(backend: str, device=None) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"DiffC scoring backend must be one of {BACKENDS}, got '{backend}'")
    if backend != "auto":
        return backend
    if device is not None and getattr(device, "type", str(device)).startswith("cuda"):
        from cod.kernels import philox as triton_philox

        if triton_philox.triton is not None:
            return "triton"
    from cod.kernels import diffc_cpu

    return "cpu" if diffc_cpu.available() else "numpy"


def score(seed: int, k: int, lay: StepLayout, r_perm, backend: str = "auto", device=None) -> np.ndarray:
    """float32 [sum of 2^b_c]: every candidate's score, chunk after chunk. r_perm: the residual in chunk order
    (a NumPy array, or a torch tensor on the device for the Triton backend)."""
    backend = resolve_backend(backend, device)
    c3 = philox.c3_word(philox.CANDIDATES, k)
    if backend == "triton":
        import torch

        from cod.kernels import philox as triton_philox

        r = torch.as_tensor(r_perm, dtype=torch.float32, device=device)
        return triton_philox.score_chunks(r, lay.starts, lay.dims, lay.counts, seed, c3).cpu().numpy()
    r = np.asarray(r_perm.cpu() if hasattr(r_perm, "cpu") else r_perm, dtype=np.float32)
    if backend == "cpu":
        from cod.kernels import diffc_cpu

        return diffc_cpu.score_chunks(r, lay.starts, lay.dims, lay.counts, seed, c3)
    out = []
    for c, (start, d, count) in enumerate(zip(lay.starts, lay.dims, lay.counts)):
        rc = r[start:start + d]
        step = max(1, NUMPY_TILE // d)
        out += [philox.candidate_normals(seed, k, c, np.arange(n0, min(count, n0 + step)), d) @ rc
                for n0 in range(0, count, step)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def select(seed: int, k: int, lay: StepLayout, r_perm, backend: str = "auto", device=None) -> list[int]:
    """The transmitted index n*_c of every chunk of a step."""
    scores = score(seed, k, lay, r_perm, backend, device)
    out, pos = [], 0
    for c, count in enumerate(lay.counts):
        race = log_arrival_times(seed, k, c, count) - scores[pos:pos + count].astype(np.float64)
        out.append(int(np.argmin(race)))
        pos += count
    return out


def regenerate(seed: int, k: int, lay: StepLayout, indices) -> np.ndarray:
    """float32 [D]: the chosen candidates of all chunks, in chunk order (scatter with the partition's order)."""
    if not lay.chunks:
        return np.zeros(0, np.float32)
    longest = max(lay.dims)
    rows = philox.candidate_normals_rows(seed, k, np.arange(lay.chunks), np.asarray(indices, dtype=np.uint64),
                                         longest)
    return np.concatenate([rows[c, :d] for c, d in enumerate(lay.dims)])


def step_sample(seed: int, k: int, lay: StepLayout, indices, order: np.ndarray | None, D: int) -> np.ndarray:
    """float32 [D] in flat order: the step's z (the shared prior draw of domain 5 when the budget is 0)."""
    if not lay.chunks:
        return philox.fallback_normals(seed, k, D)
    z = np.empty(D, dtype=np.float32)
    z[order] = regenerate(seed, k, lay, indices)
    return z
