"""`CoDModel`: a denoiser (+ VAE for latent models) with its config, and the model directory format.

A model directory holds
  config.json         what to build (family, denoiser class + kwargs, latent space, sampling defaults)
  model.safetensors   the denoiser's weights (keys = its state_dict keys, EMA weights for imported models)
  vae.safetensors     (latent models, optional) the VAE; otherwise it comes from $COD_VAE_PATH
  objective.safetensors (optional) the training heads, for fine-tuning
  MODEL_CARD.md       human-readable provenance: variant, real bpp, source, sha256
Every command and `cod.load(DIR)` read this; `cod new-model` and `cod import-official` write it.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cod.diffusion.samplers import Sampler, build_sampler
from cod.errors import ModelDirError
from cod.files import atomic_write_bytes, sha256_file  # noqa: F401 - re-exported
from cod.models.condition_codec import TOKEN_STRIDE, required_multiple
from cod.models.ddt import DDT
from cod.models.denoiser import CoDDenoiser
from cod.models.pixnerdit import PixNerDiT
from cod.models.presets import DEFAULT_SAMPLING, Preset
from cod.models.state_dict import StateDictMismatch, load_state_strict

CONFIG_FORMAT = "cod-model"
CONFIG_VERSION = 1
DENOISERS = {"PixNerDiT": PixNerDiT, "DDT": DDT}
LATENT_DOWNSAMPLE = 8  # the SD VAE; condition tokens cover 16x16 pixels = 2x2 latent cells


def build_config(preset: Preset, preset_name: str | None = None, latent_scale: float | None = None,
                 vae_file: str | None = None, sampling: dict | None = None, extra: dict | None = None) -> dict:
    latent = None
    if preset.family == "latent":
        from cod.models.vae import SD_VAE_SCALING

        latent = {"vae_preset": preset.vae_preset, "vae_file": vae_file,
                  "scale": SD_VAE_SCALING if latent_scale is None else latent_scale}
    return {
        "format": CONFIG_FORMAT, "format_version": CONFIG_VERSION, "preset": preset_name,
        "family": preset.family, "denoiser": {"class": preset.denoiser_class, "kwargs": dict(preset.denoiser)},
        "latent": latent, "sampling": {**DEFAULT_SAMPLING, **preset.sampling, **(sampling or {})},
        **(extra or {}),
    }


def build_denoiser(config: dict) -> CoDDenoiser:
    spec = config["denoiser"]
    if spec["class"] not in DENOISERS:
        raise ModelDirError(f"unknown denoiser class '{spec['class']}' (expected one of {list(DENOISERS)})")
    return DENOISERS[spec["class"]](**spec["kwargs"])


class CoDModel(torch.nn.Module):
    """Encoder side (image -> indices) and decoder side (indices -> image by sampling) of one CoD model."""

    def __init__(self, config: dict, denoiser: CoDDenoiser | None = None, latent=None, path: Path | None = None):
        super().__init__()
        self.config = config
        self.denoiser = denoiser if denoiser is not None else build_denoiser(config)
        self.latent = latent
        self.path = path
        self._fingerprint = config.get("fingerprint", "")
        self._uncond_cache: dict[tuple, torch.Tensor] = {}

    @property
    def fingerprint(self) -> str:
        """sha256 of the weights file (what .cod files are tied to). A model that was never saved gets the hash of
        its weights serialised as save() would write them, computed once at first use."""
        if not self._fingerprint:
            from safetensors.torch import save as safetensors_bytes

            weights = {k: v.detach().contiguous().cpu() for k, v in self.denoiser.state_dict().items()}
            self._fingerprint = hashlib.sha256(safetensors_bytes(weights)).hexdigest()
        return self._fingerprint

    @fingerprint.setter
    def fingerprint(self, value: str) -> None:
        self._fingerprint = value

    # ---- geometry and rate -------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.config["family"]

    @property
    def codec(self):
        return self.denoiser.codec

    @property
    def bpp(self) -> float:
        return self.codec.bpp

    @property
    def size_multiple(self) -> int:
        """Image heights and widths must be multiples of this (index stride and token stride)."""
        return required_multiple(self.codec.stride, TOKEN_STRIDE)

    def model_shape(self, height: int, width: int) -> tuple[int, int, int]:
        if self.family == "pixel":
            return (self.denoiser.in_channels, height, width)
        f = LATENT_DOWNSAMPLE
        return (self.denoiser.in_channels, height // f, width // f)

    def check_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ValueError(f"this model codes images whose sides are multiples of {m}; got {height}x{width}")

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    # ---- conditioning --------------------------------------------------------------------------------------
    @staticmethod
    def condition_image(images01: torch.Tensor) -> torch.Tensor:
        """The conditioner of the release rounds the [0, 1] image to bfloat16 before the codec (QUIRK 15)."""
        return images01.to(torch.bfloat16).to(torch.float32)

    def unconditional_condition(self, height: int, width: int) -> torch.Tensor:
        """Condition map of the all -1 image, cached per size and device (the release caches one forever,
        whatever the size of later calls: a bug we do not reproduce)."""
        key = (height, width, str(self.device), self.codec.decoder.conv_in.weight.dtype)
        if key not in self._uncond_cache:
            uncond = -torch.ones(1, 3, height, width, device=self.device)
            with torch.no_grad():
                idx = self.codec.encode_indices(self.condition_image(uncond))
                self._uncond_cache[key] = self.codec.decode_indices(idx)
        return self._uncond_cache[key]

    # ---- encode / decode -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] floats in [0, 1] -> VQ indices [B, H/s, W/s]."""
        self.check_size(*images01.shape[-2:])
        return self.codec.encode_indices(self.condition_image(images01.to(self.device)))

    def sampler(self, **overrides) -> Sampler:
        cfg = {**self.config["sampling"], **{k: v for k, v in overrides.items() if v is not None}}
        name = cfg.pop("sampler")
        return build_sampler(name, **cfg)

    def initial_noise(self, batch: int, height: int, width: int, seeds: int | list[int] = 0) -> torch.Tensor:
        """One CPU generator per image (seeded like the release's CLI), so a batch equals single images."""
        seeds = [seeds] * batch if isinstance(seeds, int) else list(seeds)
        shape = self.model_shape(height, width)
        noise = [torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.cat(noise).to(self.device)

    @torch.no_grad()
    def sample(self, indices: torch.Tensor, height: int, width: int, seeds: int | list[int] = 0,
               **sampling) -> torch.Tensor:
        """VQ indices [B, h, w] -> model-space samples (decompress path: exact codebook rows)."""
        self.check_size(height, width)
        B = indices.shape[0]
        cond = self.codec.decode_indices(indices.to(self.device))
        uncond = self.unconditional_condition(height, width).expand(B, -1, -1, -1)
        return self.sampler(**sampling)(self.denoiser, self.initial_noise(B, height, width, seeds),
                                        cond=torch.cat([uncond, cond]))

    def decode(self, indices: torch.Tensor, height: int, width: int, seeds: int | list[int] = 0,
               **sampling) -> torch.Tensor:
        """VQ indices [B, h, w] -> uint8 images [B, 3, H, W]."""
        self._ensure_latent()  # fail before sampling, not after
        return self.to_uint8(self.sample(indices, height, width, seeds, **sampling))

    def _ensure_latent(self) -> None:
        """Latent models load their VAE on first use, so that indices and samples need no VAE weights."""
        if self.family == "latent" and self.latent is None:
            self.latent = _load_latent(self.path or Path("."), self.config["latent"], None).to(self.device)

    @torch.no_grad()
    def reconstruct(self, images01: torch.Tensor, seeds: int | list[int] = 0, **sampling) -> torch.Tensor:
        """Evaluate path: the codec runs inside the first network call (straight-through condition)."""
        B, _, H, W = images01.shape
        self.check_size(H, W)
        y = self.condition_image(images01.to(self.device))
        y_uncond = self.condition_image(-torch.ones_like(y))
        x = self.sampler(**sampling)(self.denoiser, self.initial_noise(B, H, W, seeds), y=y, y_uncond=y_uncond)
        return self.to_uint8(x)

    def compress(self, images, **options) -> list[bytes]:
        """RGB images (HxWx3 uint8 arrays, PIL images, [3,H,W] tensors or a [B,3,H,W] float batch), any size ->
        .cod bytes each. options: fmt ("cod" | "official"), batch_size, and sampler, steps, cfg, seed (stored in
        the file when not the defaults). See cod.codec.api.compress."""
        from cod.codec import api

        return api.compress(self, images, **options)

    def decompress(self, data: bytes, **options):
        """.cod bytes -> HxWx3 uint8 numpy image at the original size. options: fmt, sampler, steps, cfg, seed."""
        from cod.codec import api

        return api.decompress(self, data, **options)

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space sample -> uint8 image: through the VAE for latent models, then the release's rounding
        (bf16 cast, (x + 1) * 127.5 + 0.5, clip, truncate)."""
        if self.family == "latent":
            self._ensure_latent()
            x = self.latent.to_image(x.float()) * 2 - 1
        x = x.to(torch.bfloat16).float()
        return torch.clamp((x + 1) * 127.5 + 0.5, 0, 255).to(torch.uint8)

    # ---- persistence ---------------------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike, card: dict | None = None, objective_state: dict | None = None) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().contiguous().cpu() for k, v in self.denoiser.state_dict().items()}
        _atomic_save_safetensors(weights, out / "model.safetensors")
        config = dict(self.config)
        if self.latent is not None and config["latent"].get("vae_file"):
            vae_sd = {k: v.detach().contiguous().cpu() for k, v in self.latent.vae.state_dict().items()}
            _atomic_save_safetensors(vae_sd, out / config["latent"]["vae_file"])
        if objective_state:
            _atomic_save_safetensors({k: v.detach().contiguous().cpu() for k, v in objective_state.items()},
                                     out / "objective.safetensors")
        config["fingerprint"] = sha256_file(out / "model.safetensors")
        atomic_write_bytes(out / "config.json", (json.dumps(config, indent=2) + "\n").encode())
        atomic_write_bytes(out / "MODEL_CARD.md", render_model_card(config, card or {}).encode())
        self.config, self.fingerprint, self.path = config, config["fingerprint"], out
        return out


def _atomic_save_safetensors(tensors: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def render_model_card(config: dict, card: dict) -> str:
    kw = config["denoiser"]["kwargs"]
    from cod.models.condition_codec import bits_per_pixel, index_stride

    stride = index_stride(kw["ds"], kw["up2x"])
    bpp = bits_per_pixel(kw["ds"], kw["codebook_bits"], kw["up2x"])
    lines = [
        f"# CoD model: {card.get('title', config.get('preset') or config['denoiser']['class'])}", "",
        f"- family: {config['family']} ({config['denoiser']['class']})",
        f"- rate: {kw['codebook_bits']} bits per {stride}x{stride} pixels = {bpp:.6g} bpp "
        f"({kw['codebook_bits'] * (512 // stride) ** 2} bits for a 512x512 image)",
        f"- nominal ds={kw['ds']}, up2x={kw['up2x']}",
        f"- image sides must be multiples of {required_multiple(stride, TOKEN_STRIDE)}",
        f"- weights sha256: {config.get('fingerprint', '')}",
        f"- sampling defaults: {json.dumps(config['sampling'])}",
    ]
    if config.get("latent"):
        lat = config["latent"]
        lines.append(f"- latent space: VAE '{lat['vae_preset']}', scale {lat['scale']:.6g}, weights "
                     f"{lat.get('vae_file') or 'from $COD_VAE_PATH'}")
    for key, value in card.items():
        if key != "title":
            lines.append(f"- {key}: {value}")
    lines.append(f"- written: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    return "\n".join(lines) + "\n"


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise ModelDirError(f"model directory {path} does not exist; create one with `cod new-model` or "
                            f"`cod import-official`")
    if not cfg_path.is_file():
        raise ModelDirError(f"{path} is not a cod model directory (no config.json)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{cfg_path} is not valid JSON: {e}") from None
    if config.get("format") != CONFIG_FORMAT:
        raise ModelDirError(f"{cfg_path} is not a cod model config (format={config.get('format')!r})")
    if config.get("format_version", 0) > CONFIG_VERSION:
        raise ModelDirError(f"{cfg_path} has format version {config['format_version']}; this cod reads up to "
                            f"{CONFIG_VERSION}: upgrade cod")
    return config


def load(path: str | os.PathLike, device: str | torch.device = "cpu", vae_path: str | None = None) -> CoDModel:
    """Load a model directory written by `cod new-model` or `cod import-official`."""
    path = Path(path)
    config = _read_config(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ModelDirError(f"{path} has no model.safetensors")
    denoiser = build_denoiser(config)
    try:
        load_state_strict(denoiser, load_file(str(weights)), str(weights))
    except StateDictMismatch as e:
        raise ModelDirError(str(e)) from None
    latent = None
    lat = config.get("latent") or {}
    if config["family"] == "latent" and (lat.get("vae_file") or vae_path or os.environ.get("COD_VAE_PATH")):
        latent = _load_latent(path, lat, vae_path)  # otherwise loaded (or its absence explained) on first use
    model = CoDModel(config, denoiser.eval(), latent, path)
    model.fingerprint = config.get("fingerprint") or sha256_file(weights)
    return model.to(device)


def _load_latent(path: Path, latent_cfg: dict, vae_path: str | None):
    from cod.models.vae import VAE_PRESETS, AutoencoderKL, LatentSpace, load_vae, resolve_vae_path

    if latent_cfg.get("vae_file") and vae_path is None:
        vae = AutoencoderKL(VAE_PRESETS[latent_cfg["vae_preset"]])
        load_state_strict(vae, load_file(str(path / latent_cfg["vae_file"])), str(path / latent_cfg["vae_file"]))
    else:
        vae = load_vae(resolve_vae_path(vae_path), preset=latent_cfg["vae_preset"])
    return LatentSpace(vae, scale=latent_cfg["scale"])


def new_model(preset_name: str, out_dir: str | os.PathLike | None = None, seed: int = 0, ds: int | None = None,
              bits: int | None = None, up2x: bool | None = None, rope_step: float | None = None) -> CoDModel:
    """A randomly initialised model of a preset (written to out_dir when given)."""
    from cod.models.presets import get_preset

    preset = get_preset(preset_name, ds=ds, bits=bits, up2x=up2x, rope_step=rope_step)
    torch.manual_seed(seed)
    latent = None
    vae_file = None
    if preset.family == "latent" and preset.vae_preset == "tiny":
        vae_file = "vae.safetensors"  # tiny VAEs ship inside the directory: nothing to download
    config = build_config(preset, preset_name, vae_file=vae_file)
    denoiser = build_denoiser(config).eval()
    if preset.family == "latent" and vae_file:
        from cod.models.vae import VAE_PRESETS, AutoencoderKL, LatentSpace

        latent = LatentSpace(AutoencoderKL(VAE_PRESETS[preset.vae_preset]), scale=config["latent"]["scale"])
    model = CoDModel(config, denoiser, latent)
    if out_dir is not None:
        model.save(out_dir, card={"provenance": f"random initialisation (seed {seed}) by `cod new-model`"})
    return model
