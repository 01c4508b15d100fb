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
