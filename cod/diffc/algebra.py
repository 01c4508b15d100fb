"""One DiffC step in CoD's flow coordinates (spec §6.4): t = 1 clean, x_t = t x0 + (1 - t) eps, v = x0 - eps.

For a step t -> t' (0 <= t < t' < 1) with lambda(t) = (t / (1 - t))^2 and rho = lambda(t) / lambda(t'):
  prior     p = N(a_x x_t + a_0 x0_hat, sigma^2 I),  x0_hat = x_t + (1 - t) v_hat
  posterior q = N(a_x x_t + a_0 x0,     sigma^2 I)
  a_x = t (1 - t')^2 / (t' (1 - t)^2),  a_0 = t' (1 - rho),  sigma = (1 - t') sqrt(1 - rho)
  r = (mu_q - mu_p) / sigma = sqrt(lambda(t') - lambda(t)) (x0 - x0_hat),  KL = ||r||^2 / (2 ln 2) bits
  update (both sides): x_t' = a_x x_t + a_0 x0_hat + sigma z
These are the release's variance-preserving formulas rescaled by c(s) = 1 / sqrt((1 - s)^2 + s^2), s = 1 - t;
r, KL and z are the same (tests/test_diffc_algebra.py compares the two forms).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LN2 = math.log(2.0)


@dataclass(frozen=True)
class StepCoefficients:
    t: float
    t_next: float
    a_x: float
    a_0: float
    sigma: float
    r_scale: float  # sqrt(lambda(t') - lambda(t))


def coefficients(t: float, t_next: float) -> StepCoefficients:
    if not 0.0 <= t < t_next < 1.0:
        raise ValueError(f"a DiffC step needs 0 <= t < t' < 1, got t={t}, t'={t_next}")
    rho = (t * (1 - t_next)) ** 2 / (t_next * (1 - t)) ** 2
    a_x = t * (1 - t_next) ** 2 / (t_next * (1 - t) ** 2)
    return StepCoefficients(t, t_next, a_x, t_next * (1 - rho), (1 - t_next) * math.sqrt(1 - rho),
                            t_next / (1 - t_next) * math.sqrt(1 - rho))


def clean_estimate(x: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
    return x + (1 - t) * v


def residual(x0: torch.Tensor, x0_hat: torch.Tensor, co: StepCoefficients) -> torch.Tensor:
    return (co.r_scale * (x0.float() - x0_hat.float())).float()


def kl_bits(r: torch.Tensor) -> float:
    return float(r.double().square().sum()) / (2 * LN2)


def update(x: torch.Tensor, x0_hat: torch.Tensor, z: torch.Tensor, co: StepCoefficients) -> torch.Tensor:
    return co.a_x * x + co.a_0 * x0_hat + co.sigma * z
