"""DiffC's step algebra in CoD's flow time against the release's variance-preserving form, the closed-form KL,
and the schedules' rate-control table (spec §2.4)."""
from __future__ import annotations

import math

import pytest
import torch

from cod.diffc import algebra, schedule


def vp_form(t, t_next, x_fl, x0, x0_hat):
    """The release's DDPM posterior (utils/p.py, q.py) with one consistent time, in float64."""
    def alpha_bar(tt):
        rho = tt / (1 - tt)  # amplitude ratio (1 - s) / s, s = 1 - t
        return rho ** 2 / (1 + rho ** 2)

    def c(tt):
        s = 1 - tt
        return 1 / math.sqrt((1 - s) ** 2 + s ** 2)

    ab_t, ab_n = alpha_bar(t), alpha_bar(t_next)
    a_t = ab_t / ab_n
    beta = 1 - a_t
    x_vp = c(t) * x_fl

    def mu(y):
        return (math.sqrt(ab_n) * beta / (1 - ab_t)) * y + (math.sqrt(a_t) * (1 - ab_n) / (1 - ab_t)) * x_vp

    sigma = math.sqrt((1 - ab_n) / (1 - ab_t) * beta)
    # back to flow coordinates at t': divide by c(t')
    return mu(x0_hat) / c(t_next), mu(x0) / c(t_next), sigma / c(t_next), (mu(x0) - mu(x0_hat)) / sigma


@pytest.mark.parametrize("t,t_next", [(0.028, 0.051), (0.3, 0.31), (0.5, 0.9), (0.95, 0.998)])
def test_flow_form_equals_the_vp_form(t, t_next):
    g = torch.Generator().manual_seed(0)
    x, x0, x0_hat = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(3))
    co = algebra.coefficients(t, t_next)
    mu_p, mu_q, sigma, r_vp = vp_form(t, t_next, x, x0, x0_hat)
    assert torch.allclose(co.a_x * x + co.a_0 * x0_hat, mu_p, rtol=1e-10, atol=1e-12)
    assert torch.allclose(co.a_x * x + co.a_0 * x0, mu_q, rtol=1e-10, atol=1e-12)
    assert math.isclose(co.sigma, sigma, rel_tol=1e-10)
    r = co.r_scale * (x0 - x0_hat)
    assert torch.allclose(r, r_vp, rtol=1e-9, atol=1e-12)
    lam = lambda tt: (tt / (1 - tt)) ** 2  # noqa: E731
    kl_closed = 0.5 * (lam(t_next) - lam(t)) * float((x0 - x0_hat).square().sum()) / math.log(2)
    assert math.isclose(algebra.kl_bits(r), kl_closed, rel_tol=1e-9)


def test_first_step_starts_from_pure_noise():
    co = algebra.coefficients(0.0, 0.028)
    assert co.a_x == 0 and math.isclose(co.a_0, 0.028) and math.isclose(co.sigma, 0.972)
    with pytest.raises(ValueError):
        algebra.coefficients(0.5, 0.5)


def test_update_of_the_exact_posterior_mean_is_the_interpolation():
    # with x0_hat = x0 and z = eps' the update is t' x0 + (1 - t') (...) noise: the marginal at t'
    co = algebra.coefficients(0.0, 0.3)
    x0, eps, z = torch.ones(4), torch.zeros(4), torch.zeros(4)
    assert torch.allclose(algebra.update(eps, x0, z, co), 0.3 * x0)


@pytest.mark.parametrize("T,K,T_K,denoise", [(900, 4, 897, 47), (500, 24, 498, 27), (100, 90, 99, 7),
                                             (20, 142, 20, 3), (5, 157, 5, 1), (2, 160, 2, 1)])
def test_recon_timestep_table_of_the_release(T, K, T_K, denoise):
    assert schedule.steps_for_recon_t(T) == K
    assert schedule.last_noise_level(K) == T_K
    grid = schedule.denoise_times(K)
    assert len(grid) - 1 == denoise and grid[-1] == 1.0 and grid[0] == 1 - T_K / 1000
    assert all(a < b for a, b in zip(grid, grid[1:]))
