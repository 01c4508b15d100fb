"""KL autoencoder with the state-dict layout of diffusers' `AutoencoderKL` (the SD VAE that CoD's latent
models use: stabilityai/sd-vae-ft-ema, 4 latent channels, 8x downsampling), plus CoD's latent scaling.

Loads diffusers folders or files, and converts the original CompVis/LDM layout; every key and shape is
checked. No diffusers dependency.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# The SD VAE's latent scaling factor. Official CoD latent checkpoints were trained on latents multiplied by
# its square (QUIRK 14), so their model configs store OFFICIAL_LATENT_SCALE; new models use SD_VAE_SCALING.
SD_VAE_SCALING = 0.18215
OFFICIAL_LATENT_SCALE = SD_VAE_SCALING ** 2

DOWNLOAD_HINT = ("download diffusion_pytorch_model.safetensors and config.json from "
                 "https://huggingface.co/stabilityai/sd-vae-ft-ema into one folder and pass that folder "
                 "(or set the environment variable COD_VAE_PATH to it)")


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32

    @classmethod
    def from_json(cls, data: dict) -> "VAEConfig":
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if "block_out_channels" in kwargs:
            kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        return cls(**kwargs)


VAE_PRESETS = {
    "sd-vae": VAEConfig(),
    # CPU tests and demos: same 8x geometry, a few hundred thousand parameters.
    "tiny": VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1),
}


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SelfAttention(nn.Module):
    """Single-head attention over all positions, linear projections (diffusers' `Attention` layout)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)
        q, k, v = (m(h).unsqueeze(1) for m in (self.to_q, self.to_k, self.to_v))
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return x + self.to_out[0](o).transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class DownBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList([
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class DiagonalGaussian:
    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                          device=generator.device if generator is not None else self.mean.device)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config or VAE_PRESETS["sd-vae"]
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quant_conv = nn.Conv2d(2 * self.config.latent_channels, 2 * self.config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(self.config.latent_channels, self.config.latent_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x in [-1, 1] -> posterior over latents."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """latent -> image in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))


class LatentSpace(nn.Module):
    """Frozen VAE + CoD's scaling: latent = encode(2 img - 1).sample() * scale; image = (decode(latent/scale)+1)/2."""

    def __init__(self, vae: AutoencoderKL, scale: float = SD_VAE_SCALING):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scale = scale

    @torch.no_grad()
    def to_latent(self, img01: torch.Tensor, generator: torch.Generator | None = None,
                  sample: bool = True) -> torch.Tensor:
        posterior = self.vae.encode(2 * img01 - 1)
        return (posterior.sample(generator) if sample else posterior.mode()) * self.scale

    @torch.no_grad()
    def to_image(self, latent: torch.Tensor) -> torch.Tensor:
        return ((self.vae.decode(latent / self.scale) + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def resolve_vae_path(path: str | os.PathLike | None) -> Path:
    """An explicit path, else $COD_VAE_PATH; a missing file says what to download."""
    chosen = path if path is not None else os.environ.get("COD_VAE_PATH")
    if not chosen:
        raise FileNotFoundError(f"this latent model needs the SD VAE weights: {DOWNLOAD_HINT}")
    chosen = Path(chosen)
    if not chosen.exists():
        raise FileNotFoundError(f"SD VAE weights not found at {chosen}: {DOWNLOAD_HINT}")
    return chosen


_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def convert_state_dict(state: dict[str, torch.Tensor], num_levels: int = 4) -> dict[str, torch.Tensor]:
    """Map the CompVis/LDM layout and diffusers' legacy attention names to the current diffusers layout."""
    state = {k.removeprefix("first_stage_model."): v for k, v in state.items()}
    if not any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.")) for k in state) and \
            not any(re.search(r"attentions\.0\.(query|key|value|proj_attn)\.", k) for k in state):
        return state
    out = {}
    for key, value in state.items():
        new = key
        m = re.match(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)$", key)
        if m:
            new = f"{m[1]}.mid_block.attentions.0.{_LDM_ATTENTION[m[2]]}.{m[3]}"
            if m[2] in ("q", "k", "v", "proj_out") and value.ndim == 4:
                value = value[:, :, 0, 0]
        else:
            new = re.sub(r"^(encoder|decoder)\.mid\.block_(\d)\.",
                         lambda mm: f"{mm[1]}.mid_block.resnets.{int(mm[2]) - 1}.", new)
            new = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", new)
            new = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", new)
            new = re.sub(r"^decoder\.up\.(\d+)\.block\.",
                         lambda mm: f"decoder.up_blocks.{num_levels - 1 - int(mm[1])}.resnets.", new)
            new = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
                         lambda mm: f"decoder.up_blocks.{num_levels - 1 - int(mm[1])}.upsamplers.0.", new)
            new = re.sub(r"\.norm_out\.", ".conv_norm_out.", new)
            new = new.replace(".nin_shortcut.", ".conv_shortcut.")
            new = re.sub(r"attentions\.0\.(query|key|value|proj_attn)\.",
                         lambda mm: f"attentions.0.{_LEGACY_ATTENTION[mm[1]]}.", new)
        out[new] = value
    return out


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_vae(path: str | os.PathLike, preset: str = "sd-vae") -> AutoencoderKL:
    """A diffusers folder (config.json + diffusion_pytorch_model.safetensors/.bin), or one weights file in
    diffusers or CompVis layout (.safetensors, or .bin/.pt/.ckpt read with weights_only)."""
    path = resolve_vae_path(path)
    config = VAE_PRESETS[preset]
    if path.is_dir():
        if (path / "config.json").is_file():
            config = VAEConfig.from_json(json.loads((path / "config.json").read_text()))
        candidates = [path / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")]
        weights = next((c for c in candidates if c.is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{path} holds no diffusion_pytorch_model.safetensors: {DOWNLOAD_HINT}")
    else:
        weights = path
    vae = AutoencoderKL(config)
    state = convert_state_dict(_read_weights(weights), len(config.block_out_channels))
    from cod.model import load_state_strict  # one strict loader for every weights file

    load_state_strict(vae, state, f"VAE weights {weights}")
    return vae.eval()


def vae_config_dict(vae: AutoencoderKL) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(vae.config).items()}
