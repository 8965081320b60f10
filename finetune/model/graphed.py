"""The compiled decode step replayed as our own CUDA graph: no Python, no dynamo guards per token.

transformers' compiled step (`mode="reduce-overhead"`) already replays CUDA graphs, but every call first
evaluates dynamo's guards over the whole model: ~4 ms a token on V2-Lite's ~2,000 modules, more than
half the step at batch 1 (docs/benchmarks.md, `benchmarks/decode_host.py`). Guards exist to notice a
changed model; within one `generate` call nothing changes but the step's inputs and the KV cache, so
the step is captured once per input signature (batch, cache length) and then replayed after copying the
new inputs into the captured ones. Graphs never outlive the `generation.compiled_decoding` block that
made them, so weights updated between calls (GRPO) are always the ones replayed.

The step's only state is the static cache: keys and values written at the step's position, and each
layer's `cumulative_length` counter, which the warm-up call advances and capture does not; it is put
back before capturing. A model with forward hooks (routing statistics, routing replay) is not graphed:
its hooks collect Python-side values on every call, which a replay would skip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class _Entry:
    graph: Any
    inputs: dict[str, torch.Tensor]
    output: Any
    keep: Any  # the cache object, so its id (part of the key) cannot be reused while the graph lives


class GraphedStep:
    """Calls `step(**kwargs)` through a captured CUDA graph per input signature.

    `graph_factory` makes the graph object (`torch.cuda.CUDAGraph` with a shared memory pool by
    default): anything with `capture(fn, warmup, state) -> output` and `replay()`, where `state` lists
    the tensors the step advances in place.
    """

    def __init__(
        self, step: Callable[..., Any], graph_factory: Callable[[], Any] | None = None, max_graphs: int = 8
    ):
        self.step = step
        self.graph_factory = graph_factory or _CudaGraph.factory()
        self.max_graphs = max_graphs
        self.entries: dict[tuple, _Entry] = {}

    def __call__(self, **kwargs: Any) -> Any:
        key = _signature(kwargs)
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= self.max_graphs:
                # Oldest first: an evaluation's prompt chunks of many lengths would otherwise keep a
                # graph and a KV cache alive for each.
                del self.entries[next(iter(self.entries))]
            entry = self.entries[key] = self._capture(kwargs)
            # Capture records kernels without running them: this replay is the call's own step.
        else:
            for name, buffer in entry.inputs.items():
                buffer.copy_(kwargs[name])
        entry.graph.replay()
        return entry.output

    def _capture(self, kwargs: dict[str, Any]) -> _Entry:
        inputs = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        static = {**kwargs, **inputs}
        graph = self.graph_factory()
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        output = graph.capture(lambda: self.step(**static), lambda: self._warm(static), _counters(cache))
        return _Entry(graph, inputs, output, cache)

    def _warm(self, static: dict[str, Any]) -> None:
        """One uncaptured call (compilation, lazy allocations), its cache counters put back."""
        cache = static.get("cache", static.get("past_key_values"))
        counters = _counters(cache)
        saved = [c.clone() for c in counters]
        self.step(**static)
        for counter, value in zip(counters, saved, strict=True):
            counter.copy_(value)

    def clear(self) -> None:
        self.entries.clear()


def _signature(kwargs: dict[str, Any]) -> tuple:
    parts = []
    for name in sorted(kwargs):
        value = kwargs[name]
        if isinstance(value, torch.Tensor):
            parts.append((name, tuple(value.shape), value.dtype, value.device))
        elif isinstance(value, (int, float, bool, str, type(None))):
            parts.append((name, value))
        else:
            parts.append((name, id(value)))
    return tuple(parts)


def _counters(cache: Any) -> list[torch.Tensor]:
    """The cache's in-place position counters (one per layer of a static cache)."""
    layers = getattr(cache, "layers", None) or []
    return [
        c
        for c in (getattr(layer, "cumulative_length", None) for layer in layers)
        if isinstance(c, torch.Tensor)
    ]


def has_hooks(model: torch.nn.Module) -> bool:
    """Whether any forward hook would run in a step (module or global): a replay would skip it."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class _CudaGraph:
    """`torch.cuda.CUDAGraph` behind the small interface `GraphedStep` uses; one memory pool per
    `GraphedStep`, shared by its graphs (they never run concurrently)."""

    def __init__(self, pool: Any):
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    @classmethod
    def factory(cls) -> Callable[[], _CudaGraph]:
        pool: list[Any] = []

        def make() -> _CudaGraph:
            if not pool:
                pool.append(torch.cuda.graph_pool_handle())
            return cls(pool[0])

        return make

    def capture(self, fn: Callable[[], Any], warmup: Callable[[], None], state: list[torch.Tensor]) -> Any:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            warmup()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(self.graph, pool=self.pool):
            output = fn()
        return output

    def replay(self) -> None:
        self.graph.replay()
