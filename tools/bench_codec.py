"""Encode and decode speed of CoD per preset, image size and precision, against its anchors, all in one run:

  - the baseline: plain float32 eager decoding with the release's per-step work (both CFG halves at every step,
    the guidance formula always: `exact=True`; PixNerDiT's per-pixel stage in the release's layout), timed interleaved with every variant, so that speed-ups are ratios
    taken side by side on the same (possibly busy) machine;
  - the variants: each --precision, decoding the way cod does by default (the unconditional half skipped where
    guidance is off), and with --compile the same under torch.compile (inductor), with its compile time;
  - the physical limit: FLOPs per decode (cod.flops: matrix products and convolutions, 2 per multiply-add, counted
    on the meta device for the work each variant really does) and the achieved FLOP/s as a fraction of the peak of
    this machine, measured in the same run with a large float32 and bfloat16 matrix product;
  - the error of each variant's decoded image against the float32 baseline's (max abs difference in 8-bit levels
    and PSNR between the two decodes), and the official fixture's forward-pass parity.

    python tools/bench_codec.py --presets tiny-pixel,pixel-s --sizes 256,512 --steps 25 --precision fp32,bf16,int8
    python tools/bench_codec.py --presets pixel-xl --sizes 256 --steps 2 --precision fp32,bf16   # CPU: few steps
    python tools/bench_codec.py --device cuda --presets pixel-xl,latent-xl --sizes 512 --steps 25 \\
        --precision fp32,bf16,int8,fp8 --json codec.json

Weights are random (seed 0; speed does not depend on them; a latent preset's SD-VAE too). Decode times are per
image, the best of --repeats after a warm-up decode (which fills the unconditional-condition cache, and compiles
under --compile). When --steps is below --extrapolate-to (default 25), the table also gives the time of a decode
with that many steps, extrapolated from the measured passes: the fixed part of the measured decode (its time minus
its network passes) plus the 25-step schedule's passes, each at the measured time of a guided (two-half) or
unguided (one-half) pass. Those columns are labelled "est.". On CUDA every timing is bracketed by
torch.cuda.synchronize(). "speed-up (passes)" compares the network passes of the schedule alone (each pass the
best of --repeats short timings), which a busy machine disturbs less than whole decodes.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

import cod
from cod.flops import count_flops
from cod.precision import PRECISIONS, check_precision

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn, *args, **kwargs):
    sync(device)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return out, time.perf_counter() - start


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matrix product (best of several), this machine's practical peak for the dtype."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = math.inf
    for _ in range(3 if device.type == "cpu" else 10):
        _, s = timed(device, torch.mm, a, b)
        best = min(best, s)
    return 2 * n ** 3 / best


def fixture_parity() -> float | None:
    """Max relative error of our float32 forward pass on the official pixel fixture (None without ../shared)."""
    from safetensors.torch import load_file

    from cod.compat.fill_rule import apply_fill_rule
    from cod.models.pixnerdit import PixNerDiT

    fx = Path(os.environ.get("COD_SHARED", ROOT.parent / "shared")) / "fixtures" / "cod-reference"
    if not fx.is_dir():
        return None
    manifest = json.loads((fx / "pixel_ds32_up2x.json").read_text())
    tensors = load_file(str(fx / "pixel_ds32_up2x.safetensors"))
    net = apply_fill_rule(PixNerDiT(**manifest["constructor_kwargs"])).eval()
    y = (tensors["in.y_u8"].float() / 255).to(torch.bfloat16).float()
    with torch.no_grad():
        out, _ = net(tensors["in.x_t"], tensors["in.t"], y)
    ref = tensors["fwd.out"]
    return ((out - ref).abs().max() / max(1.0, ref.abs().max().item())).item()


def build(preset: str, device: torch.device) -> cod.CoDModel:
    torch.manual_seed(0)
    model = cod.new_model(preset)
    model.fingerprint = f"bench-{preset}"  # never saved: skip hashing the weights
    if model.family == "latent" and model.latent is None:  # the SD-VAE has no bundled weights: random ones
        from cod.models.vae import VAE_PRESETS, AutoencoderKL, LatentSpace

        model.latent = LatentSpace(AutoencoderKL(VAE_PRESETS[model.config["latent"]["vae_preset"]]),
                                   model.config["latent"]["scale"])
    return model.to(device).eval()


def work(model: cod.CoDModel, size: int) -> dict[str, float]:
    """FLOPs of one guided pass (both halves), of the condition map of one file, and of the VAE decoder, counted on
    the meta device."""
    from cod.limits import _work  # the cost model counts the same graph on the meta device

    parts = _work(model, size, size)
    h, w = model.codec.index_grid(size, size)
    with torch.device("meta"):
        from cod.model import build_denoiser

        den = build_denoiser(model.config)
        cond_map = count_flops(den.codec.decode_indices, torch.zeros(1, h, w, dtype=torch.long))
        vae = 0
        if model.family == "latent":
            from cod.models.vae import VAE_PRESETS, AutoencoderKL

            v = AutoencoderKL(VAE_PRESETS[model.config["latent"]["vae_preset"]])
            f = 8
            vae = count_flops(v.decode, torch.zeros(1, v.config.latent_channels, size // f, size // f))
    return {"pair": parts["step"], "cond_map": cond_map, "vae": vae}


def image_error(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    d = a.float() - b.float()
    mse = d.pow(2).mean().item()
    return int(d.abs().max().item()), (math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse))


class Variant:
    def __init__(self, name: str, model: cod.CoDModel, exact: bool, precision: str, compiled: bool,
                 twin: "Variant | None" = None):
        self.name, self.model, self.exact, self.precision, self.compiled = name, model, exact, precision, compiled
        self.twin = twin  # the eager variant of the same precision, for a graphs variant: its image must be the same
        self.times: list[float] = []
        self.first_s = None
        self.pass_s: dict[int, float] = {}
        self.image = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--presets", default="tiny-pixel,pixel-s")
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: each preset's)")
    ap.add_argument("--precision", default="fp32,bf16,int8", help=f"comma-separated, of {', '.join(PRECISIONS)}")
    ap.add_argument("--compile", action="store_true", help="also each precision under torch.compile (inductor)")
    ap.add_argument("--compile-regions", action="store_true",
                    help="also each precision with only the repeated regions compiled (compile_denoiser(regional=True))")
    ap.add_argument("--graphs", action="store_true",
                    help="also each precision (and compiled variant) replayed from CUDA graphs (cod.cuda_graphs; CUDA)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--extrapolate-to", type=int, default=25)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    refused = {}
    for p in precisions:
        try:
            check_precision(p, device)
        except ValueError as e:
            refused[p] = str(e)
    runnable = [p for p in precisions if p not in refused]

    started = datetime.datetime.now(datetime.timezone.utc)
    peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                                 platform.machine())
    header = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "device": str(device), "machine": machine,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "peak_tflops_fp32": peaks["fp32"] / 1e12, "peak_tflops_bf16": peaks["bf16"] / 1e12,
              "fixture_parity_max_rel_err": fixture_parity(), "refused": refused,
              "command": "python tools/bench_codec.py " + " ".join(os.sys.argv[1:])}
    print(f"# {header['date']}, {machine} ({device}, {header['threads']} threads), torch {torch.__version__}; "
          f"matmul peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s; "
          f"fixture parity {header['fixture_parity_max_rel_err']}")
    for p, why in refused.items():
        print(f"# {p}: refused: {why}")
    rows, failures = [], []
    for preset in (p.strip() for p in args.presets.split(",")):
        for size in (int(s) for s in args.sizes.split(",")):
            try:  # one preset or size that fails (out of memory, say) does not lose the others' figures
                base = build(preset, device)
                rows += bench_one(args, device, preset, base, size, runnable, peaks)
            except Exception as e:  # noqa: BLE001 - reported in the output and the JSON
                failures.append(f"{preset} {size}: {type(e).__name__}: {' '.join(str(e).split())[:500]}")
                print(f"# FAILED {failures[-1]}", flush=True)
            base = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if args.json:  # after every case, so that a run stopped early keeps what it measured
                args.json.write_text(json.dumps({**header, "failures": failures, "rows": rows}, indent=1))
    if rows:
        print_table(rows, args)


def bench_one(args, device, preset, base, size, precisions, peaks) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, size, size, generator=g).to(device)
    base.encode(image)  # warm-up
    indices, encode_s = timed(device, base.encode, image)
    sampling = {"steps": args.steps, **({"cfg": args.cfg} if args.cfg is not None else {})}
    sampler = base.sampler(**sampling)
    times_t = sampler.network_times()
    long_sampler = base.sampler(**{**sampling, "steps": args.extrapolate_to})

    # The baseline computes PixNerDiT's per-pixel stage in the release's layout (decode_patches_reference)
    base.denoiser.reference_pixel_stage = True
    variants = [Variant("release fp32 eager (baseline)", base, True, "fp32", False)]
    for p in precisions:
        model = copy.deepcopy(base)
        model.denoiser.reference_pixel_stage = False
        model.set_precision(p)
        eager = Variant(f"{p}", model, False, p, False)
        variants.append(eager)
        if args.graphs:
            variants.append(Variant(f"{p} + graphs", copy.deepcopy(model).use_cuda_graphs(), False, p, False, eager))
        for regional in [r for r, on in ((False, args.compile), (True, args.compile_regions)) if on]:
            name = f"{p} + compile" + (" (regions)" if regional else "")
            compiled = Variant(name, copy.deepcopy(model).compile_denoiser(regional=regional, dynamic=False),
                               False, p, True)
            variants.append(compiled)
            if args.graphs:
                variants.append(Variant(f"{name} + graphs", copy.deepcopy(model).compile_denoiser(
                    regional=regional, dynamic=False).use_cuda_graphs(), False, p, True, compiled))
    W = work(base, size)
    base.unconditional_condition(size, size)  # cached before any timing
    for v in variants:  # warm-up (and compilation; graphs are recorded at the second call of each shape)
        v.image, v.first_s = timed(device, v.model.decode, indices, size, size, exact=v.exact, **sampling)
        print(f"  {preset} {size}: {v.name}: first decode {v.first_s:.2f} s", flush=True)
    for _ in range(args.repeats):  # interleaved, so that every variant sees the same machine
        for v in variants:
            _, s = timed(device, v.model.decode, indices, size, size, exact=v.exact, **sampling)
            v.times.append(s)
    # one network pass of each kind, for the per-step figures and the extrapolation
    x = base.initial_noise(1, size, size)
    cond_half = base.codec.decode_indices(indices)
    cond_pair = torch.cat([base.unconditional_condition(size, size), cond_half])
    with torch.no_grad():
        for v in variants:
            for halves, (xx, cc) in ((2, (torch.cat([x, x]), cond_pair)), (1, (x, cond_half))):
                if v.exact and halves == 1:
                    continue
                t = torch.full((xx.shape[0],), 0.5, device=device)
                net = v.model.graphed_denoiser()
                net(xx, t, cond=cc)
                net(xx, t, cond=cc)  # a graphs variant records at the second call
                best = math.inf
                for _ in range(max(3, args.repeats)):  # short: more samples against a busy machine's swings
                    _, s = timed(device, net, xx, t, cond=cc)
                    best = min(best, s)
                v.pass_s[halves] = best

    baseline = variants[0]
    base_passes = len(times_t) * baseline.pass_s[2]
    rows = []
    for v in variants:
        decode_s = min(v.times)
        halves = [2 if v.exact else sampler.network_passes(t) for t in times_t]
        flops = sum(halves) / 2 * W["pair"] + W["cond_map"] + W["vae"]
        pass_time = sum(v.pass_s[k] for k in halves)
        fixed_s = max(0.0, decode_s - pass_time)
        est = None
        if args.steps < args.extrapolate_to:
            long_halves = [2 if v.exact else long_sampler.network_passes(t) for t in long_sampler.network_times()]
            est = fixed_s + sum(v.pass_s[k] for k in long_halves)
        max_abs, psnr = image_error(v.image, baseline.image)
        twin_levels = None if v.twin is None else image_error(v.image, v.twin.image)[0]
        peak = peaks["fp32" if v.precision == "fp32" else "bf16"]
        rows.append({
            "preset": preset, "size": size, "steps": args.steps, "cfg": sampler.guidance.cfg, "variant": v.name,
            "precision": v.precision, "compiled": v.compiled, "exact": v.exact,
            "encode_s": encode_s, "decode_s": decode_s, "speedup_vs_baseline": min(baseline.times) / decode_s,
            # the network passes alone (each the best of several short timings): steadier on a busy machine
            "speedup_passes": base_passes / pass_time,
            "first_decode_s": v.first_s, "compile_s": (v.first_s - decode_s) if v.compiled else None,
            "guided_pass_s": v.pass_s.get(2), "unguided_pass_s": v.pass_s.get(1),
            "halves_computed": sum(halves), "gflop_per_decode": flops / 1e9,
            "achieved_tflops": flops / decode_s / 1e12, "peak_used": "fp32" if v.precision == "fp32" else "bf16",
            "fraction_of_peak": flops / decode_s / peak,
            f"est_decode_s_{args.extrapolate_to}_steps": est,
            f"est_speedup_{args.extrapolate_to}_steps": None,
            "max_abs_levels_vs_baseline": max_abs, "psnr_db_vs_baseline": psnr,
            "max_abs_levels_vs_eager_twin": twin_levels,
            "graphs_recorded": v.model.cuda_graph_counts()[0] if v.twin is not None else None,
            "graph_replays": v.model.cuda_graph_counts()[1] if v.twin is not None else None,
        })
    if args.steps < args.extrapolate_to:
        key = f"est_decode_s_{args.extrapolate_to}_steps"
        for r in rows:
            r[f"est_speedup_{args.extrapolate_to}_steps"] = rows[0][key] / r[key]
    for r in rows:
        twin = "" if r["max_abs_levels_vs_eager_twin"] is None else \
            f", {r['max_abs_levels_vs_eager_twin']} levels from its eager twin ({r['graphs_recorded']} graphs)"
        print(f"  {preset} {size}: {r['variant']}: decode {r['decode_s']:.3f} s ({r['speedup_vs_baseline']:.2f}x){twin}",
              flush=True)
    return rows


def print_table(rows: list[dict], args) -> None:
    est = args.steps < args.extrapolate_to
    n = args.extrapolate_to
    cols = ["preset", "size", "variant", "encode s", "decode s", "speed-up", "speed-up (passes)", "guided pass ms",
            "unguided pass ms",
            "GFLOP/decode", "TFLOP/s", "% peak", "max err (levels)", "PSNR vs base (dB)"]
    if est:
        cols += [f"est. {n}-step decode s", f"est. {n}-step speed-up"]
    if args.compile or args.compile_regions:
        cols += ["compile s"]
    print(f"\nsteps {args.steps} (cfg {rows[0]['cfg'] if rows else '?'}); speed-up = baseline time / variant time, "
          f"measured side by side; (passes): the same for the steps' network passes alone")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [r["preset"], f"{r['size']}²", r["variant"], f"{r['encode_s']:.3f}", f"{r['decode_s']:.3f}",
                 f"{r['speedup_vs_baseline']:.2f}×", f"{r['speedup_passes']:.2f}×", f"{1e3 * r['guided_pass_s']:.1f}",
                 "–" if r["unguided_pass_s"] is None else f"{1e3 * r['unguided_pass_s']:.1f}",
                 f"{r['gflop_per_decode']:.1f}", f"{r['achieved_tflops']:.4f}",
                 f"{100 * r['fraction_of_peak']:.1f} ({r['peak_used']})", str(r["max_abs_levels_vs_baseline"]),
                 "∞" if math.isinf(r["psnr_db_vs_baseline"]) else f"{r['psnr_db_vs_baseline']:.2f}"]
        if est:
            cells += [f"{r[f'est_decode_s_{n}_steps']:.2f}", f"{r[f'est_speedup_{n}_steps']:.2f}×"]
        if args.compile or args.compile_regions:
            cells += ["–" if r["compile_s"] is None else f"{r['compile_s']:.1f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
