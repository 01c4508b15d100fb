"""Index priors (cod/entropy/priors.py) and index-grid coding under them (cod/entropy/index_coding.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cod.entropy.index_coding import decode_grid, encode_grid
from cod.entropy.priors import (EXP_LUT, LOGIT_ONE, ContextPrior, StaticPrior, build_prior, integer_freqs,
                                prior_from_state, prior_state)
from cod.entropy.rans import StreamError
from cod.entropy.tables import PRECISION


def random_prior(kind: str, num_codes: int = 16, seed: int = 0, **hyper):
    torch.manual_seed(seed)
    prior = build_prior(kind, num_codes, **hyper)
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(0, 1.5 if p.dim() == 1 or p.shape[0] == 4 else 0.4)
    prior.freeze()
    return prior


def smooth_grid(h: int, w: int, num_codes: int, seed: int = 0) -> np.ndarray:
    """Spatially correlated indices, like a CoD's on a photo."""
    rng = np.random.default_rng(seed)
    base = np.cumsum(np.cumsum(rng.integers(-1, 2, size=(h, w)), 0), 1)
    return np.mod(base // 3, num_codes).astype(np.int64)


@pytest.mark.parametrize("kind", ["static", "context"])
def test_integer_tables_follow_the_float_model(kind):
    """Training (float position_logits) and coding (integer group_tables) describe the same model, up to the
    fixed-point rounding: the code lengths agree closely."""
    prior = random_prior(kind, 16, **({"dim": 8} if kind == "context" else {}))
    grid = smooth_grid(12, 10, 16)
    float_bits = prior.bits(torch.from_numpy(grid)[None]).sum().item()
    assert prior.table_bits(grid) == pytest.approx(float_bits, rel=0.01)


def test_integer_freqs_are_exact_and_deterministic():
    rng = np.random.default_rng(0)
    logits = rng.integers(-40 * LOGIT_ONE, 40 * LOGIT_ONE, size=(500, 37))
    logits[0] = 5  # a flat row
    freqs = integer_freqs(logits)
    assert freqs.min() >= 1 and (freqs.sum(1) == 1 << PRECISION).all()
    assert (freqs[0] == freqs[0, 1]).sum() == 36  # flat: equal, the leftover units on the first symbol
    assert np.array_equal(freqs, integer_freqs(logits.copy()))
    assert EXP_LUT[0] == 1 << 30 and np.all(np.diff(EXP_LUT) <= 0)
    probs = freqs / (1 << PRECISION)
    exact = np.exp((logits - logits.max(1, keepdims=True)) / LOGIT_ONE)
    exact /= exact.sum(1, keepdims=True)
    big = exact > 1e-2  # (smaller probabilities are dominated by the 2^-16 resolution)
    assert np.abs(probs[big] / exact[big] - 1).max() < 0.01


def test_context_tables_use_exact_integer_sums():
    """The float64 product in group_tables must equal the exact integer product (no rounding anywhere)."""
    prior = random_prior("context", 64, dim=16)
    with torch.no_grad():  # the largest weights the int16 storage allows
        prior.embed_q.fill_(32767)
        prior.out_q.fill_(-32767)
    grid = smooth_grid(9, 9, 64)
    for g, pos in enumerate(prior.schedule(9, 9)):
        if g == 0:
            continue
        nb = prior.neighbours(grid, g, pos)
        embed = prior.embed_q[g - 1].numpy().astype(np.int64)
        hidden = sum(embed[j][nb[:, j]] for j in range(4))
        exact = hidden @ prior.out_q[g - 1].numpy().astype(np.int64)
        assert np.array_equal((hidden.astype(np.float64) @ prior.out_q[g - 1].numpy().astype(np.float64))
                              .astype(np.int64), exact)
        freqs, rows = prior.group_tables(grid, g, pos)
        assert freqs.shape == (len(pos), 64) and (freqs.sum(1) == 1 << PRECISION).all()


@pytest.mark.parametrize("kind", ["static", "context"])
def test_contexts_read_only_earlier_groups(kind):
    """What the decoder computes for group g must not depend on indices it has not decoded yet."""
    prior = random_prior(kind, 16, **({"dim": 4} if kind == "context" else {}))
    grid = smooth_grid(8, 6, 16)
    groups = prior.schedule(8, 6)
    assert np.array_equal(np.sort(np.concatenate(groups)), np.arange(48))  # every position exactly once
    rng = np.random.default_rng(1)
    for g, pos in enumerate(groups):
        scrambled = grid.copy().reshape(-1)
        later = np.concatenate(groups[g:])
        scrambled[later] = rng.integers(0, 16, size=len(later))
        a, b = prior.group_tables(grid, g, pos), prior.group_tables(scrambled.reshape(8, 6), g, pos)
        assert np.array_equal(a[0][a[1]], b[0][b[1]])


@pytest.mark.parametrize("kind,shape", [("static", (1, 1)), ("context", (1, 1)), ("context", (1, 5)),
                                        ("context", (5, 1)), ("context", (3, 3)), ("context", (16, 16)),
                                        ("static", (9, 4)), ("context", (7, 12))])
def test_grid_round_trip(kind, shape):
    prior = random_prior(kind, 16)
    grid = smooth_grid(*shape, 16, seed=shape[0] * 31 + shape[1])
    data = encode_grid(prior, grid)
    assert np.array_equal(decode_grid(prior, data, *shape), grid)


def test_large_grids_are_coded_piece_by_piece_into_the_same_stream(monkeypatch):
    """Tables are computed for pieces of a group at a time (bounded memory); the stream is the one the whole
    grid's tables give at once, and decodes piece by piece as well."""
    from cod.entropy import index_coding, rans

    prior = random_prior("context", 256, dim=8)
    grid = smooth_grid(24, 40, 256)
    whole = encode_grid(prior, grid)
    monkeypatch.setattr(index_coding, "TABLE_ENTRIES", 256 * 7)  # 7 positions per piece
    calls = []
    group_tables = prior.group_tables
    monkeypatch.setattr(prior, "group_tables", lambda g, gr, pos: calls.append(len(pos)) or group_tables(g, gr, pos))
    assert encode_grid(prior, grid) == whole
    assert max(calls) == 7 and len(calls) > 4 * (24 * 40 // 4) // 7
    assert np.array_equal(decode_grid(prior, whole, 24, 40), grid)
    # the same bytes as one encode() call over all positions with every table at once
    symbols, tables, rows, offset = [], [], [], 0
    flat = grid.reshape(-1)
    for g, pos in enumerate(prior.schedule(24, 40)):
        freqs, index = group_tables(grid, g, pos)
        symbols.append(flat[pos]), tables.append(freqs), rows.append(index + offset)
        offset += len(freqs)
    assert rans.encode(np.concatenate(symbols), np.concatenate(tables), np.concatenate(rows)) == whole


def test_grid_code_length_follows_the_tables():
    """The stream costs what the integer tables say, plus the coder's small constant."""
    prior = random_prior("context", 256, dim=8)
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


def test_unfrozen_prior_cannot_code():
    for prior in (StaticPrior(16), ContextPrior(16, dim=4)):
        with pytest.raises(RuntimeError, match="freeze"):
            encode_grid(prior, np.zeros((2, 2), np.int64))


def test_prior_state_round_trip_and_refusals():
    prior = random_prior("context", 16, dim=4)
    state = prior_state(prior)
    again = prior_from_state("context", 16, {"dim": 4}, dict(state))
    grid = smooth_grid(6, 6, 16)
    assert encode_grid(again, grid) == encode_grid(prior, grid)
    bad = [
        ({**state, "out_q": state["out_q"].int()}, "out_q"),
        ({**state, "frozen": torch.tensor(False)}, "never frozen"),
        ({**state, "base_q": state["base_q"] * 0 + 2 ** 31 - 1}, "out of range"),
        ({k: v for k, v in state.items() if k != "embed"}, "missing"),
        ({**state, "base": torch.full_like(state["base"], float("nan"))}, "non-finite"),
    ]
    for tensors, what in bad:
        with pytest.raises(ValueError, match=what):
            prior_from_state("context", 16, {"dim": 4}, tensors)
    with pytest.raises(ValueError):
        prior_from_state("context", 32, {"dim": 4}, dict(state))  # another codebook size
    with pytest.raises(ValueError):
        prior_from_state("context", 16, {"dim": 5}, dict(state))  # another width
