"""One-step distillation, stage 2 of the release (spec one-step.md §6.3-6.5): DMD + adversarial fine-tuning of a
one-step student from a frozen CoD teacher.

Networks:
  * generator G: the one-step student (CoD-Lite / One-step CoD) with its codec encoder and VQ frozen
    (`fix_encoder`), trained in full otherwise, plus the REPA projector of its block `align_layer`;
  * real score R: the frozen CoD teacher (pixel space, velocity prediction), conditioned on its own codec;
  * fake score F: a copy of R (its codec frozen) trained to model G's outputs;
  * discriminator: spectral-norm heads on a frozen feature network (cod.training.discriminator).
Iteration k (0-based global step) is a generator iteration when (k + 1) % 5 == 0, else a critic iteration
(4 critic : 1 generator). Generator loss: l1 + perceptual + 2 dmd + 0.01 g_fake + (0.5 cos + 0.25 vq);
critic loss: fake flow matching + 0.5 (hinge fake + hinge real). The DMD gradient itself is
cod.losses.CoDPerceptualLoss (real = R with CFG 3, fake = F).

`DMDObjective` computes the two loss dicts from given networks and draws (parity with the `dmd_tiny` fixture);
`DMDDistillation` is the LightningModule (manual optimisation, two optimisers) that `cod fit` runs with
`model: {class_path: cod.training.dmd.DMDDistillation, ...}` (conf/dmd.yaml, conf/dmd-tiny.yaml).
"""
from __future__ import annotations

import bisect
import copy
import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from cod.diffusion.losses import projector
from cod.errors import InputError, OutputExistsError
from cod.losses import CoDPerceptualLoss, DMDNoise, condition_image
from cod.training.repa import build_repa_teacher

GENERATOR_LOSS_KEYS = ("cos", "vq", "l1", "lpips", "dmd", "g_fake", "loss")
CRITIC_LOSS_KEYS = ("fake_fm", "d_fake", "d_real", "fake_loss")


@dataclass
class DistillationDraws:
    """One iteration's random numbers in the release's order: the student's input noise (scaled by its noise level,
    drawn even at level 0), then the DMD noise and time logits."""

    student_noise: torch.Tensor
    dmd: DMDNoise

    @classmethod
    def draw(cls, x: torch.Tensor, generator: torch.Generator | None = None) -> "DistillationDraws":
        student = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return cls(student, DMDNoise.draw(x, generator))

    @classmethod
    def per_sample(cls, x: torch.Tensor, ids: torch.Tensor, seed: int, step: int) -> "DistillationDraws":
        """Each sample's draws from its own generator seeded by (seed, step, sample id): the same under any data
        parallelism and after a resume."""
        from cod.training.module import sample_generator

        student, noise, logit = [], [], []
        for sid in ids.tolist():
            g = sample_generator(seed, step, sid)
            student.append(torch.randn(x.shape[1:], generator=g))
            noise.append(torch.randn(x.shape[1:], generator=g))
            logit.append(torch.randn(1, generator=g))
        to = dict(device=x.device, dtype=x.dtype)
        return cls(torch.stack(student).to(**to), DMDNoise(torch.stack(noise).to(**to), torch.cat(logit).to(x.device)))


