"""Entropy-coding benchmarks. Sections are subcommands; `coder` measures the rANS coder itself:

    python tools/bench_entropy.py coder                       # CPU: overhead, flush, throughput vs constriction
    python tools/bench_entropy.py coder --device cuda         # + the batched Triton coder (1024 streams)
    python tools/bench_entropy.py coder --n 1000000 --lanes 2048 --json coder.json

Overhead = code length over the ideal (sum of -log2 f/2^precision under the quantized tables), in % of the ideal,
for long streams of several distributions, with one lane (the coding loss alone: its flush is ~2 bytes), at the
default lane count and at --lanes (each lane adds ~4 bytes of flush); flush = bytes over the ideal
for 256 symbols of a 16-symbol alphabet (a 512x512 image at 0.0039 bpp), over many random streams. Throughput:
symbols/s and MB/s of coded output for encode and decode of the same symbols and tables by cod's coder and by
constriction's AnsCoder (its Categorical model built once for one table, and the batched per-symbol model for
per-symbol tables), with the ratio measured in the same run: cod's compiled coder (kernels/rans_cpu.c) at the
default lane count, and its NumPy reference at --lanes (lanes are what makes NumPy fast). With --device cuda, the Triton coder codes --batch
streams of --batch-n 8-bit symbols at once and is checked byte for byte against the CPU coder.

`models` measures what a trained prior saves on real files: for each model directory with a prior (cod fit-prior),
the payload bytes of every image of each --data folder coded fixed-length and entropy-coded (the encoder keeps the
smaller), the index bits under the prior's integer tables, the order-0 entropy of the folder's own index histogram
(what the best static distribution for exactly these images would reach: an oracle, for reference), and the round
trip (the entropy-coded indices decode to the fixed-length ones):

    python tools/bench_entropy.py models --model DIR [--model DIR2] --data ../shared/data/kodak [--json models.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from cod.entropy import decode, encode, ideal_bits, quantize_pmf
from cod.entropy.rans import Layout
from cod.kernels import rans_cpu


def best(fn, repeats: int) -> float:
    t = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def distributions(rng, K: int) -> dict[str, np.ndarray]:
    return {
        "uniform": np.ones(K),
        "dirichlet(1)": rng.dirichlet(np.ones(K)),
        "dirichlet(0.1) skewed": rng.dirichlet(np.full(K, 0.1)),
        "geometric 0.5": 0.5 ** np.arange(K),
        "one symbol 99.9%": np.r_[999.0, np.full(K - 1, 1.0 / (K - 1))],
    }


def overhead_rows(rng, n: int, lanes_options, precision: int) -> list[dict]:
    rows = []
    for K in (16, 256):
        for name, p in distributions(rng, K).items():
            f = quantize_pmf(p, precision)
            s = rng.choice(K, size=n, p=f / f.sum())
            ideal = ideal_bits(s, f)
            seen = set()
            for lanes in lanes_options:
                data = encode(s, f, lanes=lanes, precision=precision)
                J = Layout(data).lanes
                if J in seen:  # the default picked a lane count already listed
                    continue
                seen.add(J)
                rows.append({"K": K, "distribution": name, "n": n, "lanes": f"{J} (default)" if lanes is None else J,
                             "ideal_bytes": ideal / 8,
                             "bytes": len(data), "over_bytes": len(data) - ideal / 8,
                             "overhead_pct": 100 * (len(data) * 8 - ideal) / ideal if ideal else float("nan")})
    return rows


def flush_rows(rng, trials: int, precision: int) -> list[dict]:
    import constriction
    AnsCoder = constriction.stream.stack.AnsCoder
    Categorical = constriction.stream.model.Categorical
    rows = []
    for name, draw in (("uniform (4 bits each)", lambda: np.ones(16)),
                       ("dirichlet(1)", lambda: rng.dirichlet(np.ones(16))),
                       ("dirichlet(0.3)", lambda: rng.dirichlet(np.full(16, 0.3)))):
        over, c_over = [], []
        for _ in range(trials):
            f = quantize_pmf(draw(), precision)
            s = rng.choice(16, size=256, p=f / f.sum())
            over.append(len(encode(s, f, precision=precision)) - ideal_bits(s, f) / 8)
            c = AnsCoder()
            c.encode_reverse(s.astype(np.int32), Categorical(f / f.sum(), perfect=False))
            c_over.append(c.get_compressed().nbytes - ideal_bits(s, f) / 8)
        rows.append({"distribution": name, "n": 256, "trials": trials, "mean_bytes": float(np.mean(over)),
                     "max_bytes": float(np.max(over)), "constriction_mean_bytes": float(np.mean(c_over)),
                     "constriction_max_bytes": float(np.max(c_over))})
    return rows


def throughput_rows(rng, n: int, lanes: int, repeats: int, precision: int) -> list[dict]:
    import constriction
    AnsCoder = constriction.stream.stack.AnsCoder
    Categorical = constriction.stream.model.Categorical
    rows = []
    for K, per_symbol in ((16, False), (256, False), (16, True), (256, True)):
        m = min(n, 50_000) if per_symbol else n  # per-symbol tables hold n x K entries: fewer symbols
        T = m if per_symbol else 1
        f = quantize_pmf(rng.dirichlet(np.full(K, 0.5), size=T), precision)
        t = np.arange(m) if per_symbol else np.zeros(m, dtype=np.int64)
        cdf = np.cumsum(f, axis=1)
        u = rng.random(m) * (1 << precision)
        s = (cdf <= u[:, None]).sum(1) if per_symbol else np.searchsorted(cdf[0], u, side="right")
        tables = "per-symbol" if per_symbol else "one table"
        t = t if per_symbol else None
        ours = []  # (label, lanes, encode s, decode s, bytes)
        for label, env, J in (("cod (C)", None, None), ("cod (NumPy reference)", "numpy", lanes)):
            if env is None and not rans_cpu.available():
                continue
            with backend(env):
                data = encode(s, f, t, lanes=J, precision=precision)
                assert np.array_equal(decode(data, f, t, None if per_symbol else m, lanes=J, precision=precision), s)
                enc = best(lambda: encode(s, f, t, lanes=J, precision=precision), repeats)
                dec = best(lambda: decode(data, f, t, None if per_symbol else m, lanes=J, precision=precision),
                           repeats)
            ours.append((label, Layout(data).lanes, enc, dec, len(data)))
        probs = (f / float(1 << precision)).astype(np.float64)
        s32 = s.astype(np.int32)
        if per_symbol:
            model = Categorical(perfect=False)
            p32 = probs.astype(np.float32)

            def c_enc():
                c = AnsCoder()
                c.encode_reverse(s32, model, p32)
                return c.get_compressed()
            c_data = c_enc()
            c_dec = lambda: AnsCoder(c_data).decode(model, p32)  # noqa: E731
        else:
            model = Categorical(probs[0], perfect=False)

            def c_enc():
                c = AnsCoder()
                c.encode_reverse(s32, model)
                return c.get_compressed()
            c_data = c_enc()
            c_dec = lambda: AnsCoder(c_data).decode(model, m)  # noqa: E731
        assert np.array_equal(c_dec(), s32)
        c_enc_t, c_dec_t = best(c_enc, repeats), best(c_dec, repeats)
        c_bytes = c_data.nbytes
        for coder, J, te, td, size in (*ours, ("constriction", 1, c_enc_t, c_dec_t, c_bytes)):
            rows.append({"K": K, "tables": tables, "n": m, "lanes": J,
                         "coder": coder, "bytes": size, "encode_Msym_s": m / te / 1e6, "decode_Msym_s": m / td / 1e6,
                         "encode_MB_s": size / te / 1e6, "decode_MB_s": size / td / 1e6})
            if coder != "constriction":
                rows[-1]["encode_ratio_vs_constriction"] = c_enc_t / te  # > 1: cod faster
                rows[-1]["decode_ratio_vs_constriction"] = c_dec_t / td
    return rows


@contextlib.contextmanager
def backend(env: str | None):
    """COD_RANS_CPU for the block (None: the compiled coder, "numpy": the reference)."""
    old = os.environ.pop("COD_RANS_CPU", None)
    if env is not None:
        os.environ["COD_RANS_CPU"] = env
    try:
        yield
    finally:
        os.environ.pop("COD_RANS_CPU", None)
        if old is not None:
            os.environ["COD_RANS_CPU"] = old


def image_rows(rng, repeats: int, precision: int) -> list[dict]:
    """One image's stream: 256 symbols of 16 (512x512 at 0.0039 bpp), one lane, per call in microseconds."""
    import constriction
    AnsCoder = constriction.stream.stack.AnsCoder
    Categorical = constriction.stream.model.Categorical
    rows = []
    n, K = 256, 16
    for per_symbol in (False, True):
        T = n if per_symbol else 1
        f = quantize_pmf(rng.dirichlet(np.ones(K), size=T), precision)
        t = np.arange(n) if per_symbol else np.zeros(n, dtype=np.int64)
        cdf = np.cumsum(f, axis=1)
        s = (cdf[t] <= (rng.random(n) * (1 << precision))[:, None]).sum(1)
        data = encode(s, f, t, precision=precision)
        enc = best(lambda: encode(s, f, t, precision=precision), repeats * 10)
        dec = best(lambda: decode(data, f, t, precision=precision), repeats * 10)
        probs = (f / float(1 << precision)).astype(np.float32 if per_symbol else np.float64)
        s32 = s.astype(np.int32)
        model = Categorical(perfect=False) if per_symbol else Categorical(probs[0], perfect=False)
        args = (model, probs) if per_symbol else (model,)

        def c_enc():
            c = AnsCoder()
            c.encode_reverse(s32, *args)
            return c.get_compressed()
        c_data = c_enc()
        c_dec = (lambda: AnsCoder(c_data).decode(model, probs)) if per_symbol else \
            (lambda: AnsCoder(c_data).decode(model, n))
        rows.append({"tables": "per-symbol" if per_symbol else "one table", "n": n, "ideal_bytes": ideal_bits(s, f, t) / 8,
                     "cod_bytes": len(data), "constriction_bytes": c_data.nbytes,
                     "cod_encode_us": enc * 1e6, "cod_decode_us": dec * 1e6,
                     "constriction_encode_us": best(c_enc, repeats * 10) * 1e6,
                     "constriction_decode_us": best(c_dec, repeats * 10) * 1e6})
    return rows


