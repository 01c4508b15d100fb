"""The SD-VAE implementation: diffusers key layout, every accepted weights format (incl. the CompVis layout),
strict loading with clear messages, and CoD's latent scaling."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from cod.models.vae import (OFFICIAL_LATENT_SCALE, SD_VAE_SCALING, VAE_PRESETS, AutoencoderKL, LatentSpace,
                            load_vae, resolve_vae_path)


def test_sd_vae_layout_matches_diffusers():
    with torch.device("meta"):
        vae = AutoencoderKL(VAE_PRESETS["sd-vae"])
    sd = vae.state_dict()
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # stabilityai/sd-vae-ft-ema
    assert len(sd) == 248
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": (256, 128, 1, 1),
        "encoder.down_blocks.0.downsamplers.0.conv.weight": (128, 128, 3, 3),
        "encoder.mid_block.attentions.0.to_q.weight": (512, 512),
        "encoder.mid_block.attentions.0.to_out.0.bias": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.up_blocks.3.resnets.2.conv2.weight": (128, 128, 3, 3),
        "decoder.up_blocks.2.resnets.0.conv_shortcut.weight": (256, 512, 1, 1),
        "decoder.up_blocks.0.upsamplers.0.conv.weight": (512, 512, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any("up_blocks.3.upsamplers" in k or "down_blocks.3.downsamplers" in k for k in sd)
    assert vae.downsample_factor == 8


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return AutoencoderKL(VAE_PRESETS["tiny"]).eval()


def to_compvis(state: dict) -> dict:
    """The inverse of the converter, written independently: diffusers names -> original LDM names."""
    out = {}
    for k, v in state.items():
        n = k
        n = re.sub(r"mid_block\.attentions\.0\.group_norm", "mid.attn_1.norm", n)
        for ours, theirs in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            if f"mid_block.attentions.0.{ours}." in n:
                n = n.replace(f"mid_block.attentions.0.{ours}.", f"mid.attn_1.{theirs}.")
                v = v[:, :, None, None] if v.ndim == 2 else v
        n = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", n)
        n = re.sub(r"encoder\.down_blocks\.(\d)\.resnets", r"encoder.down.\1.block", n)
        n = re.sub(r"encoder\.down_blocks\.(\d)\.downsamplers\.0", r"encoder.down.\1.downsample", n)
        n = re.sub(r"decoder\.up_blocks\.(\d)\.resnets", lambda m: f"decoder.up.{3 - int(m[1])}.block", n)
        n = re.sub(r"decoder\.up_blocks\.(\d)\.upsamplers\.0", lambda m: f"decoder.up.{3 - int(m[1])}.upsample", n)
        n = n.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        out["first_stage_model." + n] = v
    return out


def test_every_weights_format_loads_to_the_same_model(tiny, tmp_path):
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    expected = tiny.decode(tiny.encode(x).mode())
    state = tiny.state_dict()
    folder = tmp_path / "diffusers"
    folder.mkdir()
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4,
                                                    "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}))
    torch.save(state, tmp_path / "weights.bin")
    save_file({k: v.contiguous() for k, v in to_compvis(state).items()}, str(tmp_path / "ldm.safetensors"))
    for source in (folder, tmp_path / "weights.bin", tmp_path / "ldm.safetensors"):
        vae = load_vae(source, preset="tiny")
        assert torch.equal(vae.decode(vae.encode(x).mode()), expected), source


def test_mismatched_weights_list_the_keys(tiny, tmp_path):
    state = dict(tiny.state_dict())
    state.pop("decoder.conv_out.bias")
    state["encoder.conv_in.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as e:
        load_vae(tmp_path / "bad.safetensors", preset="tiny")
    assert "decoder.conv_out.bias" in str(e.value) and "encoder.conv_in.weight" in str(e.value)


def test_missing_weights_say_what_to_download(tmp_path, monkeypatch):
    monkeypatch.delenv("COD_VAE_PATH", raising=False)
    with pytest.raises(FileNotFoundError, match="huggingface.co/stabilityai/sd-vae-ft-ema"):
        resolve_vae_path(None)
    with pytest.raises(FileNotFoundError, match="COD_VAE_PATH"):
        load_vae(tmp_path / "missing")
    monkeypatch.setenv("COD_VAE_PATH", str(tmp_path))
    assert resolve_vae_path(None) == tmp_path


def test_latent_scaling_and_sampling(tiny):
    assert OFFICIAL_LATENT_SCALE == pytest.approx(0.0331786, rel=1e-5)
    space = LatentSpace(tiny, scale=SD_VAE_SCALING)
    img = torch.rand(1, 3, 64, 64)
    z = space.to_latent(img, sample=False)
    assert z.shape == (1, 4, 8, 8)
    assert torch.allclose(z, tiny.encode(2 * img - 1).mode() * SD_VAE_SCALING)
    assert torch.allclose(space.to_image(z), ((tiny.decode(z / SD_VAE_SCALING) + 1) / 2).clamp(0, 1))
    a = space.to_latent(img, generator=torch.Generator().manual_seed(1))
    b = space.to_latent(img, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, z)
    assert not any(p.requires_grad for p in space.parameters())
