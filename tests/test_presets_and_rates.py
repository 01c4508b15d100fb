"""Presets build with the documented sizes, and every rate of the table gives a decoder whose condition grid
matches the token grid, with the real bits per pixel."""
from __future__ import annotations

import pytest
import torch

from cod.model import build_config, build_denoiser
from cod.models.condition_codec import ConditionCodec, bits_per_pixel
from cod.models.presets import PRESETS, get_preset, rate_table


@pytest.mark.parametrize("name,params_m", [("pixel-xl", None), ("latent-xl", None), ("latent-xl-64bit", None)])
def test_released_presets_match_the_spec_table(name, params_m):
    preset = PRESETS[name]
    with torch.device("meta"):
        net = build_denoiser(build_config(preset, name))
    kw = preset.denoiser
    assert kw["hidden_size"] == 1152 and kw["num_groups"] == 16 and kw["up2x"] is True
    if preset.family == "pixel":
        assert (kw["patch_size"], kw["num_blocks"], kw["num_cond_blocks"], kw["hidden_size_x"]) == (16, 30, 26, 64)
        assert net.blocks[-1].param_generator1[0].weight.shape == (2 * 64 * 64 * 2, 1152)
    else:
        assert (kw["patch_size"], kw["num_blocks"], kw["num_cond_blocks"]) == (2, 28, 22)
    assert net.blocks[0].mlp.w1.weight.shape == (3072, 1152)  # F = floor(2 * 4D / 3)


def test_real_bpp_of_released_rates():
    assert bits_per_pixel(32, 4, True) == 4 / 32 ** 2 == 0.00390625
    assert bits_per_pixel(128, 4, True) * 512 * 512 == 64
    assert bits_per_pixel(32, 4, False) == 4 / 16 ** 2  # stage-1 "0.0039" configs really spend 0.0156 bpp


@pytest.mark.parametrize("row", rate_table(), ids=lambda r: f"ds{r['ds']}-b{r['bits']}-up{int(r['up2x'])}")
def test_every_rate_maps_indices_to_the_token_grid(row):
    codec = ConditionCodec(hidden_size=32, ds=row["ds"], bits=row["bits"], up2x=row["up2x"], encoder_width=32)
    H, W = 256, 128
    y = torch.rand(1, 3, H, W)
    with torch.no_grad():
        idx = codec.encode_indices(y)
        assert idx.shape[1:] == (H // row["index_stride"], W // row["index_stride"])
        assert int(idx.max()) < 2 ** row["bits"]
        cond = codec.decode_indices(idx)
    assert cond.shape == (1, 32, H // 16, W // 16)
    assert codec.bpp == pytest.approx(row["bits"] * idx.numel() / (H * W))


def test_get_preset_rejects_unknown_names_and_rates():
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("pixel-xxl")
    with pytest.raises(ValueError, match="ds must be one of"):
        get_preset("tiny-pixel", ds=64)
    with pytest.raises(ValueError, match="index stride below 4"):
        get_preset("tiny-pixel", ds=4, up2x=False)


def test_tiny_presets_are_small():
    for name in ("tiny-pixel", "tiny-latent"):
        net = build_denoiser(build_config(PRESETS[name], name))
        assert sum(p.numel() for p in net.parameters()) < 5_000_000


def test_fixed_step_rope_positions_do_not_depend_on_the_image_size():
    """The release normalises RoPE positions to [0, 16] (QUIRK 2): a token's rotation depends on the image size.
    With rope_step, the top-left tokens of a small and a large grid rotate alike, and the option reaches the
    model config (so saved models keep it)."""
    import cod
    from cod.models.layers import rope_2d

    small, large = rope_2d(2, 3, 16, step=1.0), rope_2d(4, 5, 16, step=1.0)
    top_left = large.reshape(4, 5, 8, 2)[:2, :3].reshape(6, 8, 2)
    assert torch.equal(small, top_left)
    official_small, official_large = rope_2d(2, 3, 16), rope_2d(4, 5, 16)
    assert not torch.equal(official_small, official_large.reshape(4, 5, 8, 2)[:2, :3].reshape(6, 8, 2))
    model = cod.new_model("tiny-pixel", rope_step=0.5)
    assert model.config["denoiser"]["kwargs"]["rope_step"] == 0.5 and model.denoiser.rope_step == 0.5
    assert "rope_step" not in cod.new_model("tiny-pixel").config["denoiser"]["kwargs"]
