"""DiffC's shared randomness: Philox-4x32-10 known answers, the integer normal transform, and the three
implementations (NumPy reference, compiled CPU kernel, Triton under TRITON_INTERPRET=1) giving identical bits."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy.special import ndtri

from cod.diffc import philox
from cod.diffc.tables import SHA256, normal_table, zipf_table
from cod.kernels import diffc_cpu

# Random123's published known-answer vectors for philox4x32_10 (kat_vectors)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    assert tuple(int(w) for w in philox.philox4x32(*counter, *key)) == expected


def test_philox_vectorised_equals_one_at_a_time():
    c0 = np.array([0, 1, 2 ** 32 - 1, 77], dtype=np.uint32)
    batch = np.stack(philox.philox4x32(c0, 5, 6, 7, 8, 9), axis=-1)
    for i, c in enumerate(c0):
        assert tuple(batch[i]) == tuple(int(w) for w in philox.philox4x32(int(c), 5, 6, 7, 8, 9))


def test_stream_words_are_philox_blocks_in_order():
    words = philox.stream_words(7, philox.CANDIDATES, 3, 2, 11, 10)[0]
    c3 = (1 << 24) | 3
    for q in range(3):
        block = [int(w) for w in philox.philox4x32(q, 11, 2, c3, 7, 0)]
        assert list(words[4 * q: 4 * q + 4]) == block[: len(words[4 * q: 4 * q + 4])]
    with pytest.raises(ValueError, match="2\\^24"):
        philox.c3_word(1, 1 << 24)


def test_shipped_tables_are_the_recorded_ones():
    assert hashlib.sha256(normal_table().astype("<i4").tobytes()).hexdigest() == SHA256["normal.i32"]
    assert hashlib.sha256(zipf_table().astype("<u2").tobytes()).hexdigest() == SHA256["zipf.u16"]
    t = normal_table().astype(np.int64)
    assert t.size == 3223
    assert np.all(np.diff(t[:256]) < 0)  # |z| decreases with the tail position v
    for e in range(8, 31):
        knots = t[256 + (e - 8) * 129: 256 + (e - 7) * 129]
        delta = knots[:-1] - knots[1:]
        assert delta.min() >= 0 and delta.max() < 1 << 17  # what makes the 32-bit product safe
        if e < 30:
            assert knots[-1] == t[256 + (e - 7) * 129]  # an octave's last knot is the next one's first
    z = zipf_table()
    for b in range(1, 17):
        assert np.all(z[b - 1, :, : b + 1].sum(axis=1) == 1 << 16) and z[b - 1, :, : b + 1].min() >= 1
        assert np.all(z[b - 1, :, b + 1:] == 0)


def test_normal_transform_accuracy_symmetry_and_moments():
    words = np.concatenate([np.arange(0, 2 ** 32, 1009, dtype=np.uint64),
                            np.arange(0, 4096), 2 ** 31 - 1 - np.arange(4096),  # both ends of each sign
                            2 ** 32 - 1 - np.arange(4096)]).astype(np.uint32)
    z = philox.normals(words).astype(np.float64)
    v = (words & 0x7FFFFFFF).astype(np.float64)
    exact = -ndtri((v + 0.5) / 2 ** 32)
    exact = np.where(words >> 31, -exact, exact)
    assert np.abs(z - exact).max() < 5e-6
    assert np.abs(z).max() < 6.34
    assert np.array_equal(philox.normals(words ^ np.uint32(1 << 31)), -philox.normals(words))
    draws = philox.stream_normals(0, philox.INITIAL, 0, 0, 0, 1 << 20)[0].astype(np.float64)
    assert abs(draws.mean()) < 5e-3 and abs(draws.var() - 1) < 6e-3


def test_domains_are_independent_streams():
    a = philox.initial_noise(0, 64)
    b = philox.fallback_normals(0, 0, 64)
    c = philox.candidate_normals(0, 0, 0, [0], 64)[0]
    d = philox.initial_noise(1, 64)  # another seed
    for x, y in ((a, b), (a, c), (b, c), (a, d)):
        assert not np.array_equal(x, y)
    assert np.array_equal(philox.candidate_normals(0, 2, 1, [5, 9], 10)[1], philox.candidate_normals(0, 2, 1, [9], 10)[0])


# -- the compiled CPU kernel -----------------------------------------------------------------------------------
needs_cpu_kernel = pytest.mark.skipif(not diffc_cpu.available(), reason=f"no C compiler ({diffc_cpu.error()})")


@needs_cpu_kernel
def test_cpu_kernel_words_and_normals_equal_the_reference():
    c2 = np.array([3, 0, 1, 2 ** 20, 17])
    c1 = np.array([0, 5, 2 ** 31 + 7, 65535, 2 ** 32 - 1])
    for length in (1, 4, 37, 70):
        assert np.array_equal(diffc_cpu.stream(123, (1 << 24) | 7, c2, c1, length, False),
                              philox.stream_words(123, 1, 7, c2, c1, length))
        assert np.array_equal(diffc_cpu.stream(2 ** 32 - 1, (5 << 24) | 9, c2, c1, length, True).view(np.uint32),
                              philox.stream_normals(2 ** 32 - 1, 5, 9, c2, c1, length).view(np.uint32))


@needs_cpu_kernel
def test_cpu_kernel_scores_equal_the_reference_dot_products():
    rng = np.random.default_rng(0)
    dims, counts = [1, 5, 403, 64], [2, 40, 128, 17]
    starts = np.concatenate([[0], np.cumsum(dims)[:-1]])
    r = rng.standard_normal(sum(dims)).astype(np.float32)
    scores = diffc_cpu.score_chunks(r, starts, dims, counts, 5, (1 << 24) | 2)
    ref = np.concatenate([philox.candidate_normals(5, 2, c, np.arange(n), d).astype(np.float64)
                          @ r[s:s + d].astype(np.float64) for c, (s, d, n) in enumerate(zip(starts, dims, counts))])
    assert np.abs(scores - ref).max() < 1e-4 * max(1, np.abs(ref).max())
    again = diffc_cpu.score_chunks(r, starts, dims, counts, 5, (1 << 24) | 2, threads=1)
    assert np.array_equal(scores, again)  # a fixed summation order per candidate, whatever the threads


# -- Triton under the interpreter ------------------------------------------------------------------------------
SCRIPT = textwrap.dedent("""
    import json, numpy as np, torch
    from cod.diffc import philox
    from cod.kernels import philox as K
    out = {}
    rng = np.random.default_rng(1)
    out["kat"] = [int(w) for w in K.stream(0, 0, [0], [0], 4, False, "cpu").numpy().view(np.uint32)[0]]
    # random (seed, k, c, n, j), candidates far beyond n * d_c = 2^31 (the release's int32 offset bug)
    ok_words = ok_normals = True
    for trial in range(4):
        seed, k = int(rng.integers(0, 2 ** 32)), int(rng.integers(0, 2 ** 24))
        c2 = rng.integers(0, 2 ** 16, size=3)
        c1 = np.array([0, 65535, int(rng.integers(0, 2 ** 32))])
        length = int(rng.integers(1, 90))
        c3 = (1 << 24) | k
        ok_words &= np.array_equal(K.stream(seed, c3, c2, c1, length, False, "cpu").numpy().view(np.uint32),
                                   philox.stream_words(seed, 1, k, c2, c1, length))
        ok_normals &= np.array_equal(K.stream(seed, c3, c2, c1, length, True, "cpu").numpy().view(np.uint32),
                                     philox.stream_normals(seed, 1, k, c2, c1, length).view(np.uint32))
    out["words"], out["normals"] = bool(ok_words), bool(ok_normals)
    # scoring: the fused kernel against NumPy dot products, ragged chunks
    dims, counts = [3, 50, 130], [8, 40, 64]
    starts = np.concatenate([[0], np.cumsum(dims)[:-1]])
    r = rng.standard_normal(sum(dims)).astype(np.float32)
    s = K.score_chunks(torch.from_numpy(r), starts, dims, counts, 11, (1 << 24) | 4, block_n=16, block_q=8).numpy()
    ref = np.concatenate([philox.candidate_normals(11, 4, c, np.arange(n), d).astype(np.float64)
                          @ r[st:st + d].astype(np.float64) for c, (st, d, n) in enumerate(zip(starts, dims, counts))])
    out["score_err"] = float(np.abs(s - ref).max())
    # regeneration of a winner equals the scored candidate: regenerate n with d_c = 40000, n * d_c > 2^31
    d, n = 40000, 60000
    z = K.stream(3, (1 << 24) | 2, [1], [n], d, True, "cpu").numpy()[0]
    out["regen"] = bool(np.array_equal(z.view(np.uint32), philox.candidate_normals(3, 2, 1, [n], d)[0].view(np.uint32)))
    print(json.dumps(out))
""")


def test_triton_kernels_match_the_reference_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert tuple(out["kat"]) == KAT[0][2]
    assert out["words"] and out["normals"] and out["regen"]
    assert out["score_err"] < 1e-4
