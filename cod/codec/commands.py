"""`cod compress / decompress / evaluate`: thin wrappers over cod.codec.api. Registered into cod/cli.py.

With several inputs, a file that cannot be read or coded does not stop the others: it gets no output, and the
command ends with one `cod: error:` line naming every such file and exit status 1.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from cod.codec.images import IMAGE_SUFFIXES, collect_inputs


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got '{value}'")
    return n


def _add_arguments(p, inputs_help: str) -> None:
    from cod.codec.api import CODEC_SAMPLERS

    p.add_argument("inputs", nargs="+", help=inputs_help)
    p.add_argument("--model", required=True, help="model directory (cod new-model / import-official / fit)")
    p.add_argument("--steps", type=_positive, help="sampling steps (default: the model's, 25)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--sampler", choices=CODEC_SAMPLERS, help="sampler (default: the model's, adam2)")
    p.add_argument("--seed", type=int, help="noise seed, 0 to 2^32-1 (default 0)")
    p.add_argument("--recursive", "-r", action="store_true", help="take files in subfolders of input folders too")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="print nothing but errors")


def _batch_size_argument(p, effect: str) -> None:
    p.add_argument("--batch-size", type=_positive, default=1,
                   help=f"code up to this many images of equal padded size together (default 1); {effect}")


def register(sub) -> None:
    p = sub.add_parser("compress", help="images -> .cod files")
    _add_arguments(p, "image files (PNG/JPEG/WebP/TIFF/BMP), folders or glob patterns")
    _batch_size_argument(p, "the files are identical at any batch size")
    p.add_argument("-o", "--out", required=True, help="output folder (or .cod file, for one input)")
    p.add_argument("--format", choices=["cod", "official"], default="cod",
                   help="cod: our checked container, any size (default); official: the release's 4-byte header, "
                        "sides multiples of the model's size multiple only")
    p.set_defaults(func=_cmd_compress)

    p = sub.add_parser("decompress", help=".cod files -> PNG images")
    _add_arguments(p, ".cod files, folders (their .cod files) or glob patterns")
    _batch_size_argument(p, "faster on GPU, but a pixel may then differ by one level from decoding the file alone")
    p.add_argument("-o", "--out", required=True, help="output folder (or .png file, for one input)")
    p.add_argument("--format", choices=["cod", "official"], default="cod",
                   help="format of the input files (official: the release's; decoded with the model's defaults "
                        "unless sampling options are given)")
    p.set_defaults(func=_cmd_decompress)

    p = sub.add_parser("evaluate", help="rate/distortion of CoD vs JPEG/WebP/AVIF at matched size")
    _add_arguments(p, "image files, folders or glob patterns")
    p.add_argument("--out-dir", default="cod-eval", help="where per_image.csv/json, summary.json, rd.png go")
    p.add_argument("--anchors", default="jpeg,webp,avif", help="comma-separated classical codecs, or 'none'")
    p.add_argument("--lpips-weights", help="local torchvision alexnet-owt-7be5be79.pth, to report LPIPS")
    p.add_argument("--dists-weights", help="local torchvision vgg16-397923af.pth, to report DISTS")
    p.add_argument("--inception-weights", help="Inception weights for patch FID/KID (needs torch-fidelity)")
    p.set_defaults(func=_cmd_evaluate)


def _load(args):
    import torch

    import cod

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} asked for, but no CUDA device is available")
    return cod.load(args.model, device=args.device)


def _progress(args, total: int, desc: str):
    """A tqdm bar on stderr, silent with --quiet, when stderr is not a terminal, or for a single file."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr,
                disable=args.quiet or total < 2 or not sys.stderr.isatty())


def _targets(inputs: list[Path], out: str, suffix: str) -> list[Path]:
    out_path = Path(out)
    if len(inputs) == 1 and out_path.suffix.lower() == suffix:
        return [out_path]
    if out_path.exists() and not out_path.is_dir():
        raise ValueError(f"-o {out}: exists and is not a folder (give a folder, or a {suffix} file for one input)")
    names = [p.stem for p in inputs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"two inputs would both write {out_path / (dup + suffix)}: rename one")
    return [out_path / (p.stem + suffix) for p in inputs]


def _sampling(args) -> dict:
    return {"sampler": args.sampler, "steps": args.steps, "cfg": args.cfg, "seed": args.seed}


def _finish(args, failures: list[str], total: int, done: str) -> None:
    """One summary line on success; one error naming the failed inputs otherwise."""
    if failures:
        if total == 1:
            raise ValueError(failures[0])
        shown = "; ".join(failures[:3]) + (f"; and {len(failures) - 3} more" if len(failures) > 3 else "")
        raise ValueError(f"{len(failures)} of {total} inputs failed (nothing written for them): {shown}")
    if not args.quiet:
        print(done)


