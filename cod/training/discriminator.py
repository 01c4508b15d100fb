"""The GAN discriminator of one-step distillation (spec one-step.md §6.4): spectral-norm conv heads on the layers of
a frozen feature network.

The feature network is a seam: anything with `channels` (one entry per layer) whose forward maps an image in
[-1, 1] to a list of maps [B, C_i, H/16, W/16]. The release uses DINOv2 ViT-B/14 layers 2, 5, 8, 11
(`DinoV2Features`); `RandomPatchFeatures` is a small frozen random network for CPU-sized runs and tests.
Only the heads are trained; the feature network stays frozen, but gradients flow through it to the image (the
generator's adversarial term).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cod.training.repa import build_dinov2


def spectral_conv(in_ch: int, out_ch: int, kernel: int) -> nn.Conv2d:
    """Conv2d (with bias) under torch.nn.utils.spectral_norm: one power iteration per training forward, eps 1e-12
    (state-dict keys weight_orig, weight_u, weight_v, bias, as the release's SpectralNorm.apply)."""
    return nn.utils.spectral_norm(nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2), n_power_iterations=1,
                                  eps=1e-12)


def discriminator_head(channels: int) -> nn.Sequential:
    """SN-Conv3x3 C->C, LeakyReLU 0.2, SN-Conv1x1 C->C/2, LeakyReLU 0.2, SN-Conv1x1 C/2->1."""
    half = max(1, channels // 2)
    return nn.Sequential(spectral_conv(channels, channels, 3), nn.LeakyReLU(0.2),
                         spectral_conv(channels, half, 1), nn.LeakyReLU(0.2), spectral_conv(half, 1, 1))


class FrozenFeatures(nn.Module):
    """Base of the feature networks: frozen parameters, always in evaluation mode."""

    channels: list[int]

    def freeze(self) -> None:
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)


class DinoV2Features(FrozenFeatures):
    """DINOv2 (timm) layers as discriminator features: the [-1, 1] image fed directly (no ImageNet normalisation,
    QUIRK of the release), bicubic-resized to 14 H/16 x 14 W/16, the outputs of blocks `layers` with the final
    LayerNorm applied, patch tokens only, as [B, 768, H/16, W/16]. dtype: of the frozen weights (the release:
    bfloat16). Weights from a local file only (`weights` or $COD_DINOV2_PATH)."""

    def __init__(self, weights: str | None = None, layers: tuple[int, ...] = (2, 5, 8, 11),
                 arch: str = "vit_base_patch14_dinov2", dtype: str = "bfloat16", random_init: bool = False,
                 **overrides):
        super().__init__()
        self.net = build_dinov2(arch, weights, random_init, purpose="the DINOv2 discriminator",
                                setting="discriminator: {init_args: {features: {init_args: {weights: PATH}}}}",
                                **overrides).to(getattr(torch, dtype))
        if max(layers) >= len(self.net.blocks):
            raise ValueError(f"discriminator layers {list(layers)}: {arch} has {len(self.net.blocks)} blocks")
        self.layers = [int(i) for i in layers]
        self.patch = self.net.patch_embed.patch_size[0]
        self.channels = [self.net.embed_dim] * len(self.layers)
        self.freeze()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        H, W = x.shape[-2:]
        dtype = self.net.patch_embed.proj.weight.dtype
        x = F.interpolate(x, (self.patch * H // 16, self.patch * W // 16), mode="bicubic", align_corners=False)
        return list(self.net.get_intermediate_layers(x.to(dtype), n=self.layers, reshape=True, norm=True))


class RandomPatchFeatures(FrozenFeatures):
    """A small frozen random network (a stand-in for DINOv2 on CPU): a 16x16 stride-16 patch convolution, then
    1x1 convolutions with GELU; every stage's output is one layer [B, width, H/16, W/16]. Seeded: the same
    features in every run."""

    def __init__(self, width: int = 32, layers: int = 2, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.stages = nn.ModuleList([nn.Conv2d(3, width, 16, stride=16)] +
                                        [nn.Conv2d(width, width, 1) for _ in range(layers - 1)])
        self.channels = [width] * layers
        self.freeze()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else F.gelu(x))
            out.append(x)
        return out


class Discriminator(nn.Module):
    """Logits [B, n_layers, H/16, W/16]: one spectral-norm head per feature layer, concatenated on channels."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features
        self.heads = nn.ModuleList(discriminator_head(c) for c in features.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.heads[0][0].bias.dtype
        return torch.cat([head(f.to(dtype)) for f, head in zip(self.features(x), self.heads)], dim=1)
