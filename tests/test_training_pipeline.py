"""The training pipeline: the tiny config trains on ../shared/data/train256 and its loss falls, every YAML in
conf/ composes and instantiates, unreadable images are skipped, stage chaining and model export work."""
from __future__ import annotations


import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

import cod
from cod.cli import main
from cod.training.commands import expand_configs
from cod.training.data import FolderDataset, ImageDataModule, SkipCounter, collate_skipping, crop
from cod.training.module import CoDTrainingModule
from conftest import ROOT, TRAIN256, require

CONF = ROOT / "conf"


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_tiny_model_learns_on_train256(tmp_path):
    require(TRAIN256)
    L.seed_everything(0, verbose=False)
    module = CoDTrainingModule("tiny-pixel", lr=1e-3, warmup_steps=5, ema_decay=0.9, val_sampling_steps=2,
                               export_dir=str(tmp_path / "model"))
    data = ImageDataModule(str(TRAIN256), size=32, batch_size=8, val_images=4)
    recorder = LossRecorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=50, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
                        limit_val_batches=1, val_check_interval=50, num_sanity_val_steps=0)
    trainer.fit(module, data)
    first, last = np.mean(recorder.losses[:10]), np.mean(recorder.losses[-10:])
    assert last < 0.8 * first, (first, last)
    assert "val/psnr" in trainer.callback_metrics
    model = cod.load(tmp_path / "model")  # exported EMA weights, usable by cod compress
    ema = dict(module.ema.module.named_parameters())
    assert all(torch.equal(p, ema[k]) for k, p in model.denoiser.named_parameters())
    assert model.decode(model.encode(torch.rand(1, 3, 32, 32)), 32, 32, steps=2).shape == (1, 3, 32, 32)


# conf/prior.yaml holds `cod fit-prior` settings, not a LightningCLI config (tests/test_entropy_codec.py checks it);
# the distillation configs train cod.training.dmd.DMDDistillation, not CoD (tests/test_dmd.py composes them)
NOT_FIT_CONFIGS = {"prior.yaml", "dmd.yaml", "dmd-tiny.yaml"}


@pytest.mark.parametrize("config", sorted(str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml")
                                          if str(p.relative_to(CONF)) not in NOT_FIT_CONFIGS))
def test_every_config_composes_and_parses(config):
    from lightning.pytorch.cli import LightningCLI

    from cod.models.presets import PRESETS
    from cod.training.data import ImageDataModule as DM

    class ParseOnly(LightningCLI):  # parse and type-check the composed config; build nothing (XL, DINOv2)
        def instantiate_classes(self):
            pass

    args = expand_configs(["--config", str(CONF / "base.yaml"), "--config", str(CONF / config)])
    cli = ParseOnly(CoDTrainingModule, DM, args=args, run=False)
    model = cli.config["model"]
    assert model["preset"] in PRESETS
    if config == "stages/stage3.yaml":
        assert model["one_step_mse_weight"] == 1.0 and model["up2x"] is True and model["lr"] == 2e-5
    if config == "pixel.yaml":
        assert model["preset"] == "pixel-xl" and model["up2x"] is False and cli.config["data"]["size"] == 256


def test_xl_config_instantiates_on_the_meta_device():
    from cod.model import build_config, build_denoiser
    from cod.models.presets import get_preset

    with torch.device("meta"):
        net = build_denoiser(build_config(get_preset("pixel-xl", up2x=False), "pixel-xl"))
    assert net.y_embedder.stride == 16 and net.y_embedder.decoder.ada is None


def test_readme_training_command_runs_with_only_a_step_cap(tmp_path, monkeypatch, capsys):
    """`cod fit --config conf/tiny.yaml` exactly as the README says (only the step count capped): it once failed
    because val_check_interval (100) exceeded the 62 batches of an epoch."""
    require(TRAIN256)
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(CONF / "tiny.yaml"), "--trainer.max_steps", "3"]) == 0
    out = capsys.readouterr()
    assert (tmp_path / "runs" / "tiny" / "model" / "model.safetensors").is_file()
    assert "runs/tiny/model" in out.out  # where the model went
    assert "args parameter" not in out.err and "Tip:" not in out.out + out.err
    # a second run would replace the exported model: refused before training, the model untouched
    before = (tmp_path / "runs" / "tiny" / "model" / "model.safetensors").read_bytes()
    assert main(["fit", "--config", str(CONF / "tiny.yaml"), "--trainer.max_steps", "3"]) == 1
    err = capsys.readouterr().err
    assert err.count("cod: error:") == 1 and "export_dir" in err and "exists" in err
    assert (tmp_path / "runs" / "tiny" / "model" / "model.safetensors").read_bytes() == before


