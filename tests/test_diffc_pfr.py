"""PFR selection and regeneration: determinism, backends agreeing, the regenerated winner being the scored
candidate (upstream PR #6), and the statistics of the truncated race against an exact-Gaussian simulation."""
from __future__ import annotations

import numpy as np
import pytest

from cod.diffc import pfr, philox
from cod.diffc.layout import StepLayout, layout, partition, zipf_share
from cod.diffc.tables import zipf_table
from cod.kernels import diffc_cpu

needs_cpu_kernel = pytest.mark.skipif(not diffc_cpu.available(), reason=f"no C compiler ({diffc_cpu.error()})")


def residual(d: int, bits: float, seed: int = 0) -> np.ndarray:
    """A fixed r of KL = bits: ||r||^2 / (2 ln 2) = bits."""
    direction = np.random.default_rng(seed).standard_normal(d)
    return (direction / np.linalg.norm(direction) * np.sqrt(2 * np.log(2) * bits)).astype(np.float32)


def test_arrival_times_increase_and_are_shared_by_seed():
    a = pfr.log_arrival_times(0, 1, 2, 1000)
    assert np.all(np.diff(a) > 0)
    assert np.array_equal(a, pfr.log_arrival_times(0, 1, 2, 1000))
    assert not np.array_equal(a, pfr.log_arrival_times(0, 1, 3, 1000))


def test_selection_is_deterministic_and_the_backends_agree():
    D = 300
    lay = layout(40, D)
    r = np.random.default_rng(1).standard_normal(D).astype(np.float32) * 0.3
    chosen = pfr.select(0, 2, lay, r, backend="numpy")
    assert chosen == pfr.select(0, 2, lay, r, backend="numpy")
    assert all(0 <= i < n for i, n in zip(chosen, lay.counts))
    if diffc_cpu.available():
        assert pfr.select(0, 2, lay, r, backend="cpu") == chosen
    with pytest.raises(ValueError, match="backend"):
        pfr.select(0, 2, lay, r, backend="cuda-magic")


def test_the_regenerated_winner_is_the_scored_candidate():
    D, k, seed = 200, 4, 9
    lay = layout(30, D)
    r = np.random.default_rng(2).standard_normal(D).astype(np.float32)
    scores = pfr.score(seed, k, lay, r, backend="numpy")
    chosen = pfr.select(seed, k, lay, r, backend="numpy")
    z = pfr.regenerate(seed, k, lay, chosen)
    offsets = np.concatenate([[0], np.cumsum(lay.counts)])
    for c, (s, d) in enumerate(zip(lay.starts, lay.dims)):
        assert np.array_equal(z[s:s + d], philox.candidate_normals(seed, k, c, [chosen[c]], d)[0])
        assert np.isclose(scores[offsets[c] + chosen[c]], float(z[s:s + d] @ r[s:s + d]), rtol=1e-5, atol=1e-5)
    order = partition(seed, k, lay, D)
    flat = pfr.step_sample(seed, k, lay, chosen, order, D)
    assert np.array_equal(flat[order], z)
    assert np.array_equal(pfr.step_sample(seed, k, layout(0, D), [], None, D), philox.fallback_normals(seed, k, D))


def race(bits: int, padding: int, trials: int, d: int = 400):
    """(bias E<z - r, r^>, mean log2(n* + 1), mean code length under our octave model, orthogonal variance)."""
    b = bits + padding
    lay = StepLayout(bits, (b,), (d,))
    r = residual(d, bits)
    unit = r / np.linalg.norm(r)
    F = zipf_table()[b - 1, zipf_share(bits, b, b)]
    bias, logs, lengths, ortho = [], [], [], []
    for seed in range(trials):
        i = pfr.select(seed, 0, lay, r)[0]
        z = philox.candidate_normals(seed, 0, 0, [i], d)[0].astype(np.float64)
        bias.append(np.dot(z - r, unit))
        ortho.append(np.sum((z - np.dot(z, unit) * unit) ** 2) / (d - 1))
        e = (i + 1).bit_length() - 1
        logs.append(np.log2(i + 1))
        lengths.append(16 - np.log2(F[e]) + (e if e < b else 0))
    return np.mean(bias), np.mean(logs), np.mean(lengths), np.mean(ortho)


@needs_cpu_kernel
def test_truncated_race_statistics():
    # An exact-Gaussian simulation of the same race (NumPy's generator, 100 trials; d = 400, 10 bits, 2^12
    # candidates) gives bias -0.55 +- 0.07 and mean log2(n* + 1) = 7.0; with 6 padding bits (2^16 candidates)
    # -0.16 +- 0.09 and 8.6. (The spec's §4.4 quotes -0.7 and 6.0 for the first; we could not reproduce those.)
    bias2, logs2, length2, ortho2 = race(10, 2, trials=60)
    assert -0.9 < bias2 < -0.2 and 6.0 < logs2 < 8.3
    assert 0.9 < ortho2 < 1.1  # the orthogonal part of the selected sample is still N(0, I)
    assert 8 < length2 < 10 + np.log2(11) + 1  # ~ the budget, plus the Zipf model's log2(D + 1) overhead
    bias6, logs6, _, _ = race(10, 6, trials=30)
    assert abs(bias6) < 0.45 and bias6 > bias2 and logs6 > logs2  # more candidates: less bias toward the prior
