"""One-step distillation (DMD + GAN, spec one-step.md §6.3): parity with the official trainer (`dmd_tiny` fixture),
which networks each step trains, and the fixture's stand-ins for LPIPS / DINOv2 / the discriminator plugged in
through the module's seams."""
from __future__ import annotations

import numpy as np
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


# ---- training: which networks each iteration trains, a short fine-tune, the recipe through `cod fit` -------------
from pathlib import Path  # noqa: E402

import lightning as L  # noqa: E402

from cod.training.discriminator import Discriminator, DinoV2Features, RandomPatchFeatures  # noqa: E402
from conftest import KODAK, ROOT, TRAIN256, require  # noqa: E402

DEMO = ROOT / "cod" / "assets" / "demo-model"


class RandomTarget(nn.Module):
    """A REPA target stand-in (16 features per token), so that the projector trains."""

    enabled, dim = True, 16

    def forward(self, y, tokens):
        g = torch.Generator().manual_seed(1)
        return torch.randn(y.shape[0], tokens, self.dim, generator=g)


def demo_student_and_teacher():
    """The embedded demo model as teacher; a One-step CoD of its size as student, seeded fresh except its codec,
    which is the teacher's (frozen in distillation: the student keeps the teacher's bits)."""
    import cod
    from cod.models.onestep_presets import get_onestep_preset

    teacher = cod.load(DEMO).denoiser
    with torch.random.fork_rng():
        torch.manual_seed(0)
        student = get_onestep_preset("mini-onestep-cod").build()
    student.codec.load_state_dict(teacher.codec.state_dict())
    return student, teacher


def small_trainer(steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, callbacks=list(callbacks))