def test_bad_configs_give_one_clear_error(tmp_path, capsys):
    assert main(["fit", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "no such config file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {CONF / 'tiny.yaml'}\ndata:\n  train: {tmp_path / 'no-such-folder'}\n")
    assert main(["fit", "--config", str(bad), "--trainer.max_steps", "1"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / f"ok{i}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "empty.jpg").write_bytes(b"")
    before = SkipCounter.skipped
    ds = FolderDataset(str(tmp_path), size=32)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        items = [ds[i] for i in range(len(ds))]
    assert len(items) == 5 and sum(x is None for x in items) == 2
    assert SkipCounter.skipped - before == 2
    images, ids = collate_skipping(items)
    assert images.shape == (3, 3, 32, 32) and len(ids) == 3


def test_crop_policy_upsizes_small_images_and_centres_validation():
    import random

    small = np.zeros((20, 40, 3), np.uint8)
    assert crop(small, 32, True, random.Random(0)).shape == (3, 32, 32)
    image = np.arange(10 * 10 * 3, dtype=np.uint8).reshape(10, 10, 3)
    centre = crop(image, 4, False, random.Random(0))
    assert torch.equal(centre, torch.from_numpy(image[3:7, 3:7]).permute(2, 0, 1).float() / 255)


def test_stage_chaining_from_a_model_directory(tmp_path):
    stage1 = CoDTrainingModule("tiny-pixel", up2x=False)
    stage1.save_model_dir(tmp_path / "stage1")
    stage2 = CoDTrainingModule("tiny-pixel", up2x=True, init_from=str(tmp_path / "stage1"))
    s1 = stage1.ema.module.state_dict()
    s2 = stage2.denoiser.state_dict()
    assert all(torch.equal(v, s2[k]) for k, v in s1.items())
    assert any(".decoder.ada." in k for k in s2) and not any(".decoder.ada." in k for k in s1)


def test_training_crops_change_with_the_epoch_and_stay_reproducible(tmp_path):
    from cod.training.data import EpochSampler

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    ds = FolderDataset(str(tmp_path), size=32)
    sampler = EpochSampler(len(ds), shuffle=True, seed=0)
    first = [ds[key][0] for key in sampler]
    sampler.set_epoch(1)
    second = [ds[key][0] for key in sampler]
    assert list(EpochSampler(1, True, 0)) == [(0, 0)]
    assert not torch.equal(first[0], second[0])
    assert torch.equal(ds[(0, 1)][0], second[0])


def test_codebook_restarts_reseed_unused_codewords_with_encoder_outputs():
    """After the first step every codeword the batch did not use holds one of the batch's encoder outputs (in
    the trained codebook and its EMA), so the next batch spreads over many codes instead of the one or two a
    random codebook gives; `codebook_restarts=False` leaves the codebook alone."""
    torch.manual_seed(0)
    module = CoDTrainingModule("tiny-pixel", ds=16, bits=6, null_condition_p=0.0)
    bottleneck = module.entropy_bottleneck
    images = torch.rand(4, 3, 64, 64)
    batch = (images, torch.arange(4))
    y = cod.CoDModel.condition_image(images)  # what the codec sees in training

    def codes_used():
        with torch.no_grad():
            return bottleneck.nearest(module.condition_encoder(y)).unique().numel()

    before = codes_used()
    module._losses(batch)
    with torch.no_grad():
        z = module.condition_encoder(y).permute(0, 2, 3, 1).reshape(-1, bottleneck.dim)
    rows = module.codebook_restarts.step([bottleneck.embedding.weight,
                                          module.ema.module.y_embedder.bottleneck.embedding.weight], step=0)
    assert rows == 64 - before > 0
    codebook = bottleneck.embedding.weight.detach()
    assert torch.equal(codebook, module.ema.module.y_embedder.bottleneck.embedding.weight)
    distance_to_data = torch.cdist(codebook, z).min(dim=1).values
    assert (distance_to_data < 1e-2).sum() >= rows  # cdist rounds at ~2e-3; other distances are ~10
    assert codes_used() > max(before, 8)

    off = CoDTrainingModule("tiny-pixel", ds=16, bits=6, codebook_restarts=False)
    assert off.codebook_restarts is None


def test_a_folder_without_readable_images_stops_with_an_error_and_exports_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    args = ["fit", "--config", str(CONF / "tiny.yaml"), "--data.train", str(data), "--data.batch_size", "2",
            "--trainer.max_steps", "5", "--trainer.enable_progress_bar", "false"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("cod: error:") == 1 and "no readable image" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "tiny" / "model").exists()


def test_odd_entries_in_a_training_folder_are_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(data / f"ok{i}.png")
    (data / "folder.png").mkdir()  # a directory with an image suffix
    (data / "dangling.png").symlink_to(data / "gone.png")
    args = ["fit", "--config", str(CONF / "tiny.yaml"), "--data.train", str(data), "--data.size", "32",
            "--data.batch_size", "2", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"]
    assert main(args) == 0
    assert "skipping 2 entries that are not image files" in capsys.readouterr().err
    for bad, words in ((["--data.size", "-64"], "data.size"), (["--data.batch_size", "0"], "data.batch_size"),
                       (["--data.size", "40"], "multiple of")):
        assert main(args[:-2] + ["--model.export_dir", str(tmp_path / "other")] + bad) == 1
        err = capsys.readouterr().err
        assert err.count("cod: error:") == 1 and words in err and "Traceback" not in err, err
