"""One-step decode speed (CoD-Lite, One-step CoD): indices -> image, the whole decompress path of `cod decompress`
(codebook rows, the codec's decoder, one pass of the generator), per case, precision and modulation:

  folded  the t = 0 adaLN modulation folded into constants (what cod.load serves)
  live    the blocks compute it from the time embedding at every call (the release before its eval() cache)

    python tools/bench_onestep.py                                   # the cases of docs/benchmarks.md
    python tools/bench_onestep.py --cases cod-lite-0.0039@720x480 --precision fp32,bf16 --repeats 5
    python tools/bench_onestep.py --cases onestep-cod-0.0039@512x512 --precision bf16 --modulation folded
    python tools/bench_onestep.py --cases cod-lite-0.0039@720x480 --modulation folded --stream-budgets-mib 1024,32

A case is PRESET@WIDTHxHEIGHT (cod.models.onestep_presets); the image is padded to the model's size multiple as
the codec does (720x480 -> 736x480 for ds 32). Weights are random (seed 0): speed does not depend on them. All
variants of a case are built, decoded once each to warm up, then timed round-robin --repeats times (so that a
changing load on a shared machine hits every variant alike); the best time of each is reported, with the FLOPs of
the decode (cod.limits.decode_tflop: matrix products and convolutions) and the achieved GFLOP/s. Times are
wall-clock on --threads threads; "core-s" is time x threads, the single-core cost. The load average before and
after each case is printed: compare variants only within one run.

This machine's matrix-product peak is measured in the same loop, round-robin with the decodes (a --peak-size
square matrix product in float32 and in bfloat16, best of the same repeats), so that each decode is also reported
as a fraction of the peak of its compute dtype measured beside it under the same load ("% peak"; bf16 decodes
against the bfloat16 peak, although their condition decoder runs in float32). --compile adds variants under
torch.compile (OneStepModel.compile_denoiser); their first decode compiles, and the compile time reported is that
decode minus the best compiled decode.

Published figures (spec one-step.md; the release's README): CoD-Lite 720x480 decodes in 13 ms on an A100 and in
65 ms on a many-core EPYC.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

from bench_codec import sync  # this folder's codec benchmark
from cod.limits import decode_tflop
from cod.model import OneStepModel, build_config
from cod.models.onestep_presets import get_onestep_preset
from cod.precision import prepare_denoiser

DEFAULT_CASES = "cod-lite-0.0039@720x480,cod-lite-0.0039@1920x1024,onestep-cod-0.0039@512x512"
PUBLISHED = {("cod-lite-0.0039", 720, 480): "release: 13 ms A100, 65 ms many-core EPYC"}


def build(preset: str) -> OneStepModel:
    torch.manual_seed(0)
    spec = get_onestep_preset(preset)
    return OneStepModel(build_config(spec, preset), spec.build().eval())


def variant(base: OneStepModel, precision: str, modulation: str, compiled: bool = False,
            graphs: bool = False) -> OneStepModel:
    model = copy.deepcopy(base)
    model.use_cuda_graphs(graphs)
    if modulation == "folded":
        model.fold_modulation()
    if precision != "fp32":
        if modulation == "folded":
            model.set_precision(precision)
        else:  # set_precision folds first (folded vectors are computed in float32): convert the live model directly
            prepare_denoiser(model.denoiser, precision)
            model.precision = precision
    return model.compile_denoiser() if compiled else model


PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_products(size: int, device: torch.device) -> dict[str, callable]:
    """A size x size matrix product per compute dtype (2 size^3 FLOP each), the arithmetic peak a decode is compared
    with."""
    operands = {p: torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(device, d)
                for p, d in PEAK_DTYPES.items()}
    return {("peak", p): (lambda a=a: a @ a) for p, a in operands.items()}


def with_stream_budget(model: OneStepModel, mib: int | None):
    """model.decode, with CoD-Lite's per-pixel stream in runs of at most `mib` MiB (None: the default) on the
    model's device kind (cod.models.dconv.PIXEL_STREAM_BUDGET_BYTES; no effect on One-step CoD)."""
    import cod.models.dconv as dconv

    kind = "cpu" if model.device.type == "cpu" else "accelerator"
    default = dconv.PIXEL_STREAM_BUDGET_BYTES[kind]

    def decode(*args, **kwargs):
        dconv.PIXEL_STREAM_BUDGET_BYTES[kind] = default if mib is None else mib << 20
        try:
            return model.decode(*args, **kwargs)
        finally:
            dconv.PIXEL_STREAM_BUDGET_BYTES[kind] = default

    return decode


