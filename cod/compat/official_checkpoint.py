"""Import a released CoD checkpoint (a torch.save'd dict) and its YAML config into a cod model directory.

Every kind of released file goes through here (spec cod-architecture.md §2, one-step.md §5):

  file                                   YAML says                                weights
  CoD pixel / latent `.ckpt`             denoiser class_path PixNerDiT / DDT      `ema_denoiser.*` (or `denoiser.*`)
  CoD-Lite one-step `CoD_Lite_bpp_*.pt`  model.net class_path OneStepCoD or       `net.*`
                                         FinetunedOneStepCoD (+ DConv init_args)
  CoD-Lite pre-training `.pt`            denoiser class_path DConv                `ema_denoiser.*` (or `denoiser.*`)
  One-step CoD `bpp_*.pt`                top-level `ckpt_prefix` + model.init_args  `<ckpt_prefix>*`

The weights sit under "module" (DeepSpeed), else "state_dict" (Lightning), else at the top level (One-step CoD's
loader knows no "module"). Without a YAML, `--preset` names the architecture (for one-step presets the weights'
prefix is found in the file).

Safety: the checkpoint is read with `torch.load(weights_only=True)` (tensors and plain containers only; no
code from the file ever runs). Strictness: unlike the release, which copies the keys it finds and silently
keeps initial values for the rest (QUIRK 16; One-step CoD loads with strict=False and prints the first ten), every
key and shape must match or the import stops and lists the offending keys; YAML arguments that would change the
architecture and that cod does not know stop it too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cod.files import load_yaml, read_bytes_bounded, regular_file_stat
from cod.model import ModelDirError, build_config, build_denoiser, load_state_strict, model_class, sha256_file
from cod.model_config import MAX_CONFIG_BYTES, validate_config
from cod.models.onestep_presets import ONESTEP_PRESETS, OneStepPreset, get_onestep_preset, matching_preset
from cod.models.presets import PRESETS, Preset
from cod.models.state_dict import StateDictMismatch, check_state_dict, load_torch_file, tensor_state

DENOISER_KWARGS = {
    "PixNerDiT": ("in_channels", "patch_size", "hidden_size", "num_groups", "num_blocks", "num_cond_blocks",
                  "hidden_size_x", "nerf_mlpratio", "codebook_bits", "ds", "up2x", "encoder_width"),
    "DDT": ("in_channels", "patch_size", "hidden_size", "num_groups", "num_blocks", "num_cond_blocks",
            "codebook_bits", "ds", "up2x", "encoder_width"),
}
PREFIXES = {"ema": "ema_denoiser.", "raw": "denoiser."}
TRAINER_PREFIX = "diffusion_trainer."
CONTAINERS = ("module", "state_dict")  # where a checkpoint dict may hold its weights, in the release's order

# CoD-Lite (CoD_Lite/): the classes a YAML's model.net / model.denoiser may name, and the noise_level their
# constructor defaults to when the YAML leaves it out (spec one-step.md §4.1). DConv is the pre-trained diffusion
# network: as a one-step model it decodes from noise (its unified post-training's one-step term, §6.1).
LITE_CLASSES = {"OneStepCoD": 1.0, "FinetunedOneStepCoD": 0.0, "DConv": 1.0}
LITE_ONESTEP_PREFIX = "net."
LITE_KWARGS = ("in_channels", "patch_size", "hidden_size", "hidden_size_x", "mlp_ratio", "num_blocks",
               "num_cond_blocks", "bottleneck_dim", "pred", "ds", "codebook_bits", "up2x", "light", "noise_level")
ONESTEP_COD_KWARGS = DENOISER_KWARGS["PixNerDiT"] + ("noise_level", "pred")
# init_args that only steer training (which parts are frozen, where fine-tuning starts from): they do not change
# the network, and are left out. net_ckpt_path must be null: the release would first load that other file.
TRAINING_ONLY = ("fix_encoder", "pretrain_prefix", "use_checkpoint", "net_ckpt_path")
# A condition-stream block as the release's eval() leaves it (adaLN folded, the block wrapped), and as files hold it.
FOLDED_KEY, LIVE_KEY = re.compile(r"blocks\.\d+\.block\."), re.compile(r"blocks\.\d+\.adaLN_modulation\.")


@dataclass
class OfficialSpec:
    """What a release's YAML (or a preset) says about a checkpoint: the architecture, where its weights are."""

    preset: Preset | OneStepPreset
    preset_name: str | None = None       # the cod preset of this architecture, when there is one
    sampling: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    prefix: str | None = None            # None: the --weights choice (ema_denoiser. / denoiser.)
    containers: tuple[str, ...] = CONTAINERS
    what: str = "CoD"


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


