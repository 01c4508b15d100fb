"""`cod compress / decompress / evaluate`: thin wrappers over cod.codec.api. Registered into cod/cli.py."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cod.codec.images import IMAGE_SUFFIXES, collect_inputs


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def _sampling_args(p) -> None:
    from cod.diffusion.samplers import SAMPLERS

    p.add_argument("--steps", type=_positive, help="sampling steps (default: the model's, 25)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), help="sampler (default: the model's, adam2)")
    p.add_argument("--seed", type=int, help="noise seed (default 0)")


def _common(p) -> None:
    p.add_argument("--model", required=True, help="model directory (cod new-model / import-official / fit)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--format", choices=["cod", "official"], default="cod",
                   help="cod: our container (any size, checked); official: the release's 4-byte-header file")
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="print nothing but errors")


def register(sub) -> None:
    p = sub.add_parser("compress", help="images -> .cod files")
    _common(p)
    _sampling_args(p)
    p.add_argument("inputs", nargs="+", help="image files, directories or glob patterns")
    p.add_argument("-o", "--out", required=True, help="output directory (or file, for one input)")
    p.set_defaults(func=_cmd_compress)

    p = sub.add_parser("decompress", help=".cod files -> PNG images")
    _common(p)
    _sampling_args(p)
    p.add_argument("inputs", nargs="+", help=".cod files, directories or glob patterns")
    p.add_argument("-o", "--out", required=True, help="output directory (or .png file, for one input)")
    p.set_defaults(func=_cmd_decompress)

    p = sub.add_parser("evaluate", help="rate/distortion of CoD vs JPEG/WebP/AVIF at matched size")
    _common(p)
    _sampling_args(p)
    p.add_argument("inputs", nargs="+", help="image files, directories or glob patterns")
    p.add_argument("--out-dir", default="cod-eval", help="where per_image.csv/json, summary.json, rd.png go")
    p.add_argument("--anchors", default="jpeg,webp,avif", help="comma-separated classical codecs, or 'none'")
    p.add_argument("--lpips-weights", help="torchvision alexnet-owt-7be5be79.pth, to report LPIPS")
    p.add_argument("--dists-weights", help="DISTS weights (not supported yet)")
    p.add_argument("--inception-weights", help="Inception weights for patch FID/KID (not supported yet)")
    p.set_defaults(func=_cmd_evaluate)


def _load(args):
    import torch

    import cod

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} asked for, but no CUDA device is available")
    return cod.load(args.model, device=args.device)


def _progress(args, items, desc):
    if args.quiet or not sys.stderr.isatty() or len(items) < 2:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img", file=sys.stderr)


def _targets(inputs: list[Path], out: str, suffix: str) -> list[Path]:
    out_path = Path(out)
    if len(inputs) == 1 and out_path.suffix.lower() == suffix:
        return [out_path]
    if out_path.exists() and not out_path.is_dir():
        raise ValueError(f"-o {out}: exists and is not a directory (several inputs need an output directory)")
    names = [p.stem for p in inputs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"two inputs would both write {out_path / (dup + suffix)}: rename one")
    return [out_path / (p.stem + suffix) for p in inputs]


def _sampling(args) -> dict:
    return {"sampler": args.sampler, "steps": args.steps, "cfg": args.cfg, "seed": args.seed}


def _cmd_compress(args) -> None:
    from cod.codec import api
    from cod.codec.images import read_image
    from cod.model import atomic_write_bytes

    inputs = collect_inputs(args.inputs, IMAGE_SUFFIXES)
    targets = _targets(inputs, args.out, ".cod")
    model = _load(args)
    total = 0
    for src, dst in zip(_progress(args, inputs, "compress"), targets):
        data = api.compress(model, [read_image(src)], fmt=args.format, **_sampling(args))[0]
        atomic_write_bytes(dst, data)
        total += len(data)
    if not args.quiet:
        print(f"compressed {len(inputs)} image(s) into {total} bytes -> {args.out}")


def _cmd_decompress(args) -> None:
    from cod.codec import api
    from cod.codec.images import write_png

    inputs = collect_inputs(args.inputs, None)
    targets = _targets(inputs, args.out, ".png")
    model = _load(args)
    overrides = {k: v for k, v in _sampling(args).items() if v is not None}
    for src, dst in zip(_progress(args, inputs, "decompress"), targets):
        try:
            data = src.read_bytes()
            image = api.decompress(model, data, fmt=args.format, **overrides)
        except ValueError as e:
            raise ValueError(f"{src}: {e}") from None
        write_png(dst, image)
    if not args.quiet:
        print(f"decompressed {len(inputs)} file(s) -> {args.out}")


def _cmd_evaluate(args) -> None:
    from cod.codec.evaluate import ANCHORS, LPIPS_HINT, UNSUPPORTED, evaluate

    for flag, key in (("dists_weights", "dists"), ("inception_weights", "fid")):
        if getattr(args, flag):
            raise ValueError(UNSUPPORTED[key])
    anchors = () if args.anchors == "none" else tuple(a.strip() for a in args.anchors.split(",") if a.strip())
    unknown = [a for a in anchors if a not in ANCHORS]
    if unknown:
        raise ValueError(f"unknown anchor codec(s) {unknown}; choose from {sorted(ANCHORS)} or 'none'")
    inputs = collect_inputs(args.inputs, IMAGE_SUFFIXES)
    model = _load(args)
    result = evaluate(model, inputs, Path(args.out_dir), anchors, args.lpips_weights,
                      progress=lambda items: _progress(args, items, "evaluate"), **_sampling(args))
    if args.quiet:
        return
    print(f"{'method':8s} {'bpp(file)':>10s} {'PSNR':>7s} {'MS-SSIM':>8s}  matched")
    for method, s in result["summary"].items():
        print(f"{method:8s} {s.get('bpp_file', float('nan')):10.5f} {s.get('psnr', float('nan')):7.2f} "
              f"{s.get('ms_ssim', float('nan')):8.4f}  {'yes' if s['all_matched'] else 'no (smallest file)'}")
    if not args.lpips_weights:
        print(f"(LPIPS not computed: {LPIPS_HINT})")
    print(f"reports: {args.out_dir}/per_image.csv, per_image.json, summary.json, rd.png")