class DMDObjective(nn.Module):
    """The stage-2 losses for one batch (spec §6.3). Owns the REPA projector (keys `proj.0.*`, as the release's
    `net_loss.proj.0.*`); everything else is passed in, so a test or another recipe can swap any network.

    x: the image in [-1, 1]; y: the condition image in [0, 1] (bf16-rounded, cod.losses.condition_image);
    target_features: REPA targets [B, L', target_dim] of y; perceptual(a, b) -> per-sample distances;
    dmd: CoDPerceptualLoss holding the real and the fake score; disc(image) -> logits.
    """

    def __init__(self, student_width: int, align_layer: int = 8, target_dim: int = 768, l1_weight: float = 1.0,
                 perceptual_weight: float = 1.0, dmd_weight: float = 2.0, gan_weight: float = 0.01,
                 net_loss_weight: float = 1.0, feat_loss_weight: float = 0.5, vq_loss_weight: float = 0.25,
                 hinge_weight: float = 0.5, fix_encoder: bool = True):
        super().__init__()
        self.align_layer, self.fix_encoder = align_layer, fix_encoder
        self.l1_weight, self.perceptual_weight, self.dmd_weight = l1_weight, perceptual_weight, dmd_weight
        self.gan_weight, self.net_loss_weight, self.hinge_weight = gan_weight, net_loss_weight, hinge_weight
        self.feat_loss_weight, self.vq_loss_weight = feat_loss_weight, vq_loss_weight
        self.proj = nn.ModuleList([projector(student_width, student_width, target_dim)])

    def generator_losses(self, student: nn.Module, dmd: CoDPerceptualLoss, disc: nn.Module, perceptual: nn.Module,
                         x: torch.Tensor, y: torch.Tensor, target_features: torch.Tensor,
                         draws: DistillationDraws) -> dict[str, torch.Tensor]:
        captured = []
        hook = student.blocks[self.align_layer - 1].register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            x_hat, codec_res = student.train_step(y, draws.student_noise, fix_encoder=self.fix_encoder)
        finally:
            hook.remove()
        feat = captured[0]
        if feat.dim() == 4:  # DConv blocks keep the image layout: tokens row-major
            feat = feat.flatten(2).transpose(1, 2)
        src = self.proj[0](feat)[:, : target_features.shape[1]]
        cos = (1 - F.cosine_similarity(src, target_features, dim=-1)).mean()
        vq = codec_res["vq_loss"].mean()
        l1 = (x_hat - x).abs().mean()
        lpips = perceptual(x_hat, x).mean()
        dmd_loss = dmd.dmd_loss(x_hat, y, draws.dmd)
        g_fake = -disc(x_hat).mean()
        net_loss = self.feat_loss_weight * cos + self.vq_loss_weight * vq
        loss = (self.l1_weight * l1 + self.perceptual_weight * lpips + self.dmd_weight * dmd_loss
                + self.gan_weight * g_fake + self.net_loss_weight * net_loss)
        return {"cos": cos, "vq": vq, "l1": l1, "lpips": lpips, "dmd": dmd_loss, "g_fake": g_fake, "loss": loss}

    def critic_losses(self, student: nn.Module, dmd: CoDPerceptualLoss, disc: nn.Module, x: torch.Tensor,
                      y: torch.Tensor, draws: DistillationDraws) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            x_hat = student.inference(y, noise=draws.student_noise)
        fake_fm = dmd.fake_score_loss(x_hat, y, draws.dmd)
        d_fake = F.relu(1 + disc(x_hat)).mean()
        d_real = F.relu(1 - disc(x)).mean()
        return {"fake_fm": fake_fm, "d_fake": d_fake, "d_real": d_real,
                "fake_loss": fake_fm + self.hinge_weight * (d_fake + d_real)}


def fake_score_from(teacher: nn.Module) -> nn.Module:
    """F = a copy of the teacher, trained except its codec (frozen, in evaluation mode: it stays equal to R's)."""
    fake = copy.deepcopy(teacher).requires_grad_(True).train()
    fake.codec.requires_grad_(False).eval()
    return fake


