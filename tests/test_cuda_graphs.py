"""CUDA graphs (cod.cuda_graphs): a decode replayed from graphs is the eager decode, and nothing changes on a CPU.

The CUDA tests run where a GPU is (the lent device machine: docs/benchmarks.md records the run); on a CPU they are
skipped and the passthrough tests check that the seam is inert there.
"""
from __future__ import annotations

import copy

import pytest
import torch

import cod
from cod.cuda_graphs import GraphedCall

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_calls_pass_through():
    calls = []

    def fn(x, scale=None):
        calls.append(x)
        return x * 2, None

    g = GraphedCall(fn)
    x = torch.ones(3)
    for _ in range(3):
        out, none = g(x)
        assert out is not x and torch.equal(out, x * 2) and none is None
    assert len(calls) == 3 and g.recorded == 0 and g.replays == 0


def test_model_with_graphs_decodes_the_same_on_cpu():
    model = cod.new_model("tiny-pixel").eval()
    indices = model.encode(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    plain = model.decode(indices, 64, 64, steps=2)
    model.use_cuda_graphs()
    assert torch.equal(model.decode(indices, 64, 64, steps=2), plain)
    assert model.cuda_graph_counts() == (0, 0)


def test_signatures_tell_apart_what_a_graph_would_bake_in():
    from torch.utils._pytree import tree_flatten

    from cod.cuda_graphs import _signature

    x = torch.zeros(2, 3)

    def key(*args, **kwargs):
        return _signature(*tree_flatten((args, kwargs)), None)

    assert key(x, y=x) != key(x, cond=x)  # the same leaves, other arguments
    assert len({key(x, True), key(x, 1), key(x, 1.0)}) == 3
    assert key(x, None) != key(x, x)
    assert key(x.t()) != key(x.t().contiguous())  # strides
    with torch.inference_mode():
        inside = key(x)
    assert inside != key(x)  # inference mode: its static buffers could not be written outside it


def test_graphs_are_dropped_when_the_weights_change():
    model = cod.new_model("tiny-pixel").eval().use_cuda_graphs()
    first = model.graphed_denoiser()
    assert model.graphed_denoiser() is first  # kept between decodes
    for change in (lambda m: m.to(torch.float64).to(torch.float32), lambda m: m.set_precision("bf16"),
                   lambda m: m.compile_denoiser()):
        change(model)
        assert model.graphed_denoiser() is not first
        first = model.graphed_denoiser()
    copied = copy.deepcopy(first)
    assert copied.graphs == {} and copied.recorded == 0


def test_onestep_model_with_graphs_on_serves_every_path():
    model = cod.new_model("cod-lite-0.0039").eval().use_cuda_graphs()
    model.graphed_denoiser()  # the generator itself, kept apart from its decode_indices and inference wrappers
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    indices = model.encode(image)
    assert model.decode(indices, 64, 64).shape == (1, 3, 64, 64)
    assert model.reconstruct(image).shape == (1, 3, 64, 64)


@cuda
def test_graphed_function_replays_with_new_inputs():
    def fn(x, t, cond=None):
        return torch.sin(x) * t[:, None] + cond, cond

    g = GraphedCall(fn)
    with torch.no_grad():
        _replay_four(g, fn)
    assert g.recorded == 1 and g.replays == 3
    with torch.no_grad():
        g(torch.randn(3, 8, device="cuda"), torch.zeros(3, device="cuda"), cond=torch.zeros(3, 8, device="cuda"))
    assert g.recorded == 1  # a new shape: its first call is eager
    _replay_four(g, fn)  # with autograd on, calls are never replayed (a graph holds no autograd state)
    assert g.replays == 3


def _replay_four(g, fn):
    for i in range(4):
        x = torch.randn(2, 8, device="cuda")
        t = torch.full((2,), float(i), device="cuda")
        c = torch.randn(2, 8, device="cuda")
        out, _ = g(x, t, cond=c)
        assert torch.equal(out, fn(x, t, cond=c)[0])


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_decode_with_graphs_is_the_eager_decode(precision):
    model = cod.new_model("tiny-pixel").to("cuda").eval().set_precision(precision)
    indices = model.encode(torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)).cuda())
    eager = model.decode(indices, 128, 128, steps=6)
    model.use_cuda_graphs()
    first = model.decode(indices, 128, 128, steps=6)
    again = model.decode(indices, 128, 128, steps=6)
    assert torch.equal(first, eager) and torch.equal(again, eager)
    recorded, replays = model.cuda_graph_counts()
    assert recorded >= 1 and replays >= 4


@cuda
def test_onestep_decode_with_graphs_is_the_eager_decode():
    model = cod.new_model("cod-lite-0.0039").to("cuda").eval()
    model.fold_modulation()
    indices = model.encode(torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)).cuda())
    eager = model.decode(indices, 128, 128)
    model.use_cuda_graphs()
    outs = [model.decode(indices, 128, 128) for _ in range(3)]
    assert all(torch.equal(o, eager) for o in outs)
    assert model.cuda_graph_counts() == (1, 2)


@cuda
def test_tiled_decode_with_graphs_is_the_eager_tiled_decode():
    model = cod.new_model("tiny-pixel").to("cuda").eval().set_precision("bf16")
    indices = model.encode(torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)).cuda())
    eager = model.decode(indices, 256, 256, steps=4, tile=128)
    model.use_cuda_graphs()
    assert all(torch.equal(model.decode(indices, 256, 256, steps=4, tile=128), eager) for _ in range(2))
    assert model.cuda_graph_counts()[0] >= 1