def gpu_rows(rng, batch: int, n: int, repeats: int, precision: int, device: str = "cuda") -> list[dict]:
    """device="cpu" runs the same path through Triton's interpreter (TRITON_INTERPRET=1; tiny sizes only)."""
    return [row for lanes in (None, 16) for row in gpu_rows_for(rng, batch, n, repeats, precision, lanes, device)]


def gpu_rows_for(rng, batch: int, n: int, repeats: int, precision: int, lanes, device: str) -> list[dict]:
    import torch

    from cod.kernels import decode_batch, encode_batch
    K = 256
    f = quantize_pmf(rng.dirichlet(np.full(K, 0.5), size=4), precision)
    cdf = np.cumsum(f, axis=1)
    tis = [rng.integers(0, 4, n) for _ in range(batch)]
    syms = [(cdf[t] <= (rng.random(n) * (1 << precision))[:, None]).sum(1) for t in tis]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    datas = encode_batch(syms, f, tis, lanes, backend="triton", device=device)  # warm-up: compiles
    want = [encode(s, f, t, lanes=lanes, precision=precision) for s, t in zip(syms, tis)]
    assert datas == want, "GPU bytes differ from CPU"
    out = decode_batch(datas, f, tis, lanes=lanes, backend="triton", device=device)
    assert all(np.array_equal(a, b) for a, b in zip(out, syms)), "GPU decode differs"
    total = sum(len(d) for d in datas)

    def enc():
        encode_batch(syms, f, tis, lanes, backend="triton", device=device)
        sync()

    def dec():
        decode_batch(datas, f, tis, lanes=lanes, backend="triton", device=device)
        sync()
    te, td = best(enc, repeats), best(dec, repeats)
    return [{"streams": batch, "n_per_stream": n, "lanes": lanes or f"default ({Layout(datas[0]).lanes})", "K": K, "bytes": total, "encode_ms": te * 1e3,
             "decode_ms": td * 1e3, "encode_MB_s": total / te / 1e6, "decode_MB_s": total / td / 1e6,
             "encode_Msym_s": batch * n / te / 1e6, "decode_Msym_s": batch * n / td / 1e6,
             "device": torch.cuda.get_device_name() if device == "cuda" else "Triton interpreter (CPU)"}]