def read_weights(path: str, what: str) -> dict[str, torch.Tensor]:
    """A weights file (safetensors, or a torch checkpoint read as weights only) as a flat dict of tensors; a
    Lightning-style file's `state_dict` / a DeepSpeed-style `module` entry is unwrapped."""
    from cod.files import regular_file_stat
    from cod.models.state_dict import load_torch_file, tensor_state

    regular_file_stat(path, what)
    if str(path).endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{path} is not a readable safetensors {what} ({' '.join(str(e).split())[:200]})") from None
    state = load_torch_file(path, what)
    for key in ("module", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return tensor_state(state, f"{what} {path}")


def read_student_init(path: str) -> dict[str, torch.Tensor]:
    """The student's starting weights: a weights file (read_weights), or a CoD model directory whose denoiser has
    the student's layout (One-step CoD is PixNerDiT: distillation may start from the teacher itself)."""
    if Path(path).is_dir():
        from cod.model import load

        return load(path).denoiser.state_dict()
    return read_weights(path, "student weights")


def with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class DMDDistillation(L.LightningModule):
    """Stage-2 distillation of a one-step student (spec §6.3), manual optimisation.

    student: a one-step preset name (cod.models.onestep_presets; e.g. cod-lite-0.0039, tiny-cod-lite), or (Python)
        a built one-step network; student_init: its starting weights (the release's merged stage-1 file: `net.*`
        and the projector `codec_trainer.net_loss.proj.*`; a plain state dict of the student; or a CoD model
        directory of the student's layout, e.g. the teacher itself for a One-step CoD student);
    teacher: a pixel-space CoD model directory (the release: CoD pixel XL, `CoD_pixel_vpred.pt` imported with
        `cod import-official`), or (Python) a built denoiser;
    discriminator / perceptual: modules (class_path in YAML): None builds the release's (DINOv2 heads, LPIPS
        vgg + 0.5 alex), which need local weights; repa: the REPA target's settings (cod.training.repa; or, in
        Python, a module with `enabled`, `dim` and forward(y, tokens)), None trains without the cosine term.
    export_dir: at the end of training the student is written there as a one-step model directory (cod.load,
        `cod compress/decompress/evaluate --model DIR`); needs the student as a preset name.
    """

    FROZEN = ("dmd.teacher.", "discriminator.features.", "perceptual.", "repa_target.")

    def __init__(self, student: str = "tiny-cod-lite", student_init: str | None = None, teacher: str | None = None,
                 discriminator: nn.Module | None = None, perceptual: nn.Module | None = None,
                 repa: dict | None = None, guidance: float = 3.0, time_shift: float = 1.0, generator_every: int = 5,
                 lr: float = 1e-5, critic_lr: float = 1e-5, lr_milestones: list[int] | None = None,
                 lr_gamma: float = 0.1, betas: tuple[float, float] = (0.9, 0.999), align_layer: int = 8,
                 l1_weight: float = 1.0, perceptual_weight: float = 1.0, dmd_weight: float = 2.0,
                 gan_weight: float = 0.01, net_loss_weight: float = 1.0, feat_loss_weight: float = 0.5,
                 seed: int = 0, export_dir: str | None = None, export_overwrite: bool = False):
        super().__init__()
        built = [name for name, value in (("student", student), ("teacher", teacher), ("repa", repa))
                 if isinstance(value, nn.Module)]
        self.save_hyperparameters(ignore=["discriminator", "perceptual", *built])
        if not (isinstance(generator_every, int) and generator_every >= 1):
            raise ValueError(f"model.generator_every must be a positive integer, got {generator_every!r}")
        self.automatic_optimization = False
        with torch.random.fork_rng():  # a seeded initialisation without touching the caller's RNG state
            torch.manual_seed(seed)
            self.student = self._build_student(student)
        init_state = read_student_init(student_init) if student_init else None
        if init_state is not None:
            from cod.models.state_dict import load_state_strict

            net = with_prefix(init_state, "net.") or init_state
            load_state_strict(self.student, net, f"model.student_init {student_init}")
        # fix_encoder: the codec's encoder and VQ stay as they are (evaluation mode, as the release's no_grad())
        for part in (self.student.codec.encoder, self.student.codec.bottleneck):
            part.requires_grad_(False).eval()

        teacher_net = self._build_teacher(teacher)
        self.dmd = CoDPerceptualLoss(teacher_net, fake_score_from(teacher_net), guidance, time_shift)
        self.discriminator = discriminator if discriminator is not None else _release_discriminator()
        self.perceptual = perceptual if perceptual is not None else _release_perceptual()
        self.perceptual.requires_grad_(False)
        self.repa_target = repa if isinstance(repa, nn.Module) else build_repa_teacher(repa)
        self.objective = DMDObjective(
            self.student.hidden_size, align_layer, self.repa_target.dim, l1_weight=l1_weight,
            perceptual_weight=perceptual_weight, dmd_weight=dmd_weight, gan_weight=gan_weight,
            net_loss_weight=net_loss_weight, feat_loss_weight=feat_loss_weight if self.repa_target.enabled else 0.0)
        proj = with_prefix(init_state or {}, "codec_trainer.net_loss.proj.")
        if proj:
            from cod.models.state_dict import load_state_strict

            load_state_strict(self.objective.proj, proj, f"model.student_init {student_init} (projector)")
        self._generator_params, self._critic_params = self.generator_parameters(), self.critic_parameters()

    # ---- networks ----------------------------------------------------------------------------------------------
    @staticmethod
    def _build_student(student) -> nn.Module:
        if isinstance(student, nn.Module):
            return student
        from cod.models.onestep_presets import get_onestep_preset

        return get_onestep_preset(student).build()

    @staticmethod
    def _build_teacher(teacher) -> nn.Module:
        if isinstance(teacher, nn.Module):
            return teacher
        if not teacher:
            raise ValueError("model.teacher: set the CoD teacher's model directory (a pixel-space CoD; for the "
                             "release's recipe the CoD pixel XL model, docs/one-step.md#training)")
        from cod.errors import ModelDirError
        from cod.model import load

        model = load(teacher)
        if model.family != "pixel":
            raise ModelDirError(f"model.teacher {teacher}: distillation needs a pixel-space CoD teacher (this model is "
                                f"{model.family})")
        return model.denoiser

    @property
    def real(self) -> nn.Module:
        return self.dmd.teacher

    @property
    def fake(self) -> nn.Module:
        return self.dmd.fake_score

    def generator_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad] + list(self.objective.parameters())

    def critic_parameters(self) -> list[nn.Parameter]:
        codec = {id(p) for p in self.fake.codec.parameters()}
        fake = [p for p in self.fake.parameters() if id(p) not in codec]
        heads = [p for n, p in self.discriminator.named_parameters() if not n.startswith("features.")
                 and p.requires_grad]
        return fake + heads

    def _set_turn(self, generator: bool) -> None:
        """Only the side being optimised gets gradients (the other is used, frozen, in the graph)."""
        for p in self._generator_params:
            p.requires_grad_(generator)
        for p in self._critic_params:
            p.requires_grad_(not generator)

    def train(self, mode: bool = True):
        super().train(mode)
        # frozen parts stay in evaluation mode whatever Lightning does (the codec attention depends on the mode)
        self.student.codec.encoder.eval()
        self.student.codec.bottleneck.eval()
        self.dmd.train(mode)
        return self

    # ---- one iteration -----------------------------------------------------------------------------------------
    def is_generator_iteration(self, step: int) -> bool:
        return (step + 1) % self.hparams.generator_every == 0

    def generator_losses(self, images01: torch.Tensor, draws: DistillationDraws) -> dict[str, torch.Tensor]:
        x, y = images01 * 2 - 1, condition_image(images01)
        tokens = (images01.shape[-2] // 16) * (images01.shape[-1] // 16)
        target = self.repa_target(y, tokens=tokens)
        return self.objective.generator_losses(self.student, self.dmd, self.discriminator, self.perceptual, x, y,
                                               target, draws)

    def critic_losses(self, images01: torch.Tensor, draws: DistillationDraws) -> dict[str, torch.Tensor]:
        x, y = images01 * 2 - 1, condition_image(images01)
        return self.objective.critic_losses(self.student, self.dmd, self.discriminator, x, y, draws)

    def training_step(self, batch, batch_idx):
        images01, ids = batch
        if images01.numel() == 0:  # every image of the batch was unreadable (skipped and counted by the data)
            return None
        x = images01 * 2 - 1
        draws = DistillationDraws.per_sample(x, ids, self.hparams.seed, self.global_step)
        opt_critic, opt_generator = self.optimizers()
        for group in opt_generator.param_groups:
            group["lr"] = self.generator_lr(self.global_step)
        generator = self.is_generator_iteration(self.global_step)
        self._set_turn(generator)
        losses = (self.generator_losses if generator else self.critic_losses)(images01, draws)
        opt = opt_generator if generator else opt_critic
        opt.zero_grad(set_to_none=True)
        self.manual_backward(losses["loss" if generator else "fake_loss"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        side = "generator" if generator else "critic"
        self.log_dict({f"train/{side}/{k}": v.detach() for k, v in losses.items()}, batch_size=x.shape[0])
        self.log("train/lr", opt_generator.param_groups[0]["lr"], batch_size=x.shape[0])
        return None

    def validation_step(self, batch, batch_idx):
        images01, _ = batch
        if images01.numel() == 0:
            return
        with torch.no_grad():
            out = self.student.inference(condition_image(images01)).clamp(-1, 1)
        mse = F.mse_loss((out + 1) / 2, images01).clamp_min(1e-10)
        self.log("val/psnr", -10 * torch.log10(mse), batch_size=images01.shape[0], sync_dist=True)

    def generator_lr(self, step: int) -> float:
        """lr x gamma per milestone passed, counted in iterations, critic ones included (the release steps its
        MultiStepLR on every iteration); a function of the step, so a resumed run continues the schedule."""
        passed = bisect.bisect_right(sorted(self.hparams.lr_milestones or []), step)
        return self.hparams.lr * self.hparams.lr_gamma ** passed

    def configure_optimizers(self):
        betas = tuple(self.hparams.betas)
        opt_critic = torch.optim.AdamW(self._critic_params, lr=self.hparams.critic_lr, weight_decay=0.0, betas=betas)
        opt_generator = torch.optim.AdamW(self._generator_params, lr=self.hparams.lr, weight_decay=0.0, betas=betas)
        return [opt_critic, opt_generator]

    # ---- checkpoints and export --------------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        # frozen networks are rebuilt from their files: checkpoints hold what training changes
        sd = super().state_dict(*args, **kwargs)
        return {k: v for k, v in sd.items() if not k.startswith(self.FROZEN)}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = {k: v for k, v in super().state_dict().items() if k.startswith(self.FROZEN)}
        return super().load_state_dict({**state_dict, **own}, strict=strict, assign=assign)

    def setup(self, stage: str) -> None:
        path = self.hparams.export_dir
        if stage != "fit" or not path:
            return
        if not isinstance(self.hparams.get("student"), str):
            raise ValueError("model.export_dir needs the student as a one-step preset name (model.student), which "
                             "names its architecture in the model directory")
        if os.path.lexists(path) and not self.hparams.export_overwrite:
            raise OutputExistsError(f"model.export_dir {path} exists already (an earlier run's student?): set a new "
                                    f"--model.export_dir, or --model.export_overwrite true to replace it at the end "
                                    f"of this run")

    def export_model(self):
        """The student as a one-step model (cod.model.OneStepModel) of its preset, float32 on the CPU, unfolded."""
        from cod.model import OneStepModel, build_config, build_denoiser
        from cod.models.onestep_presets import get_onestep_preset
        from cod.models.state_dict import load_state_strict

        name = self.hparams.student
        config = build_config(get_onestep_preset(name), name)
        with torch.device("cpu"):
            net = build_denoiser(config)
        load_state_strict(net, {k: v.detach().float().cpu() for k, v in self.student.state_dict().items()},
                          "the distilled student")
        return OneStepModel(config, net.eval(), None)

    def save_student(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """The student as a model directory, written as a whole (cod.model.CoDModel.save)."""
        card = {"provenance": f"distilled by cod (DMD + GAN, cod.training.dmd) from the teacher "
                              f"{self.hparams.get('teacher')}, student preset {self.hparams.student}, step "
                              f"{self.global_step}"}
        return self.export_model().save(out_dir, card=card, overwrite=overwrite)

    def on_train_end(self):
        if self.hparams.export_dir and self.trainer.is_global_zero:
            out = self.save_student(self.hparams.export_dir, overwrite=self.hparams.export_overwrite)
            print(f"exported the distilled student (step {self.global_step}) as the model directory {out}; use it "
                  f"with `cod compress --model {out} IMAGES -o OUT` and `cod decompress --model {out} FILES -o OUT`")


def _release_discriminator() -> nn.Module:
    from cod.training.discriminator import Discriminator, DinoV2Features

    return Discriminator(DinoV2Features())


def _release_perceptual() -> nn.Module:
    from cod.training.perceptual import LPIPS, PerceptualSum

    return PerceptualSum([LPIPS("vgg"), LPIPS("alex")], [1.0, 0.5])
