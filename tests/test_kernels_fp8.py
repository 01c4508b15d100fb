"""cod.kernels.fp8: the per-row float8 linear layer on torch._scaled_mm (COD_FP8=scaled_mm). PyTorch runs
_scaled_mm on the CPU too, so its arithmetic is checked here: the scales' orientation against an explicit
dequantised product, the error against the bf16 layer, the swap into a denoiser, and torch.compile."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import cod
from cod.errors import PrecisionError
from cod.kernels.fp8 import E4M3_MAX, Float8Linear, quantize_rows, swap_linears
from cod.precision import check_precision, fp8_backend, prepare_denoiser


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_rows_are_quantised_with_their_own_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 1e3, 0.0])[:, None]
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (5, 1) and scale.dtype == torch.float32
    back = q.float() * scale
    assert torch.equal(back[4], torch.zeros(64))  # an all-zero row stays zero (no division by zero)
    for row in range(4):  # e4m3 keeps 3 mantissa bits: relative error per element within 2^-4 of the row's amax
        assert (back[row] - x[row]).abs().max() <= x[row].abs().max() * 2 ** -4
        assert q[row].float().abs().max() == E4M3_MAX  # each row uses the whole range


def test_the_layer_is_the_dequantised_product_and_close_to_bf16():
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(96, 48).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 96, generator=g) * torch.linspace(0.01, 2, 48)[:, None])
    layer = Float8Linear.from_linear(linear)
    x = torch.randn(3, 7, 96, generator=g).to(torch.bfloat16)
    y = layer(x)
    assert y.shape == (3, 7, 48) and y.dtype == torch.bfloat16
    qx, sx = quantize_rows(x.reshape(-1, 96))
    reference = (qx.float() * sx) @ (layer.weight.float() * layer.weight_scale.t()).t() + linear.bias.float()
    assert rel_err(y.reshape(-1, 48), reference) < 1e-2  # bf16 output rounding only: the scales are the right way
    assert rel_err(y, linear(x)) < 0.08  # float8's own error against the bf16 layer


def test_a_transposed_activation_is_quantised_row_major():
    """A batch-1 condition-token view reaches the layer with its last dimension strided; CUDA's scaled product
    takes the activation row-major only, so the codes must come out contiguous."""
    x = torch.randn(32, 5).to(torch.bfloat16).t()  # [5, 32], strides (1, 5)
    q, _ = quantize_rows(x)
    assert not x.is_contiguous() and q.is_contiguous()
    layer = Float8Linear.from_linear(nn.Linear(32, 16).to(torch.bfloat16))
    assert torch.equal(layer(x), layer(x.contiguous()))


def test_layers_whose_sides_are_not_multiples_of_16_are_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        Float8Linear.from_linear(nn.Linear(20, 32))


def test_compiled_layer_equals_eager():
    layer = Float8Linear.from_linear(nn.Linear(64, 32).to(torch.bfloat16))
    x = torch.randn(2, 16, 64).to(torch.bfloat16)
    with torch.no_grad():  # inductor may round x / scale differently (a reciprocal): a few codes one step apart
        assert rel_err(torch.compile(layer)(x), layer(x)) < 0.03  # measured 0.010; float8's own error is ~0.036


def test_cod_fp8_selects_the_backend_and_a_denoiser_decodes_through_it(monkeypatch):
    monkeypatch.delenv("COD_FP8", raising=False)
    assert fp8_backend() == "torchao"
    monkeypatch.setenv("COD_FP8", "fastest")
    with pytest.raises(PrecisionError, match="COD_FP8"):
        fp8_backend()
    monkeypatch.setenv("COD_FP8", "scaled_mm")
    with pytest.raises(PrecisionError, match="CUDA GPU"):  # still a GPU precision for users
        check_precision("fp8", "cpu")
    # The conversion itself, on the CPU (prepare_denoiser does not check the device): the DiT's linear layers become
    # Float8Linear, the ones kept in float32 or not quantised stay nn.Linear, and a forward stays close to bf16's.
    model = cod.new_model("tiny-pixel").eval()
    bf16 = prepare_denoiser(cod.new_model("tiny-pixel").eval().denoiser, "bf16")
    bf16.load_state_dict(model.denoiser.state_dict())
    denoiser = prepare_denoiser(model.denoiser, "fp8")
    swapped = [n for n, m in denoiser.named_modules() if isinstance(m, Float8Linear)]
    assert any(".attn.qkv" in n for n in swapped) and any(".param_generator1" in n for n in swapped)
    # (the tiny preset's SwiGLU hidden width is not a multiple of 16: those layers stay bf16, as with torchao)
    assert not any(n.startswith(("t_embedder", "final_layer", "x_embedder", "y_embedder.")) for n in swapped)
    assert isinstance(denoiser.final_layer.linear, nn.Linear)
    with torch.no_grad():
        out, ref = denoiser(*INPUTS)[0], bf16(*INPUTS)[0]
    assert out.dtype == torch.float32 and rel_err(out, ref) < 0.15  # measured 0.10 (a random model)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, 64, 64, generator=g), torch.tensor([0.5]), torch.rand(1, 3, 64, 64, generator=g) * 2 - 1


INPUTS = _inputs()


def test_scaled_mm_backend_is_torchaos_float8_arithmetic_bit_for_bit(monkeypatch):
    """The two fp8 backends compute the same numbers: torchao's PerRow float8 (its hardware check lifted so that it
    runs on this CPU through the same torch._scaled_mm) and cod.kernels.fp8 give identical velocities."""
    import torchao.quantization.quant_api as quant_api

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda *args, **kwargs: None)
    base = cod.new_model("tiny-pixel").eval()
    outs = {}
    for backend in ("torchao", "scaled_mm"):
        monkeypatch.setenv("COD_FP8", backend)
        denoiser = prepare_denoiser(copy.deepcopy(base.denoiser), "fp8")
        with torch.no_grad():
            outs[backend] = denoiser(*INPUTS)[0]
    assert torch.equal(outs["torchao"], outs["scaled_mm"])


def test_swap_linears_replaces_only_the_chosen_layers():
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 16)))
    assert swap_linears(net, lambda layer, name: name == "2.0") == 1
    assert isinstance(net[0], nn.Linear) and isinstance(net[2][0], Float8Linear)


fp8_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                             reason="needs a CUDA GPU of compute capability 8.9+")


@fp8_gpu
def test_on_a_gpu_both_backends_decode_the_same_image(monkeypatch):
    """fp8 through torchao and through cod.kernels.fp8 on the float8 tensor cores: the same decode, bit for bit
    (where torchao's default kernel is torch._scaled_mm too: with the mslk package it would choose its own)."""
    import importlib.util

    if importlib.util.find_spec("mslk") is not None:
        pytest.skip("torchao would run mslk's kernels, not torch._scaled_mm")
    images = {}
    for backend in ("torchao", "scaled_mm"):
        monkeypatch.setenv("COD_FP8", backend)
        model = cod.new_model("pixel-s").eval().to("cuda").set_precision("fp8")
        indices = model.encode(torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)).to("cuda"))
        images[backend] = model.decode(indices, 256, 256, steps=2)
    assert torch.equal(images["torchao"], images["scaled_mm"])
