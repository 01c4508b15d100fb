"""The training objective's fixed behaviour: the codec losses ignore dropped-out samples (the release's masking
bug is only reproduced on request), and the one-step term is active only with a positive weight."""
from __future__ import annotations

import pytest
import torch

from cod.diffusion.losses import CoDObjective, TrainingDraws
from cod.models.pixnerdit import PixNerDiT


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = PixNerDiT(hidden_size=64, num_groups=4, num_blocks=4, num_cond_blocks=3, hidden_size_x=16,
                    encoder_width=32)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = (x + 1) / 2
    feats = torch.randn(2, 16, 32)
    return net, x, y, feats


def objective(**kw):
    torch.manual_seed(1)
    return CoDObjective(64, (3, 16, 16), 64, proj_encoder_dim=32, align_layer=2, **kw)


def draws(x, u):
    g = torch.Generator().manual_seed(3)
    return TrainingDraws(torch.tensor(u), torch.randn(2, generator=g), torch.randn(x.shape, generator=g))


def test_correct_masking_ignores_dropped_samples(setup):
    net, x, y, feats = setup
    obj = objective()
    both = obj(net, x, y, -torch.ones_like(y), feats, draws(x, [0.5, 0.05]))  # sample 1 dropped
    # Changing the dropped sample's target must not change the codec losses.
    x2, feats2 = x.clone(), feats.clone()
    x2[1] = -x2[1]
    feats2[1] = -feats2[1]
    other = obj(net, x2, y, -torch.ones_like(y), feats2, draws(x, [0.5, 0.05]))
    for key in ("codec_cos_loss", "codec_recon_loss"):
        assert both[key].item() == pytest.approx(other[key].item(), rel=1e-6)


def test_official_masking_is_keep_fraction_times_mean(setup):
    net, x, y, feats = setup
    correct = objective(codec_loss_masking="correct")(net, x, y, -torch.ones_like(y), feats, draws(x, [0.5, 0.6]))
    official = objective(codec_loss_masking="official")(net, x, y, -torch.ones_like(y), feats, draws(x, [0.5, 0.6]))
    # with nothing dropped both conventions agree
    assert official["codec_recon_loss"].item() == pytest.approx(correct["codec_recon_loss"].item(), rel=1e-6)
    half = objective(codec_loss_masking="official")(net, x, y, -torch.ones_like(y), feats, draws(x, [0.05, 0.6]))
    full_mean = objective(codec_loss_masking="official", null_condition_p=0.0)(
        net, x, y, -torch.ones_like(y), feats, draws(x, [0.05, 0.6]))
    # p=0 drops nothing: keep fraction 1; with one of two dropped the official loss is exactly half of the mean
    # over the (dropped-out) conditions, which differ from the kept ones only in their condition image
    assert half["codec_recon_loss"].item() < full_mean["codec_recon_loss"].item() * 0.75


def test_one_step_term_only_with_weight(setup):
    net, x, y, feats = setup
    off = objective()(net, x, y, -torch.ones_like(y), feats, draws(x, [0.5, 0.6]))
    on = objective(one_step_mse_weight=1.0)(net, x, y, -torch.ones_like(y), feats, draws(x, [0.5, 0.6]))
    assert off["one_step_mse"].item() == 0
    assert on["one_step_mse"].item() > 0
    assert on["loss"].item() == pytest.approx(off["loss"].item() + on["one_step_mse"].item(), rel=1e-5)


def test_all_dropped_batch_keeps_a_graph(setup):
    net, x, y, feats = setup
    out = objective()(net, x, y, -torch.ones_like(y), feats, draws(x, [0.01, 0.02]))
    assert out["codec_cos_loss"].item() == 0 and out["codec_cos_loss"].requires_grad
    out["loss"].backward()


def test_bad_masking_mode_is_rejected():
    with pytest.raises(ValueError, match="codec_loss_masking"):
        objective(codec_loss_masking="sometimes")
