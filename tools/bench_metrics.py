"""Peak memory and time of PSNR + MS-SSIM: cod.metrics against the float64 torchmetrics path it replaced.

    python tools/bench_metrics.py                                  # 768x512, 1280x1024, 4000x3000
    python tools/bench_metrics.py --sizes 512x384 --limit-gb 4 --threads 1

Each (size, implementation) runs in a fresh process on a random image and a noisy copy of it, and reports its
peak RSS (VmHWM, torch imported included), its RSS just before the metrics, and their seconds. The torchmetrics
case is skipped where its memory, extrapolated per megapixel from the largest size it ran at (or from 7.8 GB at
1.3 MP before any), would pass --limit-gb.
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def status_gib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident so far) of this process."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 2 ** 20


def child(impl: str, h: int, w: int, threads: int | None) -> None:
    import math

    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    b = np.empty_like(a)
    for r in range(0, h, 256):  # in blocks, so that making the pair does not set the peak
        b[r:r + 256] = np.clip(a[r:r + 256] + rng.integers(-8, 9, a[r:r + 256].shape, dtype=np.int16), 0, 255)
    if impl == "cod.metrics":
        from cod.metrics import ms_ssim, psnr
    else:  # the code cod/codec/evaluate.py ran before cod.metrics
        from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as msssim

        def psnr(a, b):
            mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
            return 10 * math.log10(255.0 ** 2 / mse)

        def ms_ssim(a, b):
            ta, tb = (torch.tensor(x).permute(2, 0, 1)[None].double() for x in (a, b))
            return float(msssim(ta, tb, data_range=255.0))
    ms_ssim(a[:176, :176], b[:176, :176])  # one-off costs (thread pool start-up) are not the metric's
    before = status_gib("VmRSS")
    start = time.perf_counter()
    scores = psnr(a, b), ms_ssim(a, b)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_gib": status_gib("VmHWM"), "before_gib": before,
                      "psnr": scores[0], "ms_ssim": scores[1]}))


def run(impl: str, h: int, w: int, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, str(h), str(w)]
    cmd += ["--threads", str(threads)] if threads else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="768x512,1280x1024,4000x3000", help="comma-separated WxH")
    ap.add_argument("--limit-gb", type=float, default=16.0, help="skip torchmetrics where it would need more")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]), args.threads)
        return
    print("| size | MP | implementation | peak RSS (GiB) | RSS before the metrics | seconds | MS-SSIM | PSNR |")
    print("|---|---|---|---|---|---|---|---|")
    gib_per_mp = 6.0  # torchmetrics' memory above the process's, per megapixel
    for size in args.sizes.split(","):
        w, h = map(int, size.split("x"))
        mp = w * h / 1e6
        for impl in ("cod.metrics", "torchmetrics float64"):
            if impl != "cod.metrics" and gib_per_mp * mp > args.limit_gb:
                print(f"| {size} | {mp:.2f} | {impl} | skipped: ~{gib_per_mp * mp:.0f} GiB extrapolated | | | | |")
                continue
            r = run(impl, h, w, args.threads)
            if impl != "cod.metrics":
                gib_per_mp = (r["peak_gib"] - r["before_gib"]) / mp
            print(f"| {size} | {mp:.2f} | {impl} | {r['peak_gib']:.2f} | {r['before_gib']:.2f} | "
                  f"{r['seconds']:.2f} | {r['ms_ssim']:.12f} | {r['psnr']:.6f} |", flush=True)


if __name__ == "__main__":
    main()
