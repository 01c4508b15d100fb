"""One-step presets: the tiny presets are the fixtures' models; the released sizes have the spec's parameter counts."""
from __future__ import annotations

import pytest
import torch

from cod.models.onestep import OneStepCoD, OneStepCoDLite
from cod.models.onestep_presets import ONESTEP_PRESETS, get_onestep_preset
from conftest import ONESTEP_FIXTURES, fixture_manifest


@pytest.mark.parametrize("name,variant,ds,bits", [
    ("tiny-onestep-cod", "onestep_cod_ds32_b4", None, None), ("tiny-onestep-cod", "onestep_cod_ds8_b8", 8, 8),
    ("tiny-cod-lite", "lite_ds32_b4_light", None, None), ("tiny-cod-lite", "lite_ds4_b8_light", 4, 8)])
def test_tiny_presets_are_the_fixture_models(name, variant, ds, bits):
    m = fixture_manifest(variant, ONESTEP_FIXTURES)
    with torch.device("meta"):
        net = get_onestep_preset(name, ds=ds, bits=bits).build()
    assert [(k, list(v.shape)) for k, v in net.state_dict().items()] == [(e["key"], e["shape"]) for e in m["state_dict"]]


def test_released_cod_lite_size_matches_the_spec():
    with torch.device("meta"):
        net = ONESTEP_PRESETS["cod-lite-0.0039"].build()
    assert isinstance(net, OneStepCoDLite)
    count = lambda mod: sum(p.numel() for p in mod.parameters())
    assert round(count(net.codec.encoder) / 1e6, 2) == 28.71
    assert count(net.codec.bottleneck) == 2048
    assert round(count(net.codec.decoder) / 1e6, 2) == 13.58
    assert round((count(net) - count(net.codec)) / 1e6, 2) == 59.71
    assert round(sum(count(b.adaLN_modulation) for b in net.blocks) / 1e6, 2) == 18.63
    assert round(count(net) / 1e6, 1) == 102.0


@pytest.mark.parametrize("name", [n for n in ONESTEP_PRESETS if not n.startswith(("tiny", "mini"))])
def test_released_presets_build_with_their_rate(name):
    preset = ONESTEP_PRESETS[name]
    with torch.device("meta"):
        net = preset.build()
    assert isinstance(net, OneStepCoD if preset.member == "cod" else OneStepCoDLite)
    nominal = float(name.split("-")[2])  # the released name carries the nominal rate bits / ds^2
    assert net.codec.up2x and net.codec.bits / net.codec.ds ** 2 == pytest.approx(nominal, rel=0.01)


@pytest.mark.parametrize("name", list(ONESTEP_PRESETS))
def test_config_parameter_count_matches_the_built_model(name):
    """cod.model_config bounds a model directory's size by this count before anything is built."""
    from cod.model_config import parameter_count

    preset = ONESTEP_PRESETS[name]
    with torch.device("meta"):
        net = preset.build()
    assert parameter_count(preset.denoiser_class, preset.kwargs) == sum(p.numel() for p in net.parameters())
