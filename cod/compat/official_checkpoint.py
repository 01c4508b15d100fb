"""Import a released CoD checkpoint (a torch.save'd dict) and its YAML config into a cod model directory.

Safety: the checkpoint is read with `torch.load(weights_only=True)` (tensors and plain containers only; no
code from the file ever runs). Strictness: unlike the release, which copies the keys it finds and silently
keeps initial values for the rest (QUIRK 16), every key and shape must match or the import stops and lists
the offending keys.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cod.files import load_yaml, read_bytes_bounded, regular_file_stat
from cod.model import CoDModel, ModelDirError, build_config, build_denoiser, load_state_strict, sha256_file
from cod.model_config import MAX_CONFIG_BYTES, validate_config
from cod.models.presets import PRESETS, Preset
from cod.models.state_dict import check_state_dict, load_torch_file, tensor_state

DENOISER_KWARGS = {
    "PixNerDiT": ("in_channels", "patch_size", "hidden_size", "num_groups", "num_blocks", "num_cond_blocks",
                  "hidden_size_x", "nerf_mlpratio", "codebook_bits", "ds", "up2x", "encoder_width"),
    "DDT": ("in_channels", "patch_size", "hidden_size", "num_groups", "num_blocks", "num_cond_blocks",
            "codebook_bits", "ds", "up2x", "encoder_width"),
}
PREFIXES = {"ema": "ema_denoiser.", "raw": "denoiser."}
TRAINER_PREFIX = "diffusion_trainer."


def _safe_globals() -> list:
    """Plain-data classes that Lightning/argparse put into checkpoints; constructing them runs no file code."""
    import argparse

    allowed = [argparse.Namespace]
    try:
        from lightning.fabric.utilities.data import AttributeDict

        allowed.append(AttributeDict)
    except ImportError:
        pass
    return allowed


def read_checkpoint(path: str | Path) -> dict:
    """The flat state dict of an official checkpoint: under 'module' (DeepSpeed), else 'state_dict' (Lightning),
    else the top-level dict (read by load_torch_file: no code, no allocation bombs)."""
    path = Path(path)
    ckpt = load_torch_file(path, "checkpoint", _safe_globals())
    if not isinstance(ckpt, dict):
        raise ModelDirError(f"{path} does not hold a dict of tensors")
    for key in ("module", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    return ckpt


def _find_class(node, predicate):
    """Depth-first search of a LightningCLI-style YAML tree for {class_path, init_args} nodes."""
    if isinstance(node, dict):
        cls = node.get("class_path")
        if isinstance(cls, str) and predicate(cls.rsplit(".", 1)[-1]):
            return cls.rsplit(".", 1)[-1], node.get("init_args") or {}
        for value in node.values():
            found = _find_class(value, predicate)
            if found:
                return found
    elif isinstance(node, list):
        for value in node:
            found = _find_class(value, predicate)
            if found:
                return found
    return None


def _denoiser_class(name: str) -> str | None:
    if "PixNerD" in name:
        return "PixNerDiT"
    if "DDT" in name:
        return "DDT"
    return None


def preset_from_official_config(path: str | Path) -> tuple[Preset, dict, list[str]]:
    """(preset, sampling overrides, notes) from the release's YAML config."""
    path = Path(path)
    tree = load_yaml(read_bytes_bounded(path, MAX_CONFIG_BYTES, "config file"), str(path))
    found = _find_class(tree, lambda n: _denoiser_class(n) is not None)
    if not found:
        raise ModelDirError(f"{path} names no PixNerDiT or DDT denoiser (class_path/init_args)")
    cls = _denoiser_class(found[0])
    if not isinstance(found[1], dict):
        raise ModelDirError(f"{path}: the denoiser's init_args must be a mapping, got {type(found[1]).__name__}")
    init_args = dict(found[1])
    notes = []
    known = DENOISER_KWARGS[cls]
    ignored = sorted(k for k in init_args if k not in known)
    if ignored:
        notes.append(f"ignored denoiser arguments: {', '.join(ignored)}")
    base = PRESETS["pixel-xl" if cls == "PixNerDiT" else "latent-xl"]
    kwargs = {**base.denoiser, **{k: v for k, v in init_args.items() if k in known}}
    family = "pixel" if cls == "PixNerDiT" else "latent"
    sampling = _sampling_from_config(tree)
    preset = Preset(family, kwargs, f"imported from {path.name}", vae_preset=base.vae_preset,
                    sampling=base.sampling)
    return preset, sampling, notes


