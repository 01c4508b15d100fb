"""config.json of a model directory: strict parsing and validation.

A model directory may come from anywhere (a download, a colleague, a tampered copy), so its config.json is input,
not trusted data. Everything cod later does with it (building the denoiser, choosing the sampler, finding the VAE
file) must be safe for any config that passes here:

- `parse_config_bytes` turns every way JSON decoding can fail (bad UTF-8, bad syntax, NaN/Infinity, numbers that
  overflow to inf, integers too long to convert, nesting deep enough to exhaust the stack, duplicate keys, a top
  level that is not an object) into one `ModelDirError` naming the user's path.
- `validate_config` checks every field that cod reads and lists every problem in one `ModelDirError`.

The bounds are chosen so that a valid config can only describe a model that builds, samples to finite values,
decodes deterministically and stays within a few times the size of the released XL models; this check runs before
anything is allocated.

This module sits below cod.model (which imports CONFIG_FORMAT and CONFIG_VERSION from here) and must never import
the product layer (cod.codec): the engine does not depend on the codec.
"""
from __future__ import annotations

import itertools
import json
import math
import re

from cod.errors import ModelDirError
from cod.models.condition_codec import SUPPORTED_DS, index_stride
from cod.models.presets import DEFAULT_SAMPLING

CONFIG_FORMAT = "cod-model"
CONFIG_VERSION = 1

# The largest config.json cod reads (a real one is under 1 KiB); for cod.files.read_bytes_bounded.
MAX_CONFIG_BYTES = 1 << 20
# A real config nests 3 levels (top / denoiser / kwargs, top / sampling / guidance_interval); unknown top-level
# keys may carry a little structure of their own. Deeper input is refused before the JSON parser recurses.
MAX_JSON_DEPTH = 32
MAX_INT_DIGITS = 100  # longer integer literals are refused while parsing

# The samplers whose output depends only on the model, the indices and the seed. The SDE variants draw fresh noise
# at every step, so the same file would decode to different pixels each time; a model directory must not make
# them the default. (cod.codec.api.CODEC_SAMPLERS is the same list for the product layer; a test keeps them equal.)
DETERMINISTIC_SAMPLERS = ("adam1", "adam2", "adam3", "adam4", "euler")

# The one-step members (spec one-step.md): a generator decoded in one pass at t = 0 (cod.models.onestep).
DENOISER_FOR_FAMILY = {"pixel": "PixNerDiT", "latent": "DDT", "onestep-cod": "OneStepCoD",
                       "cod-lite": "OneStepCoDLite"}
ONESTEP_FAMILIES = ("onestep-cod", "cod-lite")
# What a one-step family records as its sampling (cod.models.onestep_presets.ONESTEP_SAMPLING): one Euler step,
# no guidance. Any other value would describe a decode these models do not run.
ONESTEP_SAMPLING_FIXED = {"sampler": "euler", "steps": 1, "cfg": 1.0}

# Files every model directory may contain under these names; a VAE file of the same name would be overwritten
# (or read as the wrong network) by CoDModel.save and load.
RESERVED_FILE_NAMES = frozenset({"config.json", "model.safetensors", "objective.safetensors", "MODEL_CARD.md",
                                 "prior.safetensors"})
PRIOR_KEYS = ("kind", "file")
PRIOR_KINDS = ("static", "context")
MAX_PRIOR_DIM = 256

# Size bounds. The released XL presets have hidden 1152, 16 heads, 30 blocks, hidden_x 64, nerf ratio 2, encoder
# width 128 (cod/models/presets.py); the bounds leave 2-8x headroom per field for new, larger models, and
# MAX_PARAMETERS caps their combination (every field at its bound would mean tens of billions of parameters):
# 3e9 float32 parameters are 12 GB, 3x the largest released model (pixel-xl: 1.0e9 with its condition codec).
MAX_HIDDEN_SIZE = 4096
MAX_NUM_GROUPS = 128
MAX_NUM_BLOCKS = 128
MAX_HIDDEN_SIZE_X = 256
MAX_NERF_MLPRATIO = 8
MAX_ENCODER_WIDTH = 512
MAX_MLP_RATIO = 8     # DConv's DiCo blocks (released: 4)
MAX_NOISE_LEVEL = 100.0  # one-step input noise scale (released: 0 or 1)
LITE_DS = (4, 8, 16, 32)  # the CoD-Lite codec (cod.models.condition_codec.lite_condition_codec)
MAX_CODEBOOK_BITS = 16  # the VQ codebook has 2^bits rows; the bit packer and the rate table stop at 16
MAX_PARAMETERS = 3_000_000_000
GROUP_NORM_GROUPS = 32  # the condition codec's GroupNorm(32) runs over hidden_size and encoder_width channels

