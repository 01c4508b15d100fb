"""`cod demo`: the main job on a fresh CPU machine, no downloads.

Trains a tiny pixel-space CoD for a few minutes on the photos that ship with scikit-image, holds two of them out,
compresses and decompresses those with the trained model, and prints bpp / PSNR / MS-SSIM next to JPEG at a
matched file size (or JPEG's smallest file, when it cannot get that small). Writes a normal model directory
that `cod compress --model OUT/model` uses afterwards, a side-by-side picture and a JSON report.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

HELD_OUT = ("coffee.png", "chelsea.png")
TRAIN = ("astronaut.png", "motorcycle_left.png", "motorcycle_right.png", "rocket.jpg", "hubble_deep_field.jpg",
         "retina.jpg", "ihc.png", "camera.png", "coins.png", "moon.png", "grass.png", "gravel.png", "brick.png")
# 8 bits per 16x16 pixels: 0.031 bpp (a 512x512 image in 1 KB), a rate a tiny model learns in minutes.
# RoPE positions a fixed step apart (not the release's size-normalised ones): trained on 64x64 crops, the model
# sees the same token geometry on the full-size photos it decodes.
DEMO_MODEL = {"preset": "tiny-pixel", "ds": 16, "bits": 8, "up2x": True, "rope_step": 1.0}
CROP, BATCH = 64, 16


def skimage_photos(names) -> dict[str, np.ndarray]:
    import skimage.data

    from cod.images import read_image

    folder = Path(skimage.data.__file__).parent
    found = {n: read_image(folder / n) for n in names if (folder / n).is_file()}
    if not found:
        raise FileNotFoundError(f"no sample photos found in {folder} (is scikit-image installed?)")
    return found


class CropDataset(Dataset):
    def __init__(self, images: list[np.ndarray], size: int, crops_per_image: int, seed: int):
        from cod.training.data import crop

        self.images, self.size, self.n, self.seed, self.crop = images, size, crops_per_image, seed, crop

    def __len__(self) -> int:
        return len(self.images) * self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rng = random.Random(self.seed * 1_000_003 + i)
        return self.crop(self.images[i % len(self.images)], self.size, True, rng), i


def run_demo(out: Path, minutes: float = 6.0, seed: int = 0, quiet: bool = False) -> dict:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from cod.codec.evaluate import matched_anchor
    from cod.images import png_bytes
    from cod.metrics import ms_ssim, psnr
    from cod.model import atomic_write_bytes, load
    from cod.training.data import collate_skipping
    from cod.training.module import CoDTrainingModule

    say = (lambda *a: None) if quiet else print
    t0 = time.time()
    L.seed_everything(seed, verbose=False)
    train_photos = skimage_photos(TRAIN)
    held_out = skimage_photos(HELD_OUT)
    say(f"training a tiny CoD ({DEMO_MODEL['bits']} bits per 16x16 pixels) on {len(train_photos)} scikit-image "
        f"photos for {minutes:g} min; held out: {', '.join(held_out)}")
    # Minutes of CPU cannot train a many-step sampler; the stage-3 one-step term (x0 = noise + v(noise, t=0))
    # learns a direct decoder fast, and the exported model decodes with that single step by default.
    # A few hundred steps: a short EMA, no unconditional draws (the demo decodes without guidance) and codebook
    # restarts every 25 steps (docs/training.md).
    module = CoDTrainingModule(**DEMO_MODEL, lr=1e-3, warmup_steps=30, ema_decay=0.95, one_step_mse_weight=1.0,
                               null_condition_p=0.0, codebook_restart_window=25,
                               sampling={"sampler": "euler", "steps": 1, "cfg": 1.0}, seed=seed)
    loader = DataLoader(CropDataset(list(train_photos.values()), CROP, 256, seed), batch_size=BATCH, shuffle=True,
                        num_workers=0, drop_last=True, generator=torch.Generator().manual_seed(seed),
                        collate_fn=collate_skipping)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_time={"seconds": int(minutes * 60)}, max_epochs=-1,
                        logger=TensorBoardLogger(str(out), name="logs"), enable_checkpointing=False,
                        enable_progress_bar=not quiet, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, log_every_n_steps=20, deterministic=False)
    trainer.fit(module, loader)
    steps = trainer.global_step
    model_dir = module.save_model_dir(out / "model")
    say(f"trained {steps} steps in {time.time() - t0:.0f} s -> model directory {model_dir}")

    model = load(model_dir)
    rows, panels = [], []
    for name, image in held_out.items():
        data = model.compress([image])[0]
        recon = model.decompress(data)
        jpeg = matched_anchor(image, "jpeg", len(data))
        H, W = image.shape[:2]
        rows.append({"image": name, "size": f"{W}x{H}", "cod_bytes": len(data), "cod_bpp": 8 * len(data) / (H * W),
                     "cod_psnr": psnr(image, recon), "cod_ms_ssim": ms_ssim(image, recon),
                     "jpeg_bytes": jpeg["bytes"], "jpeg_bpp": 8 * jpeg["bytes"] / (H * W),
                     "jpeg_quality": jpeg["quality"], "jpeg_matched": jpeg["matched"],
                     "jpeg_psnr": psnr(image, jpeg["recon"]), "jpeg_ms_ssim": ms_ssim(image, jpeg["recon"])})
        panels.append(np.concatenate([image, recon, jpeg["recon"]], axis=1))
    width = max(p.shape[1] for p in panels)
    picture = np.concatenate([np.pad(p, ((0, 8), (0, width - p.shape[1]), (0, 0)), constant_values=255)
                              for p in panels], axis=0)
    atomic_write_bytes(out / "demo.png", png_bytes(picture))
    report = {"model": str(model_dir), "train_steps": steps, "train_minutes": minutes,
              "seconds_total": round(time.time() - t0, 1), "held_out": rows}
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())

    say(f"\n{'image':12s} {'method':6s} {'bytes':>6s} {'bpp':>7s} {'PSNR':>6s} {'MS-SSIM':>8s}")
    for r in rows:
        say(f"{r['image']:12s} {'CoD':6s} {r['cod_bytes']:6d} {r['cod_bpp']:7.4f} {r['cod_psnr']:6.2f} "
            f"{r['cod_ms_ssim']:8.4f}")
        note = "" if r["jpeg_matched"] else "  (JPEG cannot get this small: its smallest file, quality 1)"
        say(f"{'':12s} {'JPEG':6s} {r['jpeg_bytes']:6d} {r['jpeg_bpp']:7.4f} {r['jpeg_psnr']:6.2f} "
            f"{r['jpeg_ms_ssim']:8.4f}{note}")
    say(f"\nside by side (original | CoD | JPEG): {out / 'demo.png'}; report: {out / 'report.json'}")
    say(f"use the model: cod compress --model {model_dir} IMAGES -o OUT")
    return report
