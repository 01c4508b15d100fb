"""Parity with the official CoD implementation on its golden fixtures (all four tiny variants).

Tolerances are the ones suggested in the fixtures' README.json: integers exact, forward/codec floats 1e-4,
samples 5e-4 (relative to max(1, max|ref|)), losses 1e-4 relative, gradients 2e-3 of max|ref|.
"""
from __future__ import annotations

import pytest
import torch

from cod.codec.bitpack import pack_indices, unpack_indices
from cod.compat.fill_rule import apply_fill_rule
from cod.compat.official_format import read_official, write_official
from cod.diffusion.losses import CoDObjective, TrainingDraws
from cod.diffusion.samplers import AdamsSampler, build_sampler
from cod.models.ddt import DDT
from cod.models.layers import rope_2d, timestep_features
from cod.models.pixnerdit import PixNerDiT
from conftest import VARIANTS, condition_from_u8, fixture_manifest, fixture_tensors, max_rel_err

FWD_TOL, SAMPLE_TOL, LOSS_TOL, GRAD_TOL = 1e-4, 5e-4, 1e-4, 2e-3


def build(variant: str):
    m = fixture_manifest(variant)
    cls = PixNerDiT if m["class"] == "PixNerDiT" else DDT
    return apply_fill_rule(cls(**m["constructor_kwargs"])).eval()


@pytest.fixture(scope="module", params=VARIANTS)
def case(request):
    variant = request.param
    m, T = fixture_manifest(variant), fixture_tensors(variant)
    return variant, m, T, build(variant), condition_from_u8(T["in.y_u8"])


def test_state_dict_layout_and_fill_rule(case):
    _, m, _, net, _ = case
    sd = net.state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == [(e["key"], e["shape"]) for e in m["state_dict"]]
    for e in m["state_dict"]:
        assert sd[e["key"]].double().sum().item() == pytest.approx(e["sum"], rel=1e-6, abs=1e-6), e["key"]
        assert sd[e["key"]].flatten()[0].item() == pytest.approx(e["first"], rel=1e-6, abs=1e-7), e["key"]
    assert sum(p.numel() for p in net.parameters()) == m["num_params_denoiser"]


