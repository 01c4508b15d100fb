"""KL autoencoder with the state-dict layout of diffusers' `AutoencoderKL` (the SD VAE that CoD's latent
models use: stabilityai/sd-vae-ft-ema, 4 latent channels, 8x downsampling), plus CoD's latent scaling.

The released `diffusion_pytorch_model.safetensors` loads into `AutoencoderKL` key for key. `load_vae` also
reads diffusers' legacy attention names and the original CompVis/LDM layout; every key and shape is checked.
No diffusers dependency: this file only needs torch, safetensors and the standard library.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# the SD VAE pads right/bottom only before its stride-2 conv, exactly like the condition encoder
from cod.models.condition_codec import Downsample
from cod.files import read_bytes_bounded, regular_file_stat
from cod.models.state_dict import check_state_dict, load_torch_file, tensor_state

# Two scales exist because of a quirk of the release (spec §7.1, QUIRK 14): the official CoD latent
# checkpoints were trained on VAE latents multiplied by the SD scaling factor *squared*, so they only work
# with OFFICIAL_LATENT_SCALE. The standard factor gives unit-variance latents and is what new models use.
SD_VAE_SCALING = 0.18215
OFFICIAL_LATENT_SCALE = SD_VAE_SCALING ** 2

DOWNLOAD_HINT = ("download `diffusion_pytorch_model.safetensors` and `config.json` from "
                 "https://huggingface.co/stabilityai/sd-vae-ft-ema and pass the folder "
                 "(or set the environment variable COD_VAE_PATH)")


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32

    @classmethod
    def from_diffusers_config(cls, data: dict) -> "VAEConfig":
        """Read a diffusers `config.json`; settings this implementation does not build are refused rather
        than ignored, since ignoring them would give a model that loads but computes something else."""
        if not isinstance(data, dict):
            raise ValueError("unsupported VAE config.json: not a JSON object")
        channels = data.get("block_out_channels", cls.block_out_channels)
        levels = len(channels) if isinstance(channels, (list, tuple)) else 0
        groups = data.get("norm_num_groups", cls.norm_num_groups)

        def count(v, hi):  # bool is not a count
            return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= hi

        # bounds before anything is built: the SD VAE has 4 levels of at most 512 channels
        bad = [f"{k}={data.get(k)!r}" for k, ok in (
            ("block_out_channels", 1 <= levels <= 6 and all(count(c, 2048) and count(groups, 64) and c % groups == 0
                                                           for c in channels)),
            ("layers_per_block", count(data.get("layers_per_block", cls.layers_per_block), 8)),
            ("latent_channels", count(data.get("latent_channels", cls.latent_channels), 64)),
            ("in_channels", count(data.get("in_channels", cls.in_channels), 4)),
            ("out_channels", count(data.get("out_channels", cls.out_channels), 4)),
            ("norm_num_groups", count(groups, 64))) if not ok]
        if bad:
            raise ValueError("unsupported VAE config.json: " + "; ".join(bad))
        required = {
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "mid_block_add_attention": True,
            "use_quant_conv": True,
            "use_post_quant_conv": True,
        }
        wrong = [f"{k}={data[k]!r} (supported: {v!r})" for k, v in required.items()
                 if k in data and (list(data[k]) if isinstance(v, list) else data[k]) != v]
        if wrong:
            raise ValueError("unsupported VAE config.json: " + "; ".join(wrong))
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if "block_out_channels" in kwargs:
            kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        return cls(**kwargs)


VAE_PRESETS: dict[str, VAEConfig] = {
    "sd-vae": VAEConfig(),
    # CPU tests and demos. It keeps the SD VAE's 8x geometry (four levels) because the latent denoisers
    # assume H/8 x W/8 latents; narrow channels and one resnet per level keep it at ~0.37 M parameters.
    "tiny": VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1),
}


# ---------------------------------------------------------------------------------------------------------
# Network. Module and attribute names are chosen so that state_dict keys equal diffusers' keys.
# ---------------------------------------------------------------------------------------------------------
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
    """Single-head attention over all spatial positions with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # A one-element list so the key reads `to_out.0.*` as in diffusers (whose index 1 is a dropout).
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return x + self.to_out[0](o).transpose(1, 2).reshape(B, C, H, W)


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
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
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
        # Mean and log-variance of the posterior, hence twice the latent channels.
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
        # The decoder has one resnet more per level than the encoder (diffusers and LDM alike).
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
    """The encoder's posterior N(mean, exp(logvar)) per latent element."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        # Same clamp as diffusers/LDM, so sampled latents match theirs for the same noise.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Draw on the generator's device (like diffusers' randn_tensor), so a seeded CPU generator gives the
        # same latent whether the model runs on CPU or GPU.
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=device)
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
        """Image in [-1, 1], [B,3,H,W] -> posterior over [B,latent_channels,H/f,W/f] latents."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> image, nominally in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))


