"""Peak memory (RSS) and time of encode and a 1-step decode at large image sizes, one fresh process per size.

    python tools/bench_memory.py                                  # tiny-pixel at 1024^2, 2048^2, 4000x3000
    python tools/bench_memory.py --preset tiny-pixel --sizes 512x512 --threads 1
    python tools/bench_memory.py --sizes 2048 --tile off                # whole-image decoding (default: auto)

Weights are random (memory and speed do not depend on them). Sizes that are not multiples of the model's size
multiple are padded up to one, as the codec does (4000x3000 is coded as 4000x3008). Peak RSS is read from
/proc/self/status (VmHWM, reset through /proc/self/clear_refs before each phase), the only measure that sees
PyTorch's CPU allocations; "base" is the process after the model is built and the image made. Prints a
markdown table; --json writes the rows. Linux only.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

GIB = 2 ** 30


def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def measure(preset: str, height: int, width: int, steps: int, threads: int, tile: str = "auto") -> dict:
    """Runs in the child process: one encode and one decode, each with its own peak."""
    import torch

    import cod

    torch.set_num_threads(threads)
    model = cod.new_model(preset)
    m = model.size_multiple
    ph, pw = math.ceil(height / m) * m, math.ceil(width / m) * m
    image = torch.rand(1, 3, ph, pw, generator=torch.Generator().manual_seed(0))
    row = {"preset": preset, "size": f"{width}x{height}", "coded": f"{pw}x{ph}", "steps": steps,
           "threads": threads, "tile": tile, "base_gib": _status("VmRSS") / GIB}
    _reset_peak()
    start = time.perf_counter()
    indices = model.encode(image)
    row["encode_s"] = time.perf_counter() - start
    row["encode_peak_gib"] = _status("VmHWM") / GIB
    _reset_peak()
    start = time.perf_counter()
    model.decode(indices, ph, pw, steps=steps, tile=tile)
    row["decode_s"] = time.perf_counter() - start
    row["decode_peak_gib"] = _status("VmHWM") / GIB
    return row


def parse_size(text: str) -> tuple[int, int]:
    """"WxH" or a single number for a square -> (height, width)."""
    w, _, h = text.partition("x")
    return int(h or w), int(w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-pixel")
    ap.add_argument("--sizes", nargs="+", default=["1024", "2048", "4000x3000"], help="WxH or N (square)")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tile", default="auto", help="decode tiling: auto, off or a window side in pixels")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one size, measured in this (fresh) process; the parent reads the JSON line
        print(json.dumps(measure(args.preset, *parse_size(args.sizes[0]), args.steps, args.threads, args.tile)))
        return
    rows = []
    for size in args.sizes:
        # A fresh process per size: peak RSS is per process, and freed memory is not always returned to the OS.
        out = subprocess.run([sys.executable, __file__, "--child", "--preset", args.preset, "--sizes", size,
                              "--steps", str(args.steps), "--threads", str(args.threads), "--tile", args.tile],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{size}: the child process failed\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| preset | image | coded as | threads | tile | base RSS GiB | encode s | encode peak GiB | "
          f"decode s ({args.steps} step) | decode peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['size']} | {r['coded']} | {r['threads']} | {r['tile']} | {r['base_gib']:.2f} | "
              f"{r['encode_s']:.2f} | {r['encode_peak_gib']:.2f} | {r['decode_s']:.2f} | {r['decode_peak_gib']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
