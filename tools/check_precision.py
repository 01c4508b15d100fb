"""How far each decode precision moves the decoded image from the float32 decode, and which modules are worth
keeping in float32 (the ablation behind cod.precision.KEEP_FP32; figures in docs/precision.md).

    python tools/check_precision.py --model cod/assets/demo-model --images ../shared/data/kodak --count 4
    python tools/check_precision.py --preset tiny-pixel --size 256 --steps 25 --ablation

For each precision (and with --ablation, each bf16 variant that keeps another set of modules in float32) the same
indices are decoded with the same seed; the table gives the max abs difference in 8-bit levels and the PSNR of the
decode against the float32 decode (not against the original image), over all images. Random-weight presets show
the arithmetic's sensitivity, a trained model (the demo model) what a user would see.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import cod
from cod.precision import KEEP_FP32, POLICIES, Policy, check_precision, prepare_denoiser

ABLATION = {
    "bf16 (all converted)": (),
    "bf16, keep t_embedder": ("t_embedder",),
    "bf16, keep condition decoder": ("y_embedder.decoder",),
    "bf16, keep velocity layer": ("final_layer.linear",),
    "bf16, keep the three (default)": KEEP_FP32,
    "bf16, default + s_embedder": KEEP_FP32 + ("s_embedder",),
}


def images_from(folder: Path | None, count: int, size: int) -> torch.Tensor:
    if folder is None:
        return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0))
    from cod.images import read_image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:count]
    crops = []
    for f in files:
        a = read_image(f, 1 << 26)
        top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
        crops.append(torch.from_numpy(a[top:top + size, left:left + size].copy()).permute(2, 0, 1).float() / 255)
    return torch.stack(crops)


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = a.float() - b.float()
    mse = d.pow(2).mean().item()
    return {"max_abs_levels": int(d.abs().max().item()),
            "psnr_db": math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse),
            "changed_values": float((d != 0).float().mean().item())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model directory (e.g. cod/assets/demo-model)")
    src.add_argument("--preset", help="a preset with random weights (seed 0)")
    ap.add_argument("--images", type=Path, help="a folder of images (centre crops of --size); default random images")
    ap.add_argument("--count", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    ap.add_argument("--precision", default="bf16,int8,fp8")
    ap.add_argument("--ablation", action="store_true", help="also the bf16 variants of ABLATION")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def fresh():
        if args.model:
            return cod.load(args.model)
        model = cod.new_model(args.preset)
        model.fingerprint = "check-precision"
        return model

    images = images_from(args.images, args.count, args.size)
    base = fresh()
    indices = base.encode(images)
    sampling = {"steps": args.steps} if args.steps else {}

    def decode(model):
        start = time.perf_counter()
        out = torch.cat([model.decode(indices[i:i + 1], args.size, args.size, seeds=i, **sampling)
                         for i in range(len(indices))])
        return out, time.perf_counter() - start

    reference, ref_s = decode(base)
    rows = [{"variant": "fp32", "seconds": ref_s, **compare(reference, reference)}]
    variants = []
    for p in args.precision.split(","):
        variants.append((p, p, None))
    if args.ablation:
        variants += [(name, "bf16", Policy(torch.bfloat16, None, keep)) for name, keep in ABLATION.items()]
    for name, precision, policy in variants:
        try:
            check_precision(precision, base.device)
        except ValueError as e:
            rows.append({"variant": name, "refused": str(e)})
            continue
        model = fresh()
        if policy is None:
            model.set_precision(precision)
        else:
            prepare_denoiser(model.denoiser, precision, policy)
            model.precision = precision
        assert torch.equal(model.encode(images), indices), "the indices must not depend on the precision"
        out, seconds = decode(model)
        rows.append({"variant": name, "seconds": seconds, **compare(out, reference)})

    source = args.model or f"{args.preset} (random weights)"
    print(f"{source}, {len(indices)} image(s) {args.size}x{args.size}, steps {sampling.get('steps', 'default')}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| variant | max abs diff (levels) | PSNR vs fp32 (dB) | values changed | decode s |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "refused" in r:
            print(f"| {r['variant']} | refused: {r['refused']} | | | |")
        else:
            print(f"| {r['variant']} | {r['max_abs_levels']} | {r['psnr_db']:.2f} | {100 * r['changed_values']:.2f}% "
                  f"| {r['seconds']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"source": source, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
