"""`cod compress / decompress / evaluate`: thin wrappers over cod.codec.api. Registered into cod/cli.py.

Before any work: every output is checked (one that exists is refused unless --overwrite; one that is an input
is always refused), and so are the options. With several inputs, a file that cannot be read, is over a limit
or fails to code does not stop the others: it gets no output, and the command ends with one `cod: error:` line
naming every such file and exit status 1.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from cod.errors import describe_error, is_out_of_memory
from cod.images import IMAGE_SUFFIXES, collect_inputs
from cod.limits import DEFAULT_MAX_PIXELS, DEFAULT_MAX_STEPS, DEFAULT_MAX_TFLOP, Limits


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n < 1 << 62:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got '{value}'")
    return n


def non_negative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if not 0 <= n < 1 << 32:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2^32-1, got '{value}'")
    return n


def positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = float("nan")
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got '{value}'")
    return x


def tile_option(value: str):
    from cod.diffusion.tiling import parse_tile

    try:
        return parse_tile(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_limit_arguments(p) -> None:
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images with more pixels than this (default {DEFAULT_MAX_PIXELS}, 4096x4096)")
    p.add_argument("--max-steps", type=positive_int, default=DEFAULT_MAX_STEPS,
                   help=f"refuse decodes with more sampling steps (default {DEFAULT_MAX_STEPS})")
    p.add_argument("--max-tflop", type=positive_float,
                   help="refuse decodes whose estimated work is larger, in TFLOP (default: "
                        + ", ".join(f"{v:g} on {k}" for k, v in DEFAULT_MAX_TFLOP.items()) + ")")


def limits_from(args) -> Limits:
    return Limits(args.max_pixels, args.max_steps, args.max_tflop)


def add_overwrite_argument(p, what: str = "existing outputs") -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace {what} (never the inputs)")


def _add_arguments(p, inputs_help: str) -> None:
    from cod.codec.api import CODEC_SAMPLERS

    p.add_argument("inputs", nargs="+", help=inputs_help)
    p.add_argument("--model", required=True, help="model directory (cod new-model / import-official / fit)")
    p.add_argument("--steps", type=positive_int, help="sampling steps (default: the model's, see `cod info`)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--sampler", choices=CODEC_SAMPLERS, help="sampler (default: the model's)")
    p.add_argument("--seed", type=non_negative_int, help="noise seed, 0 to 2^32-1 (default 0)")
    p.add_argument("--recursive", "-r", action="store_true", help="take files in subfolders of input folders too")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    add_limit_arguments(p)
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="print nothing but errors")


def _decode_arguments(p) -> None:
    from cod.precision import PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="arithmetic of the decoder: fp32 (default, the reference), bf16, int8 (torchao, CPU or GPU) "
                        "or fp8 (torchao, GPUs of compute capability 8.9+); the encoder and the codebook stay fp32, "
                        "so the .cod files never depend on it (docs/precision.md gives each one's error)")
    compiling = p.add_mutually_exclusive_group()
    compiling.add_argument("--compile", action="store_const", const="whole", default=False,
                           help="torch.compile the denoiser: faster decoding after a one-off compilation per image "
                                "size")
    compiling.add_argument("--compile-regions", dest="compile", action="store_const", const="regional",
                           help="torch.compile only the denoiser's repeated blocks, which share one compiled graph: "
                                "faster to compile (XL on an H200: 21 s instead of 60 s), decodes a little slower "
                                "(0.208 vs 0.197 s there; on a CPU within noise; docs/benchmarks.md)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="on a CUDA device, replay the network's calls from CUDA graphs (recorded at the second call "
                        "of each image size; the same result, less launch overhead; no effect on a CPU)")
    p.add_argument("--tile", type=tile_option, default="auto", metavar="auto|off|PIXELS",
                   help="decode in overlapping windows of this many pixels a side (cost linear in the area, a small "
                        "seam cost; docs/precision.md); auto (default): 512-pixel windows above 4 megapixels; off: "
                        "whole images")


def _batch_size_argument(p, effect: str) -> None:
    p.add_argument("--batch-size", type=positive_int, default=1,
                   help=f"code up to this many images of equal padded size together (default 1); {effect}")


def register(sub) -> None:
    p = sub.add_parser("compress", help="images -> .cod files")
    _add_arguments(p, "image files (PNG/JPEG/WebP/TIFF/BMP), folders or glob patterns")
    _batch_size_argument(p, "the files are identical at any batch size")
    p.add_argument("-o", "--out", required=True, help="output folder (or .cod file, for one input)")
    add_overwrite_argument(p, "existing .cod files")
    p.add_argument("--format", choices=["cod", "official"], default="cod",
                   help="cod: our checked container, any size (default); official: the release's 4-byte header, "
                        "sides multiples of the model's size multiple only")
    p.add_argument("--entropy", choices=["auto", "off"], default="auto",
                   help="auto: entropy-code the indices under the model's prior (prior.safetensors, from "
                        "`cod fit-prior`) when that gives a smaller file (default); off: fixed-length indices")
    p.set_defaults(func=_cmd_compress)

    p = sub.add_parser("decompress", help=".cod files -> PNG images")
    _add_arguments(p, ".cod files, folders (their .cod files) or glob patterns")
    _decode_arguments(p)
    _batch_size_argument(p, "faster on GPU, but a pixel may then differ by one level from decoding the file alone")
    p.add_argument("-o", "--out", required=True, help="output folder (or .png file, for one input)")
    add_overwrite_argument(p, "existing PNG files")
    p.add_argument("--format", choices=["cod", "official"], default="cod",
                   help="format of the input files (official: the release's; decoded with the model's defaults "
                        "unless sampling options are given)")
    p.set_defaults(func=_cmd_decompress)

    p = sub.add_parser("evaluate", help="rate/distortion of CoD vs JPEG/WebP/AVIF at matched size")
    _add_arguments(p, "image files, folders or glob patterns")
    _decode_arguments(p)
    p.add_argument("--out-dir", default="cod-eval", help="where per_image.csv/json, summary.json, rd.png go")
    add_overwrite_argument(p, "the reports of an earlier evaluation in --out-dir")
    p.add_argument("--anchors", default="jpeg,webp,avif", help="comma-separated classical codecs, or 'none'")
    p.add_argument("--lpips-weights", help="local torchvision alexnet-owt-7be5be79.pth, to report LPIPS")
    p.add_argument("--dists-weights", help="local torchvision vgg16-397923af.pth, to report DISTS")
    p.add_argument("--inception-weights", help="Inception weights for patch FID/KID (needs torch-fidelity)")
    p.set_defaults(func=_cmd_evaluate)


def parse_device(name: str):
    """--device as a torch.device that this machine has, else a ValueError saying what to use."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} asked for, but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: cod runs on cpu or cuda")
    return device


