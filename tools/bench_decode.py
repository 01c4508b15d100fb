"""Decode-speed benchmark with its anchors in one run: the official numerics (fixture parity), and the
physical limit (the denoiser's FLOPs per decode against the device's peak).

    python tools/bench_decode.py --preset tiny-pixel --size 512 --steps 25            # CPU
    python tools/bench_decode.py --preset pixel-xl --size 512 --device cuda --dtype bfloat16 --peak-tflops 989

Weights are random (the speed does not depend on them). Prints a markdown table; --json writes the figures.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]

import cod


def fixture_parity() -> float | None:
    """Max relative error of our forward pass on the official pixel fixture (None without ../shared)."""
    from safetensors.torch import load_file

    from cod.compat.fill_rule import apply_fill_rule
    from cod.models.pixnerdit import PixNerDiT

    fx = ROOT.parent / "shared" / "fixtures" / "cod-reference"
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-pixel")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="device peak for the dtype (H100 SXM bf16 dense: 989); CPU: leave empty")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = cod.new_model(args.preset).to(args.device)
    dtype = getattr(torch, args.dtype)
    S, B = args.size, args.batch
    images = torch.rand(B, 3, S, S, generator=torch.Generator().manual_seed(0)).to(args.device)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.no_grad(), torch.autocast(device_type=args.device.split(":")[0], dtype=dtype,
                                         enabled=dtype != torch.float32):
        indices = model.encode(images)  # warm-up + encode timing below
        sync()
        t0 = time.perf_counter()
        indices = model.encode(images)
        sync()
        encode_s = time.perf_counter() - t0

        # FLOPs of one denoiser call on the CFG-doubled batch, times the number of steps.
        x = torch.randn(2 * B, *model.model_shape(S, S), device=args.device)
        cond = torch.cat([model.unconditional_condition(S, S).expand(B, -1, -1, -1),
                          model.codec.decode_indices(indices)])
        with FlopCounterMode(display=False) as counter:
            model.denoiser(x, torch.full((2 * B,), 0.5, device=args.device), cond=cond)
        flops = counter.get_total_flops() * args.steps

        model.decode(indices, S, S, steps=1)
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            model.decode(indices, S, S, steps=args.steps)
            sync()
            times.append(time.perf_counter() - t0)
    decode_s = min(times)
    achieved = flops / decode_s / 1e12
    row = {
        "preset": args.preset, "size": S, "batch": B, "steps": args.steps, "device": args.device,
        "dtype": args.dtype, "threads": torch.get_num_threads(), "encode_s": encode_s, "decode_s": decode_s,
        "decode_s_per_image": decode_s / B, "denoiser_gflops_per_decode": flops / 1e9,
        "achieved_tflops": achieved, "peak_tflops": args.peak_tflops,
        "fraction_of_peak": achieved / args.peak_tflops if args.peak_tflops else None,
        "fixture_parity_max_rel_err": fixture_parity(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    print("| preset | size | batch | steps | device | dtype | encode s | decode s/img | GFLOP/decode | TFLOP/s |"
          " % peak | parity err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    peak = f"{100 * row['fraction_of_peak']:.1f}" if row["fraction_of_peak"] else "–"
    parity = f"{row['fixture_parity_max_rel_err']:.1e}" if row["fixture_parity_max_rel_err"] is not None else "–"
    print(f"| {args.preset} | {S} | {B} | {args.steps} | {args.device} | {args.dtype} | {encode_s:.3f} | "
          f"{row['decode_s_per_image']:.3f} | {row['denoiser_gflops_per_decode']:.1f} | {achieved:.4f} | {peak} | "
          f"{parity} |")
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