def _read(args, path: Path):
    """read_image with its warnings (alpha dropped, ...) as one plain line each on stderr."""
    from cod.codec.images import read_image

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_image(path)
    if not args.quiet:
        for w in caught:
            print(f"cod: warning: {w.message}", file=sys.stderr)
    return image


def _cmd_compress(args) -> None:
    from cod.codec import api
    from cod.model import atomic_write_bytes

    inputs = collect_inputs(args.inputs, IMAGE_SUFFIXES, args.recursive)
    targets = _targets(inputs, args.out, ".cod")
    model = _load(args)
    api.stored_params(model, args.format, **_sampling(args))  # bad sampling options fail before any reading
    failures: list[str] = []
    pending: dict[tuple[int, int], list[tuple[Path, object]]] = {}  # padded size -> (target, image)
    total = 0
    bar = _progress(args, len(inputs), "compress")

    def flush(size: tuple[int, int]) -> None:
        nonlocal total
        group = pending.pop(size)
        datas = api.compress(model, [image for _, image in group], fmt=args.format, batch_size=len(group),
                             **_sampling(args))
        for (dst, _), data in zip(group, datas):
            atomic_write_bytes(dst, data)
            total += len(data)
        bar.update(len(group))

    def fail(message: str) -> None:
        failures.append(message)
        bar.update(1)

    for src, dst in zip(inputs, targets):
        try:
            image = _read(args, src)
        except (ValueError, OSError) as e:  # read_image's messages name the file
            fail(str(e))
            continue
        try:
            api.check_compressible(model, *image.shape[:2], args.format)
        except ValueError as e:
            fail(f"{src}: {e}")
            continue
        size = api.padded_size(model, *image.shape[:2])
        pending.setdefault(size, []).append((dst, image))
        if len(pending[size]) == args.batch_size:
            flush(size)
    for size in list(pending):
        flush(size)
    bar.close()
    _finish(args, failures, len(inputs),
            f"compressed {len(inputs) - len(failures)} image(s) into {total} bytes -> {args.out}")


def _cmd_decompress(args) -> None:
    from cod.codec import api
    from cod.codec.images import write_png

    inputs = collect_inputs(args.inputs, {".cod"}, args.recursive)
    targets = _targets(inputs, args.out, ".png")
    model = _load(args)
    failures: list[str] = []
    parsed, parsed_targets = [], []
    for src, dst in zip(inputs, targets):
        try:
            header, indices = api.parse(model, src.read_bytes(), args.format)
            api.decode_options(header, **_sampling(args))  # a bad stored or given option fails before sampling
        except (ValueError, OSError) as e:
            failures.append(f"{src}: {e}")
            continue
        parsed.append((header, indices))
        parsed_targets.append(dst)
    bar = _progress(args, len(inputs), "decompress")
    bar.update(len(failures))
    for i, image in api.iter_decoded(model, parsed, args.batch_size, **_sampling(args)):
        write_png(parsed_targets[i], image)
        bar.update(1)
    bar.close()
    _finish(args, failures, len(inputs), f"decompressed {len(parsed)} file(s) -> {args.out}")


def _cmd_evaluate(args) -> None:
    from cod.codec.evaluate import ANCHORS, BACKBONES, FID_UNAVAILABLE, evaluate, weights_hint

    if args.inception_weights:
        raise ValueError(FID_UNAVAILABLE)
    anchors = () if args.anchors == "none" else tuple(a.strip() for a in args.anchors.split(",") if a.strip())
    unknown = [a for a in anchors if a not in ANCHORS]
    if unknown:
        raise ValueError(f"unknown anchor codec(s) {unknown}; choose from {sorted(ANCHORS)} or 'none'")
    inputs = collect_inputs(args.inputs, IMAGE_SUFFIXES, args.recursive)
    model = _load(args)
    weights = {"lpips": args.lpips_weights, "dists": args.dists_weights}
    sampling = _sampling(args)

    def progress(items):
        bar = _progress(args, len(items), "evaluate")
        for item in items:
            yield item
            bar.update(1)
        bar.close()

    result = evaluate(model, inputs, Path(args.out_dir), anchors, weights, progress=progress, **sampling)
    if args.quiet:
        return
    shown = ["psnr", "ms_ssim"] + [m for m in BACKBONES if weights[m]]
    print(f"{'method':8s} {'bpp(file)':>10s} " + " ".join(f"{m.upper().replace('_', '-'):>8s}" for m in shown)
          + "  matched")
    for method, s in result["summary"].items():
        print(f"{method:8s} {s.get('bpp_file', float('nan')):10.5f} "
              + " ".join(f"{s.get(m, float('nan')):8.4f}" for m in shown)
              + f"  {'yes' if s['all_matched'] else 'no (smallest file)'}")
    for m in BACKBONES:
        if not weights[m]:
            print(f"({m.upper()} not computed: {weights_hint(m)})")
    print(f"reports: {args.out_dir}/per_image.csv, per_image.json, summary.json, rd.png")
