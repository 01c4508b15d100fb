"""The seam/quality cost of tiled decoding (cod.diffusion.tiling): each image decoded whole and in windows of each
--tiles size, same indices and seed; PSNR between the tiled and the whole decode, and each against the original.

    python tools/check_tiling.py --model cod/assets/demo-model --images ../shared/data/kodak --tiles 512,256,128

Prints a markdown table of means over the images (and the worst image for tiled-vs-whole); --json writes per-image
rows. Windows overlap by a quarter of the tile (cod.diffusion.tiling.tiling_for).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


def main() -> None:
    import cod
    from cod.codec.api import _padded_batch, padded_size
    from cod.images import collect_inputs, IMAGE_SUFFIXES, read_image

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--tiles", default="512,256,128", help="comma-separated window sides in pixels")
    ap.add_argument("--count", type=int, default=0, help="first N images only (0: all)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = cod.load(args.model)
    tiles = [int(t) for t in args.tiles.split(",")]
    paths = collect_inputs([args.images], IMAGE_SUFFIXES, False)
    paths = paths[: args.count] if args.count else paths
    sampling = {"steps": args.steps} if args.steps else {}
    rows = []
    for path in paths:
        image = read_image(path, 10 ** 8)
        H, W = image.shape[:2]
        ph, pw = padded_size(model, H, W)
        indices = model.encode(_padded_batch([image], model))
        decoded, seconds = {}, {}
        for tile in ["off"] + tiles:
            start = time.perf_counter()
            out = model.decode(indices, ph, pw, tile=tile, **sampling)[0, :, :H, :W].permute(1, 2, 0).numpy()
            seconds[tile] = time.perf_counter() - start
            decoded[tile] = out
        row = {"image": path.name, "size": f"{W}x{H}", "whole_vs_original": psnr(decoded["off"], image),
               "whole_s": seconds["off"]}
        for tile in tiles:
            row[f"{tile}_vs_whole"] = psnr(decoded[tile], decoded["off"])
            row[f"{tile}_vs_original"] = psnr(decoded[tile], image)
            row[f"{tile}_max_levels"] = int(np.abs(decoded[tile].astype(int) - decoded["off"]).max())
            row[f"{tile}_s"] = seconds[tile]
        rows.append(row)
        print(json.dumps(row), flush=True)
    n = len(rows)
    print(f"\n{n} images, model {args.model}\n")
    print("| decode | PSNR vs original (dB, mean) | change vs whole (dB) | PSNR vs whole decode (dB, mean / worst) "
          "| max abs diff (levels) | s per image |")
    print("|---|---|---|---|---|---|")
    base = np.mean([r["whole_vs_original"] for r in rows])
    print(f"| whole | {base:.3f} | – | – | – | {np.mean([r['whole_s'] for r in rows]):.2f} |")
    for tile in tiles:
        vs_orig = np.mean([r[f"{tile}_vs_original"] for r in rows])
        vs_whole = [r[f"{tile}_vs_whole"] for r in rows]
        print(f"| tile {tile} | {vs_orig:.3f} | {vs_orig - base:+.3f} | {np.mean(vs_whole):.2f} / {min(vs_whole):.2f} "
              f"| {max(r[f'{tile}_max_levels'] for r in rows)} | {np.mean([r[f'{tile}_s'] for r in rows]):.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
