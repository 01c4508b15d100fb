"""The Triton attention kernel against its PyTorch reference, run on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported, so the kernel runs in a subprocess. bfloat16 is left to GPU
runs: the interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584); fp16 covers the
low-precision path (p cast to v's dtype, tensor-core dots) instead."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cod.kernels import BACKENDS, attention, attention_reference, attention_triton_forward, has_triton
from cod.kernels.attention import INTERPRETED

pytestmark = pytest.mark.skipif(not has_triton(), reason="triton is not installed")

SCRIPT = textwrap.dedent("""
    import json, torch
    from cod.kernels import attention, attention_reference
    torch.manual_seed(0)
    errors = {}
    for d in (16, 72):
        for L in (1, 7, 64, 130):
            q, k, v = (torch.randn(2, L, 3, d) for _ in range(3))
            out = attention(q, k, v, backend="triton")
            ref = attention_reference(q, k, v)
            errors[f"d{d}-L{L}"] = ((out - ref).abs().max() / ref.abs().max()).item()
    # fp16 in, fp16 out, against the fp32 reference of the same (rounded) inputs
    fp16 = {}
    for d in (16, 72):
        q, k, v = (torch.randn(1, 70, 2, d).half() for _ in range(3))
        out = attention(q, k, v, backend="triton")
        assert out.dtype == torch.float16
        ref = attention_reference(q.float(), k.float(), v.float())
        fp16[f"fp16-d{d}"] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    # strided (non-contiguous) inputs straight from a fused qkv projection
    qkv = torch.randn(1, 33, 3, 2, 72)
    q, k, v = qkv.unbind(2)
    errors["strided"] = ((attention(q, k, v, backend="triton") - attention_reference(q, k, v)).abs().max()).item()
    q, k, v = (torch.randn(1, 20, 2, 16, requires_grad=True) for _ in range(3))
    attention(q, k, v, backend="triton").square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    attention_reference(q, k, v).square().sum().backward()
    errors["grad"] = max((a - t.grad).abs().max().item() for a, t in zip(grads, (q, k, v)))
    # mixed dtypes, as under autocast in mixed-precision training (float32 q, k from RMSNorm; half v): the kernel
    # once refused these, which broke bf16-mixed training on GPUs
    q, k, v = torch.randn(1, 24, 2, 16), torch.randn(1, 24, 2, 16), torch.randn(1, 24, 2, 16).half()
    with torch.autocast("cpu", dtype=torch.float16):
        out = attention(q, k, v, backend="triton")
    assert out.dtype == torch.float16
    ref = attention_reference(q.half().float(), k.half().float(), v.float())
    fp16["autocast-mixed"] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    print(json.dumps({"fp32": errors, "fp16": fp16}))
""")


def test_triton_kernel_matches_reference_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(errors["fp32"]) == 10 and len(errors["fp16"]) == 3
    for case, err in errors["fp32"].items():
        assert err < 1e-5, (case, err)
    # fp16 output rounding alone is ~5e-4 relative; a masking or rescaling bug would be O(1)
    for case, err in errors["fp16"].items():
        assert err < 2e-3, (case, err)


def test_auto_backend_on_cpu_is_the_reference(monkeypatch):
    monkeypatch.delenv("COD_ATTENTION", raising=False)
    q, k, v = (torch.randn(1, 9, 2, 16) for _ in range(3))
    assert torch.equal(attention(q, k, v), attention_reference(q, k, v))
    manual = torch.softmax(torch.einsum("blgd,bmgd->bglm", q, k) / 4.0, -1)
    assert torch.allclose(attention(q, k, v), torch.einsum("bglm,bmgd->blgd", manual, v), atol=1e-6)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        attention(*(torch.randn(1, 2, 1, 16) for _ in range(3)), backend="cudnn")
    assert "triton" in BACKENDS


def test_kernel_rejects_inputs_it_would_misread():
    q = torch.randn(1, 10, 2, 16)
    with pytest.raises(ValueError, match="shape"):  # the kernel reads k and v with q's length
        attention_triton_forward(q, torch.randn(1, 12, 2, 16), torch.randn(1, 12, 2, 16))
    with pytest.raises(TypeError, match="dtype"):
        attention_triton_forward(q.double(), q.double(), q.double())
    with pytest.raises(TypeError, match="dtype"):
        attention_triton_forward(q, q.half(), q)


@pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1 makes CPU tensors valid kernel inputs")
def test_forcing_triton_on_cpu_without_the_interpreter_explains_itself():
    q = torch.randn(1, 4, 1, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        attention(q, q, q, backend="triton")


def test_cod_attention_chooses_for_auto_calls_and_is_checked(monkeypatch):
    q, k, v = (torch.randn(1, 9, 2, 16) for _ in range(3))
    monkeypatch.setenv("COD_ATTENTION", "reference")
    assert torch.equal(attention(q, k, v), attention_reference(q, k, v))
    monkeypatch.setenv("COD_ATTENTION", "fastest")
    with pytest.raises(ValueError, match="COD_ATTENTION"):
        attention(q, k, v)
    assert torch.equal(attention(q, k, v, backend="reference"), attention_reference(q, k, v))  # explicit: unaffected
