"""`cod demo`: what CoD is for, on any machine, in about a minute, with nothing to download.

The embedded default model (cod/assets/demo-model: a mini-pixel CoD at 8 bits per 16x16 pixels, trained by this
project with `cod fit --config conf/demo-model.yaml`, see docs/demo.md) compresses four colour photos that ship
with scikit-image (none of them was in its training data) into files of about a kilobyte, decodes them, and
compares them with the smallest files JPEG and WebP can make. `cod demo --train` first trains a small model
from scratch for a fixed number of steps, to show training, and uses that instead.

The outcome never depends on how busy the machine is: the work is fixed (no time budgets), seeded, and runs on
one thread (the same thread count everywhere, so the same arithmetic; one thread is also what keeps a loaded
machine from slowing it down many times over, docs/robustness.md).
"""
from __future__ import annotations

import contextlib
import json
import random
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

HELD_OUT = ("coffee.png", "chelsea.png", "astronaut.png", "rocket.jpg")
# `--train`: the other photos scikit-image ships (several are grey; the embedded model saw 499 colour photos).
TRAIN = ("motorcycle_left.png", "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png",
         "camera.png", "coins.png", "moon.png", "grass.png", "gravel.png", "brick.png")
# `--train` recipe: the embedded model's, scaled down to minutes of one CPU thread.
TRAIN_MODEL = {"preset": "tiny-pixel", "ds": 16, "bits": 8, "up2x": True, "rope_step": 1.0}
TRAIN_STEPS, CROP, BATCH = 600, 64, 16


def embedded_model_dir() -> Path:
    return Path(str(resources.files("cod") / "assets" / "demo-model"))


def skimage_photos(names) -> dict[str, np.ndarray]:
    import skimage.data

    from cod.images import read_image

    folder = Path(skimage.data.__file__).parent
    found = {n: read_image(folder / n) for n in names if (folder / n).is_file()}
    if not found:
        raise FileNotFoundError(f"no sample photos found in {folder} (is scikit-image installed?)")
    return found


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def is_demo_dir(path: Path) -> bool:
    """An earlier demo's folder (what --overwrite may replace): its report.json and nothing the demo does not
    write."""
    from cod.files import read_bytes_bounded

    try:
        report = json.loads(read_bytes_bounded(path / "report.json", 1 << 20, "demo report"))
    except (ValueError, RecursionError):
        return False
    names = {"report.json", "demo.png", "model"} | {f"{Path(n).stem}.cod" for n in HELD_OUT}
    return isinstance(report, dict) and "held_out" in report and {p.name for p in path.iterdir()} <= names


def run_demo(out: Path, overwrite: bool = False, train_steps: int | None = None, seed: int = 0,
             quiet: bool = False) -> dict:
    from cod.files import atomic_directory, atomic_write_bytes, check_output_dir, copy_files

    say = (lambda *a, **k: None) if quiet else (lambda *a, **k: print(*a, **k, flush=True))
    check_output_dir(out, overwrite=overwrite, own=is_demo_dir)
    t0 = time.perf_counter()
    with one_thread(), atomic_directory(out, overwrite, own=is_demo_dir) as tmp:
        if train_steps:
            model_dir = train_small_model(tmp / "model", train_steps, seed, say, progress=not quiet)
            source = f"a tiny-pixel CoD trained here for {train_steps} steps"
        else:
            model_dir = tmp / "model"
            model_dir.mkdir()
            copy_files(embedded_model_dir(), model_dir)
            source = "the embedded mini-pixel CoD (cod/assets/demo-model, docs/demo.md)"
        report = compress_photos(model_dir, tmp, source, say)
        report["seconds_total"] = round(time.perf_counter() - t0, 1)
        atomic_write_bytes(tmp / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    say(f"\nwrote {out}/: demo.png (original | CoD | smallest WebP per row), report.json, the .cod files, and the "
        f"model directory {out}/model\nyour own photos: cod compress --model {out}/model PHOTO -o OUT.cod, then "
        f"cod decompress --model {out}/model OUT.cod -o OUT.png")
    return report


def compress_photos(model_dir: Path, tmp: Path, source: str, say) -> dict:
    from cod.codec.evaluate import matched_anchor
    from cod.images import png_bytes
    from cod.files import atomic_write_bytes
    from cod.metrics import ms_ssim, psnr
    from cod.model import load

    model = load(model_dir)
    photos = skimage_photos(HELD_OUT)
    say(f"compressing {len(photos)} photos that ship with scikit-image with {source}: {model.bpp:.3g} bpp, "
        f"{model.config['sampling']['steps']}-step decoding")
    say(f"{'image':14s} {'size':>8s} {'method':>6s} {'bytes':>6s} {'bpp':>7s} {'PSNR':>6s} {'MS-SSIM':>8s}")
    rows, panels = [], []
    for name, image in photos.items():
        data = model.compress([image])[0]
        atomic_write_bytes(tmp / f"{Path(name).stem}.cod", data)
        recon = model.decompress(data)
        H, W = image.shape[:2]
        row = {"image": name, "size": f"{W}x{H}", "cod_bytes": len(data), "cod_bpp": 8 * len(data) / (H * W),
               "cod_psnr": psnr(image, recon), "cod_ms_ssim": ms_ssim(image, recon)}
        anchors = {codec: matched_anchor(image, codec, len(data)) for codec in ("jpeg", "webp")}
        for codec, a in anchors.items():
            row.update({f"{codec}_bytes": a["bytes"], f"{codec}_bpp": 8 * a["bytes"] / (H * W),
                        f"{codec}_matched": a["matched"], f"{codec}_psnr": psnr(image, a["recon"]),
                        f"{codec}_ms_ssim": ms_ssim(image, a["recon"])})
        rows.append(row)
        for method in ("cod", "jpeg", "webp"):
            label = "CoD" if method == "cod" else method.upper()
            note = "" if method == "cod" or row[f"{method}_matched"] else "  (its smallest file)"
            say(f"{name if method == 'cod' else '':14s} {row['size'] if method == 'cod' else '':>8s} {label:>6s} "
                f"{row[f'{method}_bytes']:6d} {row[f'{method}_bpp']:7.4f} {row[f'{method}_psnr']:6.2f} "
                f"{row[f'{method}_ms_ssim']:8.4f}{note}")
        panels.append(_panel(image, recon, anchors["webp"]["recon"],
                             (f"{name}", f"CoD {len(data)} bytes", f"WebP {anchors['webp']['bytes']} bytes")))
    width = max(p.shape[1] for p in panels)
    picture = np.concatenate([np.pad(p, ((0, 8), (0, width - p.shape[1]), (0, 0)), constant_values=255)
                              for p in panels], axis=0)
    atomic_write_bytes(tmp / "demo.png", png_bytes(picture))
    means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k.endswith(("_psnr", "_ms_ssim", "_bpp"))}
    say(f"mean over the {len(rows)} photos: CoD {means['cod_bpp']:.4f} bpp, {means['cod_psnr']:.2f} dB, MS-SSIM "
        f"{means['cod_ms_ssim']:.3f}; the smallest WebP files are {means['webp_bpp'] / means['cod_bpp']:.1f}x and "
        f"JPEG's {means['jpeg_bpp'] / means['cod_bpp']:.1f}x larger")
    return {"model": source, "fingerprint": model.fingerprint, "bpp": model.bpp, "threads": 1, "held_out": rows,
            "means": means}


