"""Benchmark cod's kernels against PyTorch: the Triton fused attention vs torch SDPA and the naive reference.

    python tools/bench_kernels.py --device cuda --dtype bfloat16            # released shape: B=2, L=1024, G=16, d=72
    python tools/bench_kernels.py --device cpu --seq 256                     # CPU: reference paths only

Reports ms, achieved TFLOP/s (4 B G L^2 d) and % of --peak-tflops, and the max error against the reference.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cod.kernels import attention, has_triton  # noqa: E402


def naive(q, k, v):
    w = torch.softmax(torch.einsum("blgd,bmgd->bglm", q.float(), k.float()) / q.shape[-1] ** 0.5, -1)
    return torch.einsum("bglm,bmgd->blgd", w, v.float()).to(q.dtype)


def timeit(fn, device, repeats):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=72)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM bf16 dense")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype) if a.device == "cuda" else torch.float32
    q, k, v = (torch.randn(a.batch, a.seq, a.heads, a.head_dim, device=a.device, dtype=dtype) for _ in range(3))
    flops = 4 * a.batch * a.heads * a.seq ** 2 * a.head_dim
    ref = naive(q, k, v).float()
    candidates = {"torch SDPA": lambda: attention(q, k, v, backend="reference"), "naive": lambda: naive(q, k, v)}
    triton_ok = has_triton() and (a.device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    if triton_ok:
        candidates = {"triton fused": lambda: attention(q, k, v, backend="triton"), **candidates}
    else:
        print("(Triton kernel skipped: needs a CUDA device, or TRITON_INTERPRET=1 for a slow CPU check)")
    rows = []
    for name, fn in candidates.items():
        s = timeit(fn, a.device, a.repeats)
        err = (fn().float() - ref).abs().max().item()
        rows.append({"kernel": name, "ms": s * 1e3, "tflops": flops / s / 1e12, "max_err": err})
    print(f"B={a.batch} L={a.seq} G={a.heads} d={a.head_dim} {a.device} {dtype}")
    print("| kernel | ms | TFLOP/s | % peak | max err |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['ms']:.3f} | {r['tflops']:.3f} | {100 * r['tflops'] / a.peak_tflops:.1f} | "
              f"{r['max_err']:.1e} |")
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
