"""CoD-Lite (DConv + its codec + one-step decode) against the official one-step fixtures.

Tolerances from the fixtures' README.json: integers exact, floats max|a-b| <= 1e-4 max(1, max|ref|), uint8 images
off by at most 1 on at most 0.05% of the pixels.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from cod.codec.bitpack import pack_indices, unpack_indices
from cod.compat.fill_rule import apply_fill_rule
from cod.compat.official_format import read_official_lite, write_official_lite
from cod.models.condition_codec import SpatialAttention
from cod.models.dconv import DConv
from cod.models.layers import timestep_features
from cod.models.onestep import FoldedDiCoBlock, OneStepCoDLite, model_to_uint8
from conftest import ONESTEP_FIXTURES, fixture_manifest, fixture_tensors, max_rel_err
from test_onestep_cod import TAGS, assert_u8_close

TOL = 1e-4
VARIANTS = ("lite_ds32_b4_light", "lite_ds32_b4_full", "lite_ds32_b8_light", "lite_ds16_b4_light",
            "lite_ds16_b8_light", "lite_ds8_b8_light", "lite_ds4_b8_light")


def build(variant: str) -> OneStepCoDLite:
    m = fixture_manifest(variant, ONESTEP_FIXTURES)
    return apply_fill_rule(OneStepCoDLite(**m["constructor_kwargs"])).eval()


@pytest.fixture(scope="module", params=VARIANTS)
def case(request):
    variant = request.param
    m, T = fixture_manifest(variant, ONESTEP_FIXTURES), fixture_tensors(variant, ONESTEP_FIXTURES)
    return variant, m, T, build(variant), T["in.y_u8"].float() / 255


def test_state_dict_layout_and_fill_rule(case):
    _, m, _, net, _ = case
    sd = net.state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == [(e["key"], e["shape"]) for e in m["state_dict"]]
    for e in m["state_dict"]:
        assert sd[e["key"]].double().sum().item() == pytest.approx(e["sum"], rel=1e-6, abs=1e-6), e["key"]
    assert sum(p.numel() for p in net.parameters()) == m["num_params"]
    codec = net.codec
    assert sum(p.numel() for p in codec.encoder.parameters()) == m["num_params_codec_encoder"]
    assert sum(p.numel() for p in codec.decoder.parameters()) == m["num_params_codec_decoder"]
    assert codec.bottleneck.embedding.weight.numel() == m["num_params_codebook"]


def test_forward_and_intermediates(case):
    _, m, T, net, y = case
    assert not net.is_folded
    seen = {}

    def keep(name, first4=False):
        return lambda _m, _i, o: seen.__setitem__(name, o[:4] if first4 else o)

    hooks = [net.codec.encoder.register_forward_hook(keep("codec_z")),
             net.s_embedder.proj1.register_forward_hook(keep("s_proj1")),
             net.s_embedder.register_forward_hook(keep("s_embed")),
             net.x_embedder.register_forward_hook(keep("x_embed_first4", True)),
             net.dec_net.input_proj.register_forward_hook(keep("dec_in_first4", True)),
             net.dec_net.cond_embed.register_forward_hook(keep("dec_cond_first4", True)),
             net.final_layer.register_forward_hook(keep("final_first4", True))]
    hooks += [b.register_forward_hook(keep(f"s_block{i}")) for i, b in enumerate(net.blocks)]
    hooks += [b.register_forward_hook(keep(f"dec_block{j}_first4", True)) for j, b in enumerate(net.dec_net.res_blocks)]
    with torch.no_grad():
        out, cond, res = net(T["in.x_t"], T["in.t"], y, None, return_codec_res=True)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        x_pred = net(T["in.x_t"], T["in.t"], None, cond, return_pred=True)[0]
    assert max_rel_err(out, T["fwd.out"]) < TOL  # velocity (x - x_t) / max(1 - t, 0.05), t = 0.98 clamps
    assert max_rel_err(x_pred, T["fwd.x_pred"]) < TOL
    assert max_rel_err(cond, T["fwd.cond"]) < TOL
    assert torch.equal(res["indices"], T["fwd.vq_indices"])
    assert res["vq_loss"].item() == pytest.approx(T["fwd.vq_loss"].item(), rel=1e-4)
    assert max_rel_err(timestep_features(T["in.t"], max_period=10000.0), T["fwd.t_freq"]) < TOL
    assert max_rel_err(net.t_embedder(T["in.t"]), T["fwd.t_emb"]) < TOL
    for name, value in seen.items():
        expected = T[f"fwd.{name}"]
        actual = value if name.endswith("first4") or name == "codec_z" else value[:1]
        assert max_rel_err(actual, expected) < TOL, name
    assert len(seen) == 7 + len(net.blocks) + len(net.dec_net.res_blocks)


def test_codec_indices_bitstream_cod_file_and_decompress(case):
    _, m, T, net, y = case
    H, W = m["image_size"]
    idx = net.codec.encode_indices(y[:1])
    assert list(idx.shape[-2:]) == m["index_grid"]
    assert torch.equal(idx.flatten(), T["codec.indices"])
    payload = pack_indices(idx.flatten().numpy(), net.codec.bits)
    assert payload == bytes(T["codec.bitstream"].tolist()) and len(payload) == m["codec"]["bitstream_len"]
    assert net.codec.bpp == pytest.approx(m["codec"]["bpp_actual"])
    cod = write_official_lite(payload, H, W)
    assert cod == bytes(T["codec.cod_file"].tolist())
    h, w, data = read_official_lite(cod)
    back = torch.from_numpy(unpack_indices(data, idx.numel(), net.codec.bits)).reshape(1, h // net.codec.ds, -1)
    with torch.no_grad():
        assert max_rel_err(net.codec.decode_indices(back), T["codec.decompress"]) < TOL


@pytest.mark.parametrize("variant", ["lite_ds32_b4_light", "lite_ds16_b8_light"])
def test_rectangular_cod_file_is_width_first(variant):
    m, T = fixture_manifest(variant, ONESTEP_FIXTURES), fixture_tensors(variant, ONESTEP_FIXTURES)
    net = build(variant)
    H, W = m["rect_example"]["image_hw"]
    idx = net.codec.encode_indices(T["rect.y_u8"].float() / 255)
    assert list(idx.shape[-2:]) == m["rect_example"]["index_grid"]
    cod = write_official_lite(pack_indices(idx.flatten().numpy(), net.codec.bits), H, W)
    assert cod == bytes(T["rect.cod_file"].tolist()) and list(cod[:4]) == m["rect_example"]["header_bytes"]
    assert read_official_lite(cod)[:2] == (H, W)


@pytest.mark.parametrize("tag", TAGS)
def test_one_step_evaluate_folded_and_live(case, tag):
    variant, _, T, net, y = case
    net.pred, level = TAGS[tag]
    net.noise_level = level
    with torch.no_grad():
        live = net.inference(y[:1], noise=T["onestep.noise"])
        folded = build(variant).fold_modulation()
        folded.pred, folded.noise_level = net.pred, level
        out = folded.inference(y[:1], noise=T["onestep.noise"])
    net.pred = "x"
    assert torch.equal(out, live)  # folding is exact on CPU float32, as in the release
    assert max_rel_err(out, T[f"onestep.{tag}.evaluate"]) < TOL
    assert_u8_close(model_to_uint8(out), T[f"onestep.{tag}.evaluate_u8"])


def test_one_step_decompress_and_folded_block(case):
    variant, m, T, _, _ = case
    net = build(variant).fold_modulation()
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == m["cached_state_dict_keys"]
    idx = T["codec.indices"].reshape(1, *m["index_grid"])
    with torch.no_grad():
        out = net.decode_indices(idx, noise=T["onestep.noise"])
        assert max_rel_err(out, T["onestep.predx_n0.decompress"]) < TOL
        assert isinstance(net.blocks[0], FoldedDiCoBlock)
        block = net.blocks[0](T["cache.block0_in"])
    assert max_rel_err(block, T["cache.block0_cached"]) < TOL
    # unlike the release's cache (batch 1 only), the folded vectors broadcast over any batch
    with torch.no_grad():
        two = net.decode_indices(idx.repeat(2, 1, 1))
    assert max_rel_err(two[1:], out) < 1e-4


def test_windowed_codec_attention_on_a_large_grid():
    variant = "lite_ds4_b8_light"
    T = fixture_tensors(variant, ONESTEP_FIXTURES)
    net = build(variant)
    y = T["win.y_u8"].float() / 255
    idx = net.codec.encode_indices(y)
    assert idx.shape[-2:] == (36, 40)
    assert torch.equal(idx.flatten(), T["win.indices"])
    assert pack_indices(idx.flatten().numpy(), 8) == bytes(T["win.bitstream"].tolist())
    with torch.no_grad():
        assert max_rel_err(net.codec.decode_indices(idx), T["win.decompress"]) < TOL
        out = net.inference(y, noise=torch.zeros_like(y))
    assert max_rel_err(out, T["win.onestep_predx_n0_evaluate_uncached"]) < TOL


def salted_fill(module: torch.nn.Module, salt: str) -> torch.nn.Module:
    with torch.no_grad():
        module.load_state_dict({k: salted_value(salt, k, tuple(v.shape)) for k, v in module.state_dict().items()})
    return module


def salted_value(salt: str, key: str, shape):
    """The fixtures' fill rule with seed crc32(salt + key); the scale still follows the key's shape and name."""
    g = torch.Generator().manual_seed(zlib.crc32((salt + key).encode("utf-8")))
    r = torch.randn(shape, generator=g, dtype=torch.float32)
    if len(shape) >= 2:
        return r * (1 / math.sqrt(math.prod(shape[1:])))
    return r * 0.1 + 1 if key.endswith("weight") else r * 0.02


def test_attention_block_unit_windowed_and_global():
    m, T = fixture_manifest("lite_attnblock_unit", ONESTEP_FIXTURES), fixture_tensors("lite_attnblock_unit", ONESTEP_FIXTURES)
    for case, spec in m["cases"].items():
        attn = salted_fill(SpatialAttention(32, window=spec["patch_size"]), "attn.").eval()
        for e in m["state_dict"]:
            assert attn.state_dict()[e["key"]].double().sum().item() == pytest.approx(e["sum"], rel=1e-6, abs=1e-6)
        with torch.no_grad():
            assert max_rel_err(attn(T[f"{case}.x"]), T[f"{case}.eval"]) < TOL, case
            if f"{case}.train" in T:
                assert max_rel_err(attn.train()(T[f"{case}.x"]), T[f"{case}.train"]) < TOL, case


def test_dconv_rejects_bad_configs():
    with pytest.raises(ValueError):
        DConv(pred="eps", hidden_size=32, hidden_size_x=8, num_blocks=2, num_cond_blocks=1)
    with pytest.raises(ValueError):
        DConv(up2x=False, hidden_size=32, hidden_size_x=8, num_blocks=2, num_cond_blocks=1)
