"""Data-parallel training is the same computation: 2 CPU processes (DDP, or FSDP2 through Lightning's
ModelParallelStrategy, over gloo) with 4 samples each give the losses of one process with the global batch of 8,
step after step (the per-sample noise is seeded by the sample, not by the process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TRAIN256, require
from cod.training.module import CoDTrainingModule

SCRIPT = ROOT / "tests" / "helpers" / "train_steps.py"


def run(*args, expect_rc: int = 0) -> list[float]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(SCRIPT), str(require(TRAIN256)), *args], capture_output=True,
                         text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == expect_rc, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("LOSSES "))
    return json.loads(line[len("LOSSES "):])


def test_ddp_two_processes_match_one_process_on_the_global_batch():
    single = run("--devices", "1", "--batch", "8", "--steps", "3")
    ddp = run("--devices", "2", "--strategy", "ddp", "--batch", "4", "--steps", "3")
    assert len(single) == len(ddp) == 3
    assert single[0] == pytest.approx(ddp[0], rel=1e-5)      # same samples, same noise
    assert single[1:] == pytest.approx(ddp[1:], rel=1e-4)    # same averaged gradients, same updates
    assert single[0] != pytest.approx(single[2], rel=1e-3)   # and training moved


def test_fsdp2_two_processes_match_one_process_and_export_the_full_ema(tmp_path):
    """FSDP2 shards the denoiser, the objective's heads and the EMA copy over 2 CPU ranks; the losses follow the
    one-process run and the exported model directory holds the whole (gathered) EMA weights."""
    import cod

    single = run("--devices", "1", "--batch", "8", "--steps", "3", "--export", str(tmp_path / "single"))
    fsdp = run("--devices", "2", "--strategy", "fsdp2", "--batch", "4", "--steps", "3",
               "--export", str(tmp_path / "fsdp"))
    assert single[0] == pytest.approx(fsdp[0], rel=1e-5)
    assert single[1:] == pytest.approx(fsdp[1:], rel=1e-4)
    a, b = cod.load(tmp_path / "single").denoiser.state_dict(), cod.load(tmp_path / "fsdp").denoiser.state_dict()
    init = CoDTrainingModule("tiny-pixel").denoiser.state_dict()
    assert a.keys() == b.keys() == init.keys()
    assert all(a[k].shape == b[k].shape for k in a)
    # Adam turns last-bit gradient differences into update differences, so compare the runs' distance to
    # each other with how far training moved the average from its initial weights.
    moved = sum((a[k] - init[k]).abs().sum() for k in a)
    apart = sum((a[k] - b[k]).abs().sum() for k in a)
    assert moved > 0 and apart < 0.01 * moved  # measured: 1e-4


def test_sigkill_and_resume_continue_with_the_uninterrupted_losses(tmp_path):
    """A run killed with SIGKILL after step 5 (last checkpoint at step 3) and resumed from that checkpoint trains
    steps 4-8 exactly as the uninterrupted run: optimizer, EMA, step, noise and data position are restored."""
    full = run("--batch", "4", "--steps", "8")
    ckpt = tmp_path / "ckpt"
    crashed = run("--batch", "4", "--steps", "8", "--ckpt-dir", str(ckpt), "--ckpt-every", "3", "--kill-at", "5",
                  expect_rc=-9)
    assert crashed == pytest.approx(full[:5], rel=1e-6)
    resumed = run("--batch", "4", "--steps", "8", "--resume", str(ckpt / "last.ckpt"))
    assert len(resumed) == 5
    assert resumed == pytest.approx(full[3:], rel=1e-5)
