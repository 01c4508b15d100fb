"""CoD as a perceptual loss: the distribution-matching (DMD) gradient of a frozen CoD teacher, as a loss on a
reconstruction (spec one-step.md §6.3 generator step, §6.6, §7).

Given a reconstruction x̂ of an image y, DMD noises x̂ to a random time t, asks two score networks where x_t
came from and moves x̂ along the difference:
  * the real score: the frozen CoD teacher conditioned on its own codec's condition map of y, with
    classifier-free guidance (weight 3 in the release; one batched call, conditional half FIRST);
  * the fake score: a network trained to model the decoder's own outputs (the DMD critic; `fake_score_loss`
    is its training loss), or, when none is given, the teacher itself without guidance — then nothing is trained
    and the gradient points along the guidance direction (towards images the teacher finds more typical of y).
The step is normalised per sample by mean|x̂ - x_R| and applied as mean((x̂ - sg(x̂ - g))^2), whose gradient
is 2g/N while the value is mean(g^2).

Every parameter of the teacher is frozen; the loss is differentiable with respect to the reconstruction only.
It works for any decoder whose output is an image: MS-ILLM's decoder in the paper's perceptual-loss experiment,
a one-step CoD student in distillation (cod.training.dmd).

    loss_fn = CoDPerceptualLoss.from_model_dir("models/cod-pixel")      # a pixel-space CoD model directory
    loss = F.l1_loss(recon, image) + 2.0 * loss_fn(recon, image)         # recon, image in [0, 1]
    loss.backward()                                                      # gradients reach the decoder only
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cod.diffusion.flow import interpolate, training_time

DEFAULT_GUIDANCE = 3.0  # the release's DMD real-score CFG weight (always on: no guidance interval)


def condition_image(images01: torch.Tensor) -> torch.Tensor:
    """The teacher's condition image: [0, 1] rounded to bfloat16, as the training conditioner of the release does."""
    return images01.to(torch.bfloat16).to(torch.float32)


