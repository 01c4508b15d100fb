"""`cod` command line: thin subcommands over the Python API.

Every expected failure (bad input, missing file, wrong model) ends with one `cod: error: ...` line and a
non-zero exit; set COD_DEBUG=1 to see the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CLIError(Exception):
    """An error whose message is the whole story for the user."""


def _cmd_new_model(args) -> None:
    from cod.model import new_model

    model = new_model(args.preset, args.out, seed=args.seed, ds=args.ds, bits=args.bits, up2x=args.up2x)
    _say(args, f"wrote {args.out}: {args.preset}, {model.bpp:.6g} bpp, sides multiple of {model.size_multiple}")


def _cmd_import_official(args) -> None:
    from cod.compat.official_checkpoint import import_official

    model = import_official(args.ckpt, args.out, config=args.config, preset=args.preset, weights=args.weights,
                            vae=args.vae)
    _say(args, f"wrote {args.out}: {model.config['denoiser']['class']}, {model.bpp:.6g} bpp, "
               f"fingerprint {model.fingerprint[:16]}")


def _cmd_info(args) -> None:
    from cod.model import _read_config
    from pathlib import Path

    config = _read_config(Path(args.model))
    print(json.dumps(config, indent=2))


def _cmd_export(args) -> None:
    import cod
    from cod.export import export

    manifest = export(cod.load(args.model), args.out, fmt=args.format, height=args.height, width=args.width,
                      batch=args.batch)
    for name, graph in manifest["graphs"].items():
        _say(args, f"{args.out}/{graph['file']}: {name}, max |error| vs PyTorch {graph['max_abs_err_vs_eager']:.2e}")


def _cmd_presets(args) -> None:
    from cod.models.presets import PRESETS, rate_table

    print("presets:")
    for name, preset in PRESETS.items():
        print(f"  {name:16s} {preset.description}")
    print("\nrates (real bpp; the release reports bits/ds^2 even when up2x is off):")
    print(f"  {'ds':>4} {'bits':>4} {'up2x':>5} {'stride':>6} {'bpp':>12} {'bits@512²':>10}")
    for r in rate_table():
        print(f"  {r['ds']:>4} {r['bits']:>4} {str(r['up2x']):>5} {r['index_stride']:>6} {r['bpp']:>12.6g} "
              f"{r['bits_512']:>10}")


def _say(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message)


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{value}'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cod", description="CoD: compression-oriented diffusion image codec")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("new-model", help="write a randomly initialised model directory of a preset")
    p.add_argument("--preset", required=True, help="preset name (see `cod presets`)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ds", type=int, help="nominal downsampling of the index grid (4/8/16/32/128)")
    p.add_argument("--bits", type=int, help="bits per index (codebook of 2^bits entries)")
    p.add_argument("--up2x", type=_bool, help="true: index stride = ds; false: ds/2")
    p.set_defaults(func=_cmd_new_model)

    p = sub.add_parser("import-official", help="import a released CoD checkpoint into a model directory")
    p.add_argument("--ckpt", required=True, help="the release's .pt/.ckpt file (read with weights_only)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="the release's YAML config for that checkpoint")
    src.add_argument("--preset", help="or a cod preset with the same architecture (e.g. pixel-xl)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="EMA (inference) or raw weights")
    p.add_argument("--vae", help="latent models: SD-VAE weights to bundle (else $COD_VAE_PATH at load time)")
    p.set_defaults(func=_cmd_import_official)

    p = sub.add_parser("info", help="print a model directory's config")
    p.add_argument("model")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("export", help="export encoder, decoder and denoiser step to TorchScript or ONNX")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("presets", help="list model presets and the rate table")
    p.set_defaults(func=_cmd_presets)

    for register in _command_modules():
        register(sub)
    return parser


def _command_modules():
    """Subcommands that live with their concept (codec product, training) register themselves here."""
    from cod.codec import commands as codec_commands
    from cod.training import commands as training_commands

    return [codec_commands.register, training_commands.register]


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from cod.training.commands import lightning_main

        return lightning_main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("cod: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, FileNotFoundError, OSError) as e:
        if os.environ.get("COD_DEBUG"):
            raise
        message = str(e) if not isinstance(e, OSError) or not e.strerror else f"{e.filename}: {e.strerror}"
        print(f"cod: error: {message}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    from cod.cli import main as _main  # the package's copy, whose error classes the subcommands raise

    sys.exit(_main())
