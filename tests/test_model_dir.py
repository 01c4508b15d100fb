"""Model directories: `cod new-model` writes one, `cod.load` reads it back strictly, and every broken directory
is refused with a message that says what is wrong."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import cod
from cod.cli import main
from cod.model import ModelDirError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "tiny"
    assert main(["-q", "new-model", "--preset", "tiny-pixel", "--out", str(out)]) == 0
    return out


def test_new_model_writes_a_loadable_directory(tiny_dir):
    assert {p.name for p in tiny_dir.iterdir()} == {"config.json", "model.safetensors", "MODEL_CARD.md"}
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["family"] == "pixel" and config["sampling"]["sampler"] == "adam2"
    model = cod.load(tiny_dir)
    assert model.fingerprint == config["fingerprint"] and len(model.fingerprint) == 64
    assert model.bpp == 4 / 32 ** 2 and model.size_multiple == 32
    assert "0.00390625 bpp" in (tiny_dir / "MODEL_CARD.md").read_text()


def test_decode_is_deterministic_and_batch_equals_single(tiny_dir):
    model = cod.load(tiny_dir)
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    idx = model.encode(images)
    assert idx.shape == (2, 2, 3)
    both = model.decode(idx, 64, 96, steps=3)
    assert both.dtype == torch.uint8 and both.shape == (2, 3, 64, 96)
    assert torch.equal(both, model.decode(idx, 64, 96, steps=3))
    # CPU kernels round differently for other batch sizes, so a batch equals single images up to float
    # rounding, not bit for bit (the codec product decodes file by file where bit-exactness is promised).
    single = model.sample(idx[1:], 64, 96, steps=3)
    assert (model.sample(idx, 64, 96, steps=3)[1:] - single).abs().max() < 1e-3


def test_unconditional_condition_is_cached_per_size(tiny_dir):
    model = cod.load(tiny_dir)
    a = model.unconditional_condition(64, 64)
    b = model.unconditional_condition(64, 128)
    assert a.shape[-2:] == (4, 4) and b.shape[-2:] == (4, 8)


def test_new_model_at_another_rate(tmp_path):
    out = tmp_path / "r"
    assert main(["-q", "new-model", "--preset", "tiny-pixel", "--ds", "16", "--bits", "8", "--out", str(out)]) == 0
    model = cod.load(out)
    assert model.bpp == 8 / 16 ** 2 and model.codec.bits == 8


def test_sizes_that_are_not_multiples_are_refused(tiny_dir):
    model = cod.load(tiny_dir)
    with pytest.raises(ValueError, match="multiples of 32"):
        model.encode(torch.rand(1, 3, 50, 64))


def test_broken_directories_are_refused_with_a_reason(tiny_dir, tmp_path, capsys):
    with pytest.raises(ModelDirError, match="does not exist"):
        cod.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirError, match="no config.json"):
        cod.load(tmp_path / "empty")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_dir / "config.json").read_text())
    weights = load_file(str(tiny_dir / "model.safetensors"))
    weights.pop("blocks.0.attn.qkv.weight")
    weights["blocks.1.norm1.weight"] = torch.ones(3)
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(ModelDirError) as e:
        cod.load(broken)
    assert "blocks.0.attn.qkv.weight" in str(e.value) and "blocks.1.norm1.weight" in str(e.value)

    (broken / "config.json").write_text("{not json")
    assert main(["info", str(broken)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cod: error:") and "not valid JSON" in err and "Traceback" not in err


def test_cli_usage_errors_exit_non_zero(capsys):
    assert main(["new-model", "--preset", "huge", "--out", "/tmp/x-never"]) == 1
    assert "unknown preset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["new-model", "--preset", "tiny-pixel"])  # missing --out
    assert e.value.code == 2
    assert main(["presets"]) == 0
    assert "tiny-pixel" in capsys.readouterr().out


def test_tiny_latent_model_bundles_its_vae_and_decodes(tmp_path):
    out = tmp_path / "latent"
    assert main(["-q", "new-model", "--preset", "tiny-latent", "--out", str(out)]) == 0
    assert (out / "vae.safetensors").is_file()
    model = cod.load(out)
    assert model.config["latent"]["scale"] == pytest.approx(0.18215)
    images = torch.rand(1, 3, 64, 64)
    idx = model.encode(images)
    assert model.sample(idx, 64, 64, steps=2).shape == (1, 4, 8, 8)
    assert model.latent is None  # the VAE is read (and verified) only when an image is decoded
    decoded = model.decode(idx, 64, 64, steps=2)
    assert model.latent is not None
    assert decoded.shape == (1, 3, 64, 64) and decoded.dtype == torch.uint8


def test_latent_model_without_vae_names_the_download(tmp_path, monkeypatch):
    monkeypatch.delenv("COD_VAE_PATH", raising=False)
    out = tmp_path / "latent"
    cod.new_model("tiny-latent", out)
    (out / "vae.safetensors").unlink()
    config = json.loads((out / "config.json").read_text())
    config["latent"]["vae_file"] = None
    (out / "config.json").write_text(json.dumps(config))
    model = cod.load(out)  # indices and samples need no VAE
    idx = model.encode(torch.rand(1, 3, 64, 64))
    with pytest.raises(FileNotFoundError, match="sd-vae-ft-ema"):
        model.decode(idx, 64, 64, steps=2)


def test_an_unsaved_model_compresses_and_its_files_decode_after_saving(tmp_path):
    """A model built in memory (e.g. right after training) fingerprints its weights as save() writes them."""
    import numpy as np

    model = cod.new_model("tiny-pixel", seed=3)
    image = np.random.default_rng(0).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    data = model.compress([image])[0]
    unsaved = model.fingerprint
    model.save(tmp_path / "m")
    assert model.fingerprint == unsaved
    assert cod.load(tmp_path / "m").decompress(data, steps=1).shape == (40, 24, 3)
