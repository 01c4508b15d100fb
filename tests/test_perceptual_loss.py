"""cod.losses.CoDPerceptualLoss: a frozen CoD teacher's DMD gradient as a loss on any decoder's reconstruction."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cod.losses import CoDPerceptualLoss, DMDNoise
from conftest import ROOT

DEMO = ROOT / "cod" / "assets" / "demo-model"


def test_frozen_and_differentiable_with_respect_to_the_reconstruction_only():
    loss_fn = CoDPerceptualLoss.from_model_dir(DEMO)
    assert not any(p.requires_grad for p in loss_fn.parameters())
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 32, 32, generator=g)
    recon = (image + 0.2 * torch.randn(2, 3, 32, 32, generator=g)).clamp(0, 1).requires_grad_(True)
    draws = DMDNoise.draw(recon, torch.Generator().manual_seed(1))
    loss = loss_fn(recon, image, draws)
    loss.backward()
    assert loss.item() > 0 and recon.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_fn.parameters())
    # the gradient is the DMD step: d/d recon of mean((x - sg(x - g))^2) with x = 2 recon - 1 is 2 * 2g / N
    from cod.losses import condition_image

    direction = loss_fn.direction(recon.detach() * 2 - 1, condition_image(image), draws)
    assert torch.allclose(recon.grad, 4 * direction / direction.numel(), atol=1e-7)
    assert loss.item() == torch.mean(direction ** 2).item()


def test_worked_example_a_decoder_trains_with_cod_as_its_perceptual_loss():
    """docs/one-step.md: L1 + 2 x CoD loss on a small decoder; one Adam step moves the decoder only."""
    loss_fn = CoDPerceptualLoss.from_model_dir(DEMO)
    decoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 3, 3, padding=1), nn.Sigmoid())
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    teacher_before = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    decoder_before = [p.detach().clone() for p in decoder.parameters()]
    recon = decoder(image)
    loss = F.l1_loss(recon, image) + 2.0 * loss_fn(recon, image, generator=torch.Generator().manual_seed(1))
    loss.backward()
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(decoder_before, decoder.parameters()))
    assert all(torch.equal(v, loss_fn.state_dict()[k]) for k, v in teacher_before.items())


def test_without_a_fake_score_the_step_is_the_guidance_direction():
    """fake_score None: the unguided teacher is the fake score, so g = (x_F - x_R) / |.| is the CFG direction; a
    guidance of 1 makes it vanish (the teacher agrees with itself)."""
    loss_fn = CoDPerceptualLoss.from_model_dir(DEMO, guidance=1.0)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    draws = DMDNoise.draw(image, torch.Generator().manual_seed(1))
    assert loss_fn.direction(image * 2 - 1, image, draws).abs().max() == 0
    loss_fn.guidance = 3.0
    assert loss_fn.direction(image * 2 - 1, image, draws).abs().max() > 0
