"""Samplers: Euler (ODE and SDE variants) and Adams linear multistep, with classifier-free guidance (spec §7.4).

The denoiser is called as `net(x, t, y=..., cond=...) -> (velocity, cond)` on a doubled batch whose
unconditional half comes first (both halves in one call). The condition codec runs once, on the first call, and
its output is passed back on every later call; a precomputed `cond` (the decompress path) skips it altogether.

Where guidance is off (weight 1: outside the guidance interval, or cfg = 1) the guided velocity u + 1 (c - u) is
the conditional one up to rounding, so only the conditional half is computed, at half the cost. `exact=True` keeps
the release's arithmetic instead (both halves at every step, the guidance formula always): the fixture parity tests
run that way, and the skipped form differs from it by float rounding only (tests/test_samplers.py).

Nothing in the loop waits for the device: times are host floats (the network's time input is a fill, not a copy
from host memory) and guidance weights are decided on the host, so a GPU runs the steps back to back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from cod.diffusion.flow import sampling_grid

StepCallback = Callable[[int, torch.Tensor], None]


@dataclass
class GuidanceConfig:
    cfg: float = 3.0
    interval: tuple[float, float] = (0.1, 1.0)

    def weight(self, t: float) -> float:
        # Strict on both ends; outside the interval the same formula runs with weight 1 (QUIRK 10).
        lo, hi = self.interval
        return self.cfg if lo < t < hi else 1.0


def apply_guidance(out: torch.Tensor, weight: float) -> torch.Tensor:
    uncond, cond = out.chunk(2, dim=0)
    return uncond + weight * (cond - uncond)


class Sampler:
    """Shared driver: owns the time grid, the doubled-batch network call and guidance."""

    name = "base"

    def __init__(self, steps: int = 25, cfg: float = 3.0, guidance_interval: tuple[float, float] = (0.1, 1.0),
                 last_step: float = 0.04, timeshift: float = 1.0, exact: bool = False):
        self.steps = steps
        self.guidance = GuidanceConfig(cfg, tuple(guidance_interval))
        self.last_step = last_step
        self.timeshift = timeshift
        self.exact = exact  # True: the release's arithmetic (both CFG halves at every step)

    def timesteps(self) -> torch.Tensor:
        return sampling_grid(self.steps, self.last_step, self.timeshift)

    def config(self) -> dict:
        return {"sampler": self.name, "steps": self.steps, "cfg": self.guidance.cfg,
                "guidance_interval": list(self.guidance.interval), "last_step": self.last_step,
                "timeshift": self.timeshift, "exact": self.exact}

    def network_times(self) -> list[float]:
        """The time fed to the network at each step (float32 values as host floats)."""
        return self.timesteps()[:-1].tolist()

    def network_passes(self, t: float, cond_known: bool = True) -> int:
        """How many batch halves the network computes at time t: 1 where guidance is off and skipped, else 2."""
        return 1 if self.skips(t, cond_known) else 2

    def skips(self, t: float, cond_known: bool = True) -> bool:
        # The condition map must be known: on the evaluate path the first call runs the codec on both halves.
        return not self.exact and cond_known and self.guidance.weight(t) == 1.0

    def _velocity(self, net, x: torch.Tensor, t: torch.Tensor, state: dict) -> torch.Tensor:
        t = float(t)  # a host value (t is a CPU tensor): no device sync
        n = x.shape[0]
        if self.skips(t, state["cond"] is not None):
            out, _ = net(x, torch.full((n,), t, dtype=torch.float32, device=x.device), cond=state["cond"][n:])
            return out
        t_in = torch.full((2 * n,), t, dtype=torch.float32, device=x.device)
        out, state["cond"] = net(torch.cat([x, x]), t_in, y=state.get("y"), cond=state.get("cond"))
        state["y"] = None
        return apply_guidance(out, self.guidance.weight(t))

    @staticmethod
    def _initial_state(y, y_uncond, cond) -> dict:
        if cond is not None:
            return {"cond": cond, "y": None}
        if y is None or y_uncond is None:
            raise ValueError("sampling needs either a precomputed condition map or (y, y_uncond) images")
        return {"cond": None, "y": torch.cat([y_uncond.expand_as(y), y])}

    @torch.no_grad()
    def __call__(self, net, noise: torch.Tensor, y: torch.Tensor | None = None,
                 y_uncond: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, on_step: StepCallback | None = None) -> torch.Tensor:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------
# Euler
# ----------------------------------------------------------------------------------------------------------
def _score(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Score of x_t implied by the velocity for x_t = t x + (1 - t) eps: -(x_t - t v) / (1 - t)."""
    return -(x - t * v) / (1 - t)


