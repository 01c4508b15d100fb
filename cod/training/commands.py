"""`cod fit / validate / test / predict` (LightningCLI), dispatched from cod/cli.py.

Config composition: a YAML file may start with `extends: other.yaml` (a path relative to it, or a list of them);
the chain is expanded into LightningCLI's own `--config A --config B ...` merging, base first. So conf/ holds one
shared base plus small per-variant files instead of near-copies.
"""
from __future__ import annotations

import contextlib
import logging
import re
import os
import sys
import warnings
from pathlib import Path

import yaml

from cod.errors import OutputExistsError
from cod.files import load_yaml, read_bytes_bounded
from cod.model_config import MAX_CONFIG_BYTES


MAX_EXTENDS_DEPTH = 16
MAX_CONFIG_FILES = 64


def _expand(path: Path, seen: tuple = (), budget: list | None = None) -> list[str]:
    """A config file and the files it `extends`, base first, each as YAML text with its relative paths resolved
    (LightningCLI's --config takes YAML text as well as paths, so no temporary file is involved)."""
    budget = [MAX_CONFIG_FILES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"config {path}: `extends` brings in more than {MAX_CONFIG_FILES} files")
    if path.resolve() in seen:
        raise ValueError(f"config {path} extends itself (cycle: {' -> '.join(map(str, seen))})")
    if len(seen) > MAX_EXTENDS_DEPTH:
        raise ValueError(f"config {path}: `extends` chains deeper than {MAX_EXTENDS_DEPTH} files")
    data = load_yaml(read_bytes_bounded(path, MAX_CONFIG_BYTES, "config file"), str(path)) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping at the top level")
    parents = data.pop("extends", None) or []
    parents = [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ValueError(f"{path}: `extends` must be a file name or a list of file names")
    chain: list[str] = []
    for parent in parents:
        chain += _expand((path.parent / parent), seen + (path.resolve(),), budget)
    return chain + [yaml.safe_dump(_resolve_paths(data, path.parent))]


def _resolve_paths(data: dict, base: Path) -> dict:
    """`data.train` / `data.val` / `model.init_from` (and the distillation's `model.teacher` / `student_init`)
    given relative to the config file are made absolute when that file exists there (so `cod fit --config
    conf/tiny.yaml` works from any directory)."""
    for section, keys in (("data", ("train", "val")), ("model", ("init_from", "teacher", "student_init"))):
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


YAML_SUFFIXES = (".yaml", ".yml", ".json")


def check_config_files(values) -> None:
    """LightningCLI also reads YAML files named by other options (`--data FILE`, `--model FILE`) and by string
    values inside configs; each such existing file goes through the same bounded, alias-checked reading first."""
    for value in values:
        if isinstance(value, dict):
            check_config_files(value.values())
        elif isinstance(value, list):
            check_config_files(value)
        elif isinstance(value, str) and value.lower().endswith(YAML_SUFFIXES) and "\n" not in value and \
                os.path.lexists(value):
            load_yaml(read_bytes_bounded(value, MAX_CONFIG_BYTES, "config file"), value)


def check_ckpt_path(argv: list[str]) -> None:
    """`--ckpt_path FILE` (resume) is read by Lightning with torch.load: refuse what is not a checkpoint of
    `cod fit` (guarded against allocation bombs like every torch file cod reads), and never allow unpickling."""
    from cod.models.state_dict import load_torch_file

    for i, arg in enumerate(argv):
        if arg.startswith("--weights_only") and "false" in (arg.partition("=")[2] or "".join(argv[i + 1:i + 2])).lower():
            raise ValueError("--weights_only false would unpickle the checkpoint (unpickling can run any code); cod "
                             "resumes its own checkpoints without it")
    for i, arg in enumerate(argv):
        value = arg.partition("=")[2] if arg.startswith("--ckpt_path=") else (
            argv[i + 1] if arg == "--ckpt_path" and i + 1 < len(argv) else None)
        if value and value not in ("last", "best", "hpc", "registry"):
            ckpt = load_torch_file(value, "checkpoint")
            if not (isinstance(ckpt, dict) and "pytorch-lightning_version" in ckpt and "state_dict" in ckpt):
                raise ValueError(f"--ckpt_path {value}: not a checkpoint written by `cod fit` (no Lightning state)")


def expand_configs(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            for text in _expand(Path(argv[i + 1])):
                out += ["--config", text]
            i += 2
            continue
        if arg.startswith("--config="):
            for text in _expand(Path(arg.split("=", 1)[1])):
                out += ["--config", text]
        else:
            out.append(arg)
        i += 1
    return out


HELP_FLAGS = ("-h", "--help", "--print_config", "--print-config")

# The LightningModules `cod fit` trains. A config without `model.class_path` trains CoD itself (flat `model:`
# settings, conf/base.yaml); one that names another module here (`model: {class_path: ..., init_args: ...}`)
# trains that. Only these names are accepted: a config never makes cod import anything else.
TRAINING_MODULES = {"cod.training.dmd.DMDDistillation": ("cod.training.dmd", "DMDDistillation")}


def training_module(args: list[str]):
    """(LightningModule class, subclass mode) for the composed `--config` texts: the last `model.class_path`
    decides."""
    import importlib

    chosen = None
    for i, arg in enumerate(args[:-1]):
        if arg == "--config":
            data = yaml.safe_load(args[i + 1]) if args[i + 1].count("\n") else None
            model = data.get("model") if isinstance(data, dict) else None
            if isinstance(model, dict) and "class_path" in model:
                chosen = model["class_path"]
    if chosen is None:
        from cod.training.module import CoDTrainingModule

        return CoDTrainingModule, False
    if chosen not in TRAINING_MODULES:
        raise ValueError(f"model.class_path {chosen!r}: cod fit trains CoD (no class_path: conf/base.yaml) or one of "
                         f"{', '.join(TRAINING_MODULES)}")
    module, name = TRAINING_MODULES[chosen]
    return getattr(importlib.import_module(module), name), True


class _QuietLightning(logging.Filter):
    """Lightning's advertising tips are not information about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


@contextlib.contextmanager
def quiet_third_party():
    """Keep the run's output about the run: no deprecation notices from libraries, no tips, and no warning from
    LightningCLI that we pass it arguments (we do, after expanding `extends:`)."""
    from lightning_utilities.core import rank_zero

    quiet = _QuietLightning()
    # filters apply to the logger a record is logged on (not its parents): Lightning logs through rank_zero.log
    loggers = {id(x): x for x in (rank_zero.log, logging.getLogger("lightning.pytorch.utilities.rank_zero"),
                                  logging.getLogger("lightning.fabric.utilities.rank_zero"))}.values()
    for logger in loggers:
        logger.addFilter(quiet)
    argv, sys.argv = sys.argv, sys.argv[:1]
    package = str(Path(__file__).resolve().parents[1])

    def show(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(package):  # cod's own notices (skipped files, ...): one plain line each
            print(f"cod: warning: {message}", file=sys.stderr)
        else:
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category)
            warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the EMA copy, by design
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")  # it logs anyway
            yield
    finally:
        sys.argv = argv
        for logger in loggers:
            logger.removeFilter(quiet)


_TYPE_NOISE = ("Does not validate against", "Expected a ", "Given value", "Not a valid subclass", "Import path")


def config_error(e: Exception) -> str:
    """One line for a config that does not validate. A module built from the config (`class_path`) that raised
    (a weights file missing, ...) reaches us wrapped in jsonargparse's report of every union member it tried:
    its own message is the part that is not about types."""
    text = " ".join(str(e).split())
    parts = [part.strip() for part in text.split(" - ")]
    if len(parts) > 1:
        own = [part for part in parts[1:] if not part.startswith(_TYPE_NOISE)]
        if own:
            return own[0]
    return text


def lightning_main(argv: list[str]) -> int:
    from cod.cli import EXIT_USAGE, run

    command = argv[0]
    if not any(a in ("--config", "-c") or a.startswith("--config=") for a in argv) and \
            not any(a in HELP_FLAGS or a.startswith("--print_config") for a in argv):
        print(f"cod: error: `cod {command}` needs --config FILE, e.g. `cod {command} --config conf/tiny.yaml` "
              f"(see conf/ and docs/training.md)", file=sys.stderr)
        return EXIT_USAGE
    status = {"code": 0}

    def go() -> None:
        import argparse

        from lightning.pytorch.cli import LightningCLI

        from cod.training.data import ImageDataModule

        args = expand_configs(argv)
        check_config_files([yaml.safe_load(a) if a.count("\n") else a for a in args])
        check_ckpt_path(argv)
        module_class, subclass_mode = training_module(args)
        with quiet_third_party():
            try:
                # the run's config.yaml never replaces an existing file (with the logger off it lands in the
                # current folder)
                LightningCLI(module_class, ImageDataModule, args=args, save_config_kwargs={"overwrite": False},
                             subclass_mode_model=subclass_mode, parser_kwargs={"prog": "cod", "exit_on_error": False})
            except argparse.ArgumentError as e:  # a config value of the wrong type, an unknown key, ...
                print(f"cod: error: {config_error(e)} (see `cod {command} --help`)", file=sys.stderr)
                status["code"] = EXIT_USAGE
            except (TypeError, ValueError) as e:
                if "Does not validate against" not in str(e):
                    raise
                # a module the config builds (class_path) refused its settings: its own message
                print(f"cod: error: {config_error(e)}", file=sys.stderr)
                status["code"] = EXIT_USAGE
            except RuntimeError as e:
                if "to NOT exist" not in str(e):
                    raise
                found = re.search(r"expected (.+?) to NOT exist", str(e))
                existing = found.group(1) if found else "config.yaml"
                raise OutputExistsError(f"{existing} exists already (an earlier run's saved config?): cod does not "
                                        f"replace it; run in another folder or set a new trainer.default_root_dir"
                                        ) from None

    code = run(go)
    return code or status["code"]