def load_model(args):
    import cod

    return cod.load(args.model, device=parse_device(args.device), precision=getattr(args, "precision", "fp32"),
                    compile=getattr(args, "compile", False), tile=getattr(args, "tile", "auto"),
                    cuda_graphs=getattr(args, "cuda_graphs", False))


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


def _read(args, path: Path, max_pixels: int):
    """read_image with its warnings (alpha dropped, ...) as one plain line each on stderr."""
    from cod.images import read_image

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_image(path, max_pixels)
    if not args.quiet:
        for w in caught:
            print(f"cod: warning: {w.message}", file=sys.stderr)
    return image


def failure_message(e: BaseException) -> str | None:
    """The one-line reason for a failure that concerns one input, or None for one that should stop the command."""
    if isinstance(e, (ValueError, OSError, MemoryError)) or is_out_of_memory(e):
        return describe_error(e)
    return None


def _cmd_compress(args) -> None:
    from cod.codec import api
    from cod.files import atomic_write_bytes, check_outputs

    inputs = collect_inputs(args.inputs, IMAGE_SUFFIXES, args.recursive)
    targets = _targets(inputs, args.out, ".cod")
    check_outputs(targets, inputs, args.overwrite, own=api.is_cod_file)
    limits = limits_from(args)
    model = load_model(args)
    api.stored_params(model, args.format, **_sampling(args))  # bad sampling options fail before any reading
    failures: list[str] = []
    pending: dict[tuple[int, int], list[tuple[Path, Path, object]]] = {}  # padded size -> (source, target, image)
    total = 0
    bar = _progress(args, len(inputs), "compress")

    def flush(size: tuple[int, int]) -> None:
        nonlocal total
        group = pending.pop(size)
        try:
            datas = api.compress(model, [image for _, _, image in group], fmt=args.format, batch_size=len(group),
                                 limits=limits, entropy=args.entropy, **_sampling(args))
        except Exception as e:  # noqa: BLE001 - one failing batch (e.g. out of memory) must not stop the others
            reason = failure_message(e)
            if reason is None:
                raise
            failures.extend(f"{src}: {reason}" for src, _, _ in group)
            bar.update(len(group))
            return
        for (src, dst, _), data in zip(group, datas):
            try:
                atomic_write_bytes(dst, data, overwrite=args.overwrite)
                total += len(data)
            except (ValueError, OSError) as e:
                failures.append(failure_message(e))
        bar.update(len(group))

    for src, dst in zip(inputs, targets):
        try:
            image = _read(args, src, limits.max_pixels)
            api.check_compressible(model, *image.shape[:2], args.format, limits, str(src))
        except (ValueError, OSError) as e:  # the messages name the file
            message = failure_message(e)
            failures.append(message if str(src) in message else f"{src}: {message}")
            bar.update(1)
            continue
        size = api.padded_size(model, *image.shape[:2])
        pending.setdefault(size, []).append((src, dst, image))
        if len(pending[size]) == api.batch_limit(args.batch_size, size, limits):
            flush(size)
    for size in list(pending):
        flush(size)
    bar.close()
    _finish(args, failures, len(inputs),
            f"compressed {len(inputs) - len(failures)} image(s) into {total} bytes -> {args.out}")


