"""CUDA graphs for the decode side: a network call recorded once per input signature and replayed.

A decode is many identical network calls (25 sampler steps, each the same shapes); on a GPU the XL denoiser's
call is a few thousand small kernels, so in eager mode the GPU waits on Python and kernel launches (a bf16 pass of
pixel-xl at 512² took about as long for one CFG half as for two on an H100: docs/benchmarks.md). A CUDA graph
records the kernels of one call and replays them with one launch.

`GraphedCall(fn)` wraps a function of tensors (the sampler's `net(x, t, cond=...)`, a one-step model's
`decode_indices(indices, noise=...)`) and keeps one graph per signature: the shapes, dtypes and devices of its
tensor arguments and which arguments are None. The first call of a signature runs eagerly (it warms up whatever
initialises lazily: cuBLAS workspaces, Triton autotuning, cached position tables); the second records the graph
into static input buffers and replays it; later calls copy their inputs into those buffers and replay. Outputs
are returned as copies (the graph's own output buffers are overwritten by the next replay: a sampler keeps
earlier velocities in its history). A replay runs the same kernels on the same inputs as the eager call, so a
decode's result does not change with graphs (tests/test_cuda_graphs.py on a GPU; tools/bench_codec.py --graphs
checks the decoded images against the eager variant).

What a graph needs from the call: no host synchronisation and no host-side decision that depends on tensor
values (the samplers and denoisers keep to this: docs/kernels.md), and static shapes (each signature is its own
graph; a decode whose guidance is off at some steps records two). A signature whose recording fails falls back
to eager calls, with one warning, and is never tried again. On a CPU tensor, or with graphs off, the call is made
directly: nothing here changes what runs on a CPU.

All graphs of one GraphedCall share one memory pool: their replays never overlap (one stream, outputs copied out).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

log = logging.getLogger(__name__)


def _signature(flat: list) -> tuple:
    key = []
    for a in flat:
        if isinstance(a, torch.Tensor):
            key.append(("T", tuple(a.shape), a.dtype, str(a.device), a.requires_grad))
        elif a is None or isinstance(a, (bool, int, float, str)):
            key.append(("V", a))  # part of the key: a graph bakes host values in
        else:
            return ()  # something a graph cannot key on: call eagerly
    return tuple(key)


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list, out: Any):
        self.graph, self.inputs, self.out = graph, inputs, out


class GraphedCall:
    """fn(*args, **kwargs) replayed from one CUDA graph per input signature (module docstring)."""

    def __init__(self, fn: Callable, name: str = ""):
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", type(fn).__name__)
        self.graphs: dict[tuple, _Graph | None] = {}  # None: recording failed, call eagerly
        self.seen: set[tuple] = set()
        self.pool = None
        self.recorded = 0  # graphs recorded (for tests and benchmarks)
        self.replays = 0

    def __getattr__(self, name: str):  # the wrapped network's attributes (patch_size, ...) stay reachable
        if name == "fn":
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __call__(self, *args, **kwargs):
        flat, spec = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if (not tensors or any(t.device.type != "cuda" for t in tensors) or torch.is_grad_enabled()
                or torch.cuda.is_current_stream_capturing()):
            return self.fn(*args, **kwargs)
        key = _signature(flat)
        if not key:
            return self.fn(*args, **kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            if key in self.graphs or key not in self.seen:  # failed before, or first call: eager (the warm-up)
                self.seen.add(key)
                return self.fn(*args, **kwargs)
            entry = self._record(key, flat, spec)
            if entry is None:
                return self.fn(*args, **kwargs)
        for static, a in zip(entry.inputs, flat):
            if isinstance(static, torch.Tensor) and static.data_ptr() != a.data_ptr():
                static.copy_(a)
        entry.graph.replay()
        self.replays += 1
        return tree_map(lambda o: o.clone() if isinstance(o, torch.Tensor) else o, entry.out)

    def _record(self, key: tuple, flat: list, spec) -> _Graph | None:
        inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in flat]
        args, kwargs = tree_unflatten(inputs, spec)
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph's documentation asks
                self.fn(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a call that cannot be recorded still runs, eagerly
            log.warning("CUDA graph of %s not recorded (%s: %s); this call runs eagerly", self.name,
                        type(e).__name__, " ".join(str(e).split())[:300])
            self.graphs[key] = None
            torch.cuda.synchronize()
            return None
        entry = _Graph(graph, inputs, out)
        self.graphs[key] = entry
        self.recorded += 1
        return entry