def test_forward_and_intermediates(case):
    _, m, T, net, y = case
    captured = {}
    hooks = [net.blocks[i].register_forward_hook(lambda _m, _i, o, i=i: captured.__setitem__(f"s_block{i}", o))
             for i in range(net.num_cond_blocks)]
    hooks.append(net.y_embedder.encoder.register_forward_hook(lambda _m, _i, o: captured.__setitem__("codec_z", o)))
    with torch.no_grad():
        out, cond, res = net(T["in.x_t"], T["in.t"], y, None, return_codec_res=True)
    for h in hooks:
        h.remove()
    assert max_rel_err(out, T["fwd.out"]) < FWD_TOL
    assert max_rel_err(cond, T["fwd.cond"]) < FWD_TOL
    assert torch.equal(res["indices"], T["fwd.vq_indices"])
    assert res["vq_loss"].item() == pytest.approx(T["fwd.vq_loss"].item(), rel=1e-4)
    assert max_rel_err(captured["codec_z"], T["fwd.codec_z"]) < FWD_TOL
    for i in range(net.num_cond_blocks):
        assert max_rel_err(captured[f"s_block{i}"][:1], T[f"fwd.s_block{i}"]) < FWD_TOL, i
    assert max_rel_err(timestep_features(T["in.t"]), T["fwd.t_freq"]) < FWD_TOL
    assert max_rel_err(net.t_embedder(T["in.t"]), T["fwd.t_emb"]) < FWD_TOL
    hp, wp = m["token_grid"]
    rope = rope_2d(hp, wp, net.hidden_size // net.num_groups)
    assert max_rel_err(rope, T["fwd.rope"]) < FWD_TOL


def test_compress_bitstream_and_cod_file_exact(case):
    _, m, T, net, y = case
    H, W = m["image_size"]
    idx = net.codec.encode_indices(y[:1])
    assert torch.equal(idx.flatten(), T["codec.indices"])
    payload = pack_indices(idx.flatten().numpy(), net.codec.bits)
    assert payload == bytes(T["codec.bitstream"].tolist())
    assert len(payload) == m["codec"]["bitstream_len"]
    cod_file = write_official(payload, H, W)
    assert cod_file == bytes(T["codec.cod_file"].tolist())
    assert read_official(cod_file) == (H, W, payload)
    assert torch.equal(torch.from_numpy(unpack_indices(payload, idx.numel(), net.codec.bits)), idx.flatten())
    assert net.codec.bpp == pytest.approx(m["codec"]["actual_bits_per_pixel"])


def test_decompress_with_unconditional_condition(case):
    _, _, T, net, y = case
    uncond_idx = net.codec.encode_indices(-torch.ones_like(y[:1]))
    assert torch.equal(uncond_idx.flatten(), T["codec.uncond_indices"])
    idx = T["codec.indices"].reshape(1, *net.codec.encode_indices(y[:1]).shape[1:])
    with torch.no_grad():
        cond = torch.cat([net.codec.decode_indices(uncond_idx), net.codec.decode_indices(idx)])
    assert max_rel_err(cond, T["codec.decompress_with_uncond"]) < FWD_TOL


def test_rectangular_image_header_order():
    """The official writer stores H first; we write the same bytes and read the first field as H."""
    variant = "pixel_ds32_up2x"
    m, T = fixture_manifest(variant), fixture_tensors(variant)
    net = build(variant)
    y = condition_from_u8(T["rect.y_u8"])
    H, W = m["rect_example"]["image_hw"]
    idx = net.codec.encode_indices(y)
    assert idx.shape[-2:] == (H // 32, W // 32)
    assert torch.equal(idx.flatten(), T["rect.indices"])
    payload = pack_indices(idx.flatten().numpy(), 4)
    assert write_official(payload, H, W) == bytes(T["rect.cod_file"].tolist())
    h, w, data = read_official(bytes(T["rect.cod_file"].tolist()))
    assert (h, w) == (H, W)
    back = torch.from_numpy(unpack_indices(data, (h // 32) * (w // 32), 4)).reshape(1, h // 32, w // 32)
    with torch.no_grad():
        assert max_rel_err(net.codec.decode_indices(back), T["rect.decompress_correct_hw"]) < FWD_TOL


@pytest.mark.parametrize("sampler", ["adam2", "euler"])
def test_samplers_evaluate_and_decompress_paths(case, sampler):
    _, m, T, net, y = case
    s = build_sampler(sampler, steps=4, cfg=3.0, guidance_interval=(0.1, 1.0), last_step=0.04, timeshift=1.0,
                      exact=True)  # the release's arithmetic: both CFG halves at every step
    ref = m["sampling"][sampler]
    assert s.timesteps().tolist() == pytest.approx(ref["timesteps"], abs=0)
    steps, net_t = [], []
    hook = net.t_embedder.register_forward_hook(lambda _m, i, _o: net_t.append(i[0].tolist()))
    out = s(net, T["sample.noise"], y=y[:1], y_uncond=-torch.ones_like(y[:1]), on_step=lambda i, x: steps.append(x))
    hook.remove()
    assert net_t == ref["evaluate_net_t"]
    assert max_rel_err(out, T[f"sample.{sampler}.evaluate"]) < SAMPLE_TOL
    if sampler == "adam2":
        assert max_rel_err(torch.cat(steps), T["sample.adam2.evaluate.x_per_step"]) < SAMPLE_TOL
        assert isinstance(s, AdamsSampler)
        for mine, theirs in zip(s.coefficients(), ref["solver_coeffs"]):
            assert mine == pytest.approx(theirs, abs=1e-6)
    out = s(net, T["sample.noise"], cond=T["codec.decompress_with_uncond"])
    assert max_rel_err(out, T[f"sample.{sampler}.decompress"]) < SAMPLE_TOL


@pytest.mark.parametrize("cfg", [3.0, 1.0])
def test_skipping_the_unconditional_half_where_guidance_is_off_stays_within_the_sample_tolerance(case, cfg):
    """The default sampler computes only the conditional half where the guidance weight is 1 (the first step at
    cfg 3, every step at cfg 1): the release's samples to float rounding."""
    _, _, T, net, _ = case
    kwargs = dict(steps=4, cfg=cfg, guidance_interval=(0.1, 1.0), last_step=0.04, timeshift=1.0)
    cond = T["codec.decompress_with_uncond"]
    fast = build_sampler("adam2", **kwargs)(net, T["sample.noise"], cond=cond)
    exact = build_sampler("adam2", exact=True, **kwargs)(net, T["sample.noise"], cond=cond)
    assert max_rel_err(fast, exact) < 1e-5
    if cfg == 3.0:
        assert max_rel_err(fast, T["sample.adam2.decompress"]) < SAMPLE_TOL


@pytest.mark.parametrize("weight", [0, 1])
def test_training_losses_and_gradients(case, weight):
    variant, m, T, _, y = case
    net = build(variant).train()
    tk = m["train"]["trainer_kwargs"]
    objective = CoDObjective(m["constructor_kwargs"]["hidden_size"], tk["recon_dim"], tk["proj_hidden_dim"],
                             tk["proj_encoder_dim"], tk["align_layer"], tk["feat_loss_weight"],
                             null_condition_p=tk["null_condition_p"], lognorm_t=tk["lognorm_t"],
                             timeshift=tk["timeshift"], one_step_mse_weight=float(weight),
                             codec_loss_masking="official")
    assert [(k, list(v.shape)) for k, v in objective.state_dict().items()] == \
        [(e["key"], e["shape"]) for e in m["trainer_state_dict"]]
    apply_fill_rule(objective)
    draws = TrainingDraws(T["train.u"], T["train.t_logit"], T["train.noise"])
    losses = objective(net, T["train.x"], y, -torch.ones_like(y), T["train.target_feature"], draws)
    for key, value in m["train"][f"losses_one_step_mse_weight_{float(weight)}"].items():
        assert losses[key].item() == pytest.approx(value, rel=LOSS_TOL, abs=1e-7), key
    losses["loss"].backward()
    prefix = f"train.w{weight}.grad."
    params = {"denoiser": dict(net.named_parameters()), "trainer": dict(objective.named_parameters())}
    checked = 0
    for name, expected in T.items():
        if name.startswith(prefix):
            owner, key = name[len(prefix):].split(".", 1)
            grad = params[owner][key].grad
            assert (grad - expected).abs().max().item() <= GRAD_TOL * expected.abs().max().item(), key
            checked += 1
    assert checked == 10