# Sampling bounds. The time grid is computed in float32 (cod.diffusion.flow.sampling_grid) and the Adams
# coefficients divide by differences of its nodes: outside these ranges some step count in 1..MAX_STEPS gives
# repeated nodes or coefficients that cancel to 0/0 (e.g. timeshift 0.01 with adam4 and 255 steps), and shift 0 or
# one that underflows or overflows in float32 gives NaN times: an all-black image. Inside them every sampler and
# every step count gives a strictly increasing grid and finite coefficients (tests/test_model_config.py checks the
# corners). Steps and the guidance scale have the limits of a .cod file's decode parameters (cod/codec/container.py).
MAX_STEPS = 256
FLOAT16_MAX = 65504.0
LAST_STEP_RANGE = (1e-4, 0.5)    # the release: 0.04
TIMESHIFT_RANGE = (0.1, 100.0)   # the release: 1.0
# latent / scale and latent * scale run in float32: the SD factor is 0.18215, the official checkpoints' 0.0332.
LATENT_SCALE_RANGE = (1e-3, 1e3)
# RoPE positions are token index * rope_step in float32, for up to 4096 tokens per side (MAX_SIDE / 16): a huge
# step overflows to inf and cos(inf) is NaN. The release spaces tokens 16/(n-1) apart; new models use 0.5 or 1.
MAX_ROPE_STEP = 1000.0

MAX_FILE_NAME = 255
MAX_CHECKSUMS = 64
MAX_PRESET_NAME = 128
MAX_LISTED_ERRORS = 20

