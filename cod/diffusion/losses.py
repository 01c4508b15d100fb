"""CoD's training objective (spec §7.3): flow matching + REPA alignment + codec reconstruction/alignment + VQ
(+ the one-step MSE term of stage 3). A plain nn.Module that owns the trainable heads; the Lightning
pipeline wires it to data, the REPA teacher and the optimiser.

State-dict keys match the release's trainer (`proj.0.*`, `proj_codec.0.*`, `recon_codec.0.*`), so its
heads load from official checkpoints under the `diffusion_trainer.` prefix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from cod.diffusion.flow import interpolate, noise_to_data, training_time, velocity_target
from cod.models.layers import tokens_from_map

LOSS_KEYS = ("fm_loss", "codec_recon_loss", "codec_cos_loss", "cos_loss", "one_step_mse", "vq_loss", "loss")


def projector(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, out_dim))


def conv_projector(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_dim, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, hidden, 1), nn.SiLU(),
                         nn.Conv2d(hidden, out_dim, 1))


@dataclass
class TrainingDraws:
    """The step's random numbers, in the release's order: u ~ U[0,1)^B, z ~ N(0,1)^B, noise ~ N(0, I)."""

    u: torch.Tensor
    z: torch.Tensor
    noise: torch.Tensor

    @classmethod
    def draw(cls, x: torch.Tensor, generator: torch.Generator | None = None) -> "TrainingDraws":
        B = x.shape[0]
        u = torch.rand(B, generator=generator, device=x.device)
        z = torch.randn(B, generator=generator, device=x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return cls(u, z, noise)


class CoDObjective(nn.Module):
    """Computes the loss dict for one batch.

    codec_loss_masking: "correct" (default) averages the codec alignment / reconstruction losses over the
    samples whose condition was kept; "official" reproduces the release's broadcasting bug (the masked mean
    degenerates to keep_fraction * mean over all samples, dropped ones included) for fixture parity and for
    resuming official training runs exactly.
    """

    def __init__(self, hidden_size: int, recon_dim: tuple[int, int, int], proj_hidden_dim: int | None = None,
                 proj_encoder_dim: int = 768, align_layer: int = 8, feat_loss_weight: float = 0.5,
                 vq_loss_weight: float = 0.25, null_condition_p: float = 0.1, lognorm_t: bool = True,
                 timeshift: float = 1.0, one_step_mse_weight: float = 0.0, codec_loss_masking: str = "correct"):
        super().__init__()
        if codec_loss_masking not in ("correct", "official"):
            raise ValueError(f"codec_loss_masking must be 'correct' or 'official', got '{codec_loss_masking}'")
        hidden = proj_hidden_dim or hidden_size
        self.recon_dim = tuple(recon_dim)
        self.align_layer = align_layer
        self.feat_loss_weight = feat_loss_weight
        self.vq_loss_weight = vq_loss_weight
        self.null_condition_p = null_condition_p
        self.lognorm_t = lognorm_t
        self.timeshift = timeshift
        self.one_step_mse_weight = one_step_mse_weight
        self.codec_loss_masking = codec_loss_masking
        c, ph, pw = self.recon_dim
        self.proj = nn.ModuleList([projector(hidden_size, hidden, proj_encoder_dim)])
        self.proj_codec = nn.ModuleList([projector(hidden_size, hidden, proj_encoder_dim)])
        self.recon_codec = nn.ModuleList([conv_projector(hidden_size, hidden, c * ph * pw)])

    def _masked_mean(self, per_sample: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self.codec_loss_masking == "official":
            return keep.mean() * per_sample.mean()
        if keep.sum() == 0:
            return per_sample.sum() * 0.0  # keeps the graph (and DDP's used-parameter set) intact
        return (per_sample * keep).sum() / keep.sum()

    def forward(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, y_uncond: torch.Tensor,
                target_features: torch.Tensor, draws: TrainingDraws | None = None) -> dict[str, torch.Tensor]:
        """x: model-space data [B, C, h, w]; y / y_uncond: condition images [B, 3, H, W];
        target_features: the REPA teacher's patch tokens [B, L', 768] of the raw image."""
        draws = draws or TrainingDraws.draw(x)
        B = x.shape[0]
        drop = (draws.u < self.null_condition_p).float()
        keep = 1 - drop
        m = drop.view(B, 1, 1, 1)
        ycond = y * (1 - m) + y_uncond.expand_as(y) * m

        t = training_time(draws.z, self.lognorm_t, self.timeshift).view(B, 1, 1, 1)
        x_t = interpolate(x, draws.noise, t)
        v_target = velocity_target(x, x_t, t)

        captured = {}
        hook = net.blocks[self.align_layer - 1].register_forward_hook(
            lambda _m, _i, out: captured.__setitem__("feat", out))
        try:
            out, cond, codec_res = net(x_t, t.flatten(), ycond, return_codec_res=True)
        finally:
            hook.remove()

        fm = F.mse_loss(out, v_target)
        dst = target_features
        src = self.proj[0](captured["feat"])[:, : dst.shape[1]]
        cos = (1 - F.cosine_similarity(src, dst, dim=-1)).mean()

        src_codec = self.proj_codec[0](tokens_from_map(cond))[:, : dst.shape[1]]
        codec_cos = self._masked_mean((1 - F.cosine_similarity(src_codec, dst, dim=-1)).mean(1), keep)
        c, ph, pw = self.recon_dim
        recon = rearrange(self.recon_codec[0](cond), "b (c ph pw) h w -> b c (h ph) (w pw)", c=c, ph=ph, pw=pw)
        codec_recon = self._masked_mean((recon - x).pow(2).flatten(1).mean(1), keep)
        vq = codec_res["vq_loss"]

        if self.one_step_mse_weight > 0:
            v0, _ = net(draws.noise, torch.zeros(B, device=x.device), cond=cond)
            one_step = F.mse_loss(noise_to_data(draws.noise, v0), x)
        else:
            one_step = torch.zeros((), device=x.device)

        total = (fm + codec_recon + self.feat_loss_weight * (cos + codec_cos) + self.vq_loss_weight * vq
                 + self.one_step_mse_weight * one_step)
        return {"fm_loss": fm, "codec_recon_loss": codec_recon, "codec_cos_loss": codec_cos, "cos_loss": cos,
                "one_step_mse": one_step, "vq_loss": vq, "loss": total, "bpp": codec_res["bpp"]}
