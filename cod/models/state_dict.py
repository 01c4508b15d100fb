"""Strict state-dict checking: the one place that compares weights files with a module's layout.

The release copies the keys it finds and silently keeps initial values for the rest (QUIRK 16b); we never do.
"""
from __future__ import annotations

import torch
import torch.nn as nn


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