def read_checkpoint(path: str | Path, containers: tuple[str, ...] = CONTAINERS) -> dict:
    """The flat state dict of an official checkpoint: under 'module' (DeepSpeed), else 'state_dict' (Lightning),
    else the top-level dict (read by load_torch_file: no code, no allocation bombs)."""
    path = Path(path)
    ckpt = load_torch_file(path, "checkpoint", _safe_globals())
    if not isinstance(ckpt, dict):
        raise ModelDirError(f"{path} does not hold a dict of tensors")
    for key in containers:
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


def official_spec(path: str | Path) -> OfficialSpec:
    """What the release's YAML config says: a CoD-Lite network (model.net / model.denoiser class_path), a One-step
    CoD (ckpt_prefix + model.init_args), else a CoD denoiser (PixNerDiT / DDT class_path)."""
    path = Path(path)
    tree = load_yaml(read_bytes_bounded(path, MAX_CONFIG_BYTES, "config file"), str(path))
    lite = _find_class(tree, lambda n: n in LITE_CLASSES)
    if lite:
        return _lite_spec(path, *lite)
    if isinstance(tree, dict) and "ckpt_prefix" in tree:
        return _onestep_cod_spec(path, tree)
    preset, sampling, notes = preset_from_official_config(path, tree)
    return OfficialSpec(preset, None, sampling, notes)


def _init_args(path: Path, args, what: str) -> dict:
    if not isinstance(args, dict):
        raise ModelDirError(f"{path}: the {what}'s init_args must be a mapping, got {type(args).__name__}")
    return dict(args)


def _onestep_kwargs(path: Path, member: str, init_args: dict, known: tuple[str, ...], base: dict,
                    what: str) -> tuple[dict, list[str]]:
    """The constructor kwargs of a one-step model from the YAML's init_args over the released preset's, and notes.
    Unknown arguments stop the import (they could change the network); training-only ones are noted."""
    unknown = sorted(k for k in init_args if k not in known and k not in TRAINING_ONLY)
    if unknown:
        raise ModelDirError(f"{path}: the {what}'s init_args {', '.join(map(repr, unknown))} are not arguments cod "
                            f"knows for this network (known: {', '.join(known)}); remove them if they do not "
                            f"change the network")
    if init_args.get("net_ckpt_path") is not None:
        raise ModelDirError(f"{path}: net_ckpt_path is {init_args['net_ckpt_path']!r}; the release would load that "
                            f"file's weights first, so this YAML does not describe the checkpoint alone: set it "
                            f"to null")
    kwargs = {**base, **{k: v for k, v in init_args.items() if k in known}}
    skipped = sorted(k for k in init_args if k in TRAINING_ONLY)
    notes = [f"training-only arguments left out: {', '.join(skipped)}"] if skipped else []
    return kwargs, notes


def _checked_preset(path: Path, member: str, kwargs: dict, notes: list[str]) -> tuple[OneStepPreset, str | None]:
    """The one-step preset for kwargs, after checking the YAML's values (ds, codebook_bits, light, pred,
    noise_level, ...) as a model directory's config would be, and comparing them with cod's presets."""
    spec = OneStepPreset(member, kwargs, "imported")
    validate_config(build_config(spec, None, extra={"fingerprint": "0" * 64}), str(path),
                    fix="fix the YAML, or import with a preset of the same architecture (--preset)")
    name, differ = matching_preset(member, kwargs)
    if name is None:
        notes.append("no cod preset has this architecture and rate")
    for key, (ours, theirs) in differ.items():
        notes.append(f"{key} {theirs!r} (the preset {name} has {ours!r})")
    return spec, name