class LatentSpace(nn.Module):
    """A frozen VAE with CoD's latent scaling (spec §7.1):
    latent = encode(2·img − 1).sample() · scale, image = clamp((decode(latent / scale) + 1) / 2, 0, 1)."""

    def __init__(self, vae: AutoencoderKL, scale: float):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scale = scale

    def train(self, mode: bool = True) -> "LatentSpace":
        # The VAE is never trained; a parent's .train() must not switch it out of eval mode.
        super().train(mode)
        self.vae.eval()
        return self

    @property
    def downsample_factor(self) -> int:
        return self.vae.downsample_factor

    # No gradient flows through the VAE in CoD: it only maps data into model space and samples back out,
    # so autograd graphs over its activations would be pure memory cost.
    @torch.no_grad()
    def to_latent(self, img01: torch.Tensor, generator: torch.Generator | None = None,
                  sample: bool = True) -> torch.Tensor:
        """Image in [0, 1] -> scaled latent; `sample=False` takes the posterior mean instead of a draw."""
        posterior = self.vae.encode(2 * img01 - 1)
        return (posterior.sample(generator) if sample else posterior.mode()) * self.scale

    @torch.no_grad()
    def to_image(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image in [0, 1]."""
        return ((self.vae.decode(latent / self.scale) + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------
def resolve_vae_path(path: str | os.PathLike | None) -> Path:
    """The explicit path, else $COD_VAE_PATH, else a FileNotFoundError saying what to download."""
    chosen = path if path is not None else os.environ.get("COD_VAE_PATH")
    if not chosen:
        raise FileNotFoundError(f"the SD VAE weights are needed for latent models: {DOWNLOAD_HINT}")
    chosen = Path(chosen)
    if not chosen.exists():
        raise FileNotFoundError(f"no SD VAE weights at {chosen}: {DOWNLOAD_HINT}")
    return chosen


_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LDM_KEY = re.compile(r"^(encoder|decoder)\.(down|up|mid)\.")
# Parts of LDM training checkpoints that are not the autoencoder: the LPIPS/discriminator loss module
# and the raw EMA copy (whose values "ema-pruned" releases have already moved into the main keys).
_LDM_NOT_AUTOENCODER = ("loss.", "model_ema.")


def _ldm_to_diffusers_key(key: str, num_levels: int) -> str:
    m = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(\w+)\.", key)
    if m:
        return f"{m[1]}.mid_block.attentions.0.{_LDM_ATTENTION[m[2]]}." + key[m.end():]

    def flip(level: str) -> int:
        # LDM numbers decoder levels from the highest resolution up; diffusers in the order they run.
        return num_levels - 1 - int(level)

    rules = (
        (r"^(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
        (r"^encoder\.down\.(\d+)\.block\.", lambda m: f"encoder.down_blocks.{m[1]}.resnets."),
        (r"^encoder\.down\.(\d+)\.downsample\.", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0."),
        (r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{flip(m[1])}.resnets."),
        (r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{flip(m[1])}.upsamplers.0."),
        (r"\.norm_out\.", lambda m: ".conv_norm_out."),
        (r"\.nin_shortcut\.", lambda m: ".conv_shortcut."),
    )
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def convert_state_dict(state: dict[str, torch.Tensor], num_levels: int = 4) -> dict[str, torch.Tensor]:
    """Bring any accepted layout to the current diffusers one: the CompVis/LDM layout (optionally inside a
    full Stable Diffusion checkpoint under `first_stage_model.`), diffusers' legacy attention names, and
    1x1-conv shaped attention weights. Keys already in diffusers layout pass through unchanged."""
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in state):
        # A whole SD checkpoint: the UNet and text encoder beside the VAE are not ours to check.
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if any(_LDM_KEY.match(k) for k in state):
        state = {_ldm_to_diffusers_key(k, num_levels): v for k, v in state.items()
                 if not k.startswith(_LDM_NOT_AUTOENCODER)}
    out = {}
    for key, value in state.items():
        key = re.sub(r"attentions\.0\.(query|key|value|proj_attn)\.",
                     lambda m: f"attentions.0.{_LEGACY_ATTENTION[m[1]]}.", key)
        if re.search(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", key) and value.ndim == 4 \
                and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # a 1x1 conv over positions is the same map as a linear layer
        out[key] = value
    return out


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    regular_file_stat(path, "VAE weights file")  # never a FIFO or a device, which the readers would block on
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for malformed files
            raise ValueError(f"{path} is not a valid safetensors file ({' '.join(str(e).split())})") from None
    state = load_torch_file(path, "VAE checkpoint")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a (Lightning/LDM) training checkpoint
    return tensor_state(state, str(path))


def load_vae(path: str | os.PathLike | None, preset: str = "sd-vae") -> AutoencoderKL:
    """Load VAE weights, strictly, from
    (a) a diffusers folder: config.json (which then decides the architecture) + diffusion_pytorch_model
        .safetensors (preferred) or .bin;
    (b) one .safetensors file, or (c) one .bin/.pt/.ckpt file (read with weights_only=True),
    in diffusers, legacy-diffusers or CompVis/LDM layout. Files without config.json use `preset`.
    `path=None` falls back to $COD_VAE_PATH. Returns the model in eval mode, on the CPU."""
    path = resolve_vae_path(path)
    config = VAE_PRESETS[preset]
    if path.is_dir():
        if (path / "config.json").is_file():
            try:
                data = json.loads(read_bytes_bounded(path / "config.json", 1 << 20, "VAE config"))
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{path / 'config.json'} is not valid JSON ({e})") from None
            config = VAEConfig.from_diffusers_config(data)
        candidates = [path / f"diffusion_pytorch_model.{ext}" for ext in ("safetensors", "bin")]
        weights = next((c for c in candidates if c.is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{path} holds no diffusion_pytorch_model.safetensors: {DOWNLOAD_HINT}")
    else:
        weights = path
    # the weights first (their size is the file's), then the network on the meta device, compared with them before
    # any of its memory exists: a config.json describing a huge VAE costs nothing
    state = convert_state_dict(_read_weights(weights), len(config.block_out_channels))
    with torch.device("meta"):
        vae = AutoencoderKL(config)
    check_state_dict(vae, state, f"VAE weights {weights}")
    vae.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return vae.eval()
