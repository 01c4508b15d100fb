"""Time one whole decode the way `cod decompress` runs it (no baseline, no variants), with the matrix-product peak
of the same dtype timed just before and after: for decodes too long to repeat (a 25-step XL decode on a CPU).

    python tools/time_decode.py --preset pixel-xl --size 512 --steps 25 --precision bf16 --threads 2

Random weights (speed does not depend on them). Work is cod.limits.decode_tflop, which counts every step as a
guidance pair; steps where guidance is off run one half, so the achieved rate it implies is an upper bound.
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="pixel-xl")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "int8"])
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from cod.limits import decode_tflop
    from cod.model import new_model

    model = new_model(a.preset).eval()
    model.set_precision(a.precision)
    m = model.size_multiple
    side = -(-a.size // m) * m
    indices = torch.randint(0, model.codec.bottleneck.num_codes, (1, *model.encode(torch.zeros(1, 3, side, side))
                                                                    .shape[1:]))
    dtype = torch.float32 if a.precision == "fp32" else torch.bfloat16
    before = peak(dtype)
    t = time.perf_counter()
    model.decode(indices, side, side, steps=a.steps)
    seconds = time.perf_counter() - t
    after = peak(dtype)
    tflop = decode_tflop(model, side, side, a.steps)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {torch.get_num_threads()} thread(s), load "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| preset | size | precision | steps | decode s | TFLOP counted | GFLOP/s (at most) | peak before / after |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {a.preset} | {side}x{side} | {a.precision} | {a.steps} | {seconds:.2f} | {tflop:.2f} | "
          f"{tflop * 1e3 / seconds:.0f} | {before:.0f} / {after:.0f} |")

if __name__ == "__main__":
    main()
