"""Pixel-space perceptual metrics for one-step distillation (spec one-step.md §6.2-6.3): per-sample distances
d(a, b) -> [B, 1, 1, 1] of images in [-1, 1], frozen.

The release's term is LPIPS_vgg + 0.5 LPIPS_alex: `PerceptualSum([LPIPS("vgg"), LPIPS("alex")], [1.0, 0.5])`.
LPIPS comes from torchmetrics, which ships the LPIPS v0.1 linear-layer weights; its ImageNet backbone
(torchvision's VGG16 / AlexNet) is read from a local file, never downloaded (see BACKBONE_WEIGHTS).
`SquaredError` and `AbsoluteError` are the stand-ins of the `dmd_tiny` fixture and the CPU-sized recipe.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

# torchvision's ImageNet weights of each LPIPS backbone: where to get them and the variable naming a local copy.
BACKBONE_WEIGHTS = {
    "vgg": ("https://download.pytorch.org/models/vgg16-397923af.pth", "COD_LPIPS_VGG_PATH"),
    "alex": ("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "COD_LPIPS_ALEX_PATH"),
}


class FrozenMetric(nn.Module):
    def freeze(self) -> "FrozenMetric":
        self.requires_grad_(False).eval()
        return self

    def train(self, mode: bool = True):
        return super().train(False)


class SquaredError(FrozenMetric):
    """mean((a - b)^2) per sample."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).pow(2).mean(dim=(1, 2, 3), keepdim=True)


class AbsoluteError(FrozenMetric):
    """mean|a - b| per sample."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)


class LPIPS(FrozenMetric):
    """LPIPS (v0.1, linear calibration) with a VGG16 or AlexNet backbone, on [-1, 1] images.

    backbone_weights: torchvision's ImageNet file for the backbone (BACKBONE_WEIGHTS), or $COD_LPIPS_VGG_PATH /
    $COD_LPIPS_ALEX_PATH. Only its `features.*` entries are used, read as weights only."""

    def __init__(self, net: str = "vgg", backbone_weights: str | None = None):
        super().__init__()
        if net not in BACKBONE_WEIGHTS:
            raise ValueError(f"LPIPS net must be one of {sorted(BACKBONE_WEIGHTS)}, got {net!r}")
        url, variable = BACKBONE_WEIGHTS[net]
        path = backbone_weights or os.environ.get(variable)
        if not path or not Path(path).is_file():
            raise FileNotFoundError(
                f"LPIPS ({net}) needs torchvision's ImageNet {net} weights{f' (not found: {path})' if path else ''}: "
                f"download {url} and set `backbone_weights: PATH` on the LPIPS metric in the config, or {variable}")
        from torchmetrics.functional.image.lpips import _LPIPS

        from cod.errors import InputError
        from cod.models.state_dict import load_state_strict, load_torch_file, tensor_state

        # pnet_rand: torchmetrics builds the backbone without downloading; its packaged linear layers are loaded
        self.lpips = _LPIPS(pretrained=True, net=net, pnet_rand=True)
        state = tensor_state(load_torch_file(path, f"{net} backbone weights"), str(path), "features.")
        backbone = self.lpips.net
        own = {name.split(".", 1)[1]: name for name in backbone.state_dict()}  # "0.weight" -> "slice1.0.weight"
        missing = [f"features.{k}" for k in own if k not in state]
        if missing:
            raise InputError(f"{path} is not torchvision's {net} file: it lacks {', '.join(missing[:3])}"
                             f"{' ...' if len(missing) > 3 else ''} (download {url})")
        load_state_strict(backbone, {own[k]: state[k] for k in own}, f"{path} (features.*)")
        self.freeze()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lpips(a, b)


class PerceptualSum(FrozenMetric):
    """sum_i weights[i] * metrics[i](a, b), per sample."""

    def __init__(self, metrics: list[nn.Module], weights: list[float] | None = None):
        super().__init__()
        weights = [1.0] * len(metrics) if weights is None else [float(w) for w in weights]
        if len(weights) != len(metrics) or not metrics:
            raise ValueError(f"PerceptualSum: {len(metrics)} metrics and {len(weights)} weights")
        self.metrics = nn.ModuleList(metrics)
        self.weights = weights
        self.freeze()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sum(w * m(a, b) for w, m in zip(self.weights, self.metrics))
