"""Training throughput and peak memory per preset (one optimizer step = forward + backward + AdamW + EMA).

    python tools/bench_train.py --presets tiny-pixel pixel-s --size 128 --batch 8            # CPU
    python tools/bench_train.py --presets pixel-xl latent-xl --size 256 --batch 16 --device cuda --bf16

REPA is off (the teacher's cost is separate); latent presets use a random VAE of the preset's layout.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from cod.training.module import CoDTrainingModule


def bench(preset: str, size: int, batch: int, steps: int, device: str, bf16: bool) -> dict:
    module = CoDTrainingModule(preset, repa=None, vae_path=None).to(device)
    opt = module.configure_optimizers()["optimizer"]
    images = torch.rand(batch, 3, size, size, device=device)
    ids = torch.arange(batch)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 2):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = module._losses((images, ids))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        module.ema.update(module.denoiser)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    peak = (torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    params = sum(p.numel() for p in module.denoiser.parameters())
    return {"preset": preset, "size": size, "batch": batch, "device": device, "bf16": bf16,
            "params_m": params / 1e6, "s_per_step": step, "steps_per_s": 1 / step, "images_per_s": batch / step,
            "peak_gib": peak, "peak_kind": "CUDA allocated" if device.startswith("cuda") else "process max RSS"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny-pixel", "pixel-s"])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rows = [bench(p, a.size, a.batch, a.steps, a.device, a.bf16) for p in a.presets]
    print("| preset | params (M) | size | batch | device | s/step | images/s | peak GiB |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['params_m']:.1f} | {r['size']} | {r['batch']} | {r['device']}{' bf16' if r['bf16'] else ''} "
              f"| {r['s_per_step']:.3f} | {r['images_per_s']:.1f} | {r['peak_gib']:.2f} ({r['peak_kind']}) |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
