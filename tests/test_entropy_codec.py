"""Entropy-coded .cod files: the coder seam (cod/codec/coders.py), payload mode 1 type 0x00, model directories with
a prior (cod.model.write_prior) and `cod fit-prior`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cod
from cod.cli import main
from cod.codec import container
from cod.codec.container import BitstreamError
from cod.entropy.priors import ContextPrior, StaticPrior
from cod.errors import ModelDirError, OutputExistsError
from cod.model import new_model, write_prior

TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "train256"


def photo(seed: int, h: int = 96, w: int = 128) -> np.ndarray:
    """A smooth synthetic picture (gradients and blobs): a random tiny CoD codes it with few distinct indices."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(6 * x + rng.uniform(0, 6)) * 0.5 + 0.5, y, np.cos(5 * (x + y)) * 0.5 + 0.5], -1)
    return (img * 255).astype(np.uint8)


def fitted_prior(model, images, kind: str = "static") -> ContextPrior | StaticPrior:
    """A prior set from the indices' frequencies (what fit-prior starts from)."""
    idx = torch.cat([model.encode(torch.from_numpy(i).permute(2, 0, 1)[None].float() / 255) for i in images])
    counts = torch.bincount(idx.reshape(-1), minlength=16).double() + 0.5
    prior = StaticPrior(16) if kind == "static" else ContextPrior(16, dim=8)
    with torch.no_grad():
        logf = (counts / counts.sum()).log().float()
        if kind == "static":
            prior.logits.copy_(logf)
        else:
            prior.base.copy_(logf.expand_as(prior.base))
    prior.freeze()
    return prior


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny 4-bit model directory without a prior, and a copy of it with one."""
    root = tmp_path_factory.mktemp("entropy")
    new_model("tiny-pixel", root / "plain", bits=4, seed=3)
    shutil.copytree(root / "plain", root / "with-prior")
    model = cod.load(root / "plain")
    write_prior(root / "with-prior", fitted_prior(model, [photo(i) for i in range(3)], "context"))
    return root / "plain", root / "with-prior"


def test_prior_directory_keeps_the_weights_fingerprint(dirs):
    plain, with_prior = dirs
    a, b = cod.load(plain), cod.load(with_prior)
    assert a.fingerprint == b.fingerprint and b.prior is not None and len(b.prior_fingerprint) == 64
    assert (plain / "model.safetensors").read_bytes() == (with_prior / "model.safetensors").read_bytes()
    config = json.loads((with_prior / "config.json").read_text())
    assert config["prior"]["kind"] == "context" and "prior.safetensors" in config["checksums"]


def test_entropy_coded_file_is_smaller_and_decodes_to_the_same_image(dirs):
    plain, with_prior = dirs
    a, b = cod.load(plain), cod.load(with_prior)
    image = photo(7, 160, 224)
    fixed, coded = a.compress([image])[0], b.compress([image])[0]
    assert container.read_header(fixed)[0].payload_mode == container.PAYLOAD_FIXED
    header = container.read_header(coded)[0]
    assert header.payload_mode == container.PAYLOAD_TYPED and header.payload_type == container.TYPE_ENTROPY_INDICES
    assert len(coded) < len(fixed)
    reference = a.decompress(fixed, steps=1)
    assert np.array_equal(b.decompress(coded, steps=1), reference)  # lossless: the same indices, the same pixels
    assert np.array_equal(b.decompress(fixed, steps=1), reference)  # old files still decode with the prior present
    assert b.compress([image], entropy="off")[0] == fixed


def test_entropy_never_makes_a_file_larger(dirs):
    """A prior that fits the image badly: the encoder keeps the fixed-length payload."""
    plain, with_prior = dirs
    b = cod.load(with_prior)
    b.prior = StaticPrior(16)
    with torch.no_grad():
        b.prior.logits.copy_(torch.arange(16.0) * -3)  # nearly all mass on index 0
    b.prior.freeze()
    image = photo(11)
    assert b.compress([image])[0] == cod.load(plain).compress([image])[0]


def test_file_refuses_another_prior_or_none(dirs, tmp_path):
    plain, with_prior = dirs
    coded = cod.load(with_prior).compress([photo(5, 256, 256)])[0]
    assert container.read_header(coded)[0].payload_mode == container.PAYLOAD_TYPED
    with pytest.raises(BitstreamError, match="no prior.safetensors"):
        cod.load(plain).decompress(coded)
    other = tmp_path / "other"
    shutil.copytree(with_prior, other)
    model = cod.load(plain)
    write_prior(other, fitted_prior(model, [photo(40), photo(41)], "static"), overwrite=True)
    other_model = cod.load(other)
    if other_model.prior_fingerprint[:2] != cod.load(with_prior).prior_fingerprint[:2]:
        with pytest.raises(BitstreamError, match="another prior"):
            other_model.decompress(coded)
    # even when the one-byte tags collide, the check byte covers the prior's whole fingerprint
    forged = other_model.prior_fingerprint[:0] + cod.load(with_prior).prior_fingerprint[:2] + \
        other_model.prior_fingerprint[2:]
    other_model.prior_fingerprint = forged
    with pytest.raises(BitstreamError, match="integrity check"):
        other_model.decompress(coded)


def test_damaged_entropy_payloads_are_refused_cleanly(dirs):
    from cod.codec import api

    b = cod.load(dirs[1])
    coded = b.compress([photo(9, 256, 256)])[0]
    assert container.read_header(coded)[0].payload_mode == container.PAYLOAD_TYPED
    for cut in range(len(coded)):
        with pytest.raises(BitstreamError):
            api.parse(b, coded[:cut])
    with pytest.raises(BitstreamError):
        api.parse(b, coded + b"\x00")
    header, indices = api.parse(b, coded)
    for pos in range(len(coded)):
        for bit in (0, 3, 7):
            damaged = bytearray(coded)
            damaged[pos] ^= 1 << bit
            try:
                h, idx = api.parse(b, bytes(damaged))
            except BitstreamError:
                continue
            assert idx.shape == indices.shape  # a check-byte collision (1 in 256) may parse; never crash


def test_unknown_payload_type_and_diffc_type_are_refused(dirs):
    b = cod.load(dirs[1])
    coded = bytearray(b.compress([photo(9, 256, 256)])[0])
    _, _, start = container.read_header(bytes(coded))
    coded[start] = 0x7F
    with pytest.raises(BitstreamError, match="unknown payload type"):
        b.decompress(bytes(coded))


def test_write_prior_refuses_to_replace_and_tampering_is_caught(dirs, tmp_path):
    _, with_prior = dirs
    copy = tmp_path / "m"
    shutil.copytree(with_prior, copy)
    prior = cod.load(copy).prior
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_prior(copy, prior)
    data = bytearray((copy / "prior.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "prior.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match="prior.safetensors does not match"):
        cod.load(copy, verify="always")
    config = json.loads((copy / "config.json").read_text())
    config["prior"]["kind"] = "hyper"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="prior.kind"):
        cod.load(copy)


@pytest.mark.skipif(not TRAIN.is_dir(), reason="needs ../shared/data/train256")
def test_fit_prior_cli(dirs, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name in sorted(p.name for p in TRAIN.iterdir())[:6]:
        Image.open(TRAIN / name).save(data / Path(name).with_suffix(".png").name)
    model = tmp_path / "m"
    shutil.copytree(dirs[0], model)
    args = ["fit-prior", "--model", str(model), "--data", str(data), "--val", str(data), "--steps", "20",
            "--size", "64", "--log-dir", str(tmp_path / "runs")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "held_out:" in err and "bits per token" in err and "kept the parameters of step" in err
    assert list((tmp_path / "runs" / "prior").glob("version_*/events.out.tfevents.*"))
    assert cod.load(model).prior.kind == "context"
    assert main(args) == 1  # a prior exists: refused, before any work
    assert "already has an index prior" in capsys.readouterr().err
    src = tmp_path / "src.png"
    Image.fromarray(photo(3)).save(src)
    assert main(["compress", "--model", str(model), str(src), "-o", str(tmp_path / "a.cod")]) == 0
    assert main(["compress", "--model", str(model), "--entropy", "off", str(src), "-o", str(tmp_path / "b.cod")]) == 0
    for name in "ab":
        assert main(["decompress", "--model", str(model), "--steps", "1", str(tmp_path / f"{name}.cod"), "-o",
                     str(tmp_path / f"{name}.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    assert (tmp_path / "a.cod").stat().st_size <= (tmp_path / "b.cod").stat().st_size


def test_prior_yaml_spells_out_the_defaults():
    import yaml

    from cod.training.prior import SETTINGS

    conf = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "prior.yaml").read_text())
    assert conf == {k: default for k, (_, default, _) in SETTINGS.items()}


def test_prior_file_with_other_shapes_is_refused_before_reading(dirs, tmp_path):
    """A prior.safetensors whose header declares other tensors (its checksum rewritten to match) is refused from
    the header alone: no declared size drives an allocation."""
    from safetensors.torch import save_file

    from cod.files import sha256_file

    copy = tmp_path / "m"
    shutil.copytree(dirs[1], copy)
    state = dict(cod.load(copy).prior.state_dict())
    state["embed"] = torch.zeros(3, 4, 17, 4096)
    save_file(state, str(copy / "prior.safetensors"))
    config = json.loads((copy / "config.json").read_text())
    config["checksums"]["prior.safetensors"] = sha256_file(copy / "prior.safetensors")
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="shapes differ"):
        cod.load(copy)


def test_fit_prior_encodes_a_folder_once_and_notices_changed_files(dirs, tmp_path, monkeypatch):
    """The grids of a folder are cached under the model's weights, the files' identities and the crop settings:
    the same call reads them back without encoding; a rewritten image or other settings encode again."""
    from cod.training import prior as prior_training

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.fromarray(photo(i, 64, 64)).save(data / f"{i}.png")
    model = cod.load(dirs[0])
    calls = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda x: calls.append(len(x)) or encode(x))
    first = prior_training.encode_folder(model, str(data), 32, 2, True, 0)
    assert first.shape[0] == 6 and calls == [6]  # one batch: 3 images x 2 crops
    again = prior_training.encode_folder(model, str(data), 32, 2, True, 0)
    assert torch.equal(again, first) and calls == [6]  # from the cache
    prior_training.encode_folder(model, str(data), 32, 1, True, 0)  # other settings: encoded
    assert calls == [6, 3]
    Image.fromarray(photo(9, 64, 64)).save(data / "1.png")  # a rewritten image: encoded again
    changed = prior_training.encode_folder(model, str(data), 32, 2, True, 0)
    assert calls == [6, 3, 6] and not torch.equal(changed, first)
    # a damaged cache entry is ignored, not trusted
    for entry in Path(prior_training._grid_cache_file("x")).parent.glob("*.safetensors"):
        entry.write_bytes(b"not a safetensors file")
    assert torch.equal(prior_training.encode_folder(model, str(data), 32, 2, True, 0), changed)
    assert calls == [6, 3, 6, 6]
