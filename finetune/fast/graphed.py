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
back before capturing.

Forward hooks run Python on every call, which a replay skips. Hooks marked `observer` (routing
statistics, routing replay's recording: they look at a step, never change it) are taken off their
modules while the step is warmed up, captured and replayed, a probe in their place records what each
would have seen (those tensors are graph outputs, refreshed by every replay), and after every replay
each observer is called on copies of them, in the order of the original forward. Any other hook keeps
the model off graphs (`blocks_graphs`).
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from finetune.compat import torch as compat_torch


@dataclass
class _Entry:
    graph: Any
    inputs: dict[str, torch.Tensor]
    output: Any
    keep: Any  # the cache object, so its id (part of the key) cannot be reused while the graph lives
    observed: _Observed  # the modules with observer hooks when it was captured
    calls: list[tuple]  # what the observers saw at capture: (kind, module, args, kwargs, output)


class GraphedStep:
    """Calls `step(**kwargs)` through a captured CUDA graph per input signature.

    `graph_factory` makes the graph object (`torch.cuda.CUDAGraph` with a shared memory pool by
    default): anything with `capture(fn, warmup, state) -> fn's result` and `replay()`, which
    refreshes every tensor of that result in place; `state` lists the tensors the step advances in
    place (put back after warm-up).
    """

    def __init__(
        self,
        step: Callable[..., Any],
        graph_factory: Callable[[], Any] | None = None,
        max_graphs: int = 8,
        model: torch.nn.Module | None = None,
    ):
        self.step = step
        self.graph_factory = graph_factory or _CudaGraph.factory()
        self.max_graphs = max_graphs
        self.entries: dict[tuple, _Entry] = {}
        self.model = model
        self.capture_seconds: list[float] = []  # host time of each warm-up + capture (benchmarks)

    def __call__(self, **kwargs: Any) -> Any:
        key = _signature(kwargs)
        entry = self.entries.pop(key, None)
        if entry is None:
            if len(self.entries) >= self.max_graphs:
                # Least recently used first: an evaluation's prompt chunks of many lengths would
                # otherwise keep a graph and a KV cache alive for each.
                del self.entries[next(iter(self.entries))]
            start = time.perf_counter()
            entry = self.entries[key] = self._capture(kwargs)
            self.capture_seconds.append(time.perf_counter() - start)
            # Capture records kernels without running them: this replay is the call's own step.
        else:
            self.entries[key] = entry  # now the most recently used
            for name, buffer in entry.inputs.items():
                buffer.copy_(kwargs[name])
        # Replayed as captured, probe in place (a CUDA graph runs no Python; a stand-in that reruns
        # the step, as the CPU tests' does, must not run the observers themselves).
        with entry.observed.probing():
            entry.graph.replay()
        entry.observed.notify(entry.calls)  # the captured records, refreshed by the replay
        return entry.output

    def _capture(self, kwargs: dict[str, Any]) -> _Entry:
        inputs = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        static = {**kwargs, **inputs}
        graph = self.graph_factory()
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        observed = _Observed(self.model)
        if self.model is not None and blocks_graphs(self.model):
            raise RuntimeError("a forward hook that is not a graphed.observer was added while decoding")
        with observed.probing() as calls:
            # The probe's records are outputs of the captured region, as the step's own output is.
            output, records = graph.capture(
                lambda: (self.step(**static), list(calls)),
                lambda: self._warm(static, calls),
                _counters(cache),
            )
        return _Entry(graph, inputs, output, cache, observed, records)

    def _warm(self, static: dict[str, Any], calls: list) -> None:
        """One uncaptured call (compilation, lazy allocations), its cache counters put back and its
        observer records dropped: the replay after capture is the step."""
        cache = static.get("cache", static.get("past_key_values"))
        counters = _counters(cache)
        saved = [c.clone() for c in counters]
        self.step(**static)
        for counter, value in zip(counters, saved, strict=True):
            counter.copy_(value)
        calls.clear()

    def clear(self) -> None:
        self.entries.clear()

    def forget(self, cache: Any) -> None:
        """Drop the graphs captured on `cache` (its owner let it go: the graphs would keep it alive)."""
        self.entries = {k: e for k, e in self.entries.items() if e.keep is not cache}


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


def observer(hook: Callable) -> Callable:
    """Marks a forward hook (or pre-hook) that only looks at a decode step: returns None, or its output
    unchanged, while generating. Graphs call it after each replay (see the module docstring)."""
    getattr(hook, "__func__", hook)._graph_observer = True
    return hook


def _is_observer(hook: Callable) -> bool:
    return getattr(getattr(hook, "__func__", hook), "_graph_observer", False)


def blocks_graphs(model: torch.nn.Module) -> bool:
    """Whether a forward hook that is not an `observer` would run in a step (global hooks included)."""
    if compat_torch.global_forward_hooks():
        return True
    hooks = (
        h
        for m in model.modules()
        for name, d in compat_torch.hook_dicts(m).items()
        if name in ("_forward_hooks", "_forward_pre_hooks")
        for h in d.values()
    )
    return not all(_is_observer(h) for h in hooks)


_PROBE = -1  # hook-dict key of the probe: handle ids count up from 0


class _Probe:
    """Stands in for a module's observers while the step is compiled, captured or replayed. One per
    model (stored on it), so dynamo meets the same hook objects at every capture and does not recompile."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls.append(("pre", module, args, kwargs, None))

    def post(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.calls.append(("post", module, args, kwargs, output))


class _Observed:
    """The modules with observer hooks: their hook dicts, swapped for the probe's while `probing`
    (none without a model: then probing swaps nothing and records nothing)."""

    def __init__(self, model: torch.nn.Module | None):
        if model is None:
            self.probe, self.saved = _Probe(), {}
            return
        self.probe = model.__dict__.setdefault("_finetune_graph_probe", _Probe())
        self.saved = {m: compat_torch.hook_dicts(m) for m in model.modules() if compat_torch.has_hooks(m)}

    @contextlib.contextmanager
    def probing(self) -> Iterator[list[tuple]]:
        self.probe.calls.clear()
        for module, hooks in self.saved.items():
            pre = OrderedDict({_PROBE: self.probe.pre} if hooks["_forward_pre_hooks"] else {})
            post = OrderedDict({_PROBE: self.probe.post} if hooks["_forward_hooks"] else {})
            compat_torch.set_hook_dicts(
                module,
                {
                    "_forward_pre_hooks": pre,
                    "_forward_pre_hooks_with_kwargs": OrderedDict({_PROBE: True}),
                    "_forward_hooks": post,
                    "_forward_hooks_with_kwargs": OrderedDict({_PROBE: True}),
                    "_forward_hooks_always_called": OrderedDict(),
                },
            )
        try:
            yield self.probe.calls
        finally:
            for module, hooks in self.saved.items():
                # The same dict objects: removal handles still work.
                compat_torch.set_hook_dicts(module, hooks)

    def notify(self, calls: list[tuple]) -> None:
        """Each recorded call's observers, in order, on copies (the graph's tensors are overwritten by
        the next replay)."""
        for kind, module, args, kwargs, output in calls:
            hooks = self.saved[module]
            args, kwargs, output = _copy(args), _copy(kwargs), _copy(output)
            if kind == "pre":
                for hook_id, hook in list(hooks["_forward_pre_hooks"].items()):
                    if hook_id in hooks["_forward_pre_hooks_with_kwargs"]:
                        hook(module, args, kwargs)
                    else:
                        hook(module, args)
            else:
                for hook_id, hook in list(hooks["_forward_hooks"].items()):
                    if hook_id in hooks["_forward_hooks_with_kwargs"]:
                        hook(module, args, kwargs, output)
                    else:
                        hook(module, args, output)


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_copy(v) for v in value)
    if isinstance(value, dict):
        copied = {k: _copy(v) for k, v in value.items()}
        return copied if type(value) is dict else type(value)(**copied)
    return value


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
