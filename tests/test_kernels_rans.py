"""The Triton rANS kernels against the NumPy coder, byte for byte, run on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported, so the kernels run in a subprocess; the interpreter is slow,
so the streams are short. On a GPU, `python tools/bench_entropy.py coder --device cuda` checks 1024 streams."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cod.entropy import StreamError, encode, quantize_pmf
from cod.kernels import decode_batch, decode_batch_reference, encode_batch, encode_batch_reference, has_triton
from cod.kernels.rans import INTERPRETED

pytestmark = pytest.mark.skipif(not has_triton(), reason="triton is not installed")

SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    from cod.entropy import StreamError, encode, quantize_pmf
    from cod.kernels import decode_batch, encode_batch
    rng = np.random.default_rng(0)
    K, T = 16, 3
    f = quantize_pmf(rng.dirichlet(np.full(K, 0.5), size=T))
    f[2] = quantize_pmf(np.r_[1.0, np.full(K - 1, 1e-9)])  # a table at the frequency floor
    lengths = [0, 1, 5, 37, 100, 64]
    syms, rows = [], []
    for n in lengths:
        t = rng.integers(0, T, n)
        cdf = np.cumsum(f, axis=1)
        syms.append((cdf[t] <= rng.integers(0, 1 << 16, n)[:, None]).sum(1))
        rows.append(t)
    syms[3][:5] = 15  # rare symbols (frequency 1 where table 2 is used)
    report = {}
    for lanes in (None, 1, 3, 8):
        got = encode_batch(syms, f, rows, lanes, backend="triton", device="cpu")
        want = [encode(s, f, t, lanes=lanes) for s, t in zip(syms, rows)]
        report[f"encode lanes={lanes}"] = [g == w for g, w in zip(got, want)]
        back = decode_batch(want, f, rows, lanes=lanes, backend="triton", device="cpu")
        report[f"decode lanes={lanes}"] = [bool(np.array_equal(b, s)) for b, s in zip(back, syms)]
    one = [rng.integers(0, 256, 40)]  # 8-bit symbols, one table, a length given instead of table indices
    g = quantize_pmf(np.ones((1, 256)))
    data = encode_batch(one, g, None, 4, backend="triton", device="cpu")
    report["one table"] = [bool(np.array_equal(decode_batch(data, g, n_list=[40], lanes=4, backend="triton",
                                                            device="cpu")[0], one[0]))]
    errors = []
    good = encode(syms[4], f, rows[4])
    for bad in (good[:-1], good + b"\\x00", bytes([good[0] ^ 0x40]) + good[1:]):
        try:
            decode_batch([encode(syms[2], f, rows[2]), bad], f, [rows[2], rows[4]], backend="triton", device="cpu")
            errors.append("accepted")
        except StreamError as e:
            errors.append(str(e))
    report["errors"] = errors
    print(json.dumps(report))
""")


def test_triton_kernels_match_the_numpy_coder_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    errors = report.pop("errors")
    assert len(report) == 9
    for case, ok in report.items():
        assert all(ok), (case, ok)
    assert len(errors) == 3
    for message in errors:  # the second stream is named, and the reference's reasons are given
        assert message.startswith("stream 1: "), message


def test_reference_backend_is_the_numpy_coder():
    rng = np.random.default_rng(1)
    f = quantize_pmf(rng.dirichlet(np.ones(8), size=2))
    syms = [rng.integers(0, 8, n) for n in (0, 3, 50)]
    rows = [rng.integers(0, 2, len(s)) for s in syms]
    data = encode_batch(syms, f, rows, backend="reference")
    assert data == encode_batch_reference(syms, f, rows) == [encode(s, f, t) for s, t in zip(syms, rows)]
    back = decode_batch(data, f, rows, backend="reference")
    assert all(np.array_equal(a, b) for a, b in zip(back, syms))
    assert all(np.array_equal(a, b) for a, b in zip(decode_batch_reference(data, f, rows), syms))
    with pytest.raises(StreamError, match="^stream 2: "):
        decode_batch([data[0], data[1], data[2][:-1]], f, rows, backend="reference")
    with pytest.raises(ValueError, match="backend"):
        encode_batch(syms, f, rows, backend="cuda")


@pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1 makes CPU tensors valid kernel inputs")
def test_forcing_triton_on_cpu_without_the_interpreter_explains_itself():
    f = quantize_pmf(np.ones((1, 4)))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        encode_batch([np.zeros(3, dtype=np.int64)], f, backend="triton", device="cpu")
