"""One-step CoD (PixNerDiT at t = 0) against the official one-step fixtures (shared/fixtures/one-step-reference).

Tolerances from the fixtures' README.json: integers exact, floats max|a-b| <= 1e-4 max(1, max|ref|), uint8 images
off by at most 1 on at most 0.05% of the pixels.
"""
from __future__ import annotations

import math

import pytest
import torch

from cod.codec.bitpack import pack_indices
from cod.compat.fill_rule import apply_fill_rule
from cod.compat.official_format import write_official
from cod.models.layers import rope_2d
from cod.models.onestep import FoldedDiTBlock, OneStepCoD, model_to_uint8
from conftest import ONESTEP_FIXTURES, fixture_manifest, fixture_tensors, max_rel_err

TOL = 1e-4
VARIANTS = ("onestep_cod_ds32_b4", "onestep_cod_ds16_b8", "onestep_cod_ds8_b8")
TAGS = {"predx_n1": ("x", 1.0), "predx_n0": ("x", 0.0), "predv_n1": ("v", 1.0)}


def build(variant: str, **kwargs) -> OneStepCoD:
    m = fixture_manifest(variant, ONESTEP_FIXTURES)
    return apply_fill_rule(OneStepCoD(**m["constructor_kwargs"], **kwargs)).eval()


@pytest.fixture(scope="module", params=VARIANTS)
def case(request):
    variant = request.param
    m, T = fixture_manifest(variant, ONESTEP_FIXTURES), fixture_tensors(variant, ONESTEP_FIXTURES)
    live = build(variant)
    folded = build(variant).fold_modulation()
    return variant, m, T, live, folded, T["in.y_u8"].float() / 255  # the one-step CLIs do not bf16-round y


def assert_u8_close(actual: torch.Tensor, expected: torch.Tensor):
    diff = (actual.int() - expected.int()).abs()
    assert diff.max().item() <= 1
    assert (diff > 0).sum().item() <= math.ceil(0.0005 * diff.numel())


def test_state_dict_layout_fill_rule_and_folded_layout(case):
    _, m, _, live, folded, _ = case
    sd = live.state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == [(e["key"], e["shape"]) for e in m["state_dict"]]
    for e in m["state_dict"]:
        assert sd[e["key"]].double().sum().item() == pytest.approx(e["sum"], rel=1e-6, abs=1e-6), e["key"]
        assert sd[e["key"]].flatten()[0].item() == pytest.approx(e["first"], rel=1e-6, abs=1e-7), e["key"]
    assert sum(p.numel() for p in live.parameters()) == m["num_params"]
    assert [[k, list(v.shape)] for k, v in folded.state_dict().items()] == m["cached_state_dict_keys"]
    assert folded.is_folded and not live.is_folded
    assert folded.fold_modulation() is folded  # idempotent


def test_folded_block_equals_live_block(case):
    _, m, T, live, folded, _ = case
    x = T["cache.block0_in"]
    hp, wp = m["token_grid"]
    assert x.shape[1] == hp * wp
    rope = rope_2d(hp, wp, live.hidden_size // live.num_groups)
    with torch.no_grad():
        mine_live = live.blocks[0](x, live.time_conditioning(), rope)
        mine_folded = folded.blocks[0](x, None, rope)
    assert isinstance(folded.blocks[0], FoldedDiTBlock)
    assert torch.equal(T["cache.block0_cached"], T["cache.block0_uncached"])
    assert max_rel_err(mine_live, T["cache.block0_uncached"]) < TOL
    assert torch.equal(mine_folded, mine_live)  # folding is exact on CPU float32, as in the release


def test_codec_indices_bitstream_and_cod_file(case):
    _, m, T, live, _, y = case
    H, W = m["image_size"]
    idx = live.codec.encode_indices(y[:1])
    assert list(idx.shape[-2:]) == m["index_grid"]
    assert torch.equal(idx.flatten(), T["codec.indices"])
    payload = pack_indices(idx.flatten().numpy(), live.codec.bits)
    assert payload == bytes(T["codec.bitstream"].tolist())
    assert len(payload) == m["codec"]["bitstream_len"]
    assert live.codec.bits / live.codec.ds ** 2 == pytest.approx(m["codec"]["bpp_nominal"])
    # One-step CoD writes the base CoD header (uint16 LE H, then W)
    assert write_official(payload, H, W) == bytes(T["codec.cod_file"].tolist())
    with torch.no_grad():
        assert max_rel_err(live.codec.decode_indices(idx), T["codec.decompress"]) < TOL


def test_rectangular_header():
    variant = "onestep_cod_ds32_b4"
    m, T = fixture_manifest(variant, ONESTEP_FIXTURES), fixture_tensors(variant, ONESTEP_FIXTURES)
    net = build(variant)
    H, W = m["codec"]["rect_image_hw"]
    idx = net.codec.encode_indices(T["rect.y_u8"].float() / 255)
    payload = pack_indices(idx.flatten().numpy(), 4)
    assert payload == bytes(T["rect.bitstream"].tolist())
    cod = write_official(payload, H, W)
    assert cod == bytes(T["rect.cod_file"].tolist()) and list(cod[:4]) == m["codec"]["rect_header_bytes"]


@pytest.mark.parametrize("tag", TAGS)
def test_one_step_evaluate(case, tag):
    _, _, T, live, folded, y = case
    pred, level = TAGS[tag]
    expected = T[f"onestep.{tag}.evaluate"]
    for net in (folded, live):
        net.pred, net.noise_level = pred, level
        with torch.no_grad():
            out = net.inference(y[:1], noise=T["onestep.noise"])
        assert max_rel_err(out, expected) < TOL, net.is_folded
    assert_u8_close(model_to_uint8(out), T[f"onestep.{tag}.evaluate_u8"])


def test_one_step_decompress_and_pred_v_at_zero_noise(case):
    _, m, T, _, folded, y = case
    folded.pred, folded.noise_level = "x", 0.0
    idx = T["codec.indices"].reshape(1, *m["index_grid"])
    with torch.no_grad():
        out = folded.decode_indices(idx, noise=T["onestep.noise"])
        assert max_rel_err(out, T["onestep.predx_n0.decompress"]) < TOL
        folded.pred = "v"  # at noise level 0 the input is zero, so pred v adds nothing (fixture: equal to pred x)
        assert torch.equal(folded.decode_indices(idx, noise=T["onestep.noise"]), out)
    # without a given noise tensor the draw happens internally; at level 0 it cannot matter
    with torch.no_grad():
        assert torch.equal(folded.decode_indices(idx), out)


def test_folded_model_accepts_any_batch():
    net = build("onestep_cod_ds8_b8").fold_modulation()
    T = fixture_tensors("onestep_cod_ds8_b8", ONESTEP_FIXTURES)
    y = (T["in.y_u8"].float() / 255).repeat(2, 1, 1, 1)
    with torch.no_grad():
        out = net.inference(y)
    assert out.shape == (2, 3, 64, 64)
    assert max_rel_err(out[1:], T["onestep.predx_n0.evaluate"]) < TOL


def test_rejects_unknown_prediction():
    with pytest.raises(ValueError):
        OneStepCoD(pred="eps", hidden_size=64, num_groups=4, num_blocks=2, num_cond_blocks=1, hidden_size_x=8)
