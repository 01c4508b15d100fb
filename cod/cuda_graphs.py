"""CUDA graphs for the decode side: a network call recorded once per input signature and replayed.

A decode is many identical network calls (25 sampler steps, each the same shapes); on a GPU the XL denoiser's
call is a few thousand small kernels, so in eager mode the GPU waits on Python and kernel launches (a bf16 pass of
pixel-xl at 512² took about as long for one CFG half as for two on an H100: docs/benchmarks.md). A CUDA graph
records the kernels of one call and replays them with one launch.

`GraphedCall(fn)` wraps a function of tensors (the sampler's `net(x, t, cond=...)`, a one-step model's
`decode_indices(indices, noise=...)`) and keeps one graph per signature: the call's structure (which arguments,
which are None, host values and their types), the shapes, dtypes and devices of its tensors, and the global state
that changes what a call computes (inference mode, autocast, the wrapped module's training flag, COD_ATTENTION).
The first call of a signature runs eagerly (it warms up whatever initialises lazily: cuBLAS workspaces, Triton
autotuning, cached position tables); the second records the graph into static input buffers and replays it; later
calls copy their inputs into those buffers and replay. Outputs are returned as copies (the graph's own output
buffers are overwritten by the next replay: a sampler keeps earlier velocities in its history). A replay runs the
same kernels on the same inputs as the eager call, so a decode's result does not change with graphs
(tests/test_cuda_graphs.py on a GPU; tools/bench_codec.py --graphs checks decoded images against the eager ones).

What a graph needs from the call: no host synchronisation and no host-side decision that depends on tensor
values (the samplers and denoisers keep to this: docs/precision.md), static shapes (each signature is its own
graph; a decode whose guidance is off at some steps records two), and every tensor it reads that is neither an
input nor a parameter kept alive for as long as the graph: a cache that hands such a tensor to the call (the RoPE
table, cod.models.layers.rope_2d) passes it to `hold()`, which ties it to the graph being recorded. Weights are
read where they are at recording time, so the owner drops its graphs whenever its weights change (CoDModel: on
.to(), set_precision, folding, compile).

A signature whose recording fails runs eagerly from then on, with one warning. A failed capture can leave PyTorch's
CUDA state unusable for the rest of the process (seen once, with a host-to-device copy inside a compiled graph),
so that fallback is a last resort, not a guarantee. On CPU tensors, with autograd on, or while another capture
runs, the call is made directly: nothing here changes what runs on a CPU. One GraphedCall serves one thread at a
time (its static buffers are shared). At most MAX_GRAPHS signatures are kept (least recently used dropped first).
All graphs of one GraphedCall share one memory pool: their replays never overlap (one stream, outputs copied out).
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

log = logging.getLogger(__name__)

MAX_GRAPHS = 16
_holding: list | None = None  # tensors to keep alive with the graph being recorded (hold())


def hold(tensor: torch.Tensor) -> torch.Tensor:
    """Keep `tensor` alive as long as the CUDA graph now being recorded, if any (for tensors a call reads from a
    cache, which may drop them while the graph still reads their memory). Returns the tensor."""
    if _holding is not None and tensor.is_cuda and torch.cuda.is_current_stream_capturing():
        _holding.append(tensor)
    return tensor


def _signature(flat: list, spec, fn) -> tuple:
    key = [str(spec), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cuda"),
           getattr(getattr(fn, "__self__", fn), "training", None), os.environ.get("COD_ATTENTION", "")]
    for a in flat:
        if isinstance(a, torch.Tensor):
            key.append(("T", tuple(a.shape), tuple(a.stride()), a.dtype, str(a.device), a.requires_grad))
        elif a is None or isinstance(a, (bool, int, float, str)):
            key.append(("V", type(a).__name__, a))  # part of the key: a graph bakes host values in
        else:
            return ()  # something a graph cannot key on: call eagerly
    return tuple(key)


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list, out: Any, held: list):
        self.graph, self.inputs, self.out, self.held = graph, inputs, out, held


class GraphedCall:
    """fn(*args, **kwargs) replayed from one CUDA graph per input signature (module docstring)."""

    def __init__(self, fn: Callable, name: str = ""):
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", type(fn).__name__)
        self.graphs: OrderedDict[tuple, _Graph | None] = OrderedDict()  # None: recording failed, call eagerly
        self.seen: set[tuple] = set()
        self.pool = None
        self.recorded = 0  # graphs recorded (for tests and benchmarks)
        self.replays = 0

    def __getstate__(self) -> dict:  # a copy (deepcopy, pickle) starts without graphs: they belong to this object
        return {**self.__dict__, "graphs": OrderedDict(), "seen": set(), "pool": None, "recorded": 0, "replays": 0}

    def __call__(self, *args, **kwargs):
        flat, spec = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if (not tensors or any(t.device.type != "cuda" for t in tensors) or torch.is_grad_enabled()
                or torch.cuda.is_current_stream_capturing()):
            return self.fn(*args, **kwargs)
        key = _signature(flat, spec, self.fn)
        if not key:
            return self.fn(*args, **kwargs)
        with torch.cuda.device(tensors[0].device):
            if key in self.graphs:
                entry = self.graphs[key]
                if entry is None:  # recording failed before: eager
                    return self.fn(*args, **kwargs)
                self.graphs.move_to_end(key)
            elif key not in self.seen:  # first call of this signature: eager (the warm-up)
                self.seen.add(key)
                return self.fn(*args, **kwargs)
            else:
                entry = self._record(key, flat, spec)
                if entry is None:
                    return self.fn(*args, **kwargs)
            for static, a in zip(entry.inputs, flat):
                if isinstance(static, torch.Tensor):
                    static.copy_(a)
            entry.graph.replay()
            self.replays += 1
            return tree_map(lambda o: o.clone() if isinstance(o, torch.Tensor) else o, entry.out)

    def _record(self, key: tuple, flat: list, spec) -> _Graph | None:
        global _holding
        inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in flat]
        args, kwargs = tree_unflatten(inputs, spec)
        while len([g for g in self.graphs.values() if g is not None]) >= MAX_GRAPHS:
            oldest = next(k for k, g in self.graphs.items() if g is not None)
            del self.graphs[oldest]
        held: list = []
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph's documentation asks
                self.fn(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            _holding = held
            try:
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self.fn(*args, **kwargs)
            finally:
                _holding = None
        except Exception as e:  # noqa: BLE001 - a call that cannot be recorded still runs, eagerly (docstring)
            log.warning("CUDA graph of %s not recorded (%s: %s); this call runs eagerly", self.name,
                        type(e).__name__, " ".join(str(e).split())[:300])
            self.graphs[key] = None
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001 - the CUDA state is already broken: the eager call will say so
                pass
            return None
        entry = _Graph(graph, inputs, out, held)
        self.graphs[key] = entry
        self.recorded += 1
        return entry
