"""Time one whole decode the way `cod decompress` runs it (no baseline, no variants), with the matrix-product peak
of the same dtype timed just before and after: for decodes too long to repeat (a 25-step XL decode on a CPU).

    python tools/time_decode.py --preset pixel-xl --size 512 --steps 25 --precision bf16 --threads 2
    python tools/time_decode.py --device cuda --preset pixel-xl --batch 16 --precision bf16 --graphs --repeats 2

Random weights (speed does not depend on them). Work is cod.limits.decode_tflop, which counts every step as a
guidance pair; steps where guidance is off run one half, so the achieved rate it implies is an upper bound.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from bench_codec import build, matmul_peak, sync
from cod.model import COMPILE_MODES  # this folder's codec benchmark: the same model and peak



def profile_pass(model, indices, side: int, device: torch.device, top: int = 25) -> None:
    """One guided pass of the denoiser (both CFG halves), eager, under torch.profiler: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    cond = torch.cat([model.unconditional_condition(side, side), model.codec.decode_indices(indices)])
    x = model.initial_noise(2, side, side)
    t = torch.full((2,), 0.5, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        model.denoiser(x, t, cond=cond)
        sync(device)
        with profile(activities=activities) as prof:
            model.denoiser(x, t, cond=cond)
            sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60))


def _setting(value: str):
    """An inductor setting's value from the command line: true/false, an integer, a float, else the string."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _dynamo_graphs() -> int:
    """How many graphs dynamo compiled in this process (regional compilation: one per region and shape)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="pixel-xl")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "int8", "fp8"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1, help="images decoded together (throughput: images/s)")
    ap.add_argument("--graphs", action="store_true", help="replay the network from CUDA graphs (cod.cuda_graphs)")
    ap.add_argument("--compile", nargs="?", const="whole", choices=COMPILE_MODES,
                    help="torch.compile the denoiser (compile time reported): the whole forward as one graph (the "
                         "default, as cod.load(compile=True)) or only its repeated regions (compile_regions)")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile's mode (e.g. max-autotune-no-cudagraphs: inductor tunes the matrix products)")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="set torch._inductor.config.KEY (true/false, numbers, strings), e.g. coordinate_descent_tuning=true")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed decodes after the first (default 1: the first decode is the one timed); "
                         "with more, the first is a warm-up and the best of the rest is reported")
    ap.add_argument("--profile", action="store_true",
                    help="also one guided network pass (eager) under torch.profiler: the top kernels by device time")
    a = ap.parse_args()
    if (a.inductor or a.compile_mode) and not a.compile:
        ap.error("--inductor and --compile-mode apply to a compiled decode: add --compile")
    if a.threads:
        torch.set_num_threads(a.threads)
    from cod.errors import PrecisionError
    from cod.limits import decode_tflop
    from cod.precision import check_precision

    device = torch.device(a.device)
    try:
        check_precision(a.precision, device)
    except PrecisionError as e:
        raise SystemExit(f"time_decode: {e}") from None
    model = build(a.preset, device)
    model.set_precision(a.precision)
    model.use_cuda_graphs(a.graphs)
    if a.compile:
        import torch._inductor.config as inductor_config

        for item in a.inductor:
            key, eq, value = item.partition("=")
            if not eq or not hasattr(inductor_config, key):
                raise SystemExit(f"time_decode: --inductor {item}: expected KEY=VALUE with KEY a setting of "
                                 f"torch._inductor.config")
            setattr(inductor_config, key, _setting(value))
        model.compile_denoiser(regional=a.compile == "regional",
                               **({"mode": a.compile_mode} if a.compile_mode else {}))
    m = model.size_multiple
    side = -(-a.size // m) * m
    grid = model.encode(torch.zeros(1, 3, side, side, device=device)).shape[1:]
    indices = torch.randint(0, model.codec.bottleneck.num_codes, (a.batch, *grid), device=device)
    dtype = torch.float32 if a.precision == "fp32" else torch.bfloat16
    before = matmul_peak(device, dtype) / 1e9
    times = []
    for _ in range(1 if a.repeats <= 1 else a.repeats + 1):
        sync(device)
        t = time.perf_counter()
        model.decode(indices, side, side, steps=a.steps)
        sync(device)
        times.append(time.perf_counter() - t)
    seconds = times[0] if len(times) == 1 else min(times[1:])
    after = matmul_peak(device, dtype) / 1e9
    tflop = a.batch * decode_tflop(model, side, side, a.steps)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} thread(s)"
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine}, torch {torch.__version__}, load "
          f"{os.getloadavg()[0]:.1f}; first decode {times[0]:.3f} s"
          + (f" (graphs recorded: {model.cuda_graph_counts()[0]})" if a.graphs else "")
          + (f"; compiled {a.compile}{' ' + a.compile_mode if a.compile_mode else ''}"
             f"{' ' + ' '.join(a.inductor) if a.inductor else ''}: {_dynamo_graphs()} graphs, compile ~"
             f"{times[0] - seconds:.1f} s" if a.compile and len(times) > 1 else "") + "\n")
    if a.profile:
        profile_pass(model, indices[:1], side, device)
    print("| preset | size | precision | variant | batch | steps | decode s | images/s | TFLOP counted | "
          "GFLOP/s (at most) | peak GFLOP/s before / after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    variant = "+".join(["eager" if not a.compile else f"compile ({a.compile})"] + (["graphs"] if a.graphs else []))
    print(f"| {a.preset} | {side}x{side} | {a.precision} | {variant} | {a.batch} | {a.steps} | {seconds:.3f} | "
          f"{a.batch / seconds:.2f} | {tflop:.2f} | {tflop * 1e3 / seconds:.0f} | {before:.0f} / {after:.0f} |")


if __name__ == "__main__":
    main()