def time_decodes(decodes: dict, indices: torch.Tensor, height: int, width: int, repeats: int,
                 products: dict | None = None, device: torch.device = torch.device("cpu")) -> tuple[dict, dict]:
    """Best time per decode function (and per matrix product of `products`), all interleaved round-robin after two
    warm-up calls each (allocator, oneDNN primitive caches, compilation; CUDA graphs record at the second call);
    also the time of the first call. On CUDA every timing is bracketed by synchronisations."""
    calls = {key: (lambda d=decode: d(indices, height, width)) for key, decode in decodes.items()}
    calls.update(products or {})
    best, first = dict.fromkeys(calls, float("inf")), {}
    with torch.no_grad():
        for key, call in calls.items():
            sync(device)
            start = time.perf_counter()
            call()
            sync(device)
            first[key] = time.perf_counter() - start
            call()
        for _ in range(repeats):
            for key, call in calls.items():
                sync(device)
                start = time.perf_counter()
                call()
                sync(device)
                best[key] = min(best[key], time.perf_counter() - start)
    return best, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated PRESET@WIDTHxHEIGHT")
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--modulation", default="folded,live")
    ap.add_argument("--compile", action="store_true", help="also time each variant under torch.compile")
    ap.add_argument("--graphs", action="store_true", help="also each variant replayed from CUDA graphs (CUDA)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stream-budgets-mib", default="",
                    help="comma-separated: also each variant with CoD-Lite's per-pixel stream in runs of this many MiB "
                         "(cod.models.dconv.PIXEL_STREAM_BUDGET_BYTES), timed side by side; default: the built-in")
    ap.add_argument("--peak-size", type=int, default=2048, help="side of the peak matrix products (0: none)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine())
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{machine}, torch {torch.__version__}, {args.threads} thread(s)")
    rows = []
    for case in args.cases.split(","):
        preset, size = case.split("@")
        width, height = (int(v) for v in size.split("x"))
        base = build(preset).to(device)
        m = base.size_multiple
        ph, pw = -(-height // m) * m, -(-width // m) * m
        h, w = base.codec.index_grid(ph, pw)
        indices = torch.randint(0, base.codec.bottleneck.num_codes, (1, h, w),
                                generator=torch.Generator().manual_seed(0)).to(device)
        base._fingerprint = "0" * 64  # not needed for timing; skips hashing the weights
        tflop = decode_tflop(base, ph, pw, 1)
        load = os.getloadavg()[0]
        print(f"\n{preset} {width}x{height} (decoded at {pw}x{ph}, {tflop * 1e3:.1f} GFLOP), load {load:.1f}"
              + (f"; {PUBLISHED[(preset, width, height)]}" if (preset, width, height) in PUBLISHED else ""))
        print("\n| precision | modulation | time (s) | core-s | GFLOP/s | % peak | compile (s) |"
              "\n|---|---|---|---:|---:|---:|---:|")
        budgets = [int(b) for b in args.stream_budgets_mib.split(",") if b.strip()] or [None]
        models = {(precision, modulation, compiled, graphs): variant(base, precision, modulation, compiled, graphs)
                  for precision in args.precision.split(",") for modulation in args.modulation.split(",")
                  for compiled in ((False, True) if args.compile else (False,))
                  for graphs in ((False, True) if args.graphs else (False,))}
        decodes = {key + (mib,): with_stream_budget(m, mib) for key, m in models.items() for mib in budgets}
        del base
        products = peak_products(args.peak_size, device) if args.peak_size else {}
        times, first = time_decodes(decodes, indices, ph, pw, args.repeats, products, device)
        images = {key: decode(indices, ph, pw) for key, decode in decodes.items()}
        del models, decodes
        peak_gflops = {p: 2 * args.peak_size ** 3 / times[("peak", p)] / 1e9 for p in PEAK_DTYPES
                       if ("peak", p) in times}
        for key, t in times.items():
            if key[0] == "peak":
                continue
            precision, modulation, compiled, graphs, mib = key
            twin = None  # a graphs variant's image against the same variant's eager one: must be equal
            if graphs:
                twin = int((images[key].int() - images[key[:3] + (False, mib)].int()).abs().max())
            runs = None  # a variant in other runs than the first budget's, against that one's image
            if mib != budgets[0]:
                runs = int((images[key].int() - images[key[:4] + (budgets[0],)].int()).abs().max())
            gflops = tflop * 1e3 / t
            peak = peak_gflops.get(precision)
            compile_s = first[key] - t if compiled else None
            rows.append({"preset": preset, "width": width, "height": height, "padded": [pw, ph],
                         "precision": precision, "modulation": modulation, "compiled": compiled, "seconds": t,
                         "core_seconds": t * args.threads, "gflop": tflop * 1e3, "gflops": gflops,
                         "peak_gflops": peak, "fraction_of_peak": gflops / peak if peak else None,
                         "compile_seconds": compile_s, "threads": args.threads, "load_before": load,
                         "graphs": graphs, "max_abs_levels_vs_eager_twin": twin, "device": str(device),
                         "stream_budget_mib": mib, "max_abs_levels_vs_first_budget": runs})
            label = (modulation + (" compiled" if compiled else "")
                     + (f" graphs ({twin} levels from eager)" if graphs else "")
                     + ("" if mib is None else f" runs of {mib} MiB")
                     + ("" if runs is None else f" ({runs} levels from {budgets[0]} MiB)"))
            print(f"| {precision} | {label} | {t:.3f} | {t * args.threads:.3f} "
                  f"| {gflops:.1f} | {f'{100 * gflops / peak:.0f} %' if peak else '-'} "
                  f"| {f'{compile_s:.1f}' if compiled else '-'} |")
        for p, g in peak_gflops.items():
            print(f"peak ({args.peak_size}^2 matrix product, {p}, same loop): {g:.0f} GFLOP/s")
        for precision in args.precision.split(","):
            live, folded = (times.get((precision, m, False, False, budgets[0])) for m in ("live", "folded"))
            if live and folded:
                print(f"{precision}: folded is {live / folded:.2f}x the speed of live")
        print(f"load after: {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine,
                                         "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