def _sampling_from_config(tree) -> dict:
    found = _find_class(tree, lambda n: "Sampler" in n)
    if not found:
        return {}
    name, args = found
    if not isinstance(args, dict):
        return {}  # validated with the rest of the config (validate_config) before anything is built
    out = {}
    if "Euler" in name:
        out["sampler"] = "euler"
    elif "Adam" in name:
        out["sampler"] = f"adam{args.get('order', 2)}"
    for ours, theirs in (("steps", "num_steps"), ("cfg", "guidance"), ("last_step", "last_step"),
                         ("timeshift", "timeshift")):
        if theirs in args:
            out[ours] = args[theirs]
    if "guidance_interval_min" in args or "guidance_interval_max" in args:
        out["guidance_interval"] = [args.get("guidance_interval_min", 0.1), args.get("guidance_interval_max", 1.0)]
    return out


def import_official(ckpt: str | Path, out_dir: str | Path, config: str | Path | None = None,
                    preset: str | None = None, weights: str = "ema", vae: str | Path | None = None,
                    overwrite: bool = False) -> CoDModel:
    """Checkpoint + (official YAML config or preset name) -> model directory with strict key checks."""
    from cod.models.presets import get_preset
    from cod.models.vae import OFFICIAL_LATENT_SCALE, LatentSpace, load_vae

    if (config is None) == (preset is None):
        raise ValueError("give exactly one of --config (the release's YAML) or --preset")
    notes: list[str] = []
    if config is not None:
        spec, sampling, notes = preset_from_official_config(config)
    else:
        spec, sampling = get_preset(preset), {}
    state = read_checkpoint(ckpt)
    prefix = PREFIXES[weights]
    picked = tensor_state(state, str(ckpt), prefix)
    if not picked:
        prefixes = sorted({k.split(".", 1)[0] + "." for k in state if isinstance(k, str)})[:8]
        raise ModelDirError(f"{ckpt} has no '{prefix}*' weights (found prefixes: {', '.join(prefixes)})")
    latent = None
    vae_file = None
    if spec.family == "latent" and vae is not None:
        latent = LatentSpace(load_vae(vae, preset=spec.vae_preset), scale=OFFICIAL_LATENT_SCALE)
        vae_file = "vae.safetensors"
    cfg = build_config(spec, preset, latent_scale=OFFICIAL_LATENT_SCALE, vae_file=vae_file, sampling=sampling)
    # the config that would be written is checked like any model directory's before anything is built (the
    # release's YAML is input too), and the denoiser is built on the meta device and compared with the
    # checkpoint's shapes before its memory is allocated
    validate_config({**cfg, "fingerprint": "0" * 64, **({"checksums": {vae_file: "0" * 64}} if vae_file else {})},
                    str(config or f"preset {preset}"))
    with torch.device("meta"):
        denoiser = build_denoiser(cfg)
    what = f"'{prefix}*' weights of {ckpt}"
    check_state_dict(denoiser, picked, what)
    denoiser = denoiser.to_empty(device="cpu")
    load_state_strict(denoiser, {k: v.float() for k, v in picked.items()}, what)
    trainer = {k: v.float() for k, v in tensor_state(state, str(ckpt), TRAINER_PREFIX).items()}
    model = CoDModel(cfg, denoiser.eval(), latent)
    card = {"title": f"{Path(ckpt).name} ({weights.upper()} weights)",
            "provenance": f"imported by `cod import-official` from {Path(ckpt).name} "
                          f"(sha256 {sha256_file(ckpt)})" + (f" with config {Path(config).name}" if config else ""),
            "latent scaling": "official (SD scale factor applied squared)" if spec.family == "latent" else "n/a"}
    for note in notes:
        card.setdefault("notes", note)
    model.save(out_dir, card=card, objective_state=trainer or None, overwrite=overwrite)
    return model
