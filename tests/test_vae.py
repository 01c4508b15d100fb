"""The SD-VAE implementation: diffusers key layout, every accepted weights format (incl. the CompVis layout and
diffusers' legacy attention names), strict loading with clear messages, and CoD's latent scaling."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from cod.models.vae import (OFFICIAL_LATENT_SCALE, SD_VAE_SCALING, VAE_PRESETS, AutoencoderKL, DiagonalGaussian,
                            LatentSpace, load_vae, resolve_vae_path)

DOWNLOAD = ("download `diffusion_pytorch_model.safetensors` and `config.json` from "
            "https://huggingface.co/stabilityai/sd-vae-ft-ema and pass the folder "
            "(or set the environment variable COD_VAE_PATH)")
ATTENTION_KEYS = {f"{name}.{p}" for name in ("group_norm", "to_q", "to_k", "to_v", "to_out.0")
                  for p in ("weight", "bias")}


def test_sd_vae_layout_matches_diffusers():
    with torch.device("meta"):
        vae = AutoencoderKL(VAE_PRESETS["sd-vae"])
    sd = vae.state_dict()
    # stabilityai/sd-vae-ft-ema (= the SD 1.x VAE): 248 tensors, 83,653,863 parameters.
    assert len(sd) == 248
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": (256, 128, 1, 1),
        "encoder.down_blocks.0.downsamplers.0.conv.weight": (128, 128, 3, 3),
        "encoder.mid_block.resnets.1.norm2.weight": (512,),
        "encoder.mid_block.attentions.0.to_q.weight": (512, 512),
        "encoder.mid_block.attentions.0.to_out.0.bias": (512,),
        "encoder.conv_norm_out.weight": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.up_blocks.0.upsamplers.0.conv.weight": (512, 512, 3, 3),
        "decoder.up_blocks.2.resnets.0.conv_shortcut.weight": (256, 512, 1, 1),
        "decoder.up_blocks.3.resnets.2.conv2.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    for part in ("encoder", "decoder"):
        prefix = f"{part}.mid_block.attentions.0."
        assert {k[len(prefix):] for k in sd if k.startswith(prefix)} == ATTENTION_KEYS
    assert not any(re.search(r"(up_blocks\.3\.upsamplers|down_blocks\.3\.downsamplers)", k) for k in sd)
    assert vae.downsample_factor == 8
    posterior = vae.encode(torch.empty(1, 3, 64, 96, device="meta"))
    assert posterior.mean.shape == posterior.std.shape == (1, 4, 8, 12)
    assert vae.decode(posterior.mode()).shape == (1, 3, 64, 96)


@pytest.fixture(scope="module")
def tiny() -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(VAE_PRESETS["tiny"]).eval()
    with torch.no_grad():  # non-trivial norms, so swapping two of them in a conversion changes the output
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module")
def probe(tiny) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        return x, tiny.decode(tiny.encode(x).mode())


def to_compvis(state: dict, levels: int = 4) -> dict:
    """The inverse of the converter, written independently: diffusers names -> original LDM names, attention
    weights as 1x1 convs, inside a full SD checkpoint (`first_stage_model.`)."""
    out = {}
    for k, v in state.items():
        n = k.replace("mid_block.attentions.0.group_norm", "mid.attn_1.norm")
        for ours, theirs in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            if f"mid_block.attentions.0.{ours}." in n:
                n = n.replace(f"mid_block.attentions.0.{ours}.", f"mid.attn_1.{theirs}.")
                v = v[:, :, None, None] if v.ndim == 2 else v
        n = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", n)
        n = re.sub(r"encoder\.down_blocks\.(\d)\.resnets", r"encoder.down.\1.block", n)
        n = re.sub(r"encoder\.down_blocks\.(\d)\.downsamplers\.0", r"encoder.down.\1.downsample", n)
        n = re.sub(r"decoder\.up_blocks\.(\d)\.resnets", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block", n)
        n = re.sub(r"decoder\.up_blocks\.(\d)\.upsamplers\.0",
                   lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample", n)
        n = n.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        out["first_stage_model." + n] = v.contiguous()
    return out


def to_legacy_diffusers(state: dict) -> dict:
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    return {re.sub(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f"attentions.0.{names[m[1]]}.", k): v
            for k, v in state.items()}


def tiny_config_json(tiny) -> str:
    cfg = tiny.config
    levels = len(cfg.block_out_channels)
    return json.dumps({"_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": 3, "out_channels": 3,
                       "latent_channels": 4, "block_out_channels": list(cfg.block_out_channels),
                       "layers_per_block": cfg.layers_per_block, "norm_num_groups": cfg.norm_num_groups,
                       "down_block_types": ["DownEncoderBlock2D"] * levels,
                       "up_block_types": ["UpDecoderBlock2D"] * levels,
                       "sample_size": 256, "scaling_factor": SD_VAE_SCALING})


def test_every_weights_format_loads_to_the_same_model(tiny, probe, tmp_path):
    x, expected = probe
    state = tiny.state_dict()
    sources = {}  # path -> preset to pass

    folder = tmp_path / "diffusers"
    folder.mkdir()
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(tiny_config_json(tiny))
    sources[folder] = "sd-vae"  # config.json, not the preset, decides the architecture

    bin_folder = tmp_path / "diffusers_bin"
    bin_folder.mkdir()
    torch.save(state, bin_folder / "diffusion_pytorch_model.bin")
    (bin_folder / "config.json").write_text(tiny_config_json(tiny))
    sources[bin_folder] = "sd-vae"

    save_file(state, str(tmp_path / "vae.safetensors"))
    torch.save(state, tmp_path / "vae.bin")
    save_file(to_legacy_diffusers(state), str(tmp_path / "legacy.safetensors"))
    save_file(to_compvis(state), str(tmp_path / "ldm.safetensors"))
    # An LDM training checkpoint: the VAE inside a full SD state dict, plus loss/EMA entries and metadata.
    full = {**to_compvis(state), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2),
            "first_stage_model.loss.logvar": torch.zeros(()), "cond_stage_model.x": torch.zeros(1)}
    torch.save({"state_dict": full, "global_step": 560000}, tmp_path / "sd.ckpt")
    for name in ("vae.safetensors", "vae.bin", "legacy.safetensors", "ldm.safetensors", "sd.ckpt"):
        sources[tmp_path / name] = "tiny"

    for source, preset in sources.items():
        vae = load_vae(source, preset=preset)
        assert vae.config == tiny.config and not vae.training
        with torch.no_grad():
            assert torch.equal(vae.decode(vae.encode(x).mode()), expected), source


def test_mismatched_weights_raise_one_error_listing_the_keys(tiny, tmp_path):
    state = dict(tiny.state_dict())
    removed = sorted(k for k in state if k.startswith("decoder.up_blocks."))
    for k in removed:
        del state[k]
    state["encoder.conv_in.weight"] = torch.zeros(32, 3, 1, 1)
    state["encoder.extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as info:
        load_vae(tmp_path / "bad.safetensors", preset="tiny")
    msg = str(info.value)
    assert f"{len(removed)} missing" in msg and f"... and {len(removed) - 10} more" in msg
    assert sum(k in msg for k in removed) == 10  # the first ten are named
    assert "1 unexpected" in msg and "encoder.extra.weight" in msg
    assert "1 wrong shape" in msg and "encoder.conv_in.weight: file (32, 3, 1, 1) vs model (32, 3, 3, 3)" in msg


class ArbitraryObject:
    """Stands for the callbacks/optimizer objects training checkpoints may pickle."""


def test_refuses_what_it_cannot_build_or_safely_read(tiny, tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    save_file(tiny.state_dict(), str(folder / "diffusion_pytorch_model.safetensors"))
    config = json.loads(tiny_config_json(tiny))
    config["down_block_types"][1] = "AttnDownEncoderBlock2D"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        load_vae(folder)

    # A pickle holding arbitrary objects is refused, not executed.
    torch.save({"state_dict": tiny.state_dict(), "callback": ArbitraryObject()}, tmp_path / "unsafe.ckpt")
    with pytest.raises(ValueError, match="safetensors"):
        load_vae(tmp_path / "unsafe.ckpt", preset="tiny")


def test_missing_weights_say_what_to_download(tmp_path, monkeypatch):
    monkeypatch.delenv("COD_VAE_PATH", raising=False)
    for call in (lambda: resolve_vae_path(None), lambda: load_vae(None), lambda: load_vae(tmp_path / "missing")):
        with pytest.raises(FileNotFoundError) as info:
            call()
        assert DOWNLOAD in str(info.value)
    with pytest.raises(FileNotFoundError, match=re.escape(DOWNLOAD)):
        load_vae(tmp_path)  # a folder without the weights file
    monkeypatch.setenv("COD_VAE_PATH", str(tmp_path))
    assert resolve_vae_path(None) == tmp_path
    assert resolve_vae_path(tmp_path / ".") == tmp_path  # an explicit path wins over the variable


def test_resampling_and_posterior_follow_the_sd_vae_conventions(tiny):
    """Details that do not change any shape but would change every output of the real weights."""
    down = AutoencoderKL(VAE_PRESETS["tiny"]).encoder.down_blocks[0].downsamplers[0]
    up = AutoencoderKL(VAE_PRESETS["tiny"]).decoder.up_blocks[0].upsamplers[0]
    with torch.no_grad():
        for conv in (down.conv, up.conv):
            conv.weight.zero_()
            conv.bias.zero_()
        down.conv.weight[0, 0] = 1.0  # a 3x3 box sum of channel 0
        up.conv.weight[0, 0, 1, 1] = 1.0  # identity on channel 0
        x = torch.zeros(1, 32, 4, 4)
        x[0, 0] = 1.0
        # Zero padding on the right and bottom only (not symmetric): the last window runs off the edge.
        assert down(x)[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]
        x[0, 0, :2, :2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        assert up(x[:, :, :2, :2])[0, 0].tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]

        moments = torch.zeros(1, 8, 1, 1)
        moments[:, 4:] = torch.tensor([100.0, -100.0, 0.0, 2.0]).view(1, 4, 1, 1)
        std = DiagonalGaussian(moments).std.flatten()
        expected = torch.exp(0.5 * torch.tensor([20.0, -30.0, 0.0, 2.0]))  # logvar clamped to [-30, 20]
        assert torch.allclose(std, expected)


def test_encode_decode_shapes(tiny):
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        posterior = tiny.encode(x)
        assert tiny.downsample_factor == 8
        assert posterior.mean.shape == posterior.std.shape == (2, 4, 8, 6)
        assert (posterior.std > 0).all()
        assert tiny.decode(posterior.sample()).shape == (2, 3, 64, 48)


def test_latent_space_scaling_and_sampling(tiny):
    assert SD_VAE_SCALING == 0.18215 and OFFICIAL_LATENT_SCALE == pytest.approx(0.0331786, rel=1e-5)
    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        posterior = tiny.encode(2 * img - 1)
        decoded = ((tiny.decode(posterior.mode()) + 1) / 2).clamp(0, 1)
    for scale in (SD_VAE_SCALING, OFFICIAL_LATENT_SCALE):
        space = LatentSpace(tiny, scale=scale)
        z = space.to_latent(img, sample=False)
        assert z.shape == (1, 4, 8, 8)
        assert torch.allclose(z, posterior.mode() * scale)
        assert torch.allclose(space.to_image(z), decoded, atol=1e-5)  # the scale cancels

    space = LatentSpace(tiny, scale=OFFICIAL_LATENT_SCALE)
    a = space.to_latent(img, generator=torch.Generator().manual_seed(1))
    b = space.to_latent(img, generator=torch.Generator().manual_seed(1))
    c = space.to_latent(img, generator=torch.Generator().manual_seed(2))
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a, (posterior.mean + posterior.std * eps) * OFFICIAL_LATENT_SCALE)
    assert not any(p.requires_grad for p in space.parameters())
    space.train()
    assert not space.vae.training
