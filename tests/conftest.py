"""Shared test helpers: the golden fixtures of the official implementation and the shared data folders.

Fixtures live beside the project root in ../shared; they are read, never copied.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COD_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "cod-reference"
ONESTEP_FIXTURES = SHARED / "fixtures" / "one-step-reference"
KODAK = SHARED / "data" / "kodak"
TRAIN256 = SHARED / "data" / "train256"
VARIANTS = ("pixel_ds32_up2x", "pixel_ds32_stage1", "latent_ds32_up2x", "latent_ds128_up2x")

# Under pytest-xdist each worker gets one thread so that workers do not fight over the two cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _run_in_a_temporary_folder(tmp_path_factory, monkeypatch):
    """Every test runs in its own empty working folder (nothing a test writes lands in the checkout), with its own
    cod cache folder (verified hashes, cost-model tables)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    monkeypatch.setenv("COD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cod-cache"))
    # Lightning's log handlers keep the stream that was sys.stderr when Lightning was imported: under pytest that
    # may be an earlier test's captured (now closed) stream
    import logging
    import sys

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler):
                monkeypatch.setattr(handler, "stream", sys.__stderr__)


def require(path: Path) -> Path:
    """Skip locally when the shared data is absent; in CI (CI=true) that is a failure, since parity with the
    official implementation must never pass by being skipped."""
    if not path.exists():
        message = f"{path} not available (expected ../shared beside the project root, or set COD_SHARED)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@lru_cache(maxsize=None)
def fixture_manifest(variant: str, folder: Path = FIXTURES) -> dict:
    return json.loads((require(folder) / f"{variant}.json").read_text())


@lru_cache(maxsize=None)
def fixture_tensors(variant: str, folder: Path = FIXTURES) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(require(folder) / f"{variant}.safetensors"))


def condition_from_u8(y_u8: torch.Tensor) -> torch.Tensor:
    """The official model input for a uint8 image: bf16(u8 / 255) back in float32."""
    return (y_u8.float() / 255).to(torch.bfloat16).float()


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|a - b| / max(1, max|b|): the fixtures' suggested error measure."""
    return ((actual.float() - expected.float()).abs().max() / max(1.0, expected.abs().max().item())).item()
