"""The LightningModule that trains CoD (spec §1, §7.3): denoiser + objective + EMA + optimiser.

The denoiser keeps the release's single-module state-dict layout (so official checkpoints fine-tune and our
checkpoints export to model directories unchanged); the three stages of the codec are exposed as parts:
`condition_encoder` (image -> latent), `entropy_bottleneck` (VQ: latent -> indices, the rate) and
`diffusion_decoder` (codec decoder + denoiser, driven by a sampler at validation).
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from cod.diffusion.losses import CoDObjective, TrainingDraws
from cod.errors import CodError, OutputExistsError
from cod.files import check_output_dir
from cod.model_config import validate_config
from cod.images import as_rgb8
from cod.metrics import ms_ssim
from cod.model import CoDModel, build_config, build_denoiser, is_model_dir, load, load_state_strict
from cod.models.presets import get_preset
from cod.models.state_dict import load_torch_file, tensor_state
from cod.training.codebook import CodebookRestarts
from cod.training.repa import build_repa_teacher

RECON_DIM = {"pixel": (3, 16, 16), "latent": (4, 2, 2)}


class EMA(nn.Module):
    """Exponential moving average of a module's parameters, updated in place with one fused lerp per step;
    `.module` is the averaged copy, starting from the initial weights (its keys: `ema.module.*`)."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.module = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # Under FSDP2 both copies are sharded alike (cod.training.fsdp.shard): each rank averages its own shard,
        # no communication. Modules FSDP2 left unsharded after the step (the root keeps its parameters
        # gathered between forward and backward) are resharded first, so that both sides are shards.
        for m in model.modules():
            if hasattr(m, "reshard") and hasattr(m, "unshard"):
                m.reshard()
        torch._foreach_lerp_([_local(e) for e in self.module.parameters()],
                             [_local(p.detach()) for p in model.parameters()], 1 - self.decay)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def sample_generator(seed: int, step: int, sample_id: int) -> torch.Generator:
    """The CPU generator of one sample's training noise at one step: a function of (seed, step, sample id) only."""
    return torch.Generator().manual_seed(hash((seed, step, sample_id)) & 0x7FFFFFFFFFFF)


def _is_sharded(module: nn.Module) -> bool:
    return any(hasattr(p, "to_local") for p in module.parameters())


