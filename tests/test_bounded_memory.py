"""Attention and PixNerDiT's per-pixel stage in bounded memory: chunked paths equal the one-shot ones, and a large
image codes within a fixed memory bound (the unchunked code needs more than twice as much)."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import cod
import cod.models.pixnerdit as pixnerdit
from cod.kernels import attention_reference
from cod.models.condition_codec import SpatialAttention
from conftest import max_rel_err

# cod.kernels.attention is the function; the module that holds the budget is reached through sys.modules.
attention_module = importlib.import_module("cod.kernels.attention")
UNBOUNDED = 2 ** 62


def count_sdpa_calls(monkeypatch) -> list[int]:
    """Query lengths of the SDPA calls the reference makes from now on."""
    lengths, sdpa = [], attention_module._sdpa

    def counting(q, k, v, scale):
        lengths.append(q.shape[1])
        return sdpa(q, k, v, scale)

    monkeypatch.setattr(attention_module, "_sdpa", counting)
    return lengths


def score_budget(rows: int, B: int, G: int, Lk: int) -> int:
    """The budget that lets exactly `rows` fp32 query rows through at once."""
    return rows * B * G * Lk * 4


@pytest.mark.parametrize("B, L, Lk, G, d, rows", [
    (2, 50, 50, 3, 16, 7),     # 7 chunks of 7 and one of 1
    (1, 130, 130, 1, 72, 64),  # L not a multiple of the chunk
    (2, 33, 33, 2, 512, 0),    # a budget below one query row: one row at a time
    (1, 40, 25, 2, 8, 16),     # fewer keys than queries
])
def test_chunked_attention_equals_one_call(monkeypatch, B, L, Lk, G, d, rows):
    torch.manual_seed(0)
    q, k, v = torch.randn(B, L, G, d), torch.randn(B, Lk, G, d), torch.randn(B, Lk, G, d)
    with sdpa_kernel(SDPBackend.MATH):  # the path that holds the scores, so the one that is chunked
        whole = attention_reference(q, k, v, scale=0.2)
        monkeypatch.setattr(attention_module, "SCORE_BUDGET_BYTES", score_budget(rows, B, G, Lk))
        calls = count_sdpa_calls(monkeypatch)
        chunked = attention_reference(q, k, v, scale=0.2)
    step = max(rows, 1)
    assert calls == [min(step, L - s) for s in range(0, L, step)]
    assert chunked.shape == whole.shape
    assert max_rel_err(chunked, whole) < 1e-5  # float rounding only: matrix products of other shapes
    manual = torch.softmax(torch.einsum("blgd,bmgd->bglm", q, k) * 0.2, -1)
    assert max_rel_err(chunked, torch.einsum("bglm,bmgd->blgd", manual, v)) < 1e-5


def test_chunked_attention_gradients_equal_one_call(monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 45, 2, 16, requires_grad=True) for _ in range(3))
    grads = []
    for budget in (UNBOUNDED, score_budget(8, 1, 2, 45)):
        monkeypatch.setattr(attention_module, "SCORE_BUDGET_BYTES", budget)
        with sdpa_kernel(SDPBackend.MATH):
            grads.append(torch.autograd.grad(attention_reference(q, k, v).square().sum(), (q, k, v)))
    for whole, chunked in zip(*grads):
        assert max_rel_err(chunked, whole) < 1e-5


def test_inputs_for_a_fused_kernel_take_one_call(monkeypatch):
    """SDPA's flash kernel never holds the scores (and is slower on short query chunks), so whatever the budget,
    inputs it accepts go through in one call: the DiT's attention on CPU is exactly torch's SDPA."""
    q, k, v = (torch.randn(2, 300, 2, 16) for _ in range(3))
    monkeypatch.setattr(attention_module, "SCORE_BUDGET_BYTES", 1)
    calls = count_sdpa_calls(monkeypatch)
    out = attention_reference(q, k, v)
    assert calls == [300]
    expected = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    assert torch.equal(out, expected.transpose(1, 2))


def test_spatial_attention_chunked_equals_one_call(monkeypatch):
    """The condition codec's layout (channels strided) takes the math path, so it is chunked at large sizes."""
    torch.manual_seed(0)
    module = SpatialAttention(64).eval()
    x = torch.randn(2, 64, 9, 11)
    with torch.no_grad():
        whole = module(x)
        monkeypatch.setattr(attention_module, "SCORE_BUDGET_BYTES", score_budget(10, 2, 1, 99))
        calls = count_sdpa_calls(monkeypatch)
        chunked = module(x)
    assert len(calls) == 10  # 99 positions in chunks of 10
    assert max_rel_err(chunked, whole) < 1e-5


