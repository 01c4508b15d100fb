"""`cod import-official` for the one-step members (spec one-step.md §5): fill-rule checkpoints written in each
released layout import into model directories that reproduce the official fixtures, and every mismatch stops
with one message that names it."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

import cod
from cod.cli import main
from cod.compat.fill_rule import fill_state_dict
from cod.model import OneStepModel
from cod.models.onestep import OneStepCoD, OneStepCoDLite
from conftest import ONESTEP_FIXTURES, fixture_manifest, fixture_tensors, max_rel_err

LITE, COD = "lite_ds32_b4_light", "onestep_cod_ds32_b4"
LITE_CLASS = "finetuned_one_step_codec.main_stage1.FinetunedOneStepCoD"


def fill_weights(variant: str) -> dict[str, torch.Tensor]:
    m = fixture_manifest(variant, ONESTEP_FIXTURES)
    cls = OneStepCoDLite if variant.startswith("lite") else OneStepCoD
    with torch.device("meta"):
        net = cls(**m["constructor_kwargs"])
    return fill_state_dict(net)


def lite_files(tmp_path, container: str | None = "module", cls: str = LITE_CLASS, prefix: str = "net.",
               drop: str | None = None, extra: dict | None = None, **init_args):
    """A CoD-Lite `.pt` + `.yaml` pair as released: weights `net.*` under `container` (None: at the top level)."""
    m = fixture_manifest(LITE, ONESTEP_FIXTURES)
    state = {prefix + k: v for k, v in fill_weights(LITE).items() if k != drop}
    state.update(extra or {})
    ckpt = tmp_path / "CoD_Lite_bpp_test.pt"
    torch.save(state if container is None else {container: state, "global_step": 7}, ckpt)
    kwargs = {**m["constructor_kwargs"], "fix_encoder": True, "net_ckpt_path": None, "pretrain_prefix": "net.",
              **init_args}
    net_key = "denoiser" if cls.endswith("DConv") else "net"
    cfg = tmp_path / "CoD_Lite_bpp_test.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"latent": False, net_key: {"class_path": cls, "init_args": kwargs}}}))
    return ckpt, cfg


def onestep_cod_files(tmp_path, container: str | None = "state_dict", **init_args):
    """A One-step CoD pair: the YAML the fixture's official loader read (ckpt_prefix + model.init_args)."""
    m = fixture_manifest(COD, ONESTEP_FIXTURES)
    config = json.loads(json.dumps(m["loader"]["config"]))
    config["model"]["init_args"].update(init_args)
    state = {config["ckpt_prefix"] + k: v for k, v in fill_weights(COD).items()}
    ckpt = tmp_path / "bpp_test.pt"
    torch.save(state if container is None else {container: state}, ckpt)
    cfg = tmp_path / "bpp_test.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return ckpt, cfg


def run_import(ckpt, cfg, out, *extra) -> int:
    return main(["-q", "import-official", "--ckpt", str(ckpt), "--config", str(cfg), "--out", str(out), *extra])


def assert_fixture_parity(model, variant: str):
    """Encode gives the fixture's indices; the decompress path (one pass, folded) gives its output."""
    T = fixture_tensors(variant, ONESTEP_FIXTURES)
    y = T["in.y_u8"][:1].float() / 255
    indices = model.encode(y)
    assert torch.equal(indices.flatten(), T["codec.indices"])
    H, W = y.shape[-2:]
    out = model.sample(indices, H, W)
    assert max_rel_err(out, T["onestep.predx_n0.decompress"]) < 1e-4


def assert_noise_parity(model, variant: str):
    """A noise_level-1 model: the evaluate path with the fixture's noise draw gives its predx_n1 output."""
    T = fixture_tensors(variant, ONESTEP_FIXTURES)
    noise = T["onestep.noise"]
    y = T["in.y_u8"][: noise.shape[0]].float() / 255
    assert max_rel_err(model.denoiser.inference(y, noise=noise), T["onestep.predx_n1.evaluate"]) < 1e-4


@pytest.mark.parametrize("container", ["module", "state_dict", None])
def test_cod_lite_file_in_each_container_imports_to_fixture_parity(tmp_path, container):
    ckpt, cfg = lite_files(tmp_path, container)
    out = tmp_path / "lite"
    assert run_import(ckpt, cfg, out) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == "cod-lite" and config["denoiser"]["class"] == "OneStepCoDLite"
    assert config["preset"] == "tiny-cod-lite" and config["sampling"]["steps"] == 1
    assert "objective.safetensors" not in {p.name for p in out.iterdir()}
    card = (out / "MODEL_CARD.md").read_text()
    assert "'net.*' weights" in card and "fix_encoder" in card and "noise_level 0" in card
    model = cod.load(out)
    assert isinstance(model, OneStepModel) and model.is_folded and model.official_width_first
    assert_fixture_parity(model, LITE)


def test_one_step_cod_file_imports_with_its_ckpt_prefix(tmp_path):
    ckpt, cfg = onestep_cod_files(tmp_path)
    out = tmp_path / "onestep"
    assert run_import(ckpt, cfg, out) == 0
    model = cod.load(out)
    assert model.family == "onestep-cod" and model.config["preset"] == "tiny-onestep-cod"
    assert not model.official_width_first
    assert_fixture_parity(model, COD)


def test_one_step_cod_knows_no_module_container(tmp_path, capsys):
    ckpt, cfg = onestep_cod_files(tmp_path, container="module")  # the release's loader would find nothing either
    assert run_import(ckpt, cfg, tmp_path / "m") == 1
    err = capsys.readouterr().err
    assert "has no 'net.*' weights" in err and "module." in err