def table(rows: list[dict], title: str) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    print(f"\n## {title}\n")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |")


def coder(a) -> dict:
    rng = np.random.default_rng(a.seed)
    result = {"machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
              "precision": a.precision}
    if a.gpu_only and a.device != "cuda":
        raise SystemExit("bench_entropy: --gpu-only needs --device cuda")
    if a.device == "cuda" and a.gpu_only:
        result["gpu"] = gpu_rows(rng, a.batch, a.batch_n, a.repeats, a.precision)
        table(result["gpu"], "GPU (Triton) batched coder")
        return result
    result["overhead"] = overhead_rows(rng, a.n, [1, None, a.lanes], a.precision)
    table(result["overhead"], f"Code length vs ideal, n = {a.n}")
    result["flush"] = flush_rows(rng, a.trials, a.precision)
    table(result["flush"], "Flush: bytes over the ideal, 256 symbols of 16")
    result["throughput"] = throughput_rows(rng, a.n, a.lanes, a.repeats, a.precision)
    table(result["throughput"], f"CPU throughput (best of {a.repeats})")
    result["image"] = image_rows(rng, a.repeats, a.precision)
    table(result["image"], "One image's stream (one lane)")
    if a.device == "cuda":
        result["gpu"] = gpu_rows(rng, a.batch, a.batch_n, a.repeats, a.precision)
        table(result["gpu"], "GPU (Triton) batched coder")
    return result