_HEX64 = re.compile(r"[0-9a-f]{64}")
# A JSON string (or an unterminated one, up to the end) or a bracket. The string branch cannot fail, so the scan
# never backtracks: linear time on any input.
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\[\s\S]?)*(?:"|\Z)|([\[\]{}])')

# Top-level keys cod writes and reads. Other top-level keys are ignored, not refused: nothing in cod reads them,
# so they cannot change what a model computes, and a newer cod (or a user's notes) may add informational keys
# without breaking older readers; a change that older readers must not ignore raises format_version instead.
# (No caller passes build_config(extra=...) today; a required key misspelt is still reported as missing.)
TOP_LEVEL_KEYS = ("format", "format_version", "preset", "family", "denoiser", "latent", "sampling", "fingerprint",
                  "checksums", "prior")
LATENT_KEYS = ("vae_preset", "vae_file", "scale")


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------
class _DuplicateKey(Exception):
    pass


class _NonFinite(Exception):
    pass


def _no_duplicates(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(text)
    return value


class _TooLong(Exception):
    pass


def _short_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:  # Python refuses over 4300 digits, with advice meant for programmers
        raise _TooLong(len(text.lstrip("-")))
    return int(text)


def _reject_constant(name: str):
    raise _NonFinite(name)


def _json_depth(text: str) -> int:
    """Bracket nesting depth outside strings, in linear time and without recursion (checked before the parser,
    whose recursion a deep enough input would exhaust)."""
    steps = [1 if b in "[{" else -1 for b in _STRING_OR_BRACKET.findall(text) if b]
    return max(itertools.accumulate(steps), default=0)


def parse_config_bytes(data: bytes, source: str) -> dict:
    """The JSON object in `data` (the bytes of config.json), or a ModelDirError naming `source`."""
    fix = "re-create the directory with `cod new-model` or `cod import-official`"
    if len(data) > MAX_CONFIG_BYTES:
        raise ModelDirError(f"{source}: {len(data)} bytes is larger than any model config ({MAX_CONFIG_BYTES} "
                            f"bytes); if it is the right file, {fix}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ModelDirError(f"{source} is not UTF-8 text (invalid byte at offset {e.start}); {fix}") from None
    if _json_depth(text) > MAX_JSON_DEPTH:
        raise ModelDirError(f"{source} nests objects or arrays more than {MAX_JSON_DEPTH} levels deep, which no "
                            f"model config does; {fix}")
    try:
        config = json.loads(text, object_pairs_hook=_no_duplicates, parse_float=_finite_float, parse_int=_short_int,
                            parse_constant=_reject_constant)
    except _DuplicateKey as e:
        raise ModelDirError(f"{source} is ambiguous: the key {_show(e.args[0])} appears twice in one object; "
                            f"remove one, or {fix}") from None
    except _NonFinite as e:
        raise ModelDirError(f"{source} contains the non-finite number {_show(e.args[0])} (JSON has no NaN or "
                            f"infinity, and no config field accepts one); fix the field, or {fix}") from None
    except RecursionError:
        raise ModelDirError(f"{source} nests objects or arrays too deeply; {fix}") from None
    except _TooLong as e:
        raise ModelDirError(f"{source} contains a {e.args[0]}-digit integer, which no config field accepts; fix "
                            f"the field, or {fix}") from None
    except ValueError as e:  # json.JSONDecodeError
        raise ModelDirError(f"{source} is not valid JSON: {_oneline(str(e))}; {fix}") from None
    if not isinstance(config, dict):
        raise ModelDirError(f"{source} holds a JSON {_json_type(config)}, not an object; it is not a cod model "
                            f"config: {fix}")
    return config


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------
def validate_config(config: object, source: str,
                    fix: str = "re-create the directory with `cod new-model` or `cod import-official`") -> dict:
    """`config` itself when every field is valid, else one ModelDirError listing every invalid field, ending with
    `fix` (what to do)."""
    if not isinstance(config, dict):
        raise ModelDirError(f"{source} holds a JSON {_json_type(config)}, not an object; it is not a cod model "
                            f"config: {fix}")
    if config.get("format") != CONFIG_FORMAT:
        raise ModelDirError(f"{source} is not a cod model config (format={_show(config.get('format'))}, expected "
                            f"'{CONFIG_FORMAT}'): {fix}")
    version = config.get("format_version")
    if _is_int(version) and version > CONFIG_VERSION:
        # A newer format may legitimately differ in every other field: this is the one thing worth saying.
        raise ModelDirError(f"{source} has format version {version}; this cod reads up to {CONFIG_VERSION}: "
                            f"upgrade cod")
    errors = _Errors()
    if not _is_int(version):
        errors.add("format_version", version, f"an integer 1..{CONFIG_VERSION}", required=True)
    elif version < 1:
        errors.add("format_version", version, f"an integer 1..{CONFIG_VERSION}")
    _check_preset(config, errors)
    family = config.get("family")
    if not (isinstance(family, str) and family in DENOISER_FOR_FAMILY):
        errors.add("family", family, ", ".join(f"'{f}'" for f in DENOISER_FOR_FAMILY), required="family" not in config)
        family = None
    _check_denoiser(config, family, errors)
    _check_latent(config, family, errors)
    _check_sampling(config, family, errors)
    fingerprint = config.get("fingerprint")
    if not (isinstance(fingerprint, str) and _HEX64.fullmatch(fingerprint)):
        errors.add("fingerprint", fingerprint, "the sha256 of model.safetensors: 64 lowercase hex digits",
                   required="fingerprint" not in config)
    _check_checksums(config, errors)
    _check_prior(config, errors)
    if errors:
        listed = errors.items[:MAX_LISTED_ERRORS]
        more = len(errors.items) - len(listed)
        summary = "; ".join(listed) + (f"; and {more} more" if more else "")
        raise ModelDirError(f"{source} is not a valid cod model config: {summary}; {fix}, or fix "
                            f"{'the field' if len(errors.items) == 1 else 'these fields'}")
    return config


class _Errors:
    def __init__(self):
        self.items: list[str] = []

    def add(self, path: str, value: object, allowed: str, required: bool = False) -> None:
        got = "missing" if required else f"got {_show(value)}"
        self.items.append(f"{path}: {got}, expected {allowed}")

    def note(self, message: str) -> None:
        self.items.append(message)

    def __bool__(self) -> bool:
        return bool(self.items)


def _check_preset(config: dict, errors: _Errors) -> None:
    preset = config.get("preset", ...)
    if preset is None:
        return
    if preset is ... or not (isinstance(preset, str) and 1 <= len(preset) <= MAX_PRESET_NAME
                             and preset.isprintable()):
        errors.add("preset", preset, f"null or a preset name (printable, 1..{MAX_PRESET_NAME} characters)",
                   required=preset is ...)


def _check_object(parent: dict, key: str, path: str, errors: _Errors, keys: tuple[str, ...],
                  optional: tuple[str, ...] = ()) -> dict | None:
    """parent[key] when it is an object; its missing and unknown keys are reported (not its values)."""
    value = parent.get(key)
    if not isinstance(value, dict):
        errors.add(path, value, f"an object with the keys {', '.join(keys + optional)}", required=key not in parent)
        return None
    missing = [k for k in keys if k not in value]
    unknown = [k for k in value if k not in keys and k not in optional]
    if missing:
        errors.note(f"{path}: missing {', '.join(missing)}")
    if unknown:
        errors.note(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} "
                    f"{', '.join(_show(k) for k in unknown[:8])}{' ...' if len(unknown) > 8 else ''} "
                    f"(allowed: {', '.join(keys + optional)})")
    return value


# Denoiser kwargs: name -> (check, what is allowed), per class. The checks take the value and return whether it is
# allowed on its own; relations between fields are checked afterwards.
def _int_in(lo: int, hi: int, multiple: int = 1):
    def check(v):
        return _is_int(v) and lo <= v <= hi and v % multiple == 0
    return check


def _kwarg_rules(cls: str) -> dict:
    common = {
        "hidden_size": (_int_in(GROUP_NORM_GROUPS, MAX_HIDDEN_SIZE, GROUP_NORM_GROUPS),
                        f"a multiple of {GROUP_NORM_GROUPS} in {GROUP_NORM_GROUPS}..{MAX_HIDDEN_SIZE}"),
        "num_groups": (_int_in(1, MAX_NUM_GROUPS), f"an integer 1..{MAX_NUM_GROUPS} (attention heads)"),
        "num_blocks": (_int_in(1, MAX_NUM_BLOCKS), f"an integer 1..{MAX_NUM_BLOCKS}"),
        "num_cond_blocks": (_int_in(1, MAX_NUM_BLOCKS), "an integer 1..num_blocks"),
        "codebook_bits": (_int_in(1, MAX_CODEBOOK_BITS), f"an integer 1..{MAX_CODEBOOK_BITS}"),
        "ds": (lambda v: _is_int(v) and v in SUPPORTED_DS, f"one of {', '.join(map(str, SUPPORTED_DS))}"),
        "up2x": (lambda v: isinstance(v, bool), "true or false"),
        "encoder_width": (_int_in(GROUP_NORM_GROUPS, MAX_ENCODER_WIDTH, GROUP_NORM_GROUPS),
                          f"a multiple of {GROUP_NORM_GROUPS} in {GROUP_NORM_GROUPS}..{MAX_ENCODER_WIDTH}"),
    }
    # Condition tokens are 16x16 pixels for every model: 16-pixel patches, or 2-cell patches of the 8x latent.
    pixel = {
        "in_channels": (lambda v: _is_int(v) and v == 3, "3 (RGB)"),
        "patch_size": (lambda v: _is_int(v) and v == 16, "16 (condition tokens are 16x16 pixels)"),
    }
    onestep = {
        "noise_level": (lambda v: _is_number(v) and 0 <= v <= MAX_NOISE_LEVEL,
                        f"a number in [0, {MAX_NOISE_LEVEL:g}] (released models: 0, or 1 for a stochastic decode)"),
        "pred": (lambda v: v in ("x", "v"), "'x' or 'v'"),
    }
    if cls in ("PixNerDiT", "OneStepCoD"):
        return {
            **pixel, **common,
            "hidden_size_x": (_int_in(1, MAX_HIDDEN_SIZE_X), f"an integer 1..{MAX_HIDDEN_SIZE_X}"),
            "nerf_mlpratio": (_int_in(1, MAX_NERF_MLPRATIO), f"an integer 1..{MAX_NERF_MLPRATIO}"),
            **(onestep if cls == "OneStepCoD" else {}),
        }
    if cls == "OneStepCoDLite":  # DConv (spec one-step.md §3): no attention heads, a fixed codec encoder width
        lite = {k: v for k, v in common.items() if k not in ("num_groups", "encoder_width")}
        return {
            **pixel, **lite,
            "ds": (lambda v: _is_int(v) and v in LITE_DS, f"one of {', '.join(map(str, LITE_DS))}"),
            "up2x": (lambda v: v is True, "true (every CoD-Lite codec)"),
            "hidden_size_x": (_int_in(1, MAX_HIDDEN_SIZE_X), f"an integer 1..{MAX_HIDDEN_SIZE_X}"),
            "mlp_ratio": (lambda v: _is_number(v) and 1 <= v <= MAX_MLP_RATIO, f"a number in [1, {MAX_MLP_RATIO}]"),
            "bottleneck_dim": (_int_in(1, MAX_HIDDEN_SIZE), f"an integer 1..{MAX_HIDDEN_SIZE}"),
            "light": (lambda v: isinstance(v, bool), "true or false"),
            **onestep,
        }
    return {
        "in_channels": (lambda v: _is_int(v) and v == 4, "4 (the VAE's latent channels)"),
        "patch_size": (lambda v: _is_int(v) and v == 2, "2 (2x2 latent cells = 16x16 pixels per condition token)"),
        **common,
    }


def _check_denoiser(config: dict, family: str | None, errors: _Errors) -> None:
    spec = _check_object(config, "denoiser", "denoiser", errors, ("class", "kwargs"))
    if spec is None:
        return
    cls = spec.get("class")
    expected = DENOISER_FOR_FAMILY.get(family)
    if expected is not None and cls != expected:
        errors.add("denoiser.class", cls, f"'{expected}' for the {family} family", required="class" not in spec)
        cls = expected  # check the kwargs against what the family needs
    elif expected is None and cls not in DENOISER_FOR_FAMILY.values():
        errors.add("denoiser.class", cls, ", ".join(f"'{c}' ({f} family)" for f, c in DENOISER_FOR_FAMILY.items()),
                   required="class" not in spec)
        cls = None
    if cls is None:
        if not isinstance(spec.get("kwargs"), dict):
            errors.add("denoiser.kwargs", spec.get("kwargs"), "an object", required="kwargs" not in spec)
        return
    rules = _kwarg_rules(cls)
    kwargs = _check_object(spec, "kwargs", "denoiser.kwargs", errors, tuple(rules),
                           optional=() if cls == "OneStepCoDLite" else ("rope_step",))
    if kwargs is None:
        return
    ok = {}
    for name, (check, allowed) in rules.items():
        if name in kwargs:
            if check(kwargs[name]):
                ok[name] = kwargs[name]
            else:
                errors.add(f"denoiser.kwargs.{name}", kwargs[name], allowed)
    rope_step = kwargs.get("rope_step")
    if rope_step is not None and not (_is_number(rope_step) and 0 < rope_step <= MAX_ROPE_STEP):
        errors.add("denoiser.kwargs.rope_step", rope_step,
                   f"null (the release's size-normalised positions) or a number in (0, {MAX_ROPE_STEP:g}]")
    # Relations between fields.
    D, heads = ok.get("hidden_size"), ok.get("num_groups")
    if D is not None and heads is not None:
        if D % heads:
            errors.note(f"denoiser.kwargs.num_groups: {heads} does not divide hidden_size {D}")
        elif (D // heads) % 4:
            errors.note(f"denoiser.kwargs.num_groups: head dim hidden_size/num_groups = {D // heads} is not a "
                        f"multiple of 4, which 2-D RoPE needs")
    if "num_blocks" in ok and "num_cond_blocks" in ok and ok["num_cond_blocks"] > ok["num_blocks"]:
        errors.note(f"denoiser.kwargs.num_cond_blocks: {ok['num_cond_blocks']} is more than num_blocks "
                    f"{ok['num_blocks']}")
    if "ds" in ok and "up2x" in ok and index_stride(ok["ds"], ok["up2x"]) < 4:
        errors.note(f"denoiser.kwargs.up2x: ds={ok['ds']} with up2x=false gives an index stride below 4, which no "
                    f"decoder supports")
    if len(ok) == len(rules):
        n = parameter_count(cls, ok)
        if n > MAX_PARAMETERS:
            errors.note(f"denoiser.kwargs: describes a model of {n / 1e9:.1f} billion parameters, more than the "
                        f"{MAX_PARAMETERS / 1e9:g} billion cod loads")


def _check_latent(config: dict, family: str | None, errors: _Errors) -> None:
    latent = config.get("latent", ...)
    if family is None and latent in (None, ...):
        return  # the family is already reported and the latent section may be right whichever it should be
    if family != "latent":
        if latent is not None:
            errors.add("latent", latent, f"null for a {family} model", required=latent is ...)
        return
    lat = _check_object(config, "latent", "latent", errors, LATENT_KEYS)
    if lat is None:
        return
    from cod.models.vae import VAE_PRESETS  # only latent configs need it

    if "vae_preset" in lat and not (isinstance(lat["vae_preset"], str) and lat["vae_preset"] in VAE_PRESETS):
        errors.add("latent.vae_preset", lat["vae_preset"], f"one of {', '.join(map(repr, VAE_PRESETS))}")
    if "vae_file" in lat and lat["vae_file"] is not None:
        problem = file_name_problem(lat["vae_file"])
        if problem:
            errors.add("latent.vae_file", lat["vae_file"], f"null (VAE from $COD_VAE_PATH) or {problem}")
        elif not (isinstance(config.get("checksums"), dict) and lat["vae_file"] in config["checksums"]):
            # a bundled VAE decodes every image: like the denoiser's weights, it must be the file that was saved
            errors.note(f"checksums: no sha256 of the bundled VAE file {_show(lat['vae_file'])} (every model "
                        f"directory written by cod records one)")
    lo, hi = LATENT_SCALE_RANGE
    if "scale" in lat and not (_is_number(lat["scale"]) and lo <= lat["scale"] <= hi):
        errors.add("latent.scale", lat["scale"], f"a number in [{lo:g}, {hi:g}] (SD VAE: 0.18215)")


def _check_prior(config: dict, errors: _Errors) -> None:
    """The optional index prior (docs/entropy.md): {"kind", "file": "prior.safetensors", ["dim"]}, its file's
    sha256 in checksums."""
    if config.get("prior") is None:
        return
    prior = _check_object(config, "prior", "prior", errors, PRIOR_KEYS, ("dim",))
    if prior is None:
        return
    if "kind" in prior and prior["kind"] not in PRIOR_KINDS:
        errors.add("prior.kind", prior["kind"], f"one of {', '.join(map(repr, PRIOR_KINDS))}")
    if "file" in prior and prior["file"] != "prior.safetensors":
        errors.add("prior.file", prior["file"], "'prior.safetensors'")
    elif "file" in prior and not (isinstance(config.get("checksums"), dict) and prior["file"] in config["checksums"]):
        errors.note("checksums: no sha256 of prior.safetensors (every model directory written by cod records one)")
    if prior.get("kind") == "context" and not (_is_int(prior.get("dim")) and 1 <= prior["dim"] <= MAX_PRIOR_DIM):
        errors.add("prior.dim", prior.get("dim"), f"an integer 1..{MAX_PRIOR_DIM}", required="dim" not in prior)


def file_name_problem(name: object, reserved_ok: bool = False) -> str | None:
    """None for a plain file name inside the model directory, else what such a name must be. (The loader still
    has to check that the file is a regular file: a name cannot say that.) reserved_ok: the name may be one of the
    directory's own files (a checksum of model.safetensors), not only a VAE file."""
    reserved = () if reserved_ok else sorted(RESERVED_FILE_NAMES)
    if (not isinstance(name, str) or not 1 <= len(name) <= MAX_FILE_NAME or not name.isprintable()
            or "/" in name or "\\" in name or name in (".", "..") or name in reserved):
        return (f"a plain file name in the model directory (1..{MAX_FILE_NAME} printable characters, no / or \\, "
                f"not . or ..{''.join(', not ' + r for r in reserved)})")
    return None


def _check_sampling(config: dict, family: str | None, errors: _Errors) -> None:
    s = _check_object(config, "sampling", "sampling", errors, tuple(DEFAULT_SAMPLING))
    if s is None:
        return
    if family in ONESTEP_FAMILIES:
        for key, value in ONESTEP_SAMPLING_FIXED.items():
            if key in s and s[key] != value:
                errors.add(f"sampling.{key}", s[key], f"{_show(value)} (a {family} model decodes in one pass)")
    if "sampler" in s and not (isinstance(s["sampler"], str) and s["sampler"] in DETERMINISTIC_SAMPLERS):
        errors.add("sampling.sampler", s["sampler"],
                   f"one of {', '.join(DETERMINISTIC_SAMPLERS)} (deterministic samplers only: the SDE samplers "
                   f"would decode a file differently each time)")
    if "steps" in s and not _int_in(1, MAX_STEPS)(s["steps"]):
        errors.add("sampling.steps", s["steps"], f"an integer 1..{MAX_STEPS}")
    if "cfg" in s and not (_is_number(s["cfg"]) and abs(s["cfg"]) <= FLOAT16_MAX):
        errors.add("sampling.cfg", s["cfg"], f"a finite number within +-{FLOAT16_MAX:g}")
    if "guidance_interval" in s:
        gi = s["guidance_interval"]
        if not (isinstance(gi, (list, tuple)) and len(gi) == 2 and all(_is_number(v) for v in gi)
                and 0 <= gi[0] < gi[1] <= 1):
            errors.add("sampling.guidance_interval", gi, "[lo, hi] with 0 <= lo < hi <= 1 (the release: [0.1, 1.0])")
    lo, hi = LAST_STEP_RANGE
    if "last_step" in s and not (_is_number(s["last_step"]) and lo <= s["last_step"] <= hi):
        errors.add("sampling.last_step", s["last_step"], f"a number in [{lo:g}, {hi:g}] (the release: 0.04)")
    lo, hi = TIMESHIFT_RANGE
    if "timeshift" in s and not (_is_number(s["timeshift"]) and lo <= s["timeshift"] <= hi):
        errors.add("sampling.timeshift", s["timeshift"], f"a number in [{lo:g}, {hi:g}] (the release: 1.0)")


def _check_checksums(config: dict, errors: _Errors) -> None:
    if "checksums" not in config:
        return
    sums = config["checksums"]
    if not (isinstance(sums, dict) and len(sums) <= MAX_CHECKSUMS):
        errors.add("checksums", sums, f"an object of at most {MAX_CHECKSUMS} file name: sha256 entries")
        return
    for name, digest in sums.items():
        problem = file_name_problem(name, reserved_ok=True)
        if problem:
            errors.note(f"checksums: key {_show(name)} is not {problem}")
        if not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
            errors.add(f"checksums[{_show(name)}]", digest, "a sha256: 64 lowercase hex digits")


# ---------------------------------------------------------------------------------------------------------------
# Parameter count (pure arithmetic: the same numbers as building the modules, without allocating them)
# ---------------------------------------------------------------------------------------------------------------
def _linear(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def _conv(i: int, o: int, k: int) -> int:
    return i * o * k * k + o


def _res(i: int, o: int | None = None) -> int:
    o = o or i
    return 2 * i + _conv(i, o, 3) + 2 * o + _conv(o, o, 3) + (_conv(i, o, 1) if i != o else 0)


def _attn2d(c: int) -> int:
    return 2 * c + 4 * _conv(c, c, 1)


def _dit_block(D: int, heads: int) -> int:
    hidden = int(2 * int(D * 4.0) / 3)
    attention = _linear(D, 3 * D, bias=False) + 2 * (D // heads) + _linear(D, D)
    return 2 * D + attention + 3 * D * hidden + _linear(D, 6 * D)


def _codec(D: int, ds: int, bits: int, up2x: bool, width: int, latent_dim: int = 128, light: bool = False) -> int:
    c1, c2, c4, c8 = width, 2 * width, 4 * width, 8 * width
    enc = _conv(3, c1, 3) + 2 * _res(c1) + _conv(c1, c1, 3) + 2 * _res(c1) + (_conv(c1, c1, 3) if ds >= 8 else 0)
    enc += _res(c1, c2) + _res(c2) + (_conv(c2, c2, 3) if ds >= 16 else 0)
    enc += 2 * _res(c2) + (_conv(c2, c2, 3) if ds >= 32 else 0)
    enc += _res(c2, c4) + _res(c4) + 2 * _attn2d(c4)
    top = c4
    if ds == 128:
        enc += _conv(c4, c4, 3) + _res(c4, c8) + _res(c8) + 2 * _attn2d(c8) + _conv(c8, c8, 3)
        top = c8
    enc += 2 * _res(top) + _attn2d(top) + 2 * top + _conv(top, latent_dim, 3)
    vq = (2 ** bits) * latent_dim
    stride = index_stride(ds, up2x)
    dec = _conv(latent_dim, D, 3) + 3 * _attn2d(D) + 2 * D
    if stride >= 64:
        dec += 6 * _res(D)  # four ResBlocks and two Upsamples (a ResBlock each)
        stride //= 4
    else:
        dec += 4 * _res(D)
    dec += 2 * _conv(D, D, 3) + _res(D) if stride == 4 else _conv(D, D, 3)
    dec += _res(D) if stride == 32 else 0
    if light:  # the CoD-Lite decoder block ends one attention block and one ResBlock earlier
        dec -= _attn2d(D) + _res(D)
    return enc + vq + dec


def _dconv(kw: dict) -> int:
    """DConv (CoD-Lite, cod/models/dconv.py)."""
    D, Dx, C, p, F = kw["hidden_size"], kw["hidden_size_x"], kw["in_channels"], kw["patch_size"], \
        int(kw["hidden_size"] * kw["mlp_ratio"])
    n = _codec(D, kw["ds"], kw["codebook_bits"], True, 128, light=kw["light"])
    n += _linear(256, D) + _linear(D, D) + _conv(D, Dx * p * p, 1) + _linear(C + Dx + 64, Dx)
    n += C * kw["bottleneck_dim"] * p * p + _conv(kw["bottleneck_dim"] + D, D, 1)  # s_embedder (proj1: no bias)
    dico = 3 * _conv(D, D, 1) + 10 * D + _conv(D, F, 1) + _conv(F, D, 1) + _linear(D, 6 * D)  # 10 D: depthwise 3x3
    pixel = 2 * Dx + 2 * _linear(Dx, Dx) + _linear(Dx, 3 * Dx)
    n += kw["num_cond_blocks"] * dico + _linear(D, p * p * Dx) + _linear(Dx, Dx)
    n += (kw["num_blocks"] - kw["num_cond_blocks"]) * pixel + Dx + _linear(Dx, C)
    return n


def parameter_count(cls: str, kw: dict) -> int:
    """Number of parameters of `cls(**kw)` (kw already valid), computed without building it."""
    if cls == "OneStepCoDLite":
        return _dconv(kw)
    D, heads, C, p = kw["hidden_size"], kw["num_groups"], kw["in_channels"], kw["patch_size"]
    n = _codec(D, kw["ds"], kw["codebook_bits"], kw["up2x"], kw["encoder_width"])
    n += _linear(C * p * p + D, D) + _linear(256, D) + _linear(D, D)  # s_embedder, t_embedder
    n += kw["num_cond_blocks"] * _dit_block(D, heads)
    if cls in ("PixNerDiT", "OneStepCoD"):
        Dx, r = kw["hidden_size_x"], kw["nerf_mlpratio"]
        n += _linear(C + Dx + 64, Dx) + _linear(D, Dx * p * p) + Dx + _linear(Dx, C)
        n += (kw["num_blocks"] - kw["num_cond_blocks"]) * (_linear(D, 2 * Dx * Dx * r) + Dx)
    else:
        n += _linear(C * p * p + D, D) + _linear(D, C * p * p) + _linear(D, 2 * D)  # x_embedder, final layer
        n += (kw["num_blocks"] - kw["num_cond_blocks"]) * _dit_block(D, heads)
    return n


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------
def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    """An int or a finite float; bool is not a number here."""
    return (_is_int(v) and abs(v) < 1 << 1023) or (isinstance(v, float) and math.isfinite(v))


def _json_type(v: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number")


def _oneline(text: str) -> str:
    return " ".join(text.split())


def _show(v: object, limit: int = 40) -> str:
    """A short, printable, one-line rendering of a config value for a message (JSON spelling where it has one)."""
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    if isinstance(v, (dict, list)):
        return f"a JSON {_json_type(v)}" if len(ascii(v)) > limit else ascii(v)
    if _is_int(v) and v.bit_length() > 64:
        return f"a {len(str(abs(v))) if v.bit_length() < 10000 else 'huge'}-digit integer"
    text = ascii(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."
