"""One-step distillation (DMD + GAN, spec one-step.md §6.3): parity with the official trainer (`dmd_tiny` fixture),
which networks each step trains, and the fixture's stand-ins for LPIPS / DINOv2 / the discriminator plugged in
through the module's seams."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cod.compat.fill_rule import apply_fill_rule, fill_value
from cod.losses import DMDNoise
from cod.models.onestep import OneStepCoDLite
from cod.models.pixnerdit import PixNerDiT
from cod.training.dmd import CRITIC_LOSS_KEYS, GENERATOR_LOSS_KEYS, DistillationDraws, DMDDistillation
from cod.training.perceptual import AbsoluteError, PerceptualSum, SquaredError
from conftest import ONESTEP_FIXTURES, fixture_manifest, fixture_tensors

LOSS_REL = 1e-4
GRAD_REL = 2e-3


class StandInDisc(nn.Module):
    """The fixture's discriminator: logits = avg_pool_16(conv1x1_{3->4}(img)) -> [B, 4, H/16, W/16]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return F.avg_pool2d(self.conv(x), 16)


class FixedTarget(nn.Module):
    """The fixture's REPA encoder: returns the stored DINOv2 stand-in features whatever the image."""

    enabled, dim = True, 768

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.register_buffer("features", features, persistent=False)

    def forward(self, y, tokens):
        return self.features


@torch.no_grad()
def salted_fill(module: nn.Module, salt: str, skip: str | None = None) -> None:
    for key, value in module.state_dict().items():
        if skip is None or not key.startswith(skip):
            value.copy_(fill_value(salt + key, tuple(value.shape)))


def build_fixture_module() -> tuple[DMDDistillation, dict]:
    m, T = fixture_manifest("dmd_tiny", ONESTEP_FIXTURES), fixture_tensors("dmd_tiny", ONESTEP_FIXTURES)
    student = apply_fill_rule(OneStepCoDLite(**{k: v for k, v in m["student_kwargs"].items() if k != "fix_encoder"}))
    teacher = apply_fill_rule(PixNerDiT(**{k: v for k, v in m["teacher_kwargs"].items() if k != "pred"}))
    module = DMDDistillation(student=student, teacher=teacher, discriminator=StandInDisc(),
                             perceptual=PerceptualSum([SquaredError(), AbsoluteError()], [1.0, 0.5]),
                             repa=FixedTarget(T["in.target_feature"]))
    salted_fill(module.fake, "fake.", skip="y_embedder.")
    salted_fill(module.objective.proj, "proj.")
    salted_fill(module.discriminator, "disc.")
    return module.train(), T


@pytest.fixture(scope="module")
def fixture_case():
    return build_fixture_module()


def images01(T):
    return T["in.y_u8"].float() / 255


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_inputs_follow_the_release_conventions(fixture_case):
    module, T = fixture_case
    u = images01(T)
    assert torch.equal(u * 2 - 1, T["in.x"])
    from cod.losses import condition_image

    assert torch.equal(condition_image(u), T["in.condition"])
    assert torch.allclose(module.dmd.times(T["gen.t_logit"], torch.float32).flatten(), T["gen.t"], atol=1e-7)


def test_generator_step_matches_the_official_trainer(fixture_case):
    module, T = fixture_case
    module.zero_grad(set_to_none=True)
    module._set_turn(generator=True)
    draws = DistillationDraws(T["gen.student_noise"], DMDNoise(T["gen.dmd_noise"], T["gen.t_logit"]))
    losses = module.generator_losses(images01(T), draws)
    assert set(losses) == set(GENERATOR_LOSS_KEYS)
    for key in GENERATOR_LOSS_KEYS:
        assert losses[key].item() == pytest.approx(T[f"gen.loss.{key}"].item(), rel=LOSS_REL), key
    # the cached unconditional condition: the teacher's codec on the all -1 image
    assert rel(module.dmd.unconditional(1, 64, 64, "cpu"), T["gen.uncond_cond"]) < 1e-4
    losses["loss"].backward()
    params = dict(module.student.named_parameters())
    for name in [k for k in T if k.startswith("gen.grad.student.")]:
        assert rel(params[name.removeprefix("gen.grad.student.")].grad, T[name]) < GRAD_REL, name
    proj = dict(module.objective.proj.named_parameters())
    assert rel(proj["0.4.bias"].grad, T["gen.grad.net_loss.proj.0.4.bias"]) < GRAD_REL


def test_critic_step_matches_the_official_trainer(fixture_case):
    module, T = fixture_case
    module.zero_grad(set_to_none=True)
    module._set_turn(generator=False)
    x = T["in.x"]
    draws = DistillationDraws(torch.zeros_like(x), DMDNoise(T["disc_step.dmd_noise"], T["disc_step.t_logit"]))
    losses = module.critic_losses(images01(T), draws)
    for key in CRITIC_LOSS_KEYS:
        assert losses[key].item() == pytest.approx(T[f"disc_step.loss.{key}"].item(), rel=LOSS_REL), key
    losses["fake_loss"].backward()
    fake = dict(module.fake.named_parameters())
    for name in [k for k in T if k.startswith("disc_step.grad.fake.")]:
        assert rel(fake[name.removeprefix("disc_step.grad.fake.")].grad, T[name]) < GRAD_REL, name
    assert rel(module.discriminator.conv.bias.grad, T["disc_step.grad.disc.conv.bias"]) < GRAD_REL