def _lite_spec(path: Path, cls: str, args) -> OfficialSpec:
    init_args = _init_args(path, args, cls)
    base = {**ONESTEP_PRESETS["cod-lite-0.0039"].kwargs, "noise_level": LITE_CLASSES[cls]}
    kwargs, notes = _onestep_kwargs(path, "lite", init_args, LITE_KWARGS, base, cls)
    if "noise_level" not in init_args:
        notes.append(f"noise_level {LITE_CLASSES[cls]:g}: the default of the release's {cls}")
    spec, name = _checked_preset(path, "lite", kwargs, notes)
    onestep = cls != "DConv"  # the fine-tuned files hold `net.*`; the pre-training checkpoint is a Lightning one
    what = "CoD-Lite" if onestep else "CoD-Lite pre-trained DConv"
    return OfficialSpec(spec, name, {}, notes, LITE_ONESTEP_PREFIX if onestep else None, what=what)


def _onestep_cod_spec(path: Path, tree: dict) -> OfficialSpec:
    prefix = tree["ckpt_prefix"]
    if not isinstance(prefix, str):
        raise ModelDirError(f"{path}: ckpt_prefix must be a string (the release strips it from every weight's "
                            f"name), got {type(prefix).__name__}")
    model = tree.get("model")
    if not isinstance(model, dict) or "init_args" not in model:
        raise ModelDirError(f"{path}: a One-step CoD config holds the network's arguments under model.init_args")
    init_args = _init_args(path, model["init_args"], "One-step CoD model")
    if init_args.pop("light", False) is not False:  # the CoD codec's lighter decoder: not in cod's PixNerDiT
        raise ModelDirError(f"{path}: light: true (the lighter codec decoder) is not supported for One-step CoD")
    kwargs, notes = _onestep_kwargs(path, "cod", init_args, ONESTEP_COD_KWARGS,
                                    ONESTEP_PRESETS["onestep-cod-0.0039"].kwargs, "One-step CoD model")
    spec, name = _checked_preset(path, "cod", kwargs, notes)
    # its loader: ckpt["state_dict"] if present, else the dict itself (no "module")
    return OfficialSpec(spec, name, {}, notes, prefix, ("state_dict",), "One-step CoD")


def preset_from_official_config(path: str | Path, tree=None) -> tuple[Preset, dict, list[str]]:
    """(preset, sampling overrides, notes) from the release's YAML config of a CoD (PixNerDiT / DDT) model."""
    path = Path(path)
    if tree is None:
        tree = load_yaml(read_bytes_bounded(path, MAX_CONFIG_BYTES, "config file"), str(path))
    found = _find_class(tree, lambda n: _denoiser_class(n) is not None)
    if not found:
        raise ModelDirError(f"{path} names no CoD network: no PixNerDiT, DDT, DConv, OneStepCoD or "
                            f"FinetunedOneStepCoD class_path, and no ckpt_prefix (One-step CoD)")
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


def _spec_from_preset(name: str) -> OfficialSpec:
    from cod.models.presets import get_preset

    if name in ONESTEP_PRESETS:
        what = "One-step CoD" if ONESTEP_PRESETS[name].member == "cod" else "CoD-Lite"
        return OfficialSpec(get_onestep_preset(name), name, what=what)
    return OfficialSpec(get_preset(name), name)


def _pick_weights(state: dict, ckpt, spec: OfficialSpec, weights: str | None) -> tuple[str, dict]:
    """(prefix, weights without it). A one-step preset without its YAML: the fine-tuned files' `net.` when the file
    has it, else the Lightning prefixes of a pre-training checkpoint."""
    if spec.prefix is not None:
        if weights is not None:
            raise ValueError(f"--weights does not apply to a {spec.what} file: it holds one set of weights "
                             f"('{spec.prefix}*', no EMA copy)")
        candidates = [spec.prefix]
    elif isinstance(spec.preset, OneStepPreset) and weights is None:
        candidates = [LITE_ONESTEP_PREFIX, PREFIXES["ema"]]
    else:
        candidates = [PREFIXES[weights or "ema"]]
    for prefix in candidates:
        picked = tensor_state(state, str(ckpt), prefix)
        if picked:
            return prefix, picked
    prefixes = sorted({k.split(".", 1)[0] + "." for k in state if isinstance(k, str)})[:8]
    wanted = " or ".join(f"'{p}*'" for p in candidates)
    raise ModelDirError(f"{ckpt} has no {wanted} weights (found prefixes: {', '.join(prefixes) or 'none'})")


