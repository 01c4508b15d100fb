"""`cod fit / validate / test / predict` (LightningCLI) and `cod demo`. Registered into cod/cli.py.

Config composition: a YAML file may start with `extends: other.yaml` (a path relative to it, or a list of them);
the chain is expanded into LightningCLI's own `--config A --config B ...` merging, base first. So conf/ holds one
shared base plus small per-variant files instead of near-copies.
"""
from __future__ import annotations

import atexit
import os
import sys
import tempfile
from pathlib import Path

import yaml


def _expand(path: Path, seen: tuple = ()) -> list[Path]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    if path.resolve() in seen:
        raise ValueError(f"config {path} extends itself (cycle: {' -> '.join(map(str, seen))})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping at the top level")
    parents = data.pop("extends", None) or []
    parents = [parents] if isinstance(parents, str) else parents
    chain: list[Path] = []
    for parent in parents:
        chain += _expand((path.parent / parent), seen + (path.resolve(),))
    fd, tmp = tempfile.mkstemp(suffix=".yaml", prefix=f"cod-{path.stem}-")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(_resolve_paths(data, path.parent), f)
    atexit.register(lambda: Path(tmp).unlink(missing_ok=True))
    return chain + [Path(tmp)]


def _resolve_paths(data: dict, base: Path) -> dict:
    """`data.train` / `data.val` / `model.init_from` given relative to the config file are made absolute when
    that file exists there (so `cod fit --config conf/tiny.yaml` works from any directory)."""
    for section, keys in (("data", ("train", "val")), ("model", ("init_from",))):
        block = data.get(section)
        if isinstance(block, dict):
            block = block.get("init_args", block)
            for key in keys:
                value = block.get(key)
                if isinstance(value, str) and ":" not in value.split("/")[0] and not Path(value).is_absolute():
                    candidate = (base / value).resolve()
                    if candidate.exists():
                        block[key] = str(candidate)
    return data


def expand_configs(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            for p in _expand(Path(argv[i + 1])):
                out += ["--config", str(p)]
            i += 2
            continue
        if arg.startswith("--config="):
            for p in _expand(Path(arg.split("=", 1)[1])):
                out += ["--config", str(p)]
        else:
            out.append(arg)
        i += 1
    return out


def lightning_main(argv: list[str]) -> int:
    from lightning.pytorch.cli import LightningCLI

    from cod.training.data import ImageDataModule
    from cod.training.module import CoDTrainingModule

    try:
        args = expand_configs(argv)
        LightningCLI(CoDTrainingModule, ImageDataModule, args=args, save_config_kwargs={"overwrite": True},
                     parser_kwargs={"prog": "cod"})
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("COD_DEBUG"):
            raise
        print(f"cod: error: {e}", file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="train a small CoD on bundled photos, then compress held-out ones vs JPEG")
    p.add_argument("--out", default="cod-demo", help="output folder (model directory, picture, report)")
    p.add_argument("--minutes", type=float, default=6.0, help="training time budget (the whole demo takes ~1 min more)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> None:
    from cod.training.demo import run_demo

    run_demo(Path(args.out), minutes=args.minutes, seed=args.seed, quiet=getattr(args, "quiet", False))