def _cmd_decompress(args) -> None:
    from cod.codec import api
    from cod.files import check_outputs, read_bytes_bounded
    from cod.images import is_cod_png, write_png

    inputs = collect_inputs(args.inputs, {".cod"}, args.recursive)
    targets = _targets(inputs, args.out, ".png")
    check_outputs(targets, inputs, args.overwrite, own=is_cod_png)
    limits = limits_from(args)
    model = load_model(args)
    failures: list[str] = []
    parsed, parsed_targets, parsed_sources = [], [], []
    for src, dst in zip(inputs, targets):
        try:
            data = read_bytes_bounded(src, api.MAX_FILE_BYTES, ".cod file")
            header, indices = api.parse(model, data, args.format, limits)
            options, _ = api.decode_options(header, **_sampling(args))  # bad stored or given options: before sampling
            api.check_decodable(model, header, options, limits, str(src))
        except (ValueError, OSError) as e:
            message = failure_message(e)
            failures.append(message if message.startswith(str(src)) else f"{src}: {message}")
            continue
        parsed.append((header, indices))
        parsed_targets.append(dst)
        parsed_sources.append(src)
    bar = _progress(args, len(inputs), "decompress")
    bar.update(len(failures))
    for group, options, seeds in api.decode_groups(model, parsed, args.batch_size, limits, **_sampling(args)):
        try:
            images = api.decode_group(model, [parsed[i] for i in group], options, seeds)
        except Exception as e:  # noqa: BLE001 - one failing batch (e.g. out of memory) must not stop the others
            reason = failure_message(e)
            if reason is None:
                raise
            failures.extend(f"{parsed_sources[i]}: {reason}" for i in group)
            bar.update(len(group))
            continue
        for i, image in zip(group, images):
            try:
                write_png(parsed_targets[i], image, overwrite=args.overwrite)
            except (ValueError, OSError) as e:
                failures.append(failure_message(e))
        bar.update(len(group))
    bar.close()
    _finish(args, failures, len(inputs), f"decompressed {len(inputs) - len(failures)} file(s) -> {args.out}")


def _cmd_evaluate(args) -> None:
    from cod.codec.evaluate import ANCHORS, BACKBONES, FID_UNAVAILABLE, REPORT_FILES, evaluate, weights_hint
    from cod.files import check_outputs

    if args.inception_weights:
        raise ValueError(FID_UNAVAILABLE)
    anchors = () if args.anchors == "none" else tuple(a.strip() for a in args.anchors.split(",") if a.strip())
    unknown = [a for a in anchors if a not in ANCHORS]
    if unknown:
        raise ValueError(f"unknown anchor codec(s) {unknown}; choose from {sorted(ANCHORS)} or 'none'")
    inputs = collect_inputs(args.inputs, IMAGE_SUFFIXES, args.recursive)
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir}: exists and is not a folder")
    check_outputs([out_dir / name for name in REPORT_FILES], inputs, args.overwrite, own=lambda path: True)
    model = load_model(args)
    weights = {"lpips": args.lpips_weights, "dists": args.dists_weights}
    sampling = _sampling(args)
    lines = not args.quiet and not sys.stderr.isatty()

    def progress(items):
        """A bar on a terminal; otherwise one line per image on stderr (logs and CI show progress as it happens)."""
        bar = _progress(args, len(items), "evaluate")
        for n, item in enumerate(items, 1):
            start = time.perf_counter()
            yield item
            bar.update(1)
            if lines:
                print(f"evaluate: {n}/{len(items)} {item} ({time.perf_counter() - start:.1f} s)", file=sys.stderr,
                      flush=True)
        bar.close()

    result = evaluate(model, inputs, out_dir, anchors, weights, progress=progress, limits=limits_from(args),
                      overwrite=args.overwrite, **sampling)
    if not args.quiet:
        for note in result["notes"]:
            print(f"cod: warning: {note}", file=sys.stderr)
    if not args.quiet:
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
        if result["rows"]:
            print(f"reports: {out_dir}/" + ", ".join(REPORT_FILES))
    if result["failures"]:
        _finish(args, result["failures"], len(inputs), "")
