"""`cod diffc compress / decompress / evaluate`: DiffC (zero-shot variable rate) over a CoD model directory.

The same conventions as `cod compress / decompress`: outputs checked before any work (never replaced without
--overwrite, never an input), limits checked before any network call, one `cod: error:` line naming every
failed input, and on long encodes one progress line per DiffC step on stderr (silent with --quiet).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from cod.codec.commands import (add_limit_arguments, add_overwrite_argument, failure_message, limits_from,
                                load_model, non_negative_int, positive_float, _finish, _read,
                                _targets)
from cod.images import IMAGE_SUFFIXES, collect_inputs

RATE_HELP = "rate: exactly one of --bpp, --steps or --recon-t"


def _common(p, inputs_help: str) -> None:
    p.add_argument("inputs", nargs="+", help=inputs_help)
    p.add_argument("--model", required=True, help="model directory (cod new-model / import-official / fit)")
    p.add_argument("--recursive", "-r", action="store_true", help="take files in subfolders of input folders too")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]; candidate scoring runs in Triton "
                                                   "on CUDA, in a compiled kernel (or NumPy) on the CPU")
    add_limit_arguments(p)
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="print nothing but errors")


def _rate_arguments(p, sweep: bool = False) -> None:
    p.add_argument("--seed", type=non_negative_int, default=0, help="Philox seed, 0 to 2^32-1 (default 0)")
    p.add_argument("--unconditional", action="store_true",
                   help="null-condition prior: no VQ indices in the file (the release's 'base' configs)")
    p.add_argument("--padding", type=int, default=2, choices=range(0, 15), metavar="P",
                   help="extra candidate bits per chunk (default 2, the release's); each one doubles the encode "
                        "work and reduces the truncated race's bias toward the prior")
    p.add_argument("--backend", choices=["auto", "triton", "cpu", "numpy"], default="auto",
                   help="candidate scoring (default: triton on CUDA, else the compiled CPU kernel, else numpy)")


def register(sub) -> None:
    diffc = sub.add_parser("diffc", help="DiffC: zero-shot variable-rate coding with a CoD model (docs/diffc.md)")
    dsub = diffc.add_subparsers(dest="diffc_command", metavar="COMMAND", parser_class=diffc.__class__)
    diffc.set_defaults(func=_cmd_missing)

    p = dsub.add_parser("compress", help="images -> DiffC .cod files at a chosen rate")
    _common(p, "image files (PNG/JPEG/WebP/TIFF/BMP), folders or glob patterns")
    rate = p.add_mutually_exclusive_group(required=True)
    rate.add_argument("--bpp", type=positive_float, help="target bits per pixel (file size, all headers counted)")
    rate.add_argument("--steps", type=non_negative_int, help="number of DiffC steps K (0-160)")
    rate.add_argument("--recon-t", type=positive_float, help="the release's recon timestep (900 ... 2): K = steps "
                                                              "down to the first schedule entry <= T")
    _rate_arguments(p)
    p.add_argument("-o", "--out", required=True, help="output folder (or .cod file, for one input)")
    add_overwrite_argument(p, "existing .cod files")
    p.set_defaults(func=_cmd_compress)

    p = dsub.add_parser("decompress", help="DiffC .cod files -> PNG images")
    _common(p, ".cod files, folders (their .cod files) or glob patterns")
    p.add_argument("-o", "--out", required=True, help="output folder (or .png file, for one input)")
    add_overwrite_argument(p, "existing PNG files")
    p.set_defaults(func=_cmd_decompress)

    p = dsub.add_parser("evaluate", help="rate-distortion sweep (bpp vs PSNR / MS-SSIM) from one encode per image")
    _common(p, "image files, folders or glob patterns")
    p.add_argument("--recon-t", help="comma-separated recon timesteps (default: the release's list)")
    p.add_argument("--steps", help="comma-separated K values instead of recon timesteps")
    _rate_arguments(p, sweep=True)
    p.add_argument("--out-dir", default="diffc-eval", help="where rd.csv and rd.json go")
    add_overwrite_argument(p, "the reports of an earlier evaluation in --out-dir")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_missing(args) -> None:
    raise ValueError("choose a DiffC command: compress, decompress or evaluate (see `cod diffc --help`)")


def _step_printer(args, name: str):
    if getattr(args, "quiet", False):
        return None

    def show(info: dict) -> None:
        extra = f" n={info['budget']} bits, {info['bpp']:.4f} bpp" if "budget" in info else ""
        print(f"diffc: {name}: step {info['step']}/{info['of']} t={info['t']:.3f}{extra} ({info['seconds']:.1f} s)",
              file=sys.stderr, flush=True)
    return show


def _warnings_as_lines(args, caught) -> None:
    if not getattr(args, "quiet", False):
        for w in caught:
            print(f"cod: warning: {w.message}", file=sys.stderr)


def _rate(args) -> dict:
    return {"bpp": args.bpp, "steps": args.steps, "recon_t": args.recon_t}


def _cmd_compress(args) -> None:
    from cod.codec import api
    from cod.diffc import codec, schedule
    from cod.files import atomic_write_bytes, check_outputs

    if args.steps is not None and args.steps > len(schedule.ENCODING_TIMESTEPS):
        raise ValueError(f"--steps {args.steps}: the schedule has {len(schedule.ENCODING_TIMESTEPS)} steps")
    inputs = collect_inputs(args.inputs, IMAGE_SUFFIXES, args.recursive)
    targets = _targets(inputs, args.out, ".cod")
    check_outputs(targets, inputs, args.overwrite, own=api.is_cod_file)
    limits = limits_from(args)
    model = load_model(args)
    failures: list[str] = []
    total = 0
    for src, dst in zip(inputs, targets):
        try:
            image = _read(args, src, limits.max_pixels)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", codec.DiffCWarning)
                enc = codec.compress(model, image, seed=args.seed, conditional=not args.unconditional,
                                     padding=args.padding, backend=args.backend, limits=limits,
                                     on_step=_step_printer(args, str(src)), **_rate(args))
            _warnings_as_lines(args, caught)
            atomic_write_bytes(dst, enc.data, overwrite=args.overwrite)
            total += len(enc.data)
            if not getattr(args, "quiet", False):
                H, W = image.shape[:2]
                print(f"{src} -> {dst}: K={enc.fields.steps}, {len(enc.data)} bytes, "
                      f"{8 * len(enc.data) / (H * W):.4f} bpp ({enc.seconds['encode']:.1f} s)", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - one failing image must not stop the others
            message = failure_message(e)
            if message is None:
                raise
            failures.append(message if str(src) in message else f"{src}: {message}")
    _finish(args, failures, len(inputs),
            f"compressed {len(inputs) - len(failures)} image(s) into {total} bytes -> {args.out}")


def _cmd_decompress(args) -> None:
    from cod.codec import api
    from cod.diffc import codec
    from cod.files import check_outputs, read_bytes_bounded
    from cod.images import is_cod_png, write_png

    inputs = collect_inputs(args.inputs, {".cod"}, args.recursive)
    targets = _targets(inputs, args.out, ".png")
    check_outputs(targets, inputs, args.overwrite, own=is_cod_png)
    limits = limits_from(args)
    model = load_model(args)
    failures: list[str] = []
    parsed = []
    for src, dst in zip(inputs, targets):  # every file parsed and checked before any network call
        try:
            item = codec.parse(model, read_bytes_bounded(src, api.MAX_FILE_BYTES, ".cod file"), limits)
            codec.check_decodable(model, item, limits, str(src))
            parsed.append((src, dst, item))
        except (ValueError, OSError) as e:
            message = failure_message(e)
            failures.append(message if message.startswith(str(src)) else f"{src}: {message}")
    for src, dst, item in parsed:
        try:
            model._ensure_latent()
            sample = codec.decode_sample(model, item, on_step=_step_printer(args, str(src)))
            write_png(dst, codec._to_image(model, sample, item.geometry), overwrite=args.overwrite)
        except Exception as e:  # noqa: BLE001
            message = failure_message(e)
            if message is None:
                raise
            failures.append(f"{src}: {message}")
    _finish(args, failures, len(inputs), f"decompressed {len(inputs) - len(failures)} file(s) -> {args.out}")


def _numbers(text: str | None, kind, option: str) -> list | None:
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} {text}: expected comma-separated numbers") from None
    if not values or min(values) < 0:
        raise ValueError(f"{option} {text}: expected non-negative numbers")
    return values


def _cmd_evaluate(args) -> None:
    from cod.diffc import evaluate, schedule
    from cod.files import atomic_write_bytes, check_outputs

    recon = _numbers(args.recon_t, float, "--recon-t")
    ks = _numbers(args.steps, int, "--steps")
    if recon and ks:
        raise ValueError("give --recon-t or --steps, not both")
    if ks and max(ks) > len(schedule.ENCODING_TIMESTEPS):
        raise ValueError(f"--steps: the schedule has {len(schedule.ENCODING_TIMESTEPS)} steps")
    inputs = collect_inputs(args.inputs, IMAGE_SUFFIXES, args.recursive)
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir}: exists and is not a folder")
    reports = [out_dir / "rd.csv", out_dir / "rd.json"]
    check_outputs(reports, inputs, args.overwrite, own=lambda path: True)
    limits = limits_from(args)
    model = load_model(args)
    sweep = evaluate.sweep_steps(model, recon, ks)
    rows, failures = [], []
    for src in inputs:
        try:
            image = _read(args, src, limits.max_pixels)
            start = time.perf_counter()
            for row in evaluate.evaluate_image(model, image, sweep, args.seed, not args.unconditional, args.backend,
                                               _step_printer(args, str(src)), limits):
                rows.append({"image": str(src), **row})
            if not getattr(args, "quiet", False):
                print(f"evaluate: {src} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
        except Exception as e:  # noqa: BLE001
            message = failure_message(e)
            if message is None:
                raise
            failures.append(message if str(src) in message else f"{src}: {message}")
    if rows:
        out_dir.mkdir(parents=True, exist_ok=True)
        keys = list(rows[0])
        csv = ",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n" for r in rows)
        atomic_write_bytes(reports[0], csv.encode(), overwrite=True)
        atomic_write_bytes(reports[1], (json.dumps(rows, indent=1) + "\n").encode(), overwrite=True)
        if not getattr(args, "quiet", False):
            print(f"{'K':>4} {'bpp':>9} {'PSNR':>7} {'MS-SSIM':>8}  (mean over {len({r['image'] for r in rows})} "
                  f"image(s))")
            for K in sweep:
                sel = [r for r in rows if r["K"] == K]
                if sel:
                    mean = {m: sum(r[m] for r in sel) / len(sel) for m in ("bpp", "psnr", "ms_ssim")}
                    print(f"{K:>4} {mean['bpp']:9.5f} {mean['psnr']:7.3f} {mean['ms_ssim']:8.4f}")
            print(f"reports: {reports[0]}, {reports[1]}")
    _finish(args, failures, len(inputs), "")