def _panel(original: np.ndarray, cod_recon: np.ndarray, anchor: np.ndarray, captions: tuple[str, ...]) -> np.ndarray:
    """original | CoD | anchor side by side, each with a caption strip above it."""
    from PIL import Image, ImageDraw

    tiles = []
    for image, caption in zip((original, cod_recon, anchor), captions):
        h, w = image.shape[:2]
        tile = Image.new("RGB", (w + 4, h + 16), "white")
        tile.paste(Image.fromarray(image), (0, 16))
        ImageDraw.Draw(tile).text((2, 2), caption, fill="black")
        tiles.append(np.asarray(tile))
    return np.concatenate(tiles, axis=1)


def train_small_model(out: Path, steps: int, seed: int, say, progress: bool = True) -> Path:
    """A tiny CoD trained from scratch for exactly `steps` steps on the photos in TRAIN (progress and time left on
    the way); the exported EMA weights as a model directory."""
    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    from cod.training.data import collate_skipping, crop
    from cod.training.module import CoDTrainingModule

    photos = list(skimage_photos(TRAIN).values())

    class Crops(Dataset):
        def __len__(self) -> int:
            return steps * BATCH

        def __getitem__(self, i: int):
            rng = random.Random(seed * 1_000_003 + i)
            return crop(photos[i % len(photos)], CROP, True, rng), i

    say(f"training a tiny CoD ({TRAIN_MODEL['bits']} bits per 16x16 pixels) for {steps} steps of {BATCH} "
        f"{CROP}x{CROP} crops of {len(photos)} scikit-image photos, on one thread (the bar shows the time left)")
    L.seed_everything(seed, verbose=False)
    module = CoDTrainingModule(**TRAIN_MODEL, lr=1e-3, warmup_steps=30, ema_decay=0.95, one_step_mse_weight=1.0,
                               null_condition_p=0.0, codebook_restart_window=25, repa=None,
                               sampling={"sampler": "euler", "steps": 1, "cfg": 1.0}, seed=seed)
    loader = DataLoader(Crops(), batch_size=BATCH, shuffle=False, num_workers=0, drop_last=True,
                        collate_fn=collate_skipping)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, enable_progress_bar=progress, deterministic=False)
    start = time.perf_counter()
    from cod.training.commands import quiet_third_party

    with quiet_third_party():
        trainer.fit(module, loader)
    say(f"trained {trainer.global_step} steps in {time.perf_counter() - start:.0f} s")
    return module.save_model_dir(out)


MAX_TRAIN_STEPS = 1_000_000


def train_steps(value: str) -> int:
    import argparse

    from cod.codec.commands import positive_int

    n = positive_int(value)
    if n > MAX_TRAIN_STEPS:
        raise argparse.ArgumentTypeError(f"at most {MAX_TRAIN_STEPS} steps (use `cod fit` for real training), got "
                                         f"'{value}'")
    return n


def register(sub) -> None:
    from cod.codec.commands import non_negative_int

    p = sub.add_parser("demo", help="compress bundled photos with the embedded model and compare with JPEG/WebP "
                                    "(--train: train a small model first)")
    p.add_argument("--out", default="cod-demo", help="output folder (picture, report, .cod files, model directory)")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder of an earlier run")
    p.add_argument("--train", nargs="?", const=TRAIN_STEPS, type=train_steps, metavar="STEPS",
                   help=f"train a tiny model from scratch for STEPS steps first (default {TRAIN_STEPS}, a few "
                        f"minutes on one CPU thread) and demonstrate that one")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of --train (default 0)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> None:
    run_demo(Path(args.out), overwrite=args.overwrite, train_steps=args.train, seed=args.seed,
             quiet=getattr(args, "quiet", False))
