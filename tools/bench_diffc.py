"""DiffC benchmark: candidate-scoring throughput per backend, and an RD sweep (bpp vs PSNR / MS-SSIM) with encode
and decode seconds for a model. Figures and commands: docs/benchmarks.md.

    python tools/bench_diffc.py --throughput                                  # CPU: compiled kernel and NumPy
    python tools/bench_diffc.py --throughput --device cuda                    # adds Triton (bit-identity checked)
    python tools/bench_diffc.py --preset tiny-pixel --size 64 --steps 0,4,8,16,24 --images ../shared/data/kodak
    python tools/bench_diffc.py --model MODEL_DIR --device cuda --images DIR --size 512 --recon-t 900,500,200,100

Throughput is "candidate-dims per second": every candidate of a chunk is d_c normals, each generated (Philox +
the integer normal transform) and multiplied into the residual. The layouts are one step of a 512x512 image:
latent (D = 16,384; 8 chunks of 2^16 candidates x 2,048 dims) and, on CUDA, pixel (D = 786,432; 22 chunks of
2^16 x ~35,700 dims). Before timing, the backend's candidates and its choices are checked against the NumPy
reference (words and normals bit for bit, argmin indices equal).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def check_identity(device) -> dict:
    """Bit identity of the backends' candidates with the NumPy reference (seeds that Triton might specialise,
    candidate numbers past n * d_c = 2^31)."""
    from cod.diffc import philox
    from cod.kernels import diffc_cpu

    out = {}
    rng = np.random.default_rng(0)
    cases = [(0, 0), (1, 1), (2 ** 31 + 5, 2 ** 24 - 1), (16, 7)]
    for seed, k in cases:
        c2 = rng.integers(0, 2 ** 16, size=4)
        c1 = np.array([0, 1, 65535, 2 ** 32 - 1])
        ref_w = philox.stream_words(seed, 1, k, c2, c1, 40001)
        ref_z = philox.stream_normals(seed, 1, k, c2, c1, 40001)
        if diffc_cpu.available():
            out.setdefault("cpu", True)
            out["cpu"] &= bool(np.array_equal(diffc_cpu.stream(seed, (1 << 24) | k, c2, c1, 40001, False), ref_w)
                               and np.array_equal(diffc_cpu.stream(seed, (1 << 24) | k, c2, c1, 40001, True)
                                                  .view(np.uint32), ref_z.view(np.uint32)))
        if str(device).startswith("cuda"):
            from cod.kernels import philox as K

            w = K.stream(seed, (1 << 24) | k, c2, c1, 40001, False, device).cpu().numpy().view(np.uint32)
            z = K.stream(seed, (1 << 24) | k, c2, c1, 40001, True, device).cpu().numpy()
            out.setdefault("triton", True)
            out["triton"] &= bool(np.array_equal(w, ref_w) and np.array_equal(z.view(np.uint32), ref_z.view(np.uint32)))
    return out


def throughput(backend: str, device, layout_name: str, repeats: int = 3) -> dict:
    from cod.diffc import pfr
    from cod.diffc.layout import StepLayout

    D, J, b = {"latent512": (16384, 8, 16), "pixel512": (786432, 22, 16), "small": (2048, 1, 10)}[layout_name]
    dims = [D // J] * (J - 1) + [D - (D // J) * (J - 1)]
    lay = StepLayout(J * 14, (b,) * J, tuple(dims))
    rng = np.random.default_rng(1)
    r = (rng.standard_normal(D) * 0.05).astype(np.float32)
    r_in = torch.from_numpy(r).to(device) if backend == "triton" else r
    work = sum(n * d for n, d in zip(lay.counts, lay.dims))
    pfr.score(0, 0, lay, r_in, backend, device)  # compile / warm up
    _sync(device)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        pfr.score(0, i, lay, r_in, backend, device)
        _sync(device)
        times.append(time.perf_counter() - start)
    best = min(times)
    row = {"backend": backend, "layout": layout_name, "candidate_dims": work, "seconds": best,
           "candidate_dims_per_s": work / best}
    if backend != "numpy" and layout_name != "pixel512":  # the choices equal those of the reference scores
        ref_lay = StepLayout(14, (12,), (D,)) if layout_name == "small" else StepLayout(14, (12,), (min(D, 4096),))
        rr = r[: ref_lay.dims[0]]
        rr_in = torch.from_numpy(rr).to(device) if backend == "triton" else rr
        row["same_choice_as_numpy"] = pfr.select(3, 2, ref_lay, rr_in, backend, device) == \
            pfr.select(3, 2, ref_lay, rr, "numpy")
    return row


def run_throughput(args) -> dict:
    from cod.kernels import diffc_cpu

    device = torch.device(args.device)
    result = {"identity": check_identity(device), "rows": []}
    backends = ["numpy"] + (["cpu"] if diffc_cpu.available() else [])
    if device.type == "cuda":
        backends.append("triton")
    for backend in backends:
        layouts = {"numpy": ["small"], "cpu": ["latent512"], "triton": ["latent512", "pixel512"]}[backend]
        for name in layouts:
            row = throughput(backend, device, name)
            if backend == "cpu":
                row["threads"] = torch.get_num_threads()
            result["rows"].append(row)
            print(f"{backend:7s} {name:10s} {row['candidate_dims']:.3g} candidate-dims in {row['seconds']:.3f} s: "
                  f"{row['candidate_dims_per_s']:.3g}/s" + (f", same choice as numpy: {row['same_choice_as_numpy']}"
                                                            if "same_choice_as_numpy" in row else ""), flush=True)
    print(f"bit identity with the NumPy reference: {result['identity']}")
    return result


def load_images(folder: str | None, size: int, count: int) -> list[tuple[str, np.ndarray]]:
    from cod.images import read_image

    if folder is None:
        rng = np.random.default_rng(0)
        return [(f"random{i}", rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for i in range(count)]
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:count]
    out = []
    for p in paths:
        img = read_image(p)
        H, W = img.shape[:2]
        top, left = (H - size) // 2, (W - size) // 2  # a centre crop of size x size
        out.append((p.name, np.ascontiguousarray(img[top:top + size, left:left + size])))
    return out


def run_sweep(args) -> dict:
    import cod
    from cod.diffc import codec, evaluate

    device = torch.device(args.device)
    if args.model:
        model = cod.load(args.model, device=device)
    else:
        torch.manual_seed(0)
        model = cod.new_model(args.preset).to(device)
        model.fingerprint = "00" * 32
    ks = evaluate.sweep_steps(model, [float(v) for v in args.recon_t.split(",")] if args.recon_t else None,
                              [int(v) for v in args.steps.split(",")] if args.steps else None)
    rows = []
    decode = []
    for name, image in load_images(args.images, args.size, args.count):
        for row in evaluate.evaluate_image(model, image, ks, backend=args.backend):
            rows.append({"image": name, **row})
            print(f"{name} K={row['K']:3d} {row['bpp']:.5f} bpp PSNR {row['psnr']:.3f} MS-SSIM {row['ms_ssim']:.4f} "
                  f"(encode {row['encode_s']:.1f} s for K={max(ks)}, denoise {row['denoise_s']:.2f} s)", flush=True)
        enc = codec.compress(model, image, steps=max(ks), backend=args.backend)
        start = time.perf_counter()
        out = codec.decompress(model, enc.data)
        decode.append({"image": name, "K": max(ks), "decode_s": time.perf_counter() - start,
                       "encode_s": enc.seconds["encode"], "bytes": len(enc.data)})
        assert out.shape == image.shape
    summary = []
    for K in ks:
        sel = [r for r in rows if r["K"] == K]
        summary.append({"K": K, **{m: float(np.mean([r[m] for r in sel])) for m in ("bpp", "psnr", "ms_ssim")}})
    print(f"{'K':>4} {'bpp':>9} {'PSNR':>7} {'MS-SSIM':>8}")
    for s in summary:
        print(f"{s['K']:>4} {s['bpp']:9.5f} {s['psnr']:7.3f} {s['ms_ssim']:8.4f}")
    for d in decode:
        print(f"{d['image']}: K={d['K']} encode {d['encode_s']:.1f} s, decode {d['decode_s']:.1f} s, {d['bytes']} bytes")
    return {"rows": rows, "summary": summary, "codec_seconds": decode,
            "model": args.model or args.preset, "size": args.size}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--throughput", action="store_true", help="candidate scoring throughput per backend")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch / kernel threads (default: torch's)")
    p.add_argument("--model", help="model directory for the RD sweep")
    p.add_argument("--preset", default="tiny-pixel", help="random model of a preset when no --model")
    p.add_argument("--images", help="folder of images (centre crops of --size); default: random images")
    p.add_argument("--count", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", help="comma-separated K values")
    p.add_argument("--recon-t", help="comma-separated recon timesteps")
    p.add_argument("--backend", default="auto")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    if args.throughput:
        result["throughput"] = run_throughput(args)
    if args.model or args.images or args.steps or args.recon_t or not args.throughput:
        result["sweep"] = run_sweep(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
