"""Sampler behaviour beyond the fixture parity: Adams orders integrate polynomials exactly, guidance interval,
SDE variants, batch consistency."""
from __future__ import annotations

import pytest
import torch

from cod.diffusion.samplers import SAMPLERS, GuidanceConfig, adams_coefficients, build_sampler


class PolyVelocity(torch.nn.Module):
    """A fake denoiser whose velocity is a polynomial in t (same for both CFG halves)."""

    def __init__(self, coeffs):
        super().__init__()
        self.coeffs = coeffs
        self.calls = []

    def forward(self, x, t, y=None, cond=None):
        self.calls.append((float(t[0]), cond is None))
        v = sum(c * t.view(-1, 1, 1, 1) ** k for k, c in enumerate(self.coeffs))
        return torch.ones_like(x) * v, "cond-map"


def exact_end(coeffs):
    return sum(c / (k + 1) for k, c in enumerate(coeffs))  # x(1) - x(0) = integral of v over [0, 1]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_adams_weights_integrate_polynomials_of_degree_below_the_order_exactly(order):
    nodes = [0.1, 0.25, 0.4, 0.5][-order:]
    start, end = nodes[-1], 0.62
    c = adams_coefficients(nodes, start, end)
    for degree in range(order):
        quad = sum(cj * tj ** degree for cj, tj in zip(c, nodes)) * (end - start)
        exact = (end ** (degree + 1) - start ** (degree + 1)) / (degree + 1)
        assert quad == pytest.approx(exact, rel=1e-5, abs=1e-7)


def test_higher_adams_orders_are_more_accurate():
    coeffs = [0.5, -1.0, 2.0, 3.0]
    errors = []
    for order in (1, 2, 3, 4):
        out = build_sampler(f"adam{order}", steps=12, cfg=1.0, last_step=1 / 12)(
            PolyVelocity(coeffs), torch.zeros(1, 1, 2, 2), cond=torch.zeros(2, 1))
        errors.append(abs(out.flatten()[0].item() - exact_end(coeffs)))
    assert errors[0] > errors[1] > errors[2] > errors[3]


def test_adams_coefficients_sum_to_one_and_match_closed_form():
    for nodes in ([0.0, 0.32, 0.64], [0.1, 0.2, 0.3, 0.4]):
        c = adams_coefficients(nodes, nodes[-1], nodes[-1] + 0.1)
        assert sum(c) == pytest.approx(1.0, abs=1e-6)
    assert adams_coefficients([0.0, 0.32], 0.32, 0.64) == pytest.approx([-0.5, 1.5])


def test_guidance_interval_is_strict_and_codec_runs_once():
    g = GuidanceConfig(cfg=3.0, interval=(0.1, 1.0))
    assert [g.weight(t) for t in (0.0, 0.1, 0.1001, 0.99, 1.0)] == [1.0, 1.0, 3.0, 3.0, 1.0]
    net = PolyVelocity([1.0])
    s = build_sampler("euler", steps=3)
    s(net, torch.zeros(1, 1, 2, 2), y=torch.zeros(1, 3, 4, 4), y_uncond=-torch.ones(1, 3, 4, 4))
    assert [first for _, first in net.calls] == [True, False, False]  # codec only on the first call


