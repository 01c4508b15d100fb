"""Long fuzz run over .cod parsing (and some decodes): every mutated file must either decode or be refused with
a BitstreamError/ValueError; anything else (another exception, a hang) is a bug. The test suite runs a short
version (tests/test_codec_container.py).

    python tools/fuzz_bitstream.py --iterations 200000 --decode-every 5000 --seconds 600
"""
from __future__ import annotations

import argparse
import random
import sys
import time
import traceback

import numpy as np


import cod
from cod.codec import api


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0 and b:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        b = b[: rng.randrange(len(b) + 1)]
    elif kind == 2:
        pos = rng.randrange(len(b) + 1)
        b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == 3:
        b = bytearray(rng.randrange(256) for _ in range(rng.randint(0, 300)))
    elif kind == 4 and b:
        b[rng.randrange(len(b))] = rng.randrange(256)
    elif b:
        i, j = sorted(rng.randrange(len(b)) for _ in range(2))
        b[i:j] = b[i:j][::-1]
    return bytes(b)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=100_000)
    ap.add_argument("--decode-every", type=int, default=5000, help="also decode every Nth file that parses")
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    model = cod.new_model("tiny-pixel")
    model.fingerprint = "ab" * 32
    images = [np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
              for i, (h, w) in enumerate([(1, 1), (64, 64), (17, 513), (300, 20)])]
    seeds = model.compress(images, steps=2) + model.compress(images[1:2], fmt="official")
    counts = {"parsed": 0, "refused": 0, "decoded": 0}
    start = time.time()
    for i in range(args.iterations):
        if time.time() - start > args.seconds:
            break
        data = mutate(rng, rng.choice(seeds))
        fmt = "official" if rng.random() < 0.2 else "cod"
        try:
            header, indices = api.parse(model, data, fmt)
            counts["parsed"] += 1
            if counts["parsed"] % args.decode_every == 0 and header.height * header.width <= 1 << 20:
                next(api.iter_decoded(model, [(header, indices)], steps=1))
                counts["decoded"] += 1
        except ValueError:
            counts["refused"] += 1
        except Exception:  # noqa: BLE001 - the point of a fuzzer
            print(f"BUG at iteration {i}: {data.hex()}\n{traceback.format_exc()}")
            return 1
    print(f"{sum(counts.values()) - counts['decoded']} files in {time.time() - start:.0f} s: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