def test_one_step_cod_noise_level_from_the_yaml_is_checked_against_the_presets(tmp_path):
    ckpt, cfg = onestep_cod_files(tmp_path, container=None, noise_level=1.0)
    out = tmp_path / "noise1"
    assert run_import(ckpt, cfg, out) == 0
    model = cod.load(out)
    assert model.denoiser.noise_level == 1.0
    assert "noise_level 1.0 (the preset tiny-onestep-cod has 0.0)" in (out / "MODEL_CARD.md").read_text()
    assert_noise_parity(model, COD)


def test_cod_lite_class_default_noise_level(tmp_path):
    """The release's OneStepCoD defaults to noise_level 1 (FinetunedOneStepCoD: 0) when the YAML is silent."""
    ckpt, cfg = lite_files(tmp_path, cls="finetuned_one_step_codec.models.models.OneStepCoD")
    out = tmp_path / "m"
    assert run_import(ckpt, cfg, out) == 0
    assert cod.load(out).denoiser.noise_level == 1.0
    assert "the default of the release's OneStepCoD" in (out / "MODEL_CARD.md").read_text()


def test_cod_lite_pretraining_checkpoint_takes_the_ema_weights(tmp_path):
    weights = fill_weights(LITE)
    state = {**{"ema_denoiser." + k: v for k, v in weights.items()},
             **{"denoiser." + k: torch.zeros_like(v) for k, v in weights.items()},
             "diffusion_trainer.proj.0.0.weight": torch.ones(4, 4)}
    ckpt = tmp_path / "CoD_Lite_pretrain.pt"
    torch.save({"state_dict": state}, ckpt)
    _, cfg = lite_files(tmp_path, cls="cod.models.pixel_cnn.DConv")
    out = tmp_path / "pre"
    assert run_import(ckpt, cfg, out) == 0
    model = cod.load(out)
    assert model.denoiser.noise_level == 1.0  # what its one-step training term decoded from
    assert_noise_parity(model, LITE)
    assert run_import(ckpt, cfg, tmp_path / "raw", "--weights", "raw") == 0
    assert all(v.abs().sum() == 0 for v in cod.load(tmp_path / "raw").denoiser.blocks[0].state_dict().values())


def test_one_step_preset_without_yaml_finds_the_prefix(tmp_path):
    ckpt, _ = lite_files(tmp_path)
    out = tmp_path / "m"
    assert main(["-q", "import-official", "--ckpt", str(ckpt), "--preset", "tiny-cod-lite", "--out", str(out)]) == 0
    assert_fixture_parity(cod.load(out), LITE)


def test_mismatched_keys_are_listed_in_one_message(tmp_path, capsys):
    ckpt, cfg = lite_files(tmp_path, drop="blocks.3.conv2.weight", extra={"net.blocks.3.extra.weight": torch.ones(2)})
    out = tmp_path / "m"
    assert run_import(ckpt, cfg, out) == 1
    err = capsys.readouterr().err
    assert err.startswith("cod: error:") and "Traceback" not in err
    assert "1 missing" in err and "blocks.3.conv2.weight" in err
    assert "1 unexpected" in err and "blocks.3.extra.weight" in err
    assert not out.exists()


def test_yaml_rate_that_does_not_fit_the_weights_is_refused(tmp_path, capsys):
    ckpt, cfg = lite_files(tmp_path, ds=16)  # the weights are ds 32 (an `ada` upsampler the ds-16 codec lacks)
    assert run_import(ckpt, cfg, tmp_path / "m") == 1
    err = capsys.readouterr().err
    assert "unexpected" in err and "decoder.ada" in err


def test_folded_layout_gets_a_hint(tmp_path, capsys):
    m = fixture_manifest(LITE, ONESTEP_FIXTURES)
    folded = OneStepCoDLite(**m["constructor_kwargs"]).fold_modulation()
    ckpt = tmp_path / "folded.pt"
    torch.save({"module": {"net." + k: v for k, v in folded.state_dict().items()}}, ckpt)
    _, cfg = lite_files(tmp_path)
    assert run_import(ckpt, cfg, tmp_path / "m") == 1
    assert "folds the adaLN modulation" in capsys.readouterr().err


@pytest.mark.parametrize("init_args,message", [
    ({"net_ckpt_path": "other.pt"}, "net_ckpt_path is 'other.pt'"),
    ({"attention_window": 16}, "'attention_window' are not arguments cod knows"),
    ({"pred": "eps"}, "denoiser.kwargs.pred: got 'eps'"),
    ({"light": "yes"}, "denoiser.kwargs.light"),
    ({"up2x": False}, "denoiser.kwargs.up2x"),
    ({"noise_level": float("nan")}, "noise_level"),
])
def test_bad_yaml_settings_are_refused_in_one_line(tmp_path, capsys, init_args, message):
    ckpt, cfg = lite_files(tmp_path, **init_args)
    assert run_import(ckpt, cfg, tmp_path / "m") == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_weights_option_does_not_apply_to_one_step_files(tmp_path, capsys):
    ckpt, cfg = lite_files(tmp_path)
    assert run_import(ckpt, cfg, tmp_path / "m", "--weights", "ema") == 1
    assert "--weights does not apply" in capsys.readouterr().err


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_one_step_import_never_unpickles_code(tmp_path, capsys):
    ckpt, cfg = lite_files(tmp_path, extra={"hook": _Payload()})
    assert run_import(ckpt, cfg, tmp_path / "m") == 1
    captured = capsys.readouterr()
    assert "this must never run" not in captured.out and "refuses to unpickle" in captured.err
