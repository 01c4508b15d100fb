"""config.json of a model directory: every config cod writes validates, and every malformed one is refused with
one ModelDirError (never a KeyError, TypeError, ZeroDivisionError, RecursionError...) naming each bad field."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from cod.errors import ModelDirError
from cod.model import build_config, build_denoiser
from cod.model_config import (CONFIG_FORMAT, CONFIG_VERSION, DETERMINISTIC_SAMPLERS, LAST_STEP_RANGE,
                              MAX_CONFIG_BYTES, MAX_STEPS, TIMESHIFT_RANGE, parameter_count, parse_config_bytes,
                              validate_config)
from cod.models.presets import PRESETS, get_preset, rate_table
from cod.models.vae import OFFICIAL_LATENT_SCALE

SOURCE = "/home/me/models/mine/config.json"
FINGERPRINT = "0123456789abcdef" * 4
FIX = "re-create the directory with `cod new-model` or `cod import-official`"


def make_config(preset: str = "tiny-pixel", **build) -> dict:
    config = build_config(get_preset(preset), preset, **build)
    config["fingerprint"] = FINGERPRINT
    return json.loads(json.dumps(config))  # as read back from disk (lists, not tuples)


def refused(config, *fields: str) -> str:
    """The message of the one ModelDirError that validate_config raises; it must name every field given."""
    with pytest.raises(ModelDirError) as info:
        validate_config(config, SOURCE)
    assert type(info.value) is ModelDirError
    message = str(info.value)
    assert message.startswith(SOURCE) and "\n" not in message
    for field in fields:
        assert field in message, (field, message)
    return message


def parse_refused(data: bytes, *words: str) -> str:
    with pytest.raises(ModelDirError) as info:
        parse_config_bytes(data, SOURCE)
    assert type(info.value) is ModelDirError
    message = str(info.value)
    assert message.startswith(SOURCE) and "\n" not in message and FIX in message
    for word in words:
        assert word in message, (word, message)
    return message


# ---------------------------------------------------------------------------------------------------------------
# Configs that cod writes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    config = make_config(name)
    before = copy.deepcopy(config)
    assert validate_config(config, SOURCE) is config and config == before  # returned unchanged
    assert validate_config(parse_config_bytes(json.dumps(config, indent=2).encode(), SOURCE), SOURCE) == config


@pytest.mark.parametrize("row", rate_table(), ids=lambda r: f"ds{r['ds']}-b{r['bits']}-up{int(r['up2x'])}")
def test_every_rate_validates(row):
    for name in ("tiny-pixel", "tiny-latent"):
        preset = get_preset(name, ds=row["ds"], bits=row["bits"], up2x=row["up2x"], rope_step=0.5)
        config = build_config(preset, name)
        config["fingerprint"] = FINGERPRINT
        validate_config(config, SOURCE)


def test_written_variants_validate():
    """What new_model, import-official, training and the demo write: vae files, the official scale, sampling
    overrides, checksums; unknown top-level keys are ignored."""
    bundled = make_config("tiny-latent", vae_file="vae.safetensors")
    with pytest.raises(ModelDirError, match="no sha256 of the bundled VAE"):  # a bundled VAE must be checksummed
        validate_config(bundled, SOURCE)
    validate_config({**bundled, "checksums": {"vae.safetensors": "a" * 64}}, SOURCE)
    validate_config({**make_config("latent-xl", latent_scale=OFFICIAL_LATENT_SCALE, vae_file="vae.safetensors",
                                   sampling={"steps": 4, "cfg": 3.0, "last_step": 0.04}),
                     "checksums": {"vae.safetensors": "b" * 64}}, SOURCE)
    validate_config(make_config(sampling={"sampler": "euler", "steps": 1, "cfg": 1.0}), SOURCE)
    config = make_config()
    config["preset"] = None
    config["checksums"] = {"model.safetensors": FINGERPRINT, "vae.safetensors": "f" * 64}
    config["notes"] = {"trained by": "me", "data": [1, 2, {"x": None}]}
    validate_config(config, SOURCE)
    for interval in ([0, 1], [0.0, 0.5], [0.1, 1.0]):
        validate_config(make_config(sampling={"guidance_interval": interval}), SOURCE)


# ---------------------------------------------------------------------------------------------------------------
# Malformed configs: one field at a time
# ---------------------------------------------------------------------------------------------------------------
def _set(config: dict, path: str, value) -> dict:
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return config


DELETE = object()
NAN, INF = float("nan"), float("inf")

# (base preset, dotted path, bad value, text the message must contain)
MALFORMED = [
    ("tiny-pixel", "format_version", "1", "format_version"),
    ("tiny-pixel", "format_version", True, "format_version"),
    ("tiny-pixel", "format_version", 0, "format_version"),
    ("tiny-pixel", "format_version", 1.0, "format_version"),
    ("tiny-pixel", "format_version", DELETE, "format_version: missing"),
    ("tiny-pixel", "preset", 5, "preset"),
    ("tiny-pixel", "preset", "tiny\npixel", "preset"),
    ("tiny-pixel", "preset", "\ud800", "preset"),  # a lone surrogate could not even be printed
    ("tiny-pixel", "preset", DELETE, "preset: missing"),
    ("tiny-pixel", "family", "voxel", "family"),
    ("tiny-pixel", "family", ["pixel"], "family"),  # unhashable
    ("tiny-pixel", "family", DELETE, "family: missing"),
    ("tiny-pixel", "denoiser", "PixNerDiT", "denoiser"),
    ("tiny-pixel", "denoiser.class", "DDT", "denoiser.class"),
    ("tiny-latent", "denoiser.class", "PixNerDiT", "denoiser.class"),
    ("tiny-pixel", "denoiser.class", {"a": 1}, "denoiser.class"),
    ("tiny-pixel", "denoiser.kwargs", [1, 2], "denoiser.kwargs"),
    ("tiny-pixel", "denoiser.kwargs.hidden_size", 10 ** 7, "denoiser.kwargs.hidden_size"),
    ("tiny-pixel", "denoiser.kwargs.hidden_size", 10 ** 100, "denoiser.kwargs.hidden_size"),
    ("tiny-pixel", "denoiser.kwargs.hidden_size", 64.0, "denoiser.kwargs.hidden_size"),
    ("tiny-pixel", "denoiser.kwargs.hidden_size", True, "denoiser.kwargs.hidden_size"),
    ("tiny-pixel", "denoiser.kwargs.hidden_size", 48, "denoiser.kwargs.hidden_size"),  # GroupNorm(32)
    ("tiny-pixel", "denoiser.kwargs.hidden_size", -64, "denoiser.kwargs.hidden_size"),
    ("tiny-pixel", "denoiser.kwargs.hidden_size", DELETE, "hidden_size"),
    ("tiny-pixel", "denoiser.kwargs.num_groups", 3, "denoiser.kwargs.num_groups"),  # does not divide 64
    ("tiny-pixel", "denoiser.kwargs.num_groups", 32, "denoiser.kwargs.num_groups"),  # head dim 2: no 2-D RoPE
    ("tiny-pixel", "denoiser.kwargs.num_groups", 0, "denoiser.kwargs.num_groups"),
    ("tiny-pixel", "denoiser.kwargs.num_blocks", 0, "denoiser.kwargs.num_blocks"),
    ("tiny-pixel", "denoiser.kwargs.num_blocks", 1000, "denoiser.kwargs.num_blocks"),
    ("tiny-pixel", "denoiser.kwargs.num_cond_blocks", 11, "denoiser.kwargs.num_cond_blocks"),  # > num_blocks
    ("tiny-latent", "denoiser.kwargs.num_cond_blocks", -1, "denoiser.kwargs.num_cond_blocks"),
    ("tiny-pixel", "denoiser.kwargs.hidden_size_x", 10 ** 6, "denoiser.kwargs.hidden_size_x"),
    ("tiny-pixel", "denoiser.kwargs.nerf_mlpratio", 0, "denoiser.kwargs.nerf_mlpratio"),
    ("tiny-pixel", "denoiser.kwargs.nerf_mlpratio", 2.5, "denoiser.kwargs.nerf_mlpratio"),
    ("tiny-pixel", "denoiser.kwargs.codebook_bits", 17, "denoiser.kwargs.codebook_bits"),
    ("tiny-pixel", "denoiser.kwargs.codebook_bits", 0, "denoiser.kwargs.codebook_bits"),
    ("tiny-pixel", "denoiser.kwargs.ds", 64, "denoiser.kwargs.ds"),
    ("tiny-pixel", "denoiser.kwargs.ds", "32", "denoiser.kwargs.ds"),
    ("tiny-pixel", "denoiser.kwargs.up2x", 1, "denoiser.kwargs.up2x"),
    ("tiny-pixel", "denoiser.kwargs.encoder_width", 48, "denoiser.kwargs.encoder_width"),
    ("tiny-pixel", "denoiser.kwargs.encoder_width", 4096, "denoiser.kwargs.encoder_width"),
    ("tiny-pixel", "denoiser.kwargs.in_channels", 4, "denoiser.kwargs.in_channels"),
    ("tiny-latent", "denoiser.kwargs.in_channels", 3, "denoiser.kwargs.in_channels"),
    ("tiny-pixel", "denoiser.kwargs.patch_size", 8, "denoiser.kwargs.patch_size"),
    ("tiny-latent", "denoiser.kwargs.patch_size", 16, "denoiser.kwargs.patch_size"),
    ("tiny-latent", "denoiser.kwargs.hidden_size_x", 64, "'hidden_size_x'"),  # a PixNerDiT argument
    ("tiny-pixel", "denoiser.kwargs.dropout", 0.1, "'dropout'"),
    ("tiny-pixel", "denoiser.kwargs.rope_step", -1, "denoiser.kwargs.rope_step"),
    ("tiny-pixel", "denoiser.kwargs.rope_step", 0, "denoiser.kwargs.rope_step"),
    ("tiny-pixel", "denoiser.kwargs.rope_step", NAN, "denoiser.kwargs.rope_step"),
    ("tiny-pixel", "denoiser.kwargs.rope_step", 1e300, "denoiser.kwargs.rope_step"),
    ("tiny-pixel", "denoiser.kwargs.rope_step", True, "denoiser.kwargs.rope_step"),
    ("tiny-pixel", "denoiser.kwargs.rope_step", "1", "denoiser.kwargs.rope_step"),
    ("tiny-pixel", "latent", {"vae_preset": "tiny", "vae_file": None, "scale": 1.0}, "latent"),
    ("tiny-latent", "latent", None, "latent"),
    ("tiny-latent", "latent", DELETE, "latent: missing"),
    ("tiny-latent", "latent.vae_preset", "huge", "latent.vae_preset"),
    ("tiny-latent", "latent.vae_preset", ["tiny"], "latent.vae_preset"),
    ("tiny-latent", "latent.vae_file", "../vae.safetensors", "latent.vae_file"),
    ("tiny-latent", "latent.vae_file", "/etc/passwd", "latent.vae_file"),
    ("tiny-latent", "latent.vae_file", "sub/vae.safetensors", "latent.vae_file"),
    ("tiny-latent", "latent.vae_file", "..\\vae.safetensors", "latent.vae_file"),
    ("tiny-latent", "latent.vae_file", "..", "latent.vae_file"),
    ("tiny-latent", "latent.vae_file", ".", "latent.vae_file"),
    ("tiny-latent", "latent.vae_file", "", "latent.vae_file"),
    ("tiny-latent", "latent.vae_file", "vae\x00.safetensors", "latent.vae_file"),
    ("tiny-latent", "latent.vae_file", "v" * 256, "latent.vae_file"),
    ("tiny-latent", "latent.vae_file", "model.safetensors", "latent.vae_file"),
    ("tiny-latent", "latent.vae_file", 7, "latent.vae_file"),
    ("tiny-latent", "latent.scale", 0, "latent.scale"),
    ("tiny-latent", "latent.scale", -0.18, "latent.scale"),
    ("tiny-latent", "latent.scale", NAN, "latent.scale"),
    ("tiny-latent", "latent.scale", 1e-300, "latent.scale"),
    ("tiny-latent", "latent.scale", "0.18215", "latent.scale"),
    ("tiny-latent", "latent.scale", DELETE, "scale"),
    ("tiny-latent", "latent.vae_path", "/x", "'vae_path'"),
    ("tiny-pixel", "sampling", [], "sampling"),
    ("tiny-pixel", "sampling.sampler", "euler_sde", "sampling.sampler"),
    ("tiny-pixel", "sampling.sampler", "ddim", "sampling.sampler"),
    ("tiny-pixel", "sampling.sampler", None, "sampling.sampler"),
    ("tiny-pixel", "sampling.steps", 0, "sampling.steps"),
    ("tiny-pixel", "sampling.steps", MAX_STEPS + 1, "sampling.steps"),
    ("tiny-pixel", "sampling.steps", 25.0, "sampling.steps"),
    ("tiny-pixel", "sampling.steps", True, "sampling.steps"),
    ("tiny-pixel", "sampling.steps", DELETE, "steps"),
    ("tiny-pixel", "sampling.cfg", NAN, "sampling.cfg"),
    ("tiny-pixel", "sampling.cfg", INF, "sampling.cfg"),
    ("tiny-pixel", "sampling.cfg", -1e6, "sampling.cfg"),
    ("tiny-pixel", "sampling.cfg", "3", "sampling.cfg"),
    ("tiny-pixel", "sampling.guidance_interval", [0.5, 0.1], "sampling.guidance_interval"),
    ("tiny-pixel", "sampling.guidance_interval", [0.1, 0.1], "sampling.guidance_interval"),
    ("tiny-pixel", "sampling.guidance_interval", [0.1], "sampling.guidance_interval"),
    ("tiny-pixel", "sampling.guidance_interval", [0.1, 1.5], "sampling.guidance_interval"),
    ("tiny-pixel", "sampling.guidance_interval", [-0.1, 1.0], "sampling.guidance_interval"),
    ("tiny-pixel", "sampling.guidance_interval", [0.1, NAN], "sampling.guidance_interval"),
    ("tiny-pixel", "sampling.guidance_interval", [False, True], "sampling.guidance_interval"),
    ("tiny-pixel", "sampling.guidance_interval", {"lo": 0.1}, "sampling.guidance_interval"),
    ("tiny-pixel", "sampling.last_step", 0, "sampling.last_step"),
    ("tiny-pixel", "sampling.last_step", 1, "sampling.last_step"),
    ("tiny-pixel", "sampling.last_step", NAN, "sampling.last_step"),
    ("tiny-pixel", "sampling.timeshift", 0, "sampling.timeshift"),
    ("tiny-pixel", "sampling.timeshift", -1.0, "sampling.timeshift"),
    ("tiny-pixel", "sampling.timeshift", INF, "sampling.timeshift"),
    ("tiny-pixel", "sampling.timeshift", 1e39, "sampling.timeshift"),  # overflows float32: NaN times
    ("tiny-pixel", "sampling.sde_scale", 1.0, "'sde_scale'"),
    ("tiny-pixel", "fingerprint", DELETE, "fingerprint: missing"),
    ("tiny-pixel", "fingerprint", FINGERPRINT.upper(), "fingerprint"),
    ("tiny-pixel", "fingerprint", FINGERPRINT[:-1], "fingerprint"),
    ("tiny-pixel", "fingerprint", FINGERPRINT + "\n", "fingerprint"),
    ("tiny-pixel", "fingerprint", 123, "fingerprint"),
    ("tiny-pixel", "checksums", ["model.safetensors"], "checksums"),
    ("tiny-pixel", "checksums", {"../model.safetensors": FINGERPRINT}, "checksums"),
    ("tiny-pixel", "checksums", {"model.safetensors": "abc"}, "checksums['model.safetensors']"),
]


@pytest.mark.parametrize("preset, path, value, expected", MALFORMED,
                         ids=[f"{i}-{path}" for i, (_, path, _, _) in enumerate(MALFORMED)])
def test_malformed_field_is_refused(preset, path, value, expected):
    message = refused(_set(make_config(preset), path, value), expected)
    assert message.endswith("or fix the field") or message.endswith("or fix these fields")
    assert FIX in message


def test_format_and_version():
    assert CONFIG_FORMAT == "cod-model" and CONFIG_VERSION >= 1
    message = refused(_set(make_config(), "format", "something-else"), "not a cod model config", "'something-else'")
    assert FIX in message
    refused(_set(make_config(), "format", DELETE), "not a cod model config")
    # A newer format may differ in every other field: only the upgrade advice is given.
    config = _set(make_config(), "format_version", CONFIG_VERSION + 1)
    config["sampling"] = "whatever a future cod writes"
    message = refused(config, f"format version {CONFIG_VERSION + 1}", "upgrade cod")
    assert "sampling" not in message
    for not_an_object in ([], "cod-model", 3, None, True):
        refused(not_an_object, "not an object")


def test_huge_models_are_refused_before_building():
    config = make_config("pixel-xl")
    config["denoiser"]["kwargs"].update(hidden_size=4096, num_groups=32, num_blocks=128, num_cond_blocks=64,
                                        hidden_size_x=256, nerf_mlpratio=8, encoder_width=512, ds=128)
    refused(config, "denoiser.kwargs", "billion parameters")
    config = make_config("latent-xl")  # every size below its own bound, together too big
    config["denoiser"]["kwargs"].update(hidden_size=4096, num_groups=32, num_blocks=128, num_cond_blocks=100)
    refused(config, "billion parameters")


def test_all_errors_in_one_message():
    config = make_config("tiny-latent")
    config["sampling"].update(sampler="euler_sde", cfg=NAN, timeshift=0)
    config["latent"]["vae_file"] = "/etc/passwd"
    config["denoiser"]["kwargs"].update(hidden_size=10 ** 7, extra_arg=1)
    del config["fingerprint"]
    message = refused(config, "sampling.sampler", "sampling.cfg", "sampling.timeshift", "latent.vae_file",
                      "denoiser.kwargs.hidden_size", "'extra_arg'", "fingerprint")
    assert message.endswith("or fix these fields") and message.count("; ") >= 7


def test_long_values_are_shortened_in_messages():
    config = make_config()
    config["preset"] = "x" * 100_000
    config["denoiser"]["kwargs"]["hidden_size"] = list(range(10_000))
    for i in range(1000):
        config["denoiser"]["kwargs"][f"unknown{i}"] = i
    config["sampling"]["steps"] = 10 ** 1000
    message = refused(config, "preset", "denoiser.kwargs.hidden_size", "sampling.steps")
    assert len(message) < 3000


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------
def test_parse_accepts_a_written_config_and_a_bom():
    config = make_config()
    data = json.dumps(config, indent=2).encode()
    assert parse_config_bytes(data, SOURCE) == config
    assert parse_config_bytes(b"\xef\xbb\xbf" + data, SOURCE) == config


@pytest.mark.parametrize("data, words", [
    (b'{"format": "cod-model", "preset": "\xff"}', ["UTF-8"]),
    (b"\xfe\xff\x00{", ["UTF-8"]),
    (b'{"format": "cod-model",}', ["not valid JSON"]),
    (b"", ["not valid JSON"]),
    (b'{"format": ', ["not valid JSON"]),
    (b"[" * 100_000, ["levels deep"]),
    (b'{"a": ' + b'{"b": ' * 5_000 + b"1" + b"}" * 5_001, ["levels deep"]),
    (b"[" * 10 ** 6, ["levels deep"]),
    (b'{"sampling": {"cfg": NaN}}', ["NaN"]),
    (b'{"sampling": {"cfg": Infinity}}', ["Infinity"]),
    (b'{"sampling": {"cfg": -Infinity}}', ["Infinity"]),
    (b'{"sampling": {"cfg": 1e999}}', ["1e999"]),
    (b'{"steps": ' + b"9" * 5000 + b"}", ["5000-digit integer"]),
    (b'{"fingerprint": "a", "fingerprint": "b"}', ["'fingerprint'", "twice"]),
    (b'{"denoiser": {"kwargs": {"ds": 32, "ds": 128}}}', ["'ds'", "twice"]),
    (b"[]", ["array", "not an object"]),
    (b'"cod-model"', ["string", "not an object"]),
    (b"3", ["number", "not an object"]),
    (b"null", ["null", "not an object"]),
    (b" " * (MAX_CONFIG_BYTES + 1), ["larger than any model config"]),
])
def test_parse_refuses(data, words):
    parse_refused(data, *words)


def test_parse_is_linear_on_adversarial_strings():
    """Strings full of escaped quotes, unterminated at the end: a backtracking scan would take minutes (no timing
    assertion here: a regression shows as a test that does not finish)."""
    parse_refused(b'"' + b'\\"' * 300_000, "not valid JSON")
    parse_refused(b'"a' * 400_000 + b"\\", "not valid JSON")


def test_brackets_inside_strings_do_not_count_as_nesting():
    config = make_config()
    config["notes"] = "[" * 1000 + "\\\"{" * 100
    assert parse_config_bytes(json.dumps(config).encode(), SOURCE) == config


# ---------------------------------------------------------------------------------------------------------------
# What the bounds rest on
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_count_matches_the_built_model(name):
    for ds, up2x in ((32, True), (128, True), (128, False), (4, True), (8, True), (16, False)):
        preset = get_preset(name, ds=ds, up2x=up2x, bits=6)
        with torch.device("meta"):
            net = build_denoiser(build_config(preset, name))
        assert parameter_count(preset.denoiser_class, preset.denoiser) == sum(p.numel() for p in net.parameters())


def test_sampling_bounds_give_finite_increasing_grids():
    """At the corners of the allowed last_step x timeshift box, every sampler and step count gives a strictly
    increasing, finite time grid and finite Adams coefficients (just outside, 0/0 and repeated nodes appear)."""
    from cod.diffusion.samplers import build_sampler

    for last_step in LAST_STEP_RANGE:
        for timeshift in TIMESHIFT_RANGE:
            for steps in (1, 2, 3, 4, 25, MAX_STEPS - 1, MAX_STEPS):
                for name in ("adam2", "adam3", "adam4", "euler"):
                    sampler = build_sampler(name, steps=steps, last_step=last_step, timeshift=timeshift)
                    tau = sampler.timesteps()
                    assert torch.isfinite(tau).all() and (tau[1:] > tau[:-1]).all(), (name, steps, last_step,
                                                                                       timeshift)
                    if name != "euler":
                        assert all(math.isfinite(c) for row in sampler.coefficients() for c in row)


def test_deterministic_samplers_are_the_codec_samplers():
    from cod.codec.api import CODEC_SAMPLERS
    from cod.diffusion.samplers import SAMPLERS

    assert set(DETERMINISTIC_SAMPLERS) == set(CODEC_SAMPLERS) and set(DETERMINISTIC_SAMPLERS) <= set(SAMPLERS)


def test_imports_stay_below_the_model():
    """cod.model imports this module, so it must not import cod.model; nor the product layer (cod.codec) or
    training: the engine does not depend on them. Only constants come from the networks' modules."""
    import ast
    import cod.model_config as module

    tree = ast.parse(open(module.__file__, encoding="utf-8").read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    ours = {name for name in imported if name.split(".")[0] == "cod"}
    assert ours <= {"cod.errors", "cod.models.condition_codec", "cod.models.presets", "cod.models.vae"}, ours