class ChangedParameters(L.Callback):
    """After every iteration, the names of the parameters it changed."""

    def __init__(self):
        self.changed, self.before = [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = {n: p.detach().clone() for n, p in module.named_parameters()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.changed.append({n for n, p in module.named_parameters() if not torch.equal(p, self.before[n])})


def test_each_iteration_trains_only_its_side():
    require(TRAIN256)
    from cod.training.data import ImageDataModule
    from cod.training.perceptual import PerceptualSum

    student, teacher = demo_student_and_teacher()
    L.seed_everything(0, verbose=False)
    module = DMDDistillation(student=student, teacher=teacher, discriminator=Discriminator(RandomPatchFeatures(8)),
                             perceptual=PerceptualSum([SquaredError(), AbsoluteError()], [1.0, 0.5]),
                             repa=RandomTarget(), lr=1e-3, critic_lr=1e-3)
    names = [n for n, _ in module.named_parameters()]
    frozen_student = {n for n in names if n.startswith(("student.y_embedder.encoder.", "student.y_embedder.bottleneck."))}
    generator = {n for n in names if n.startswith(("student.", "objective."))} - frozen_student
    critic = {n for n in names if (n.startswith("dmd.fake_score.") and ".y_embedder." not in n)
              or n.startswith("discriminator.heads.")}
    never = set(names) - generator - critic
    assert any(n.startswith("dmd.teacher.") for n in never) and any(n.startswith("dmd.fake_score.y_embedder.")
                                                                   for n in never)
    assert any(n.startswith("discriminator.features.") for n in never) and frozen_student <= never

    record = ChangedParameters()
    small_trainer(5, [record]).fit(module, ImageDataModule(str(TRAIN256), size=32, batch_size=2, val_images=1))
    assert len(record.changed) == 5
    for k, changed in enumerate(record.changed):  # iterations 0-3: critic; 4: generator ((k + 1) % 5 == 0)
        side = generator if k == 4 else critic
        assert changed <= side, (k, sorted(changed - side)[:5])
        assert len(changed) > 0.9 * len(side), (k, sorted(side - changed)[:5])


def test_generator_gradient_reaches_the_student_through_the_frozen_discriminator():
    student, teacher = demo_student_and_teacher()
    module = DMDDistillation(student=student, teacher=teacher, discriminator=Discriminator(RandomPatchFeatures(8)),
                             perceptual=PerceptualSum([SquaredError()]), repa=None, gan_weight=1.0).train()
    module._set_turn(generator=True)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    draws = DistillationDraws.draw(images, torch.Generator().manual_seed(1))
    adversarial = -module.discriminator(module.student.train_step(images, draws.student_noise)[0]).mean()
    adversarial.backward()
    assert module.student.final_layer.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.discriminator.parameters())  # heads frozen in a generator iteration
    assert all(p.grad is None for p in module.student.codec.encoder.parameters())


def kodak_crops(n: int = 6, side: int = 64) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    out = []
    for f in sorted(require(KODAK).glob("*.png"))[:n]:
        a = np.asarray(Image.open(f).convert("RGB"))
        top, left = (a.shape[0] - side) // 2, (a.shape[1] - side) // 2
        out.append(torch.from_numpy(a[top:top + side, left:left + side].copy()).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def test_a_short_dmd_gan_finetune_improves_the_one_step_error_on_held_out_images():
    """20 iterations of the recipe (4 critic : 1 generator, DMD + GAN + L1 + perceptual stand-ins) distilling the
    demo model into a fresh one-step student (its codec frozen, from the teacher) on train256 crops; measured on
    Kodak centre crops, which it never sees."""
    require(TRAIN256)
    from cod.training.data import ImageDataModule
    from cod.training.perceptual import PerceptualSum

    held_out = kodak_crops()

    def one_step_mse(net):
        with torch.no_grad():
            return F.mse_loss(net.inference(held_out), held_out * 2 - 1).item()

    student, teacher = demo_student_and_teacher()
    before = one_step_mse(student)
    L.seed_everything(0, verbose=False)
    module = DMDDistillation(student=student, teacher=teacher, discriminator=Discriminator(RandomPatchFeatures()),
                             perceptual=PerceptualSum([SquaredError(), AbsoluteError()], [1.0, 0.5]),
                             guidance=1.0, lr=1e-4, critic_lr=1e-4)
    small_trainer(20).fit(module, ImageDataModule(str(TRAIN256), size=32, batch_size=4, val_images=1))
    after = one_step_mse(module.student)
    assert after < 0.7 * before, (before, after)  # measured: 0.556 -> 0.263


# ---- configuration ------------------------------------------------------------------------------------------------
CONF = ROOT / "conf"


@pytest.mark.parametrize("config", ["dmd.yaml", "dmd-tiny.yaml"])
def test_distillation_configs_compose_and_select_the_distillation_module(config):
    from lightning.pytorch.cli import LightningCLI

    from cod.training.commands import expand_configs, training_module
    from cod.training.data import ImageDataModule

    args = expand_configs(["--config", str(CONF / config)])
    module_class, subclass_mode = training_module(args)
    assert module_class is DMDDistillation and subclass_mode

    class ParseOnly(LightningCLI):
        def instantiate_classes(self):
            pass

    cli = ParseOnly(module_class, ImageDataModule, args=args, run=False, subclass_mode_model=True)
    model = cli.config["model"]["init_args"]
    assert model["generator_every"] == 5 and model["dmd_weight"] == 2.0 and model["gan_weight"] == 0.01
    features = model["discriminator"]["init_args"]["features"]["class_path"]
    if config == "dmd.yaml":
        assert model["guidance"] == 3.0 and model["lr_milestones"] == [100000] and features.endswith("DinoV2Features")
        assert [m["init_args"]["net"] for m in model["perceptual"]["init_args"]["metrics"]] == ["vgg", "alex"]
    else:
        assert features.endswith("RandomPatchFeatures") and Path(model["teacher"]).is_dir()


def test_an_unknown_training_module_is_refused(tmp_path, capsys):
    from cod.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: os.system\n  init_args: {}\n")
    assert main(["fit", "--config", str(bad)]) != 0
    err = capsys.readouterr().err
    assert err.count("cod: error:") == 1 and "os.system" in err and "DMDDistillation" in err


def test_cod_fit_runs_the_tiny_recipe_and_never_replaces_its_student(tmp_path, monkeypatch, capsys):
    require(TRAIN256)
    from safetensors.torch import load_file

    from cod.cli import main
    from cod.models.onestep_presets import get_onestep_preset

    monkeypatch.chdir(tmp_path)
    run = ["fit", "--config", str(CONF / "dmd-tiny.yaml"), "--trainer.max_steps", "2", "--data.size", "32"]
    assert main(run) == 0
    student = tmp_path / "runs" / "dmd-tiny" / "student"
    assert "as the model directory runs/dmd-tiny/student" in capsys.readouterr().out
    import cod

    model = cod.load(student)  # a one-step model directory: fingerprinted weights of the preset's layout
    assert type(model).__name__ == "OneStepModel" and model.config["preset"] == "mini-onestep-cod"
    get_onestep_preset("mini-onestep-cod").build().load_state_dict(load_file(str(student / "model.safetensors")))
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert main(["compress", "--model", str(student), str(tmp_path / "a.png"), "-o", str(tmp_path / "a.cod")]) == 0
    assert main(["decompress", "--model", str(student), str(tmp_path / "a.cod"), "-o", str(tmp_path / "b.png")]) == 0
    assert Image.open(tmp_path / "b.png").size == (48, 32)
    before = (student / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(run) == 1  # refused before training: it would replace the first run's student
    err = capsys.readouterr().err
    assert err.count("cod: error:") == 1 and "export_dir" in err and "exists" in err
    assert (student / "model.safetensors").read_bytes() == before


def test_missing_pretrained_weights_name_the_download_and_the_setting(monkeypatch):
    from cod.training.perceptual import LPIPS

    monkeypatch.delenv("COD_DINOV2_PATH", raising=False)
    monkeypatch.delenv("COD_LPIPS_VGG_PATH", raising=False)
    with pytest.raises(FileNotFoundError, match="dinov2_vitb14_pretrain.pth.*weights: PATH"):
        DinoV2Features()
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth.*backbone_weights"):
        LPIPS("vgg")


def test_cod_fit_without_dinov2_weights_is_one_clear_error(monkeypatch, capsys):
    from cod.cli import main

    monkeypatch.delenv("COD_DINOV2_PATH", raising=False)
    assert main(["fit", "--config", str(CONF / "dmd.yaml"), "--model.teacher", str(DEMO)]) != 0
    err = capsys.readouterr().err
    assert err.count("cod: error:") == 1 and "dinov2_vitb14_pretrain.pth" in err and "Namespace" not in err


def test_dinov2_discriminator_shapes_and_frozen_backbone():
    """The §6.4 layout on a small random ViT (the real one needs the downloaded weights): [B, 4, H/16, W/16] logits,
    only the spectral-norm heads trainable, gradients through the frozen backbone to the image."""
    features = DinoV2Features(random_init=True, dtype="float32", embed_dim=32, depth=4, num_heads=2,
                              layers=(0, 1, 2, 3))
    disc = Discriminator(features)
    image = torch.rand(2, 3, 32, 48, requires_grad=True)
    logits = disc(image * 2 - 1)
    assert logits.shape == (2, 4, 2, 3)
    logits.mean().backward()
    assert image.grad.abs().sum() > 0
    assert all(p.grad is None for p in features.parameters())
    assert {n.rsplit(".", 1)[-1] for n, _ in disc.heads.named_parameters()} == {"weight_orig", "bias"}
    assert "heads.0.0.weight_u" in disc.state_dict()


def test_lpips_reads_a_local_backbone_file(tmp_path):
    import torchvision

    from cod.training.perceptual import LPIPS

    torch.manual_seed(0)
    path = tmp_path / "alexnet.pth"
    torch.save({f"features.{k}": v for k, v in torchvision.models.alexnet().features.state_dict().items()}, path)
    metric = LPIPS("alex", backbone_weights=str(path))
    a = torch.rand(2, 3, 64, 64) * 2 - 1
    assert metric(a, a).abs().max() < 1e-6 and (metric(a, -a) > 0).all()
    assert not any(p.requires_grad for p in metric.parameters())
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(Exception, match="not torchvision's alex file"):
        LPIPS("alex", backbone_weights=str(tmp_path / "other.pth"))
