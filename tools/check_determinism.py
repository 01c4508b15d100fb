"""How much does a decode depend on the number of CPU threads? Compress and decompress images with 1 and with N
threads (each in its own process) and compare: the .cod bytes, and the decoded pixels (how many values differ,
and by how much). docs/robustness.md records the figures.

    python tools/check_determinism.py --model DIR --threads 1 2 IMAGES...     # e.g. ../shared/data/kodak
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, numpy as np, torch
torch.set_num_threads(int(sys.argv[1]))
import cod
from cod.images import read_image
model = cod.load(sys.argv[2])
steps = None if sys.argv[3] == "default" else int(sys.argv[3])
out = {}
for i, path in enumerate(sys.argv[5:]):
    data = model.compress([read_image(path)], steps=steps)[0]
    np.save(f"{sys.argv[4]}/{i}.npy", model.decompress(data))
    out[path] = data.hex()
print(json.dumps(out))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+")
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, nargs=2, default=[1, 2])
    ap.add_argument("--steps", default="default", help="sampling steps stored in the files (default: the model's)")
    a = ap.parse_args()
    images = [str(p) for x in a.images for p in (sorted(Path(x).glob("*.png")) if Path(x).is_dir() else [Path(x)])]
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for t in a.threads:
            folder = Path(tmp, str(t))
            folder.mkdir()
            out = subprocess.run([sys.executable, "-c", CHILD, str(t), a.model, a.steps, str(folder), *images],
                                 capture_output=True, text=True, check=True)
            runs.append((folder, json.loads(out.stdout.strip().splitlines()[-1])))
        import numpy as np

        (fa, ca), (fb, cb) = runs
        same_files = sum(ca[p] == cb[p] for p in images)
        diff_values = total = worst = 0
        for i in range(len(images)):
            x, y = np.load(fa / f"{i}.npy").astype(int), np.load(fb / f"{i}.npy").astype(int)
            d = np.abs(x - y)
            diff_values, total, worst = diff_values + int((d > 0).sum()), total + d.size, max(worst, int(d.max()))
    print(f"| model | images | threads | identical .cod files | differing pixel values | max difference |")
    print(f"|---|---|---|---|---|---|")
    print(f"| {a.model} | {len(images)} | {a.threads[0]} vs {a.threads[1]} | {same_files}/{len(images)} | "
          f"{diff_values} of {total} ({diff_values / total:.1e}) | {worst} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