def import_official(ckpt: str | Path, out_dir: str | Path, config: str | Path | None = None,
                    preset: str | None = None, weights: str | None = None, vae: str | Path | None = None,
                    overwrite: bool = False):
    """Checkpoint + (official YAML config or preset name) -> model directory with strict key checks.
    weights: "ema" (default) or "raw" for CoD and CoD-Lite pre-training checkpoints (one-step files hold one set)."""
    from cod.models.vae import OFFICIAL_LATENT_SCALE, LatentSpace, load_vae

    if (config is None) == (preset is None):
        raise ValueError("give exactly one of --config (the release's YAML) or --preset")
    spec = official_spec(config) if config is not None else _spec_from_preset(preset)
    state = read_checkpoint(ckpt, spec.containers)
    prefix, picked = _pick_weights(state, ckpt, spec, weights)
    family = spec.preset.family
    latent = None
    vae_file = None
    if family == "latent" and vae is not None:
        latent = LatentSpace(load_vae(vae, preset=spec.preset.vae_preset), scale=OFFICIAL_LATENT_SCALE)
        vae_file = "vae.safetensors"
    elif vae is not None:
        raise ValueError(f"--vae is for latent models; {Path(ckpt).name} is a {family} model")
    cfg = build_config(spec.preset, spec.preset_name, latent_scale=OFFICIAL_LATENT_SCALE, vae_file=vae_file,
                       sampling=spec.sampling)
    # the config that would be written is checked like any model directory's before anything is built (the
    # release's YAML is input too), and the denoiser is built on the meta device and compared with the
    # checkpoint's shapes before its memory is allocated
    validate_config({**cfg, "fingerprint": "0" * 64, **({"checksums": {vae_file: "0" * 64}} if vae_file else {})},
                    str(config or f"preset {preset}"))
    with torch.device("meta"):
        denoiser = build_denoiser(cfg)
    what = f"'{prefix}*' weights of {ckpt}"
    try:
        check_state_dict(denoiser, picked, what)
    except StateDictMismatch as e:
        if any(FOLDED_KEY.match(k) for k in picked) and not any(LIVE_KEY.match(k) for k in picked):
            raise StateDictMismatch(f"{e}\n  (the file looks like a one-step model saved after the release's eval(), "
                                    f"which folds the adaLN modulation into its blocks: cod imports the unfolded "
                                    f"layout that the released files have)") from None
        raise
    denoiser = denoiser.to_empty(device="cpu")
    load_state_strict(denoiser, {k: v.float() for k, v in picked.items()}, what)
    onestep = isinstance(spec.preset, OneStepPreset)
    trainer = {} if onestep else {k: v.float() for k, v in tensor_state(state, str(ckpt), TRAINER_PREFIX).items()}
    model = model_class(cfg)(cfg, denoiser.eval(), latent)
    kind = f"'{prefix}*' weights" if onestep else f"{(weights or 'ema').upper()} weights"
    card = {"title": f"{Path(ckpt).name} ({spec.what}, {kind})",
            "provenance": f"imported by `cod import-official` from {Path(ckpt).name} "
                          f"(sha256 {sha256_file(ckpt)})" + (f" with config {Path(config).name}" if config else ""),
            "latent scaling": "official (SD scale factor applied squared)" if family == "latent" else "n/a"}
    if onestep:
        kw = spec.preset.kwargs
        card["one-step decode"] = f"pred {kw['pred']}, noise_level {kw['noise_level']:g}" + (
            " (the seed chooses the decode's noise)" if kw["noise_level"] else " (deterministic)")
    if spec.notes:
        card["notes"] = "; ".join(spec.notes)
    model.save(out_dir, card=card, objective_state=trainer or None, overwrite=overwrite)
    return model
