"""REPA teacher: frozen DINOv2 ViT-B/14 patch features of the raw image (spec §7.3 step 5), built with timm.

Weights come from a local file only (the official torch-hub checkpoint `dinov2_vitb14_pretrain.pth` or a timm
state dict); `repa: null` trains without alignment (the cosine terms get weight 0).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DisabledTeacher(nn.Module):
    """No alignment: zero targets of a small width (the objective gives the cosine terms weight 0)."""

    enabled = False
    dim = 8

    def forward(self, images01: torch.Tensor, tokens: int) -> torch.Tensor:
        return images01.new_zeros(images01.shape[0], tokens, self.dim)


def build_dinov2(arch: str = "vit_base_patch14_dinov2", weights: str | None = None, random_init: bool = False,
                 purpose: str = "the REPA teacher", setting: str = "repa: {weights: PATH}", **overrides) -> nn.Module:
    """A frozen timm DINOv2 from a local weights file (never the network): `weights`, else $COD_DINOV2_PATH.
    A missing file is one error naming the download and the config setting (`setting`) that takes its path."""
    import timm

    net = timm.create_model(arch, pretrained=False, dynamic_img_size=True, num_classes=0, **overrides)
    if not random_init:
        path = weights or os.environ.get("COD_DINOV2_PATH")
        if not path or not Path(path).is_file():
            raise FileNotFoundError(
                f"{purpose} needs DINOv2 ViT-B/14 weights{f' (not found: {path})' if path else ''}: "
                f"download {DINOV2_URL} and set `{setting}` in the config or COD_DINOV2_PATH")
        from timm.models.vision_transformer import checkpoint_filter_fn

        from cod.models.state_dict import load_torch_file

        state = load_torch_file(path, "DINOv2 checkpoint")
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not hold a dict of tensors")
        state = checkpoint_filter_fn(state.get("model", state), net)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} does not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return net.eval().requires_grad_(False)


class DinoTeacher(nn.Module):
    enabled = True

    def __init__(self, arch: str = "vit_base_patch14_dinov2", weights: str | None = None, random_init: bool = False,
                 **overrides):
        super().__init__()
        try:
            self.net = build_dinov2(arch, weights, random_init, **overrides)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}; or train without alignment with `repa: null`") from None
        self.dim = self.net.embed_dim
        self.patch = self.net.patch_embed.patch_size[0]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always in eval mode

    @torch.no_grad()
    def forward(self, images01: torch.Tensor, tokens: int) -> torch.Tensor:
        H, W = images01.shape[-2:]
        size = (self.patch * H // 16, self.patch * W // 16)  # one teacher patch per 16x16 CoD token
        x = F.interpolate(images01.float(), size=size, mode="bicubic", align_corners=False)
        feats = self.net.forward_features((x - self.mean) / self.std)[:, self.net.num_prefix_tokens:]
        return feats.to(torch.bfloat16).float()


def build_repa_teacher(config: dict | None) -> nn.Module:
    return DisabledTeacher() if config is None else DinoTeacher(**config)
