"""Benchmark cod's kernels against PyTorch: the Triton fused attention vs torch SDPA and the naive reference.

    python tools/bench_kernels.py --device cuda                 # released shape, bf16: B=2 (CFG), L=1024, G=16, d=72
    python tools/bench_kernels.py --device cuda --seq 4096      # 64x64 tokens
    python tools/bench_kernels.py --device cpu --seq 1024       # CPU (fp32 by default): reference paths only

Reports the best of --repeats runs in ms, achieved TFLOP/s (4 B G L^2 d) and % of --peak-tflops, and the max
absolute error of each output against the naive reference evaluated in fp32 on the same inputs. On the CPU the
Triton kernel runs only when TRITON_INTERPRET=1 is set (slow, and wrong for bfloat16: the interpreter cannot do
bf16 dots), so keep --seq small there.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from cod.kernels import attention, has_triton
from cod.kernels.attention import INTERPRETED


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v written out in fp32: the yardstick every output is compared against."""
    w = torch.softmax(torch.einsum("blgd,bmgd->bglm", q.float(), k.float()) / q.shape[-1] ** 0.5, -1)
    return torch.einsum("bglm,bmgd->blgd", w, v.float()).to(q.dtype)


def best_seconds(fn: Callable[[], torch.Tensor], device: str, repeats: int) -> float:
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fn()  # warm-up: Triton compiles on the first call
    sync()
    best = float("inf")
    calls = 10 if device.startswith("cuda") else 1  # back-to-back calls per timing: a GPU kernel is shorter than one sync
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on cuda (the inference dtype), float32 on cpu")
    ap.add_argument("--batch", type=int, default=2, help="2 = the CFG-doubled batch of one image")
    ap.add_argument("--seq", type=int, default=1024, help="tokens L (32x32 at 512 px)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=72)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="default: H100 SXM bf16 dense")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--tune", action="store_true",
                    help="also the Triton kernel at each (BLOCK_M, BLOCK_N) of 32/64/128 (the default is 64, 64)")
    a = ap.parse_args()

    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device == "cuda" else "float32"))
    torch.manual_seed(a.seed)
    shape = (a.batch, a.seq, a.heads, a.head_dim)
    q, k, v = (torch.randn(shape, device=a.device, dtype=dtype) for _ in range(3))
    flops = 4 * a.batch * a.heads * a.seq ** 2 * a.head_dim
    ref = naive(q, k, v).float()

    candidates = {"torch SDPA": lambda: attention(q, k, v, backend="reference"), "naive": lambda: naive(q, k, v)}
    notes = []
    if has_triton() and (a.device == "cuda" or INTERPRETED):
        candidates = {"triton fused": lambda: attention(q, k, v, backend="triton"), **candidates}
        if a.tune:
            from cod.kernels import attention_triton_forward

            for bm in (32, 64, 128):
                for bn in (32, 64, 128):
                    candidates[f"triton fused BLOCK_M {bm} BLOCK_N {bn}"] = \
                        (lambda bm=bm, bn=bn: attention_triton_forward(q, k, v, block_m=bm, block_n=bn))
        if a.device == "cpu":
            notes.append("Triton kernel run by the interpreter: its time says nothing about GPU speed")
    else:
        notes.append("Triton kernel skipped: needs a CUDA device, or TRITON_INTERPRET=1 for a slow CPU check")

    rows = []
    for name, fn in candidates.items():
        try:
            seconds = best_seconds(fn, a.device, a.repeats)
        except Exception as e:  # noqa: BLE001 - a block size that does not fit (shared memory) is a finding
            notes.append(f"{name}: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
            continue
        rows.append({"kernel": name, "ms": seconds * 1e3, "tflops": flops / seconds / 1e12,
                     "pct_peak": 100 * flops / seconds / 1e12 / a.peak_tflops,
                     "max_abs_err": (fn().float() - ref).abs().max().item()})

    machine = torch.cuda.get_device_name() if a.device == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    print(f"B={a.batch} L={a.seq} G={a.heads} d={a.head_dim} {dtype} on {machine}")
    for note in notes:
        print(f"({note})")
    print(f"| kernel | ms | TFLOP/s | % of {a.peak_tflops:g} | max abs err |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['ms']:.3f} | {r['tflops']:.3f} | {r['pct_peak']:.2f} | {r['max_abs_err']:.1e} |")
    if a.json:
        args = {**vars(a), "dtype": str(dtype).removeprefix("torch."), "json": str(a.json)}
        a.json.write_text(json.dumps({"args": args, "machine": machine, "flops": flops, "notes": notes,
                                      "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