def test_sampling_needs_a_condition():
    with pytest.raises(ValueError, match="condition"):
        build_sampler("adam2", steps=2)(PolyVelocity([1.0]), torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("name", ["euler_sde", "euler_sde_mean", "euler_sde_preserve"])
def test_sde_variants_are_reproducible_with_a_generator_and_differ_from_ode(name):
    net = PolyVelocity([1.0, -0.5])
    noise = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    s = build_sampler(name, steps=6, cfg=1.0)
    a = s(net, noise, cond=torch.zeros(2, 1), generator=torch.Generator().manual_seed(5))
    b = s(net, noise, cond=torch.zeros(2, 1), generator=torch.Generator().manual_seed(5))
    ode = build_sampler("euler", steps=6, cfg=1.0)(net, noise, cond=torch.zeros(2, 1))
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()
    assert not torch.allclose(a, ode)


def test_unknown_sampler_lists_the_choices():
    with pytest.raises(ValueError, match="adam2"):
        build_sampler("heun")
    assert {"euler", "adam1", "adam2", "adam3", "adam4"} <= set(SAMPLERS)


# ----------------------------------------------------------------------------------------------------------
# Skipping the unconditional half where guidance is off; no host syncs in the loop
# ----------------------------------------------------------------------------------------------------------
class HalfRecorder(torch.nn.Module):
    """A fake denoiser whose two CFG halves differ (the velocity depends on the condition map), recording the
    batch size of every call."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x, t, y=None, cond=None):
        self.batches.append(x.shape[0])
        return x * 0.5 + cond.reshape(-1, 1, 1, 1) * t.view(-1, 1, 1, 1), cond


@pytest.mark.parametrize("name", ["euler", "adam2"])
@pytest.mark.parametrize("cfg", [3.0, 1.0])
def test_unguided_steps_compute_only_the_conditional_half(name, cfg):
    cond = torch.tensor([-1.0, 2.0])  # [uncond; cond] for one image
    noise = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    fast_net, exact_net = HalfRecorder(), HalfRecorder()
    sampler = build_sampler(name, steps=6, cfg=cfg)
    fast = sampler(fast_net, noise, cond=cond)
    exact = build_sampler(name, steps=6, cfg=cfg, exact=True)(exact_net, noise, cond=cond)
    assert exact_net.batches == [2] * 6
    expected = [sampler.network_passes(t) for t in sampler.network_times()]
    assert fast_net.batches == expected
    # cfg 3: t = 0 (and t <= 0.1) lies outside the strict guidance interval; cfg 1: guidance is off everywhere
    assert expected == ([1, 2, 2, 2, 2, 2] if cfg == 3.0 else [1] * 6)
    torch.testing.assert_close(fast, exact, rtol=1e-6, atol=1e-6)


def test_the_evaluate_path_runs_the_codec_on_both_halves_before_skipping():
    net = HalfRecorder()

    def with_codec(x, t, y=None, cond=None):
        if cond is None:  # the codec: one value per condition image
            cond = y.mean(dim=(1, 2, 3))
        return net(x, t, cond=cond)

    build_sampler("euler", steps=4, cfg=1.0)(with_codec, torch.zeros(1, 1, 2, 2), y=torch.ones(1, 3, 4, 4),
                                             y_uncond=-torch.ones(1, 3, 4, 4))
    assert net.batches == [2, 1, 1, 1]


def test_a_model_decodes_the_same_image_with_and_without_skipping():
    import cod

    model = cod.new_model("tiny-pixel")
    idx = model.encode(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    for cfg in (3.0, 1.0):
        fast = model.sample(idx, 64, 64, steps=4, cfg=cfg)
        exact = model.sample(idx, 64, 64, steps=4, cfg=cfg, exact=True)
        assert (fast - exact).abs().max().item() < 1e-5
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    fast, exact = model.reconstruct(image, steps=3), model.reconstruct(image, steps=3, exact=True)
    assert (fast.int() - exact.int()).abs().max().item() <= 1


class HostSyncs(torch.overrides.TorchFunctionMode):
    """Records every operation that makes the host wait for a device: reading a device tensor's value, or copying
    a host tensor to a device (a pageable copy waits for the device's queue)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
             torch.Tensor.__bool__, torch.Tensor.cpu, torch.Tensor.numpy}
    COPIES = {torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.cuda}

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func in self.READS and any(t.device.type != "cpu" for t in tensors):
            self.syncs.append(func.__name__)
        if func in self.COPIES and isinstance(out, torch.Tensor) and out.device.type != "cpu" \
                and any(t.device.type == "cpu" for t in tensors):
            self.syncs.append(func.__name__)
        return out


@pytest.mark.parametrize("name", ["euler", "adam2", "adam4"])
@pytest.mark.parametrize("exact", [False, True])
def test_the_sampler_loop_never_waits_for_the_device(name, exact):
    """Run on the meta device, where any read of a value fails, with every host-to-device copy recorded."""
    def net(x, t, y=None, cond=None):
        return x * t.view(-1, 1, 1, 1) + cond.view(-1, 1, 1, 1), cond

    noise = torch.empty(1, 3, 8, 8, device="meta")
    cond = torch.empty(2, device="meta")
    sampler = build_sampler(name, steps=5, cfg=3.0, exact=exact)
    with HostSyncs() as mode:
        out = sampler(net, noise, cond=cond)
    assert out.device.type == "meta" and out.shape == noise.shape
    assert mode.syncs == []
