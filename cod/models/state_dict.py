"""Weights files: reading torch checkpoints safely, and strict state-dict checking (the one place that compares
weights with a module's layout).

The release copies the keys it finds and silently keeps initial values for the rest (QUIRK 16b); we never do.
"""
from __future__ import annotations

import pickle

import torch
import torch.nn as nn

from cod.errors import InputError
from cod.files import regular_file_stat


def check_torch_file(path, what: str = "checkpoint") -> None:
    """Refuse, before torch.load reads it, a file that could expand in memory: it must be a regular file, and a
    file in torch's zip format (torch.load's own test: it starts with a zip local header) must not hold records
    whose sizes add up to more than the file, as torch's own zip reader sees them (a compressed record is a
    decompression bomb; torch.save never compresses). The older pickle format stores its data inline."""
    size = regular_file_stat(path, f"{what} file").st_size
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        total = sum(reader.get_record_size(name) for name in reader.get_all_records())
    except Exception as e:  # noqa: BLE001 - torch's reader raises RuntimeError for any damaged archive
        raise InputError(f"{path} is not a readable torch {what} ({' '.join(str(e).split())[:200]})") from None
    if total > size:
        raise InputError(f"{path} is not a torch {what} as torch.save writes it: its records hold {total} bytes "
                         f"in a {size}-byte file (compressed: a decompression bomb?)")


def load_torch_file(path, what: str = "checkpoint", safe_globals=()):
    """torch.load of an untrusted file, without running code (weights_only) and without allocation bombs
    (check_torch_file). Every failure is an InputError naming path."""
    check_torch_file(path, what)
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path} holds pickled Python objects besides tensors, which cod refuses to unpickle: "
                         f"unpickling a file can run any code in it ({first[:200]}). Use the original checkpoint "
                         f"(it loads as weights only), or ask for a weights-only or safetensors version") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for damaged or foreign files
        raise InputError(f"{path} is not a readable torch {what} ({' '.join(str(e).split())[:300]})") from None


def tensor_state(state, source: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The entries of a loaded checkpoint dict whose names start with prefix (prefix removed), checked to be real
    floating-point tensors: anything else in a weights file is refused, naming the entry."""
    if not isinstance(state, dict):
        raise InputError(f"{source} does not hold a dict of tensors (found {type(state).__name__})")
    out = {}
    for key, value in state.items():
        if not isinstance(key, str) or not key.startswith(prefix):
            continue
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point or value.is_complex():
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(f"{source}: entry {key!r} is {kind}, not a floating-point tensor")
        if value.numel() and value.numel() * value.element_size() > value.untyped_storage().nbytes():
            # an expanded (stride-0) or overlapping view: a few stored bytes that become gigabytes when copied
            raise InputError(f"{source}: entry {key!r} views {value.numel()} values stored in "
                             f"{value.untyped_storage().nbytes()} bytes (not a plain tensor)")
        out[key[len(prefix):]] = value
    return out


class StateDictMismatch(ValueError):
    """Weights whose keys or shapes do not fit the module; the message lists them."""


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise one StateDictMismatch naming the missing, unexpected and mis-shaped keys (first 10 of each, with
    counts) unless `state` fits `module` exactly."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = [(title, items) for title, items in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if items]
    if problems:
        lines = [f"{what} does not match the model:"]
        for title, items in problems:
            lines.append(f"  {len(items)} {title}:")
            lines += [f"    {item}" for item in items[:10]]
            if len(items) > 10:
                lines.append(f"    ... and {len(items) - 10} more")
        raise StateDictMismatch("\n".join(lines))


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    check_state_dict(module, state, what)
    module.load_state_dict(state, strict=True)