def models(a) -> dict:
    import cod
    from cod.codec import api, container
    from cod.images import IMAGE_SUFFIXES, read_image

    result = {"machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"), "rows": []}
    for model_dir in a.model:
        model = cod.load(model_dir)
        if model.prior is None:
            raise SystemExit(f"{model_dir} has no prior: train one with `cod fit-prior --model {model_dir} ...`")
        for folder in a.data:
            files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[: a.limit]
            fixed = coded = tokens = 0
            ideal = 0.0
            chosen = 0
            seconds = 0.0
            histogram = np.zeros(model.codec.bottleneck.num_codes)
            for path in files:
                image = read_image(path)
                data_fixed = api.compress(model, [image], entropy="off")[0]
                start = time.perf_counter()
                data = api.compress(model, [image])[0]
                seconds += time.perf_counter() - start
                _, idx_fixed = api.parse(model, data_fixed)
                header, idx = api.parse(model, data)
                assert np.array_equal(idx, idx_fixed), f"{path}: entropy-coded indices differ"
                tokens += idx.size
                fixed += api.payload_size(model, header.height, header.width)
                coded += len(data) - container.read_header(data)[2]  # the payload (type and tag bytes included)
                chosen += header.payload_mode == container.PAYLOAD_TYPED
                ideal += model.prior.table_bits(idx)
                histogram += np.bincount(idx.reshape(-1), minlength=len(histogram))
            bits = model.codec.bits
            result["rows"].append({
                "model": Path(model_dir).name, "prior": model.prior.kind, "bits/index": bits, "bpp": model.bpp,
                "data": Path(folder).name, "images": len(files), "indices": tokens,
                "prior bits/index": ideal / tokens,
                "order-0 entropy": float(-(histogram[histogram > 0] / tokens * np.log2(histogram[histogram > 0] /
                                                                                       tokens)).sum()),
                "payload bytes fixed": fixed, "payload bytes cod": coded,
                "saving %": 100 * (1 - coded / fixed), "entropy-coded files": chosen,
                "compress s/image": seconds / max(1, len(files))})
    table(result["rows"], "Payload with the prior vs fixed-length")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="section", required=True)
    c = sub.add_parser("coder", help="the rANS coder: overhead, flush, throughput vs constriction")
    c.add_argument("--n", type=int, default=1_000_000, help="symbols of the long streams")
    c.add_argument("--lanes", type=int, default=2048, help="lane count for throughput (and a second overhead row)")
    c.add_argument("--precision", type=int, default=16)
    c.add_argument("--trials", type=int, default=200, help="random 256-symbol streams for the flush figure")
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    c.add_argument("--batch", type=int, default=1024, help="GPU: streams coded at once")
    c.add_argument("--batch-n", type=int, default=1024, help="GPU: symbols per stream")
    c.add_argument("--gpu-only", action="store_true", help="with --device cuda: the GPU rows alone")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", type=Path, help="also write the results here")
    m = sub.add_parser("models", help="payload bits of trained models with priors vs fixed-length")
    m.add_argument("--model", action="append", required=True, help="model directory with a prior (repeatable)")
    m.add_argument("--data", action="append", required=True, help="image folder (repeatable)")
    m.add_argument("--limit", type=int, default=None, help="at most this many images per folder")
    m.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()
    result = {"coder": coder, "models": models}[a.section](a)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