@pytest.mark.parametrize("run", [5, 1])
def test_pixnerdit_pixel_stage_in_runs_equals_whole(monkeypatch, run):
    torch.manual_seed(0)
    net = cod.new_model("tiny-pixel").denoiser
    x, y = torch.randn(2, 3, 64, 96), torch.rand(2, 3, 64, 96)  # 4 x 6 = 24 patches per image
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        whole, cond = net(x, t, y)
        runs = []
        decode_patches = net.decode_patches
        monkeypatch.setattr(net, "decode_patches", lambda p, c, s: runs.append(p.shape[1]) or decode_patches(p, c, s))
        budget = run * 2 * net.pixel_stage_bytes_per_patch(x.element_size())
        monkeypatch.setitem(pixnerdit.PIXEL_STAGE_BUDGET_BYTES, "cpu", budget)
        chunked, cond_chunked = net(x, t, y)
    assert runs == [min(run, 24 - s) for s in range(0, 24, run)]
    assert torch.equal(cond_chunked, cond)
    assert max_rel_err(chunked, whole) < 1e-5
    runs.clear()
    net(x, t, y)  # with autograd on, runs would keep everything for the backward anyway: one call
    assert runs == [24]


def test_condition_encoder_in_strips_computes_exactly_the_whole_convolutions(monkeypatch):
    """Above STRIP_ABOVE_BYTES the encoder's full-resolution convolutions run in strips of rows: the same latent
    bit for bit (so the same indices, i.e. the same .cod bytes), while holding a fraction of the activations."""
    import cod.models.condition_codec as condition_codec

    torch.manual_seed(0)
    encoder = condition_codec.ConditionEncoder(ds=32, width=32)  # tiny-pixel's (down_block_2 changes width)
    y = torch.rand(1, 3, 128, 1024)
    with torch.no_grad():
        whole = encoder(y)
        monkeypatch.setattr(condition_codec, "STRIP_ABOVE_BYTES", 2 ** 19)
        monkeypatch.setattr(condition_codec, "STRIP_BYTES", 2 ** 17)
        strips = []
        conv2d_strips = condition_codec.conv2d_strips
        monkeypatch.setattr(condition_codec, "conv2d_strips",
                            lambda conv, x, *a, **k: strips.append(x.shape[-2]) or conv2d_strips(conv, x, *a, **k))
        striped = encoder(y)
    assert len(strips) >= 8 and 128 in strips  # conv_in, and the ResBlocks and Downsamples of the first stages
    assert torch.equal(striped, whole)
    strips.clear()
    encoder(y.requires_grad_())  # training: autograd keeps every activation anyway, so no strips
    assert strips == []


# One 2048x1024 image (2 Mpixel, the largest that codes in well under 30 s on one core: the DiT's attention over
# 8192 tokens dominates). Measured on a 2-core CPU, one thread, peak RSS above the process after the model is
# built: 0.48 GiB with the chunked stages (0.41 of it the condition encoder's convolutions), 1.06 GiB with the
# budgets lifted, i.e. the code before them (the per-pixel stage of the CFG-doubled batch held at once).
LARGE_IMAGE = textwrap.dedent("""
    import json, torch
    import cod

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    torch.set_num_threads(1)
    model = cod.new_model("tiny-pixel")
    H, W = 1024, 2048
    x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(0))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    base = status("VmRSS")
    image = model.decode(model.encode(x), H, W, steps=1)
    print(json.dumps({"peak_above_base": status("VmHWM") - base, "shape": list(image.shape)}))
""")
PEAK_BOUND_BYTES = int(0.75 * 2 ** 30)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads peak RSS from /proc/self/status")
def test_large_image_codes_in_bounded_memory():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", LARGE_IMAGE], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shape"] == [1, 3, 1024, 2048]
    assert result["peak_above_base"] < PEAK_BOUND_BYTES, result["peak_above_base"] / 2 ** 30


@pytest.mark.parametrize("run", [5, 1])
def test_dconv_pixel_stream_in_runs_equals_whole(monkeypatch, run):
    """CoD-Lite's per-pixel stream goes through in runs of patches on a CPU (short runs: faster there, docs/
    benchmarks.md): the same output as the whole image within float rounding, the runs as the budget says."""
    import cod.models.dconv as dconv

    torch.manual_seed(0)
    net = dconv.DConv(hidden_size=32, hidden_size_x=8, num_blocks=3, num_cond_blocks=2).eval()
    x, y = torch.randn(2, 3, 64, 96), torch.rand(2, 3, 64, 96)  # 4 x 6 = 24 patches per image
    t = torch.zeros(2)
    with torch.no_grad():
        monkeypatch.setitem(dconv.PIXEL_STREAM_BUDGET_BYTES, "cpu", 1 << 30)
        whole, cond = net(x, t, y)
        runs = []
        decode_patches = net.decode_patches
        monkeypatch.setattr(net, "decode_patches", lambda p, c, s: runs.append(p.shape[1]) or decode_patches(p, c, s))
        monkeypatch.setitem(dconv.PIXEL_STREAM_BUDGET_BYTES, "cpu",
                            run * 2 * net.pixel_stage_bytes_per_patch(x.element_size()))
        chunked, cond_chunked = net(x, t, y)
    assert runs == [min(run, 24 - s) for s in range(0, 24, run)]
    assert torch.equal(cond_chunked, cond)
    assert max_rel_err(chunked, whole) < 1e-5