class EulerSampler(Sampler):
    """x <- x + v dt (ode), or the SDE variants of the DDT/PixNerd code base with noise level
    w(t) = sde_scale * (1 - t): sde_mean adds s w dt, sde adds s w dt + sqrt(2 w dt) N(0, I),
    sde_preserve adds s w dt / 2 + sqrt(w dt) N(0, I). The last step is always deterministic."""

    STEP_KINDS = ("ode", "sde", "sde_mean", "sde_preserve")

    def __init__(self, *args, step: str = "ode", sde_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if step not in self.STEP_KINDS:
            raise ValueError(f"unknown Euler step '{step}', expected one of {self.STEP_KINDS}")
        self.step_kind = step
        self.sde_scale = sde_scale
        self.name = "euler" if step == "ode" else f"euler_{step}"

    def config(self) -> dict:
        return {**super().config(), "sde_scale": self.sde_scale} if self.step_kind != "ode" else super().config()

    @torch.no_grad()
    def __call__(self, net, noise, y=None, y_uncond=None, cond=None, generator=None, on_step=None):
        tau = self.timesteps()
        state = self._initial_state(y, y_uncond, cond)
        x = noise
        for i in range(self.steps):
            if on_step is not None:
                on_step(i, x)
            t, dt = tau[i], tau[i + 1] - tau[i]
            v = self._velocity(net, x, t, state)
            x = self._step(x, v, t, dt, last=i == self.steps - 1, generator=generator)
        return x

    def _step(self, x, v, t, dt, last, generator):
        if self.step_kind == "ode" or last:
            return x + v * dt
        w = self.sde_scale * (1 - t)
        sw = _score(x, v, t) * w
        if self.step_kind == "sde_mean":
            return x + v * dt + sw * dt
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        if self.step_kind == "sde":
            return x + v * dt + sw * dt + torch.sqrt(2 * w * dt) * noise
        return x + v * dt + 0.5 * sw * dt + torch.sqrt(w * dt) * noise


# ----------------------------------------------------------------------------------------------------------
# Adams linear multistep
# ----------------------------------------------------------------------------------------------------------
def adams_coefficients(nodes: list[float], start: float, end: float) -> list[float]:
    """Weights of the Lagrange interpolant through `nodes`, integrated over [start, end] and normalised to
    sum to 1 (so that the update is x + (sum c_j v_j) * (end - start)).

    Order 1 and 2 use the closed forms of the release in float32; orders 3-4 integrate exactly in float64.
    """
    q = len(nodes)
    if q == 1:
        return [1.0]
    if q == 2:
        a, b = (torch.tensor(n, dtype=torch.float32) for n in nodes)
        s, e = torch.tensor(start, dtype=torch.float32), torch.tensor(end, dtype=torch.float32)
        ia = ((e - b) ** 2 - (s - b) ** 2) / (2 * (a - b))
        ib = ((e - a) ** 2 - (s - a) ** 2) / (2 * (b - a))
        total = ia + ib
        return [float(ia / total), float(ib / total)]
    weights = []
    for j, tj in enumerate(nodes):
        others = [tm for m, tm in enumerate(nodes) if m != j]
        poly = np.poly1d(np.poly(others)) / math.prod(tj - tm for tm in others)
        integral = np.polyint(poly)
        weights.append(float(integral(end) - integral(start)))
    total = sum(weights)
    return [float(np.float32(w / total)) for w in weights]


class AdamsSampler(Sampler):
    """Adams-Bashforth multistep of order 1-4 over the guided velocities ("adam2" is the release default).

    QUIRK 11 kept for parity: the time fed to the network is a running float32 sum of the step sizes.
    """

    def __init__(self, *args, order: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        if not 1 <= order <= 4:
            raise ValueError(f"Adams order must be 1-4, got {order}")
        self.order = order
        self.name = f"adam{order}"

    def coefficients(self) -> list[list[float]]:
        tau = self.timesteps().tolist()
        out = []
        for i in range(self.steps):
            q = min(self.order, i + 1)
            out.append(adams_coefficients(tau[i - q + 1: i + 1], tau[i], tau[i + 1]))
        return out

    def network_times(self) -> list[float]:
        tau = self.timesteps()
        t, out = torch.zeros((), dtype=torch.float32), []
        for i in range(self.steps):
            out.append(float(t))
            t = t + (tau[i + 1] - tau[i])
        return out

    @torch.no_grad()
    def __call__(self, net, noise, y=None, y_uncond=None, cond=None, generator=None, on_step=None):
        tau = self.timesteps()
        coeffs = self.coefficients()
        state = self._initial_state(y, y_uncond, cond)
        x = noise
        t = torch.zeros((), dtype=torch.float32)
        history: list[torch.Tensor] = []
        for i in range(self.steps):
            if on_step is not None:
                on_step(i, x)
            dt = tau[i + 1] - tau[i]
            history.append(self._velocity(net, x, t, state))
            history = history[-self.order:]
            c = coeffs[i]
            update = torch.zeros_like(x)
            for cj, vj in zip(c, history[-len(c):]):
                update = update + cj * vj
            x = x + update * dt
            t = t + dt
        return x


SAMPLERS = {
    "euler": lambda **kw: EulerSampler(step="ode", **kw),
    "euler_sde": lambda **kw: EulerSampler(step="sde", **kw),
    "euler_sde_mean": lambda **kw: EulerSampler(step="sde_mean", **kw),
    "euler_sde_preserve": lambda **kw: EulerSampler(step="sde_preserve", **kw),
    **{f"adam{k}": (lambda k: lambda **kw: AdamsSampler(order=k, **kw))(k) for k in range(1, 5)},
}


def build_sampler(name: str = "adam2", **kwargs) -> Sampler:
    """Sampler by name (see SAMPLERS); kwargs: steps, cfg, guidance_interval, last_step, timeshift, sde_scale."""
    try:
        factory = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler '{name}', expected one of {sorted(SAMPLERS)}") from None
    return factory(**kwargs)
