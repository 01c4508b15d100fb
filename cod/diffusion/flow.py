"""Rectified-flow conventions of CoD (spec §7.2): t in [0, 1], t = 1 is clean data, t = 0 is pure noise.

x_t = t x + (1 - t) eps, and the network predicts the velocity v = dx_t/dt = x - eps.
"""
from __future__ import annotations

import torch


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t / (t + (1 - t) shift). Applied even for shift 1 (it can move t by an ulp; training parity needs it)."""
    return t / (t + (1 - t) * shift)


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return t * x + (1 - t) * noise


def velocity_target(x: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(x - x_t) / (1 - t): algebraically x - eps; this form is the one the release trains on."""
    return (x - x_t) / (1 - t)


def training_time(z: torch.Tensor, lognorm: bool = True, shift: float = 1.0) -> torch.Tensor:
    """Training times from standard-normal draws z: logit-normal (sigmoid(z)) or uniform z, then shifted."""
    base = torch.sigmoid(z) if lognorm else z
    return time_shift(base, shift)


def sampling_grid(steps: int, last_step: float = 0.04, shift: float = 1.0) -> torch.Tensor:
    """steps + 1 float32 times: linspace(0, 1 - last_step, steps), then 1.0, then shifted.

    The last interval is short (last_step) and lands exactly on t = 1.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = torch.cat([torch.linspace(0, 1 - last_step, steps, dtype=torch.float32),
                      torch.ones(1, dtype=torch.float32)])
    return time_shift(grid, shift)


def noise_to_data(noise: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """One-step estimate of clean data from the velocity at t = 0: x0 = eps + v."""
    return noise + velocity
