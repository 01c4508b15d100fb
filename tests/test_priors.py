"""Index priors (cod/entropy/priors.py) and index-grid coding under them (cod/entropy/index_coding.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cod.entropy.index_coding import decode_grid, encode_grid
from cod.entropy.priors import (ContextPrior, StaticPrior, build_prior, default_clusters, kmeans_clusters,
                                prior_from_state, prior_state)
from cod.entropy.rans import StreamError
from cod.entropy.tables import PRECISION


def random_prior(kind: str, num_codes: int = 16, seed: int = 0, **hyper):
    torch.manual_seed(seed)
    prior = build_prior(kind, num_codes, **hyper)
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(0, 1.5)
    if isinstance(prior, ContextPrior):
        prior.set_clusters(kmeans_clusters(np.random.default_rng(seed).normal(size=(num_codes, 4)), prior.clusters))
    prior.freeze()
    return prior


def smooth_grid(h: int, w: int, num_codes: int, seed: int = 0) -> np.ndarray:
    """Spatially correlated indices, like a CoD's on a photo."""
    rng = np.random.default_rng(seed)
    base = np.cumsum(np.cumsum(rng.integers(-1, 2, size=(h, w)), 0), 1)
    return np.mod(base // 3, num_codes).astype(np.int64)


def test_context_logits_are_the_tables_at_each_position():
    """Training (position_logits) and coding (contexts -> table_logits) must describe the same model."""
    prior = random_prior("context", 16, clusters=4)
    grid = torch.from_numpy(smooth_grid(7, 9, 16))
    per_position = prior.position_logits(grid[None])[0].reshape(-1, 16)
    tables = prior.table_logits()
    for g, pos in enumerate(prior.schedule(7, 9)):
        ctx = prior.contexts(grid.numpy(), g, pos)
        torch.testing.assert_close(tables[ctx], per_position[pos])


@pytest.mark.parametrize("kind", ["static", "context"])
def test_contexts_read_only_earlier_groups(kind):
    """What the decoder computes for group g must not depend on indices it has not decoded yet."""
    prior = random_prior(kind, 16, **({"clusters": 5} if kind == "context" else {}))
    grid = smooth_grid(8, 6, 16)
    groups = prior.schedule(8, 6)
    assert np.array_equal(np.sort(np.concatenate(groups)), np.arange(48))  # every position exactly once
    rng = np.random.default_rng(1)
    for g, pos in enumerate(groups):
        scrambled = grid.copy().reshape(-1)
        later = np.concatenate(groups[g:])
        scrambled[later] = rng.integers(0, 16, size=len(later))
        assert np.array_equal(prior.contexts(grid, g, pos), prior.contexts(scrambled.reshape(8, 6), g, pos))


@pytest.mark.parametrize("kind,shape", [("static", (1, 1)), ("context", (1, 1)), ("context", (1, 5)),
                                        ("context", (5, 1)), ("context", (3, 3)), ("context", (16, 16)),
                                        ("static", (9, 4)), ("context", (7, 12))])
def test_grid_round_trip(kind, shape):
    prior = random_prior(kind, 16)
    grid = smooth_grid(*shape, 16, seed=shape[0] * 31 + shape[1])
    data = encode_grid(prior, grid)
    assert np.array_equal(decode_grid(prior, data, *shape), grid)


def test_grid_code_length_follows_the_tables():
    """The stream costs what the integer tables say, plus the coder's small constant."""
    prior = random_prior("context", 256, clusters=3)
    grid = smooth_grid(32, 32, 256)
    ideal_bytes = prior.table_bits(grid) / 8
    assert len(encode_grid(prior, grid)) <= ideal_bytes * 1.01 + 8


def test_wrong_size_or_truncated_stream_is_refused():
    prior = random_prior("context", 16)
    grid = smooth_grid(8, 8, 16)
    data = encode_grid(prior, grid)
    for cut in range(len(data)):
        try:
            out = decode_grid(prior, data[:cut], 8, 8)
        except StreamError:
            continue
        assert not np.array_equal(out, grid)  # never the original from less data
    with pytest.raises(StreamError):
        decode_grid(prior, data + b"\x00", 8, 8)


def test_frozen_tables_are_valid_and_deterministic():
    a, b = random_prior("context", 32, clusters=3), random_prior("context", 32, clusters=3)
    tables = a.frequency_tables()
    assert tables.shape == (a.num_tables, 32) and tables.min() >= 1
    assert (tables.astype(np.int64).sum(1) == 1 << PRECISION).all()
    assert np.array_equal(tables, b.frequency_tables())


def test_unfrozen_prior_cannot_code():
    with pytest.raises(RuntimeError, match="freeze"):
        encode_grid(StaticPrior(16), np.zeros((2, 2), np.int64))


def test_default_clusters_bound_the_tables():
    for k in (2, 16, 256, 4096):
        c = default_clusters(k)
        assert 1 <= c <= k and (1 + 3 * (c + 1) ** 4) * k <= 1 << 20


def test_kmeans_clusters_are_canonical():
    codebook = np.random.default_rng(0).normal(size=(64, 8))
    ids = kmeans_clusters(codebook, 5)
    assert ids.min() == 0 and ids.max() <= 4 and ids[0] == 0
    firsts = [np.flatnonzero(ids == c)[0] for c in range(ids.max() + 1)]
    assert firsts == sorted(firsts)  # cluster ids in order of their smallest member


def test_prior_state_round_trip_and_refusals():
    prior = random_prior("context", 16, clusters=4)
    state = prior_state(prior)
    again = prior_from_state("context", 16, {"clusters": 4}, dict(state))
    assert np.array_equal(again.frequency_tables(), prior.frequency_tables())
    bad_tables = state["tables"].clone()
    bad_tables[3, 0] += 1
    bad = [
        ({**state, "tables": bad_tables}, "tables"),
        ({**state, "tables": state["tables"].clamp(max=0) + 0}, "tables"),
        ({**state, "tables": state["tables"].float()}, "tables"),
        ({**state, "cluster_of": state["cluster_of"] + 4}, "cluster"),
        ({k: v for k, v in state.items() if k != "slot"}, "missing"),
        ({**state, "base": torch.full_like(state["base"], float("nan"))}, "non-finite"),
    ]
    for tensors, what in bad:
        with pytest.raises(ValueError, match=what):
            prior_from_state("context", 16, {"clusters": 4}, tensors)
    with pytest.raises(ValueError):
        prior_from_state("context", 32, {"clusters": 4}, dict(state))  # another codebook size
