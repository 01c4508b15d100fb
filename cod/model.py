"""`CoDModel`: a denoiser (+ VAE for latent models) with its config, and the model directory format.

A model directory holds
  config.json         what to build (family, denoiser class + kwargs, latent space, sampling defaults)
  model.safetensors   the denoiser's weights (keys = its state_dict keys, EMA weights for imported models)
  vae.safetensors     (latent models, optional) the VAE; otherwise it comes from $COD_VAE_PATH
  objective.safetensors (optional) the training heads, for fine-tuning
  prior.safetensors   (optional) the index prior for entropy-coded files (cod fit-prior; docs/entropy.md)
  MODEL_CARD.md       human-readable provenance: variant, real bpp, source, sha256
Every command and `cod.load(DIR)` read this; `cod new-model` and `cod import-official` write it.

The config's family picks the class: "pixel" and "latent" models (`CoDModel`) decode by sampling; the one-step
members "onestep-cod" and "cod-lite" (`OneStepModel`, spec one-step.md) decode in one network pass. Both code the
same indices into the same .cod files through the same API.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cod.diffusion.samplers import Sampler, build_sampler
from cod.diffusion.tiling import TiledDenoiser, parse_tile, tiling_for
from cod.errors import InputError, LimitError, ModelDirError, OutputExistsError, PrecisionError
from cod.files import (atomic_directory, atomic_write_bytes, read_bytes_bounded, regular_file_stat, sha256_file,
                       sha256_file_cached)
from cod.model_config import (CONFIG_FORMAT, CONFIG_VERSION, MAX_CONFIG_BYTES, ONESTEP_FAMILIES, ONESTEP_SAMPLING_FIXED,
                              parse_config_bytes, validate_config)
from cod.models.condition_codec import TOKEN_STRIDE, required_multiple
from cod.models.ddt import DDT
from cod.models.denoiser import CoDDenoiser
from cod.models.onestep import OneStepCoD, OneStepCoDLite, model_to_uint8
from cod.models.pixnerdit import PixNerDiT
from cod.models.presets import DEFAULT_SAMPLING, Preset
from cod.models.state_dict import StateDictMismatch, check_state_dict, load_state_strict
from cod.precision import check_precision, prepare_denoiser

__all__ = ["CoDModel", "OneStepModel", "ModelDirError", "atomic_write_bytes", "build_config", "build_denoiser", "load",
           "new_model", "read_config", "sha256_file", "CONFIG_FORMAT", "CONFIG_VERSION"]
WEIGHTS_FILE = "model.safetensors"
OBJECTIVE_FILE = "objective.safetensors"
PRIOR_FILE = "prior.safetensors"
VERIFY_MODES = ("cached", "always")
COMPILE_MODES = ("whole", "regional")  # CoDModel.compile_denoiser: the whole forward, or its repeated regions
DENOISERS = {"PixNerDiT": PixNerDiT, "DDT": DDT, "OneStepCoD": OneStepCoD, "OneStepCoDLite": OneStepCoDLite}
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

    # The decode options a .cod file or the caller may choose (cod.codec.api); a one-step model has only the seed.
    sampling_options = ("sampler", "steps", "cfg", "seed")
    # The release's own .cod header: CoD and One-step CoD write the height first, CoD-Lite the width (spec
    # one-step.md §4.4); cod.codec.api reads both correctly.
    official_width_first = False

    def __init__(self, config: dict, denoiser: CoDDenoiser | None = None, latent=None, path: Path | None = None):
        super().__init__()
        self.config = config
        self.denoiser = denoiser if denoiser is not None else build_denoiser(config)
        self.latent = latent
        self.path = path
        self._fingerprint = config.get("fingerprint", "")
        self._uncond_cache: dict[tuple, torch.Tensor] = {}
        self.vae_path: str | None = None  # where a latent model's VAE comes from when not bundled (else $COD_VAE_PATH)
        self.verify = "cached"
        self.prior = None  # the index prior (cod.entropy.priors), when the directory has one
        self.prior_fingerprint = ""  # sha256 of prior.safetensors: entropy-coded files are tied to it
        self.precision = "fp32"  # of the decode side (cod.precision); the encoder side is always float32
        self.compiled = False
        self.tile: str | int = "auto"  # decode in overlapping windows: "auto", "off" or pixels (cod.diffusion.tiling)
        self.cuda_graphs = False  # replay the network's calls from CUDA graphs on a GPU (cod.cuda_graphs)
        self._graphed: dict = {}  # name -> GraphedCall; dropped whenever the weights change (_drop_graphs)

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
        f = self.pixels_per_cell
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

    def check_decode_options(self, options: dict) -> None:
        """Raise ValueError for sampling options this model cannot decode with (cod.codec.api checks the values)."""

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

    def network(self, height: int, width: int, tile=None, exact: bool = False):
        """The denoiser as the sampler calls it for a height x width image: itself, or in overlapping windows
        (TiledDenoiser) when the tile option (this call's, else self.tile) asks for windows smaller than the
        image. "auto" tiles only above cod.diffusion.tiling.AUTO_ABOVE_PIXELS, and never an exact decode."""
        tile = parse_tile(self.tile if tile is None else tile)
        net = self.graphed_denoiser()
        if tile == "auto" and exact:
            return net
        tiling = tiling_for(tile, height, width, self.pixels_per_cell, self.denoiser.patch_size)
        return net if tiling is None else TiledDenoiser(net, tiling, self.denoiser.patch_size)

    def graphed_denoiser(self):
        """The denoiser, or with cuda_graphs on, the denoiser replayed from CUDA graphs (cod.cuda_graphs: one graph
        per call signature, kept for later decodes; on a CPU the same calls as the denoiser's)."""
        return self._graphed_call("denoiser", lambda: self.denoiser)

    def _graphed_call(self, name: str, fn):
        """fn() (a network or one of its methods), or with cuda_graphs on, it wrapped in a GraphedCall kept under
        name until the weights change."""
        if not self.cuda_graphs:
            return fn()
        if name not in self._graphed:
            from cod.cuda_graphs import GraphedCall

            self._graphed[name] = GraphedCall(fn(), f"{type(self.denoiser).__name__}.{name}")
        return self._graphed[name]

    def use_cuda_graphs(self, enabled: bool = True) -> "CoDModel":
        """Replay the decode's network calls from CUDA graphs on a CUDA device (cod.cuda_graphs): the same kernels
        without the host's launch overhead. The first call of each shape runs eagerly, the second records."""
        self.cuda_graphs = bool(enabled)
        self._drop_graphs()
        return self

    def cuda_graph_counts(self) -> tuple[int, int]:
        """(graphs recorded, replays) over this model's graphed calls since their weights last changed."""
        return (sum(g.recorded for g in self._graphed.values()), sum(g.replays for g in self._graphed.values()))

    def _drop_graphs(self) -> None:
        """Recorded graphs read the weights where they were: any change of the weights' storage (moving,
        converting, folding, compiling) drops them."""
        self._graphed = {}

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(), ...: the weights move, graphs would read old memory
        self._drop_graphs()
        return super()._apply(fn, recurse)

    @property
    def pixels_per_cell(self) -> int:
        return 1 if self.family == "pixel" else LATENT_DOWNSAMPLE

    @torch.no_grad()
    def sample(self, indices: torch.Tensor, height: int, width: int, seeds: int | list[int] = 0,
               tile=None, **sampling) -> torch.Tensor:
        """VQ indices [B, h, w] -> model-space samples (decompress path: exact codebook rows). tile: "auto",
        "off" or a window side in pixels (default: self.tile; see network)."""
        self.check_size(height, width)
        B = indices.shape[0]
        sampler = self.sampler(**sampling)
        net = self.network(height, width, tile, sampler.exact)
        cond = self.codec.decode_indices(indices.to(self.device))
        uncond = self.unconditional_condition(height, width).expand(B, -1, -1, -1)
        return sampler(net, self.initial_noise(B, height, width, seeds), cond=torch.cat([uncond, cond]))

    def decode(self, indices: torch.Tensor, height: int, width: int, seeds: int | list[int] = 0,
               tile=None, **sampling) -> torch.Tensor:
        """VQ indices [B, h, w] -> uint8 images [B, 3, H, W]. tile: see sample."""
        self._ensure_latent()  # fail before sampling, not after
        return self.to_uint8(self.sample(indices, height, width, seeds, tile, **sampling))

    def _ensure_latent(self) -> None:
        """Latent models load their VAE on first use, so that indices and samples need no VAE weights."""
        if self.family == "latent" and self.latent is None:
            self.latent = _load_latent(self.path or Path("."), self.config, self.vae_path, self.verify).to(self.device)

    # ---- how the decode side runs ------------------------------------------------------------------------------
    def set_precision(self, precision: str) -> "CoDModel":
        """Run the decode side in precision "fp32", "bf16", "int8" or "fp8" (cod.precision; docs/precision.md) on
        this model's device; the encoder side and the codebook stay float32, so .cod files do not depend on it.
        A one-way conversion of a float32 model, done once after loading (cod.load(..., precision=...)); raises
        PrecisionError for a precision this device cannot run."""
        check_precision(precision, self.device)
        if precision == self.precision:
            return self
        if self.precision != "fp32":
            raise PrecisionError(f"this model already decodes in {self.precision}; load it again for {precision}")
        _ = self.fingerprint  # of the float32 weights, computed before they change
        prepare_denoiser(self.denoiser, precision)  # the VAE decoder stays float32 (runs once per image)
        self.precision = precision
        self._drop_graphs()
        return self

    def compile_denoiser(self, regional: bool = False, **options) -> "CoDModel":
        """torch.compile (inductor) the denoiser in place (its state-dict keys do not change): the first decode at
        each new size or batch compiles, later ones run the compiled graphs. Static shapes by default: a decode
        where guidance is off at some steps runs two batch sizes, and each gets its own graph rather than one
        dynamic graph for both.

        By default the whole forward is one graph (the fastest decode: fusions cross block boundaries). regional:
        only the repeated regions are compiled (every DiT block shares one graph, and the per-pixel stage; the glue
        between them stays eager, CoDDenoiser.compile_regions): a third of the compile time for a decode ~5 %
        slower (docs/benchmarks.md: XL on an H200, 21 s vs 60 s to compile, 0.208 vs 0.197 s per decode)."""
        if not self.compiled:
            self._compile({"dynamic": False, **options}, regional)
            self.compiled = True
            self._drop_graphs()
        return self

    def _compile(self, options: dict, regional: bool) -> None:
        if regional:
            self.denoiser.compile_regions(**options)
        else:
            self.denoiser.compile(**options)

    @torch.no_grad()
    def reconstruct(self, images01: torch.Tensor, seeds: int | list[int] = 0, tile=None, **sampling) -> torch.Tensor:
        """Evaluate path: the codec's training-path forward gives the condition (straight-through values), once per
        image, inside the first network call as in the release (exact=True) or just before the sampler."""
        B, _, H, W = images01.shape
        self.check_size(H, W)
        y = self.condition_image(images01.to(self.device))
        y_uncond = self.condition_image(-torch.ones_like(y))
        sampler = self.sampler(**sampling)
        net = self.network(H, W, tile, sampler.exact)
        if net is self.graphed_denoiser() and sampler.exact:  # the release: the codec runs in the first network call
            x = sampler(net, self.initial_noise(B, H, W, seeds), y=y, y_uncond=y_uncond)
        else:  # the same codec call, made once up front, so that unguided steps can skip the unconditional half
            cond, _ = self.codec(torch.cat([y_uncond.expand_as(y), y]))  # (and windows can crop the map)
            x = sampler(net, self.initial_noise(B, H, W, seeds), cond=cond)
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
    def save(self, out_dir: str | os.PathLike, card: dict | None = None, objective_state: dict | None = None,
             overwrite: bool = False, weights_dtype: torch.dtype | None = None) -> Path:
        """Write the model directory as a whole: assembled in a temporary folder beside out_dir and renamed into
        place, so a crash leaves either no directory or a complete one. An existing out_dir is refused unless
        overwrite (then it is replaced as a whole). weights_dtype (e.g. torch.float16) stores the denoiser's
        weights in a smaller type; they are loaded back into float32 parameters."""
        out = Path(out_dir)
        if self.precision != "fp32":
            raise ModelDirError(f"cannot save {out}: this model decodes in {self.precision} (its weights were "
                                f"converted); save the float32 model it was loaded from")
        config = {k: v for k, v in self.config.items() if k not in ("fingerprint", "checksums")}
        checksums = {}
        with atomic_directory(out, overwrite, own=is_model_dir) as tmp:
            weights = {k: v.detach().to("cpu", weights_dtype).contiguous() for k, v in
                       self.denoiser.state_dict().items()}
            _save_tensors(weights, tmp / WEIGHTS_FILE)
            fingerprint = sha256_file(tmp / WEIGHTS_FILE)
            vae_file = (config.get("latent") or {}).get("vae_file")
            if vae_file:
                if self.latent is not None:
                    vae_sd = {k: v.detach().contiguous().cpu() for k, v in self.latent.vae.state_dict().items()}
                    _save_tensors(vae_sd, tmp / vae_file)
                elif self.path is not None and (self.path / vae_file).is_file():  # never loaded: copy it as is,
                    source = self.path / vae_file  # once it is shown to be the file its config recorded
                    expected = (self.config.get("checksums") or {}).get(vae_file)
                    if expected is None:
                        raise ModelDirError(f"cannot save {out}: {source} has no recorded sha256 to check it against")
                    verify_file(source, expected, self.path / "config.json", self.verify)
                    shutil.copyfile(source, tmp / vae_file)
                else:
                    raise ModelDirError(f"cannot save {out}: its config names the VAE file {vae_file}, but the VAE "
                                        f"is not loaded and no source directory holds it")
                checksums[vae_file] = sha256_file(tmp / vae_file)
            if objective_state:
                _save_tensors({k: v.detach().contiguous().cpu() for k, v in objective_state.items()},
                              tmp / OBJECTIVE_FILE)
                checksums[OBJECTIVE_FILE] = sha256_file(tmp / OBJECTIVE_FILE)
            config.pop("prior", None)
            if self.prior is not None:
                config["prior"] = _write_prior(self.prior, tmp)
                checksums[PRIOR_FILE] = sha256_file(tmp / PRIOR_FILE)
            config["fingerprint"] = fingerprint
            if checksums:
                config["checksums"] = checksums
            atomic_write_bytes(tmp / "config.json", (json.dumps(config, indent=2) + "\n").encode())
            atomic_write_bytes(tmp / "MODEL_CARD.md", render_model_card(config, card or {}).encode())
        if weights_dtype is not None:  # this model now is what the directory holds: the rounded weights
            self.denoiser.load_state_dict(weights)
        self.config, self.fingerprint, self.path = config, fingerprint, out
        self.prior_fingerprint = checksums.get(PRIOR_FILE, "")
        return out


class OneStepModel(CoDModel):
    """A one-step member (One-step CoD, CoD-Lite; spec one-step.md): CoDModel's encoder side, and a decoder side that
    is one network pass at t = 0 from noise_level * eps (cod.models.onestep): codebook rows, the codec's decoder,
    one call of the generator with its adaLN modulation folded. No sampler, no unconditional condition map.

    Two conventions differ from the multi-step models, both the release's: the encoder sees the image as
    float32 u8/255 (the one-step CLIs do not round it to bfloat16), and the output rounds to uint8 without a
    bfloat16 cast. The seed draws eps (one CPU generator per image, as CoDModel); it matters only for models with
    noise_level > 0 (the released `onestep-cod-0.0039-noise1`).
    """

    sampling_options = ("seed",)

    def __init__(self, config: dict, denoiser=None, latent=None, path: Path | None = None):
        super().__init__(config, denoiser, latent, path)
        self.official_width_first = config["family"] == "cod-lite"

    @staticmethod
    def condition_image(images01: torch.Tensor) -> torch.Tensor:
        return images01.to(torch.float32)

    def model_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (self.denoiser.in_channels, height, width)

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        return model_to_uint8(x)

    @property
    def is_folded(self) -> bool:
        return self.denoiser.is_folded

    def fold_modulation(self) -> "OneStepModel":
        """Fold the t = 0 adaLN modulation into constants (cod.models.onestep; bitwise equal outputs on CPU float32,
        less work per decode). Done by cod.load; the weights' fingerprint is taken before (the file's layout)."""
        _ = self.fingerprint
        self.denoiser.fold_modulation()
        self._drop_graphs()
        return self

    def _compile(self, options: dict, regional: bool) -> None:
        """torch.compile (inductor) the generator and the codec's decoder (which runs outside the generator's forward
        in a decode from indices), with inductor's freezing: the weights become constants, so the matrix products
        run as prepacked oneDNN kernels with their bias and activation fused and the folded modulation is constant-
        folded. A one-step model never changes its weights after loading, which is what freezing assumes. The first
        decode at each size compiles (about a minute for CoD-Lite on a 2-core CPU, docs/benchmarks.md).

        Freezing is inductor's global setting `torch._inductor.config.freezing`, read when a graph compiles (at the
        first call, not here; `torch.compile(options={"freezing": True})` does not reach it): the decode paths set it
        for their own calls only (`_compiling`), so other compiled code in the process is unaffected. `regional` is
        ignored: a one-step model runs its network once per image, so it always compiles whole."""
        self.denoiser.compile(**options)
        self.denoiser.codec.decoder.compile(**options)

    def _compiling(self):
        """The context of a decode's network calls: inductor's freezing on while a compiled model compiles."""
        if not self.compiled:
            return contextlib.nullcontext()
        import torch._inductor.config as inductor_config

        return inductor_config.patch(freezing=True)

    def set_precision(self, precision: str) -> "OneStepModel":
        if precision != "fp32":
            self.fold_modulation()  # the folded vectors are computed in float32, then converted with the rest
        return super().set_precision(precision)

    def check_decode_options(self, options: dict) -> None:
        wrong = {k: v for k, v in options.items() if k in ONESTEP_SAMPLING_FIXED and v != ONESTEP_SAMPLING_FIXED[k]}
        if wrong:
            given = ", ".join(f"{k} {v}" for k, v in wrong.items())
            raise ValueError(f"this is a {self.family} model: it decodes in one network pass, so sampler, steps and "
                             f"cfg do not apply (got {given}); only the seed can be chosen")

    def initial_noise(self, batch: int, height: int, width: int, seeds: int | list[int] = 0) -> torch.Tensor:
        if self.denoiser.noise_level == 0:  # eps would be multiplied by 0: no need to draw it
            return torch.zeros(batch, *self.model_shape(height, width), device=self.device)
        return super().initial_noise(batch, height, width, seeds)

    def network(self, height: int, width: int, tile=None, exact: bool = False):
        """The generator, whole: one-step models never tile (CoD-Lite's channel attention mixes the whole image;
        one pass needs no blending of steps). An explicit window size is refused."""
        if parse_tile(self.tile if tile is None else tile) not in ("auto", "off"):
            raise ValueError(f"this is a {self.family} model: it decodes the whole image in one pass, so --tile "
                             f"does not apply")
        return self.denoiser

    @torch.no_grad()
    def sample(self, indices: torch.Tensor, height: int, width: int, seeds: int | list[int] = 0, tile=None,
               **sampling) -> torch.Tensor:
        """VQ indices [B, h, w] -> model-space image in [-1, 1] (decompress path: exact codebook rows)."""
        self.check_size(height, width)
        self.check_decode_options(sampling)
        self.network(height, width, tile)
        indices = indices.to(self.device)
        with self._compiling():
            return self.graphed_decode()(indices, noise=self.initial_noise(indices.shape[0], height, width, seeds))

    def graphed_decode(self):
        """The generator's decode_indices, replayed from CUDA graphs when cuda_graphs is on (CoDModel._graphed_call)."""
        return self._graphed_call("decode_indices", lambda: self.denoiser.decode_indices)

    @torch.no_grad()
    def reconstruct(self, images01: torch.Tensor, seeds: int | list[int] = 0, tile=None, **sampling) -> torch.Tensor:
        """Evaluate path: the codec's forward (straight-through VQ value), then the one pass -> uint8 images."""
        B, _, H, W = images01.shape
        self.check_size(H, W)
        self.check_decode_options(sampling)
        self.network(H, W, tile)
        y = self.condition_image(images01.to(self.device))
        inference = self._graphed_call("inference", lambda: self.denoiser.inference)
        with self._compiling():
            return self.to_uint8(inference(y, noise=self.initial_noise(B, H, W, seeds)))

    def save(self, out_dir, card: dict | None = None, objective_state: dict | None = None, overwrite: bool = False,
             weights_dtype: torch.dtype | None = None) -> Path:
        if self.is_folded:
            raise ModelDirError(f"cannot save {out_dir}: this model's adaLN modulation is folded (its weights are no "
                                f"longer in the release's layout); save the model before folding it")
        return super().save(out_dir, card, objective_state, overwrite, weights_dtype)


def model_class(config: dict) -> type[CoDModel]:
    return OneStepModel if config["family"] in ONESTEP_FAMILIES else CoDModel


def _write_prior(prior, directory: Path) -> dict:
    """prior.safetensors in directory -> the config's "prior" entry."""
    from cod.entropy.priors import prior_state

    _save_tensors(prior_state(prior), directory / PRIOR_FILE)
    return {"kind": prior.kind, "file": PRIOR_FILE, **{k: v for k, v in prior.hyper().items() if k != "num_codes"}}


def write_prior(model_dir: str | os.PathLike, prior, overwrite: bool = False) -> str:
    """Add (or, with overwrite, replace) the index prior of a model directory, as a whole-directory swap: the other
    files are carried over byte for byte (hard links where the file system allows), so the weights' fingerprint
    and every file written before stay valid. Returns the prior's sha256."""
    path = Path(model_dir)
    config = read_config(path)
    if config.get("prior") is not None and not overwrite:
        raise OutputExistsError(f"{path} already has an index prior ({PRIOR_FILE}); pass --overwrite to replace it "
                                f"(files entropy-coded with the old prior will no longer decode)")
    keep = [p for p in path.iterdir() if p.name not in ("config.json", "MODEL_CARD.md", PRIOR_FILE)]
    for p in keep:
        weights_file(path, p.name, "model file")
    with atomic_directory(path, True, own=is_model_dir) as tmp:
        for p in keep:
            try:
                os.link(p, tmp / p.name)
            except OSError:
                shutil.copyfile(p, tmp / p.name)
        config = dict(config)
        config["prior"] = _write_prior(prior, tmp)
        config["checksums"] = {**(config.get("checksums") or {}), PRIOR_FILE: sha256_file(tmp / PRIOR_FILE)}
        atomic_write_bytes(tmp / "config.json", (json.dumps(config, indent=2) + "\n").encode())
        card = (path / "MODEL_CARD.md").read_text() if (path / "MODEL_CARD.md").is_file() else \
            render_model_card(config, {})
        card = "\n".join(line for line in card.splitlines() if not line.startswith("- index prior:"))
        atomic_write_bytes(tmp / "MODEL_CARD.md", (card + f"\n- index prior: {prior.kind} "
                                                         f"({config['checksums'][PRIOR_FILE][:16]}...)\n").encode())
    return config["checksums"][PRIOR_FILE]


def _load_prior(path: Path, config: dict, num_codes: int, verify: str):
    """The directory's index prior, checked like the weights: shapes and dtypes from the header, sha256 against
    config.json, then every table validated (cod.entropy.priors.prior_from_state)."""
    from cod.entropy.priors import prior_from_state

    from cod.entropy.priors import build_prior

    spec = config["prior"]
    hyper = {k: v for k, v in spec.items() if k not in ("kind", "file")}
    file = weights_file(path, PRIOR_FILE, "prior file")
    try:  # the shapes in the file's header must be the prior's before anything is read (no declared size drives
        expected = build_prior(spec["kind"], num_codes, **hyper).state_dict()  # an allocation)
    except ValueError as e:
        raise ModelDirError(f"{path / 'config.json'}: its prior cannot be built for this model ({e})") from None
    shapes = {k: tuple(v.shape) for k, v in _safetensors_shapes(file).items()}
    if shapes != {k: tuple(v.shape) for k, v in expected.items()}:
        raise ModelDirError(f"{file} does not hold a {spec['kind']} prior for this model's {num_codes} codes (its "
                            f"tensors or their shapes differ); train it again with `cod fit-prior --overwrite`")
    verify_file(file, config["checksums"][PRIOR_FILE], path / "config.json", verify)
    try:
        tensors = load_file(str(file))
        return prior_from_state(spec["kind"], num_codes, hyper, tensors)
    except Exception as e:  # noqa: BLE001 - safetensors' own errors and ours, as one line
        raise ModelDirError(f"{file} is not a valid index prior for this model: {_one_line(e)}; train it again "
                            f"with `cod fit-prior --overwrite`") from None


def is_model_dir(path: Path) -> bool:
    """An earlier model directory (what --overwrite may replace): a config.json that parses as a cod model config,
    and no file but the ones a model directory holds."""
    try:
        config = parse_config_bytes(read_bytes_bounded(path / "config.json", MAX_CONFIG_BYTES, "model config"),
                                    str(path))
    except ValueError:
        return False
    if config.get("format") != CONFIG_FORMAT:
        return False
    names = {"config.json", WEIGHTS_FILE, OBJECTIVE_FILE, "MODEL_CARD.md", PRIOR_FILE}
    vae_file = (config.get("latent") or {}).get("vae_file") if isinstance(config.get("latent"), dict) else None
    if isinstance(vae_file, str):
        names.add(vae_file)
    return {p.name for p in path.iterdir()} <= names


def _save_tensors(tensors: dict, path: Path) -> None:
    """safetensors' save_file, its failures (a full disk, say) as the OSError they are, naming the file."""
    try:
        save_file(tensors, str(path))
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors reports write errors as its own SafetensorError
        raise OSError(None, f"cannot write it ({' '.join(str(e).split())})", str(path)) from None


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


def read_config(path: str | os.PathLike) -> dict:
    """A model directory's config.json, parsed and validated (cod.model_config); ModelDirError otherwise."""
    path = Path(path)
    if not path.is_dir():
        what = "is not a directory" if os.path.lexists(path) else "does not exist"
        raise ModelDirError(f"model directory {path} {what}; create one with `cod new-model` or "
                            f"`cod import-official`")
    cfg_path = path / "config.json"
    if not os.path.lexists(cfg_path):
        raise ModelDirError(f"{path} is not a cod model directory (no config.json)")
    try:
        data = read_bytes_bounded(cfg_path, MAX_CONFIG_BYTES, "model config")
    except (InputError, LimitError) as e:
        raise ModelDirError(str(e)) from None
    return validate_config(parse_config_bytes(data, str(cfg_path)), str(cfg_path))


_read_config = read_config  # the name older code imports


def weights_file(path: Path, name: str, what: str) -> Path:
    """path/name as a regular file (a symbolic link to one is fine: its content is verified by sha256)."""
    try:
        regular_file_stat(path / name, what)
    except InputError as e:
        raise ModelDirError(f"{path} is incomplete: {e}") from None
    return path / name


def _safetensors_shapes(path: Path) -> dict[str, torch.Tensor]:
    """name -> meta tensor of the stored shape, read from the file's header alone (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for every malformed header
        raise ModelDirError(f"{path} is not a valid safetensors file ({_one_line(e)}); re-copy the model "
                            f"directory") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - see _safetensors_shapes
        raise ModelDirError(f"{path} is not a valid safetensors file ({_one_line(e)}); re-copy the model "
                            f"directory") from None
    bad = [k for k, v in tensors.items() if not v.dtype.is_floating_point]
    if bad:
        raise ModelDirError(f"{path}: tensor {bad[0]} is {tensors[bad[0]].dtype}, not floating point")
    return tensors


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def verify_file(path: Path, expected: str, config_path: Path, verify: str) -> None:
    """Refuse a weights file whose sha256 is not the one config.json records."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    digest = sha256_file(path) if verify == "always" else sha256_file_cached(path)
    if digest != expected:
        raise ModelDirError(f"{path} does not match {config_path}: its sha256 is {digest[:16]}..., the config "
                            f"records {expected[:16]}...: the file was modified, damaged, or belongs to another "
                            f"model. Copy the model directory again (or re-create it)")


def _load_checked(build, file: Path, expected: str, config_path: Path, verify: str) -> torch.nn.Module:
    """build() a module on the meta device, compare it with the tensor shapes in the file's header, verify the
    file's sha256, then read the tensors into it. Nothing is allocated for a file that does not fit, and the file's
    tensors become the parameters (no second copy)."""
    with torch.device("meta"):
        module = build()
    try:
        check_state_dict(module, _safetensors_shapes(file), str(file))
    except StateDictMismatch as e:
        raise ModelDirError(str(e)) from None
    verify_file(file, expected, config_path, verify)
    tensors = {k: v.float() for k, v in _read_tensors(file).items()}
    module.load_state_dict(tensors, strict=True, assign=True)
    return module


def load(path: str | os.PathLike, device: str | torch.device = "cpu", vae_path: str | None = None,
         verify: str = "cached", precision: str = "fp32", compile: bool | str = False, tile="auto",
         cuda_graphs: bool = False) -> CoDModel:
    """Load a model directory written by `cod new-model`, `cod import-official` or `cod fit`.

    Nothing in it is trusted: config.json is validated (cod.model_config); the denoiser is built on the meta device
    and compared with the shapes in the weights file's header before any memory is allocated; the weights' sha256
    must equal the fingerprint in config.json (verify="cached" remembers verified files by identity and ctime in
    the user's cache folder, so an unchanged XL model is not re-hashed at every load; "always" re-hashes). A latent
    model's VAE (bundled, vae_path or $COD_VAE_PATH) is loaded, and checked the same way, when first needed.

    precision: of the decode side, "fp32" (default), "bf16", "int8" or "fp8" (CoDModel.set_precision; a precision
    the device cannot run is refused before anything is read). compile: torch.compile the denoiser (True or
    "whole": one graph; "regional": its repeated regions, CoDModel.compile_denoiser). tile: how
    decodes run, "auto" (windows above 4 MP), "off" (whole images) or a window side in pixels
    (cod.diffusion.tiling; docs/precision.md). cuda_graphs: on a CUDA device, replay the decode's network calls from
    CUDA graphs (cod.cuda_graphs; no effect on a CPU)."""
    check_precision(precision, device)
    if compile is not False and compile is not True and compile not in COMPILE_MODES:
        raise ValueError(f"compile must be False, True or one of {', '.join(COMPILE_MODES)}, not {compile!r}")
    tile = parse_tile(tile)
    path = Path(path)
    config = read_config(path)
    weights = weights_file(path, WEIGHTS_FILE, "weights file")
    denoiser = _load_checked(lambda: build_denoiser(config), weights, config["fingerprint"], path / "config.json",
                             verify)
    model = model_class(config)(config, denoiser.eval(), None, path)
    model.fingerprint = config["fingerprint"]
    if isinstance(model, OneStepModel):
        model.fold_modulation()
    model.vae_path, model.verify, model.tile = vae_path, verify, tile
    if config.get("prior") is not None:
        model.prior = _load_prior(path, config, denoiser.codec.bottleneck.num_codes, verify)
        model.prior_fingerprint = config["checksums"][PRIOR_FILE]
    model.to(device).set_precision(precision)
    model.use_cuda_graphs(cuda_graphs)
    return model.compile_denoiser(regional=compile == "regional") if compile else model


def _load_latent(path: Path, config: dict, vae_path: str | None, verify: str = "cached"):
    from cod.models.vae import VAE_PRESETS, AutoencoderKL, LatentSpace, load_vae, resolve_vae_path

    latent_cfg = config["latent"]
    vae_file = latent_cfg.get("vae_file")
    if vae_file and vae_path is None:
        file = weights_file(path, vae_file, "VAE weights file")
        vae = _load_checked(lambda: AutoencoderKL(VAE_PRESETS[latent_cfg["vae_preset"]]), file,
                            config["checksums"][vae_file], path / "config.json", verify).eval()
    else:
        vae = load_vae(resolve_vae_path(vae_path), preset=latent_cfg["vae_preset"])
    return LatentSpace(vae, scale=latent_cfg["scale"])


def new_model(preset_name: str, out_dir: str | os.PathLike | None = None, seed: int = 0, ds: int | None = None,
              bits: int | None = None, up2x: bool | None = None, rope_step: float | None = None,
              overwrite: bool = False) -> CoDModel:
    """A randomly initialised model of a preset (cod.models.presets, or a one-step preset of
    cod.models.onestep_presets), written to out_dir when given."""
    from cod.models.onestep_presets import ONESTEP_PRESETS, get_onestep_preset
    from cod.models.presets import PRESETS, get_preset

    if preset_name not in ONESTEP_PRESETS and preset_name not in PRESETS:
        raise ValueError(f"unknown preset '{preset_name}'; available: {', '.join([*PRESETS, *ONESTEP_PRESETS])}")
    if preset_name in ONESTEP_PRESETS:
        if up2x is not None or rope_step is not None:
            raise ValueError(f"one-step preset '{preset_name}': only --ds and --bits can be changed")
        preset = get_onestep_preset(preset_name, ds=ds, bits=bits)
    else:
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
    model = model_class(config)(config, denoiser, latent)
    if out_dir is not None:
        model.save(out_dir, card={"provenance": f"random initialisation (seed {seed}) by `cod new-model`"},
                   overwrite=overwrite)
    return model
