"""The benchmark scripts under tools/ run (a tiny configuration each), so that a refactor cannot silently break
the commands docs/benchmarks.md records."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import KODAK, ROOT


@pytest.mark.parametrize("args", [
    ["tools/bench_train.py", "--presets", "tiny-pixel", "--size", "32", "--batch", "2", "--steps", "1"],
    ["tools/bench_codec.py", "--presets", "tiny-pixel", "--sizes", "32", "--steps", "2", "--precision", "fp32,bf16",
     "--repeats", "1", "--threads", "1"],
    ["tools/bench_entropy.py", "coder", "--n", "3000", "--lanes", "8", "--trials", "2", "--repeats", "1"],
    ["tools/bench_onestep.py", "--cases", "tiny-cod-lite@64x48,tiny-onestep-cod@32x32", "--repeats", "1",
     "--threads", "1"],
    ["tools/bench_memory.py", "--sizes", "64x32", "--tile", "32", "--threads", "1"],
    ["tools/time_decode.py", "--preset", "tiny-pixel", "--size", "32", "--steps", "1", "--precision", "fp32",
     "--threads", "1"],
    ["tools/check_tiling.py", "--model", str(ROOT / "cod" / "assets" / "demo-model"), "--images", str(KODAK),
     "--count", "1", "--tiles", "512"],
])
def test_benchmark_script_runs(args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "|" in out.stdout  # the markdown table docs/benchmarks.md records
