"""`cod` command line: thin subcommands over the Python API.

Every failure ends with one `cod: error: ...` line on stderr and a non-zero exit status (docs/robustness.md):
  1  the input, an option value, a limit or the environment was refused (the message says what to do)
  2  the command line itself is wrong (unknown option, missing argument)
  3  an unexpected failure inside cod (a bug: rerun with COD_DEBUG=1 for the traceback, and report it)
  130 interrupted (Ctrl-C)
Set COD_DEBUG=1 to see the traceback of any failure instead.
"""
from __future__ import annotations

import argparse
import os
import sys

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130

LIGHTNING_COMMANDS = {
    "fit": "train a CoD from a YAML config (LightningCLI; see `cod fit --help` and conf/)",
    "validate": "run validation of a config/checkpoint (LightningCLI)",
}


class CLIError(Exception):
    """An error whose message is the whole story for the user."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one `cod: error:` line (no usage dump) and exit status 2."""

    def error(self, message: str):
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        hint = f"see `cod {command + ' ' if command else ''}--help`"
        self.exit(EXIT_USAGE, f"cod: error: {' '.join(message.split())} ({hint})\n")


def _cmd_new_model(args) -> None:
    from cod.files import check_output_dir
    from cod.model import is_model_dir, new_model

    check_output_dir(args.out, overwrite=args.overwrite, own=is_model_dir)
    model = new_model(args.preset, args.out, seed=args.seed, ds=args.ds, bits=args.bits, up2x=args.up2x,
                      overwrite=args.overwrite)
    _say(args, f"wrote {args.out}: {args.preset}, {model.bpp:.6g} bpp, sides multiple of {model.size_multiple}")


def _cmd_import_official(args) -> None:
    from cod.compat.official_checkpoint import import_official
    from cod.files import check_output_dir
    from cod.model import is_model_dir

    check_output_dir(args.out, [args.ckpt] + ([args.config] if args.config else []) + ([args.vae] if args.vae
                                                                                     else []), args.overwrite,
                     own=is_model_dir)
    model = import_official(args.ckpt, args.out, config=args.config, preset=args.preset, weights=args.weights,
                            vae=args.vae, overwrite=args.overwrite)
    _say(args, f"wrote {args.out}: {model.config['denoiser']['class']}, {model.bpp:.6g} bpp, "
               f"fingerprint {model.fingerprint[:16]}")


def _cmd_info(args) -> None:
    import json

    from cod.model import read_config

    print(json.dumps(read_config(args.model), indent=2))


def _cmd_export(args) -> None:
    from cod.codec.commands import load_model
    from cod.export import check_exportable, export, is_export_dir
    from cod.files import check_output_dir

    check_exportable(args.format)
    check_output_dir(args.out, [args.model], args.overwrite, own=is_export_dir)
    args.device = "cpu"
    manifest = export(load_model(args), args.out, fmt=args.format, height=args.height, width=args.width,
                      batch=args.batch, overwrite=args.overwrite)
    for name, graph in manifest["graphs"].items():
        _say(args, f"{args.out}/{graph['file']}: {name}, max |error| vs PyTorch {graph['max_abs_err_vs_eager']:.2e}")


def _cmd_presets(args) -> None:
    from cod.models.presets import PRESETS, rate_table

    from cod.models.onestep_presets import ONESTEP_PRESETS

    print("presets:")
    for name, preset in PRESETS.items():
        print(f"  {name:16s} {preset.description}")
    print("\none-step presets (decoded in one network pass; spec one-step.md):")
    for name, preset in ONESTEP_PRESETS.items():
        print(f"  {name:26s} {preset.description}")
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
    from cod import __version__
    from cod.codec.commands import non_negative_int, positive_int

    parser = Parser(prog="cod", description="CoD: compression-oriented diffusion image codec",
                    epilog="exit status: 0 ok, 1 refused input or failure (one `cod: error:` line), 2 bad command "
                           "line, 3 internal error (a bug; rerun with COD_DEBUG=1), 130 interrupted")
    parser.add_argument("--version", action="version", version=f"cod {__version__}")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("new-model", help="write a randomly initialised model directory of a preset")
    p.add_argument("--preset", required=True, help="preset name (see `cod presets`)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--ds", type=positive_int, help="nominal downsampling of the index grid (4/8/16/32/128)")
    p.add_argument("--bits", type=positive_int, help="bits per index (codebook of 2^bits entries)")
    p.add_argument("--up2x", type=_bool, help="true: index stride = ds; false: ds/2")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    p.set_defaults(func=_cmd_new_model)

    p = sub.add_parser("import-official", help="import a released checkpoint (CoD, One-step CoD, CoD-Lite) into a "
                                               "model directory")
    p.add_argument("--ckpt", required=True, help="the release's .pt/.ckpt file (read with weights_only)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="the release's YAML config for that checkpoint")
    src.add_argument("--preset", help="or a cod preset with the same architecture (e.g. pixel-xl, cod-lite-0.0039; "
                                      "see `cod presets`)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--weights", choices=["ema", "raw"],
                   help="CoD and CoD-Lite pre-training checkpoints: EMA (inference, default) or raw weights; one-step "
                        "files hold one set")
    p.add_argument("--vae", help="latent models: SD-VAE weights to bundle (else $COD_VAE_PATH at load time)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    p.set_defaults(func=_cmd_import_official)

    p = sub.add_parser("info", help="print a model directory's config")
    p.add_argument("model")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("export", help="export encoder, decoder and denoiser step to TorchScript or ONNX")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx",
                   help="onnx (needs the onnx extra: pip install 'cod[onnx]') or torchscript")
    p.add_argument("--height", type=positive_int, default=512)
    p.add_argument("--width", type=positive_int, default=512)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("presets", help="list model presets and the rate table")
    p.set_defaults(func=_cmd_presets)

    for register in _command_modules():
        register(sub)
    for name, p in sub.choices.items():  # -q/--quiet after any subcommand too (as before it)
        if name not in LIGHTNING_COMMANDS and "quiet" not in {a.dest for a in p._actions}:
            p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                           help="print nothing but errors")
    for name, help_text in LIGHTNING_COMMANDS.items():  # dispatched to LightningCLI before parsing; listed here
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _command_modules():
    """Subcommands that live with their concept (codec product, training) register themselves here."""
    from cod import demo
    from cod.codec import commands as codec_commands
    from cod.diffc import commands as diffc_commands
    from cod.training import prior

    return [codec_commands.register, diffc_commands.register, prior.register, demo.register]


def run(func, *args) -> int:
    """Call func(*args) and turn every failure into one `cod: error:` line and an exit status."""
    from cod.errors import describe_error, is_out_of_memory

    try:
        func(*args)
    except KeyboardInterrupt:
        print("cod: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the one place where every failure becomes one line
        if os.environ.get("COD_DEBUG", "") not in ("", "0"):
            raise
        if isinstance(e, (CLIError, ValueError, OSError)) or is_out_of_memory(e):
            print(f"cod: error: {describe_error(e)}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"cod: error: unexpected failure ({type(e).__name__}: {describe_error(e)}); rerun with COD_DEBUG=1 "
              f"to see the traceback, and please report it", file=sys.stderr)
        return EXIT_INTERNAL
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from cod.training.commands import lightning_main

        return lightning_main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    return run(args.func, args)


if __name__ == "__main__":
    from cod.cli import main as _main  # the package's copy, whose error classes the subcommands raise

    sys.exit(_main())