def velocity(score: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """A CoD denoiser's velocity at (x_t, t) for a precomputed condition map (PixNerDiT: its raw output; DConv
    pred x: its output converted to a velocity)."""
    return score(x_t, t.reshape(-1), None, cond)[0]


@dataclass
class DMDNoise:
    """The random numbers of one DMD evaluation, in the release's draw order: the noise eps (like x), then the
    standard-normal time logits (one per sample; t = timeshift(sigmoid(logit)))."""

    noise: torch.Tensor
    t_logit: torch.Tensor

    @classmethod
    def draw(cls, x: torch.Tensor, generator: torch.Generator | None = None) -> "DMDNoise":
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return cls(noise, torch.randn(x.shape[0], generator=generator, device=x.device))


class CoDPerceptualLoss(nn.Module):
    """DMD loss of a frozen CoD teacher (pixel space). `forward(recon, image)` takes [0, 1] images; `dmd_loss`
    works in model space ([-1, 1] reconstruction, condition image already rounded).

    teacher: a pixel-space CoD denoiser (velocity prediction), frozen here.
    fake_score: the trained critic of distillation (a copy of the teacher whose codec stays frozen), or None to use
        the unguided teacher (a frozen loss, nothing to train).
    guidance: CFG weight of the real score; time_shift: of the DMD times (1 = logit-normal).
    """

    def __init__(self, teacher: nn.Module, fake_score: nn.Module | None = None, guidance: float = DEFAULT_GUIDANCE,
                 time_shift: float = 1.0):
        super().__init__()
        self.teacher = teacher.requires_grad_(False).eval()
        self.fake_score = fake_score
        if fake_score is not None:
            fake_score.codec.requires_grad_(False).eval()  # the critic shares the teacher's (frozen) codec
        self.guidance, self.time_shift = float(guidance), float(time_shift)
        self._uncond: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_model_dir(cls, path, device: str | torch.device = "cpu", **kwargs) -> "CoDPerceptualLoss":
        """A CoD model directory (`cod fit`, `cod import-official`) as the teacher. Pixel-space models only."""
        from cod.errors import ModelDirError
        from cod.model import load

        model = load(path, device=device)
        if model.family != "pixel":
            raise ModelDirError(f"{path}: CoDPerceptualLoss needs a pixel-space CoD model (this one is "
                                f"{model.family}): DMD compares velocities in the space of the reconstruction")
        return cls(model.denoiser, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen networks stay in evaluation mode (the codec's attention depends on it)
        if self.fake_score is not None:
            self.fake_score.codec.eval()
        return self

    # ---- conditions --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def condition(self, y: torch.Tensor) -> torch.Tensor:
        """The teacher's condition map of the condition image y (codec forward: straight-through VQ value)."""
        return self.teacher.codec(y)[0]

    @torch.no_grad()
    def unconditional(self, batch: int, height: int, width: int, device) -> torch.Tensor:
        """The teacher's condition map of the all -1 image, computed once per size and device (the release caches
        the first one for the whole run) and repeated over the batch."""
        key = (height, width, str(device))
        if key not in self._uncond:
            self._uncond[key] = self.teacher.codec(-torch.ones(1, 3, height, width, device=device))[0]
        return self._uncond[key].repeat(batch, 1, 1, 1)

    def times(self, t_logit: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return training_time(t_logit, lognorm=True, shift=self.time_shift).to(dtype).view(-1, 1, 1, 1)

    # ---- the DMD gradient --------------------------------------------------------------------------------------
    @torch.no_grad()
    def direction(self, x_hat: torch.Tensor, y: torch.Tensor, draws: DMDNoise) -> torch.Tensor:
        """g = ((x̂ - x_R) - (x̂ - x_F)) / mean_{C,H,W}|x̂ - x_R| per sample (NaN -> 0): the step DMD takes."""
        x_hat = x_hat.detach()
        B, _, H, W = x_hat.shape
        t = self.times(draws.t_logit, x_hat.dtype)
        x_t = interpolate(x_hat, draws.noise, t)
        cond = self.condition(y)
        if self.guidance > 1.0:  # one call on [x_t; x_t] with [cond; uncond]: conditional half first
            v = velocity(self.teacher, torch.cat([x_t, x_t]), torch.cat([t, t]),
                         torch.cat([cond, self.unconditional(B, H, W, x_hat.device)]))
            v_cond, v_uncond = v.chunk(2)
            v_real = v_uncond + self.guidance * (v_cond - v_uncond)
        else:
            v_cond = v_real = velocity(self.teacher, x_t, t, cond)
        v_fake = v_cond if self.fake_score is None else velocity(self.fake_score, x_t, t, cond)
        p_real = x_hat - (x_t + (1 - t) * v_real)
        p_fake = x_hat - (x_t + (1 - t) * v_fake)
        return torch.nan_to_num((p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True))

    def dmd_loss(self, x_hat: torch.Tensor, y: torch.Tensor, draws: DMDNoise | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """mean((x̂ - sg(x̂ - g))^2) in float32: value mean(g^2), gradient 2g/N with respect to x̂ only.
        x_hat: reconstruction in [-1, 1]; y: condition image in [0, 1] (see condition_image)."""
        draws = draws or DMDNoise.draw(x_hat, generator)
        g = self.direction(x_hat, y, draws)
        return (x_hat.float() - (x_hat - g).detach().float()).pow(2).mean()

    def forward(self, recon: torch.Tensor, image: torch.Tensor, draws: DMDNoise | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """recon, image: [B, 3, H, W] in [0, 1] (H, W multiples of the teacher's size multiple)."""
        return self.dmd_loss(recon * 2 - 1, condition_image(image), draws, generator)

    # ---- the critic ------------------------------------------------------------------------------------------
    def fake_score_loss(self, x_hat: torch.Tensor, y: torch.Tensor, draws: DMDNoise | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Flow matching of the fake score on the decoder's (detached) outputs: mean((F(x_t, t, c) - (x̂ - eps))^2)."""
        if self.fake_score is None:
            raise ValueError("this CoDPerceptualLoss has no fake score to train (fake_score=None)")
        x_hat = x_hat.detach()
        draws = draws or DMDNoise.draw(x_hat, generator)
        t = self.times(draws.t_logit, x_hat.dtype)
        x_t = interpolate(x_hat, draws.noise, t)
        out = velocity(self.fake_score, x_t, t, self.condition(y))
        return F.mse_loss(out, x_hat - draws.noise)
