"""The resource limits and the cost model behind them: the FLOP counter agrees with PyTorch's, the decode-work
polynomial reproduces a direct count at a size it was not fitted on, and the checks come in the documented order
(pixels, steps, work) with messages that name the option to raise."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import cod
from cod.errors import LimitError
from cod.flops import count_flops
from cod.limits import DEFAULT_MAX_TFLOP, Limits, _count_polynomials, decode_tflop
from cod.model import CoDModel, build_config, build_denoiser
from cod.models.presets import get_preset


@pytest.mark.parametrize("preset", ["tiny-pixel", "tiny-latent"])
def test_flop_counter_agrees_with_torch(preset):
    model = cod.new_model(preset)
    d = model.denoiser
    side = 64
    f = 1 if model.family == "pixel" else 8
    x = torch.randn(2, d.in_channels, side // f, side // f)
    t = torch.rand(2)
    y = torch.rand(2, 3, side, side)
    # PyTorch's counter has no formula for the CPU flash-attention kernel (it would miss the DiT's attention), so
    # the reference runs attention through the math path, whose matrix products it does count
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with FlopCounterMode(display=False) as reference, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        d(x, t, y=y)
    assert count_flops(d, x, t, y=y) == reference.get_total_flops()


def meta_model(name, **kw):
    config = build_config(get_preset(name, **kw), name)
    with torch.device("meta"):
        return CoDModel(config, build_denoiser(config))


@pytest.mark.parametrize("name", ["tiny-pixel", "pixel-xl", "latent-xl-64bit"])
def test_the_polynomial_reproduces_a_direct_count(name):
    model = meta_model(name)
    m = model.size_multiple
    step = _count_polynomials(json.dumps(model.config["denoiser"], sort_keys=True),
                              json.dumps(model.config.get("latent"), sort_keys=True), model.family, m)["step"]
    side_h, side_w = 5 * m, 2 * m  # not one of the fitted sizes, and not square
    f = 1 if model.family == "pixel" else 8
    x = torch.empty(2, model.denoiser.in_channels, side_h // f, side_w // f, device="meta")
    cond = torch.empty(2, model.denoiser.hidden_size, side_h // 16, side_w // 16, device="meta")
    direct = count_flops(model.denoiser, x, torch.empty(2, device="meta"), cond=cond)
    tokens = (side_h // 16) * (side_w // 16)
    assert step[0] + step[1] * tokens + step[2] * tokens ** 2 == pytest.approx(direct, rel=1e-9)


def test_the_released_size_costs_what_it_should():
    # one guidance pair of the pixel XL model at 512x512 counts 2.42 TFLOP of matrix products here (issue 11 quotes
    # 2.17 from another count; ours is PyTorch's, see test_flop_counter_agrees_with_torch), plus 0.36 for the
    # condition maps (the file's, and the blank image's through the encoder)
    assert decode_tflop(meta_model("pixel-xl"), 512, 512, 1) == pytest.approx(2.78, abs=0.01)  # + condition maps
    assert decode_tflop(meta_model("pixel-xl"), 512, 768, 25) < DEFAULT_MAX_TFLOP["cpu"]  # Kodak, 25 steps: allowed


def test_encoding_has_a_work_limit_too():
    model = meta_model("tiny-pixel", ds=4)  # a fine index grid: the condition encoder dominates
    with pytest.raises(LimitError, match="encoding this 4096x4096 image"):
        Limits().check_encode(model, 4096, 4096, "x.png")
    Limits().check_encode(model, 512, 512, "x.png")


def test_checks_come_in_order_and_name_their_option():
    model = meta_model("tiny-pixel")
    limits = Limits()
    with pytest.raises(LimitError, match="--max-pixels"):
        limits.check_decode(model, 8192, 8192, 1000, "x.cod")
    with pytest.raises(LimitError, match="--max-steps 256"):
        limits.check_decode(model, 64, 64, 256, "x.cod")
    model.tile = "off"  # whole-image passes: attention's quadratic term makes 4096x4096 expensive
    with pytest.raises(LimitError, match="--max-tflop 447"):
        limits.check_decode(model, 4096, 4096, 25, "x.cod")
    Limits(max_tflop=447).check_decode(model, 4096, 4096, 25, "x.cod")
    model.tile = "auto"  # in 512-pixel windows above 4 MP (cod.diffusion.tiling): linear in the area
    assert decode_tflop(model, 4096, 4096, 25) < 447 / 10
    limits.check_decode(model, 4096, 4096, 25, "x.cod")
    Limits(max_pixels=1 << 28, max_tflop=1e6).check_decode(model, 8192, 8192, 25, "x.cod")
    assert Limits().tflop_budget(torch.device("cuda")) > Limits().tflop_budget(torch.device("cpu"))
    for bad in ({"max_pixels": 0}, {"max_steps": -1}, {"max_tflop": float("nan")}, {"max_pixels": 1.5}):
        with pytest.raises(ValueError):
            Limits(**bad)