class CoDTrainingModule(L.LightningModule):
    def __init__(self, preset: str = "tiny-pixel", ds: int | None = None, bits: int | None = None,
                 up2x: bool | None = None, rope_step: float | None = None, init_from: str | None = None, lr: float = 1e-4,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 0,
                 ema_decay: float = 0.9999, one_step_mse_weight: float = 0.0, null_condition_p: float = 0.1,
                 align_layer: int = 8, codec_loss_masking: str = "correct", repa: dict | None = None,
                 vae_path: str | None = None, val_sampling_steps: int = 10, export_dir: str | None = None,
                 sampling: dict | None = None, codebook_restarts: bool = True,
                 codebook_restart_window: int = 100, seed: int = 0, export_overwrite: bool = False):
        super().__init__()
        self.save_hyperparameters()
        spec = get_preset(preset, ds=ds, bits=bits, up2x=up2x, rope_step=rope_step)
        self.family = spec.family
        self.model_config = build_config(spec, preset, sampling=sampling)  # sampling: the exported defaults
        # what will be exported must be a valid model directory: checked now, not after hours of training
        validate_config({**self.model_config, "fingerprint": "0" * 64}, "the model section of this training config",
                        fix="correct the model settings (docs/training.md)")
        with torch.random.fork_rng():  # seeded initialisation without touching the caller's RNG state
            torch.manual_seed(seed)
            self.denoiser = build_denoiser(self.model_config)
        self.latent = None
        if self.family == "latent":
            from cod.models.vae import VAE_PRESETS, AutoencoderKL, LatentSpace, load_vae

            vae = load_vae(vae_path) if spec.vae_preset == "sd-vae" else \
                AutoencoderKL(VAE_PRESETS[spec.vae_preset])
            self.latent = LatentSpace(vae, self.model_config["latent"]["scale"])
        if init_from:
            self._init_from(init_from)
        align = min(align_layer, self.denoiser.num_cond_blocks)
        self.teacher = build_repa_teacher(repa)
        self.objective = CoDObjective(
            spec.denoiser["hidden_size"], RECON_DIM[self.family], proj_encoder_dim=self.teacher.dim,
            align_layer=align, feat_loss_weight=0.5 if self.teacher.enabled else 0.0,
            null_condition_p=null_condition_p, one_step_mse_weight=one_step_mse_weight,
            codec_loss_masking=codec_loss_masking)
        self.ema = EMA(self.denoiser, ema_decay)
        self._step_started = None
        self._batch_ids = None
        self._images_this_epoch = 0
        # Training-only remedy for codebook collapse (cod/training/codebook.py); false = the release's recipe.
        self.codebook_restarts = CodebookRestarts(self.entropy_bottleneck.num_codes, every=codebook_restart_window,
                                                  seed=seed) if codebook_restarts else None
        if self.codebook_restarts is not None:  # registered after the EMA copy, which must not inherit it
            self.entropy_bottleneck.register_forward_hook(self._observe_codebook)

    # ---- the codec's parts ------------------------------------------------------------------------------
    @property
    def condition_encoder(self):
        return self.denoiser.y_embedder.encoder

    @property
    def entropy_bottleneck(self):
        return self.denoiser.y_embedder.bottleneck

    @property
    def diffusion_decoder(self):
        return self.denoiser  # codec decoder (y_embedder.decoder) + transformer; sampled at validation

    def _init_from(self, source: str) -> None:
        """Stage chaining: start from a model directory's (EMA) weights or a Lightning checkpoint's EMA."""
        if not isinstance(source, str):
            raise ValueError(f"model.init_from must be a model directory or a checkpoint file, got {source!r}")
        path = Path(source)
        if path.is_dir():
            state = load(path).denoiser.state_dict()
        elif os.path.lexists(path):
            ckpt = load_torch_file(path, "checkpoint")
            sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
            state = tensor_state(sd, f"init_from {source}", "ema.module.")
        else:
            raise FileNotFoundError(f"init_from: {source} is neither a model directory nor a checkpoint file")
        # up2x off -> on (stage 1 -> 2) adds the decoder's `ada` upsampler: the one place keys may be missing.
        own = self.denoiser.state_dict()
        fresh = {k: v for k, v in own.items() if k not in state and ".decoder.ada." in k}
        load_state_strict(self.denoiser, {**state, **fresh}, f"init_from {source}")

    # ---- data -> model space -----------------------------------------------------------------------------
    def _model_space(self, images01: torch.Tensor) -> torch.Tensor:
        if self.latent is not None:
            return self.latent.to_latent(images01)
        return (images01 - 0.5) / 0.5

    def _draws(self, x: torch.Tensor, ids: torch.Tensor) -> TrainingDraws:
        """Per-sample randomness from (seed, step, sample id): identical whether a sample is trained in one
        process or another rank's shard, and after a resume (the step and the ids are restored)."""
        us, zs, noises = [], [], []
        for sid in ids.tolist():
            g = sample_generator(self.hparams.seed, self.global_step, sid)
            us.append(torch.rand(1, generator=g))
            zs.append(torch.randn(1, generator=g))
            noises.append(torch.randn(x.shape[1:], generator=g))
        dev = x.device
        return TrainingDraws(torch.cat(us).to(dev), torch.cat(zs).to(dev), torch.stack(noises).to(dev, x.dtype))

    def _observe_codebook(self, _module, inputs, outputs) -> None:
        if self.training and self._batch_ids is not None:
            self.codebook_restarts.observe(inputs[0], outputs[2], self._batch_ids)

    def _losses(self, batch) -> dict:
        images01, ids = batch
        self._batch_ids = ids
        x = self._model_space(images01)
        y = CoDModel.condition_image(images01)
        target = self.teacher(images01, tokens=(images01.shape[-2] // 16) * (images01.shape[-1] // 16))
        return self.objective(self.denoiser, x, y, -torch.ones_like(y), target, self._draws(x, ids))

    # ---- Lightning hooks -----------------------------------------------------------------------------------
    def configure_model(self):
        """FSDP2 (cod.training.fsdp.FSDP2Strategy / ModelParallelStrategy): shard the model over the
        data-parallel mesh (cod.training.fsdp.shard). Other strategies leave the module as it is."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None and not _is_sharded(self.denoiser):
            from cod.training.fsdp import shard

            shard(self, mesh)

    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError("Lightning's FSDPStrategy (FSDP1) is not supported: use FSDP2, "
                             "strategy: cod.training.fsdp.FSDP2Strategy (conf/hardware/fsdp.yaml)")
        if stage == "fit":
            self._check_before_training()

    def _check_before_training(self) -> None:
        """What would fail or destroy data at the end of a run is refused before its first step."""
        export_dir = self.hparams.export_dir
        data = getattr(self.trainer, "datamodule", None)
        if export_dir and os.path.lexists(export_dir) and not self.hparams.export_overwrite:
            raise OutputExistsError(f"model.export_dir {export_dir} exists already (an earlier run's model?): set "
                                    f"--model.export_dir to a new folder, or --model.export_overwrite true to "
                                    f"replace it at the end of this run")
        if export_dir:
            sources = [getattr(getattr(data, "hparams", None), k, None) for k in ("train", "val")]
            local = [s for s in sources if isinstance(s, str) and os.path.exists(s)]
            try:
                check_output_dir(export_dir, local, overwrite=True, own=is_model_dir)
            except OutputExistsError as e:
                raise OutputExistsError(f"model.export_dir: {e}") from None
        size = getattr(getattr(data, "hparams", None), "size", None)
        multiple = self.export_model().size_multiple
        if isinstance(size, int) and size % multiple:
            raise ValueError(f"data.size {size} is not a multiple of {multiple}, the side multiple of this model "
                             f"(preset {self.hparams.preset}): use e.g. {max(multiple, size // multiple * multiple)}")

    def training_step(self, batch, batch_idx):
        if batch[0].numel() == 0:  # every image of the batch was unreadable (skipped and counted by the data)
            return None
        losses = self._losses(batch)
        B = batch[0].shape[0]
        self._images_this_epoch += B
        self.log_dict({f"train/{k}": v.detach() if torch.is_tensor(v) else v for k, v in losses.items()},
                      prog_bar=False, batch_size=B, sync_dist=False)
        self.log("train/loss_bar", losses["loss"].detach(), prog_bar=True, logger=False, batch_size=B)
        if self._step_started is not None:
            dt = time.perf_counter() - self._step_started
            self.log("train/images_per_s", B / max(dt, 1e-9), batch_size=B)
        self._step_started = time.perf_counter()
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=B)
        return losses["loss"]

    def on_train_epoch_start(self):
        self._images_this_epoch = 0

    def on_train_epoch_end(self):
        # An epoch of unreadable images trains nothing (the step count never advances, so max_steps alone would
        # loop forever) and would export an untrained model: stop with the reason instead.
        seen = self.trainer.strategy.reduce(torch.tensor(float(self._images_this_epoch), device=self.device),
                                            reduce_op="sum")
        if float(seen) == 0:
            from cod.training.data import SkipCounter

            data = getattr(self.trainer, "datamodule", None)
            source = getattr(getattr(data, "hparams", None), "train", "the training data")
            raise CodError(f"data.train {source}: a whole epoch held no readable image ({SkipCounter.skipped} "
                           f"unreadable files skipped): nothing was trained and no model was exported; check the "
                           f"data (`cod: warning` lines above name the files)")

    def on_before_optimizer_step(self, optimizer):
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:  # DTensor-aware (FSDP2): the norm of the full gradient on every rank
            norm = torch.nn.utils.get_total_norm(grads)
            self.log("train/grad_norm", norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # once per optimizer step, right after it (also under gradient accumulation), so the last step is
        # averaged too; global_step still counts the steps completed before this one
        if self.codebook_restarts is not None:
            rows = self.codebook_restarts.step([self.entropy_bottleneck.embedding.weight,
                                                self.ema.module.y_embedder.bottleneck.embedding.weight],
                                               step=self.global_step)
            self.log("train/codebook_restarted", float(rows))
        self.ema.update(self.denoiser)

    def validation_step(self, batch, batch_idx):
        if batch[0].numel() == 0:
            return
        losses = self._losses(batch)
        batch = batch[0]
        self.log("val/loss", losses["loss"], batch_size=batch.shape[0], sync_dist=True)
        if batch_idx == 0:
            recon = self.reconstruct(batch[:4])
            mse = F.mse_loss(recon, batch[:4]).clamp_min(1e-10)
            self.log("val/psnr", 10 * torch.log10(1 / mse), batch_size=min(4, batch.shape[0]), sync_dist=True)
            scores = [ms_ssim(as_rgb8(a), as_rgb8(b)) for a, b in zip(batch[:4], recon)]
            scores = [v for v in scores if v == v]  # NaN below 176 pixels: too small for 5 scales
            if scores:
                self.log("val/ms_ssim", sum(scores) / len(scores), batch_size=len(scores), sync_dist=True)
            tb = getattr(self.logger, "experiment", None)
            if tb is not None and hasattr(tb, "add_images"):
                tb.add_images("val/original_vs_reconstruction", torch.cat([batch[:4], recon]), self.global_step)

    @torch.no_grad()
    def reconstruct(self, images01: torch.Tensor) -> torch.Tensor:
        """Compress + decompress with the EMA weights (fixed-length indices, the model's sampler)."""
        model = self.export_model()
        idx = model.encode(images01)
        steps = min(self.hparams.val_sampling_steps, self.model_config["sampling"]["steps"])
        out = model.decode(idx, *images01.shape[-2:], steps=steps)
        return out.float().div(255).to(images01.device)

    def export_model(self) -> CoDModel:
        return CoDModel(self.model_config, self.ema.module.eval(), self.latent)

    def save_model_dir(self, out_dir: str | Path) -> Path | None:
        """Write the EMA weights as a model directory. Under FSDP2 every rank must call this (the shards are
        gathered); rank 0 writes."""
        card = {"provenance": f"trained by cod (preset {self.hparams.preset}), step {self.global_step}"}
        overwrite = self.hparams.export_overwrite
        if not _is_sharded(self.ema.module):
            return self.export_model().save(out_dir, card=card, objective_state=self.objective.state_dict(),
                                            overwrite=overwrite)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        ema_state = get_model_state_dict(self.ema.module, options=opts)
        objective_state = get_model_state_dict(self.objective, options=opts)
        if not self.trainer.is_global_zero:
            return None
        with torch.device("cpu"):
            denoiser = build_denoiser(self.model_config)
        load_state_strict(denoiser, ema_state, "gathered EMA weights")
        model = CoDModel(self.model_config, denoiser.eval(), self.latent)
        return model.save(out_dir, card=card, objective_state=objective_state, overwrite=overwrite)

    def on_train_end(self):
        if self.hparams.export_dir and (self.trainer.is_global_zero or _is_sharded(self.ema.module)):
            out = self.save_model_dir(self.hparams.export_dir)
            if out is not None:
                print(f"exported the EMA weights (step {self.global_step}) as the model directory {out}; use it with "
                      f"`cod compress --model {out} IMAGES -o OUT`")

    def configure_optimizers(self):
        params = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith(("ema.", "teacher."))]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                betas=tuple(self.hparams.betas))
        warmup = max(0, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def state_dict(self, *args, **kwargs):
        # the frozen REPA teacher is rebuilt from its file; keeping it out makes checkpoints 330 MB smaller
        sd = super().state_dict(*args, **kwargs)
        return {k: v for k, v in sd.items() if not k.startswith("teacher.")}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own_teacher = {k: v for k, v in super().state_dict().items() if k.startswith("teacher.")}
        return super().load_state_dict({**state_dict, **own_teacher}, strict=strict, assign=assign)

