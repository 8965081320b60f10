"""The decode step replayed as a captured graph (`graphed.GraphedStep`) generates the plain tokens.

CUDA graphs need a GPU; on the CPU a stand-in graph keeps the contract that matters: capture does not
advance the step's state, replay recomputes from the captured input buffers and writes into the
captured output. Stale inputs (a position not copied in) or a cache counter advanced twice would
change the tokens. The same test runs with real CUDA graphs under the `gpu` mark.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from transformers import CompileConfig

from finetune.fast import generation, graphed, mode
from finetune.model.load import load_model, resolve_source

EAGER = CompileConfig(backend="eager", mode=None)


class ReplayingGraph:
    """CPU stand-in: capture does not advance the step's state (the dry run is undone), replay reruns
    the step from the captured inputs and writes into the captured result's tensors."""

    captures: ClassVar[list[ReplayingGraph]] = []

    def capture(self, fn, warmup, state):
        self.replays = 0
        warmup()
        saved = [t.clone() for t in state]
        self.fn, self.output = fn, fn()
        for tensor, value in zip(state, saved, strict=True):
            tensor.copy_(value)
        ReplayingGraph.captures.append(self)
        return self.output

    def replay(self):
        self.replays += 1
        _copy_into(self.output, self.fn())


def _copy_into(captured, fresh):
    """As a graph replay writes its outputs: into the captured tensors themselves."""
    if isinstance(captured, torch.Tensor):
        captured.copy_(fresh)
    elif isinstance(captured, dict):
        for key, value in captured.items():
            _copy_into(value, fresh[key])
    elif isinstance(captured, (tuple, list)):
        for value, new in zip(captured, fresh, strict=True):
            _copy_into(value, new)


def _inputs(model, batch=3, length=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=gen).to(model.device)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask, "do_sample": False, "pad_token_id": 0}


@pytest.fixture(scope="module")
def model():
    return load_model(resolve_source("tiny", None), dtype="float32").eval()


def test_graphed_decoding_gives_the_plain_tokens_with_one_capture(model):
    kwargs = {**_inputs(model), "max_new_tokens": 6}
    plain = model.generate(**kwargs)
    ReplayingGraph.captures.clear()
    with generation.compiled_decoding(model, True, compile_config=EAGER, graphs=ReplayingGraph) as extra:
        out = model.generate(**kwargs, **extra, return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    assert len(ReplayingGraph.captures) == 1  # one signature: batch and cache length fixed in a call
    # The counter was advanced once per step: prompt + 5 decode steps (the last token is not fed back).
    assert all(int(layer.cumulative_length) == 7 + 5 for layer in out.past_key_values.layers)
    assert "get_compiled_call" not in vars(generation._top(model))


def test_calls_of_one_block_reuse_the_cache_and_its_graph(model):
    """A second `generate` of the same batch and length in one block gets the first one's cache back,
    reset (different prompts, the plain tokens), and so its graph: no second capture."""
    calls = [{**_inputs(model, seed=seed), "max_new_tokens": 5} for seed in (0, 1)]
    calls.append({**_inputs(model, batch=2, seed=2), "max_new_tokens": 5})
    plain = [model.generate(**kwargs) for kwargs in calls]
    ReplayingGraph.captures.clear()
    with generation.compiled_decoding(model, True, compile_config=EAGER, graphs=ReplayingGraph) as extra:
        outs = [model.generate(**kwargs, **extra, return_dict_in_generate=True) for kwargs in calls[:2]]
        assert outs[1].past_key_values is outs[0].past_key_values
        outs.append(model.generate(**calls[2], **extra, return_dict_in_generate=True))
        captured = len(generation._top(model).get_compiled_call().capture_seconds)
    assert all(torch.equal(out.sequences, p) for out, p in zip(outs, plain, strict=True))
    assert len(ReplayingGraph.captures) == captured == 2  # batch 3 once, batch 2 once
    assert "_prepare_static_cache" not in vars(generation._top(model))


def test_a_block_lets_its_least_recently_used_cache_and_graph_go(model):
    """Past as many shapes as graphs kept, the least recently used cache is released with its graph
    (an evaluation of many prompt lengths must not keep a KV cache alive per length)."""
    import gc
    import weakref

    with generation.compiled_decoding(model, True, compile_config=EAGER, graphs=ReplayingGraph) as extra:
        step = generation._top(model).get_compiled_call()
        step.max_graphs = 2

        def cache(batch):
            out = model.generate(
                **_inputs(model, batch=batch), max_new_tokens=3, **extra, return_dict_in_generate=True
            )
            return weakref.ref(out.past_key_values)

        a, b = cache(1), cache(2)
        assert cache(1)() is a()  # reused: now the most recent
        cache(3)
        ReplayingGraph.captures.clear()  # the stand-in's own record of every graph it made
        gc.collect()
        assert b() is None and a() is not None and len(step.entries) == 2


def test_a_new_batch_size_is_a_new_capture_and_the_first_still_replays(model):
    small = {**_inputs(model, batch=2, seed=1), "max_new_tokens": 4}
    large = {**_inputs(model, batch=4, seed=2), "max_new_tokens": 4}
    plain = [model.generate(**small), model.generate(**large)]
    ReplayingGraph.captures.clear()
    with generation.compiled_decoding(model, True, compile_config=EAGER, graphs=ReplayingGraph) as extra:
        fast = [model.generate(**small, **extra), model.generate(**large, **extra)]
    assert all(torch.equal(a, b) for a, b in zip(fast, plain, strict=True))
    assert len(ReplayingGraph.captures) == 2


class HostEvent:
    """CPU stand-in for `torch.Event` (which the CPU lacks): CPU ops complete in order, so recording an
    event and waiting on it are no-ops."""

    def __init__(self, device=None, blocking=False):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


def test_deferred_stop_check_keeps_tokens_lengths_and_cache(model, monkeypatch):
    """The host reads the stopping flag one step late: one extra step when the rows finish early,
    undone (the same sequences, the returned cache's position as without deferring)."""
    monkeypatch.setattr(torch, "Event", HostEvent)
    kwargs = {**_inputs(model, batch=2, seed=4), "max_new_tokens": 8, "return_dict_in_generate": True}
    plain = model.generate(**kwargs)
    # Each row's third new token ends it: every row stops early, before max_new_tokens.
    eos = sorted(set(plain.sequences[:, 7 + 2].tolist()))
    early = model.generate(**kwargs, eos_token_id=eos)
    assert early.sequences.shape[1] < plain.sequences.shape[1]
    replays = []
    for expected, extra_kwargs in ((plain, {}), (early, {"eos_token_id": eos})):
        for defer in (False, True):
            ReplayingGraph.captures.clear()
            with generation.compiled_decoding(
                model, True, compile_config=EAGER, graphs=ReplayingGraph, defer_stop=defer
            ) as extra:
                out = model.generate(**kwargs, **extra_kwargs, **extra)
            assert torch.equal(out.sequences, expected.sequences)
            length = out.sequences.shape[1] - 1  # the last token is never fed back
            assert all(int(layer.cumulative_length) == length for layer in out.past_key_values.layers)
            replays.append(ReplayingGraph.captures[0].replays)
    # Deferring runs one more step only where generation stops before its length limit.
    assert replays[1] == replays[0] and replays[3] == replays[2] + 1


def test_graphs_are_capped_oldest_first():
    calls: list[int] = []
    step = graphed.GraphedStep(lambda x: calls.append(x.shape[0]) or x * 2, ReplayingGraph, max_graphs=2)
    for batch in (1, 2, 3, 1):
        assert torch.equal(step(x=torch.ones(batch)), torch.full((batch,), 2.0))
    assert [key[0][1] for key in step.entries] == [(3,), (1,)]  # batch 1 evicted, then captured again


def test_hooks_keep_the_model_off_graphs(model):
    assert not graphed.blocks_graphs(model)
    router = next(m for name, m in model.named_modules() if name.endswith("mlp.gate"))
    handle = router.register_forward_hook(lambda *args: None)
    try:
        assert graphed.blocks_graphs(model)
    finally:
        handle.remove()
    # Off CUDA the default is transformers' compiled call, not ours.
    with generation.compiled_decoding(model, True, compile_config=EAGER):
        assert "get_compiled_call" not in vars(generation._top(model))
    # The input-grads hook training leaves on the embeddings is lifted for decoding: no obstacle.
    model.enable_input_require_grads()
    try:
        assert graphed.blocks_graphs(model)
        with generation.compiled_decoding(model, True, compile_config=EAGER):
            assert not graphed.blocks_graphs(model)
    finally:
        model.disable_input_require_grads()


def test_observer_hooks_see_every_graphed_step_as_they_see_plain_ones(model):
    """GRPO's hooks (routing replay recording, router statistics) stay on graphs: after each replay
    they are called on what the step computed; their records equal plain generation's."""
    from finetune.model import replay, routing

    kwargs = {**_inputs(model, batch=2, seed=3), "max_new_tokens": 5}

    def observed(graphs):
        recorder = replay.RoutingReplay(model, mode="off", eos_token_ids=[])
        monitor = routing.RouterMonitor(model)
        try:
            assert not graphed.blocks_graphs(model)
            with generation.compiled_decoding(
                model, graphs, compile_config=EAGER, graphs=ReplayingGraph
            ) as extra:
                sequences = model.generate(**kwargs, **extra)
            return sequences, recorder.records, {i: c.clone() for i, c in monitor.counts.items()}
        finally:
            recorder.remove()
            monitor.remove()

    plain = observed(False)
    ReplayingGraph.captures.clear()
    fast = observed(True)
    assert len(ReplayingGraph.captures) == 1
    assert torch.equal(fast[0], plain[0])
    assert plain[1] and fast[1].keys() == plain[1].keys()
    assert all(torch.equal(fast[1][k], plain[1][k]) for k in plain[1])
    assert plain[2] and all(torch.equal(fast[2][i], plain[2][i]) for i in plain[2])
    assert not model._forward_hooks and not model._forward_pre_hooks  # all removed, none stranded


def test_step_signature_tells_shapes_and_values_apart():
    a = {"input_ids": torch.zeros(2, 1, dtype=torch.long), "logits_to_keep": 1}
    assert graphed._signature(a) == graphed._signature({**a, "input_ids": torch.ones(2, 1, dtype=torch.long)})
    assert graphed._signature(a) != graphed._signature(
        {**a, "input_ids": torch.zeros(3, 1, dtype=torch.long)}
    )
    assert graphed._signature(a) != graphed._signature({**a, "logits_to_keep": 2})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_cuda_graphs_give_observers_the_plain_records(backend):
    """Real CUDA graphs: the observers' records are the captured tensors, refreshed by each replay.
    With the eager backend the graph replays the plain kernels, so every record is bit-equal. MLA runs as
    transformers writes it on both sides (`absorb=False`): the latent-space decode rounds in another
    order in bf16 and may flip a near-tied expert (its numerics: tests/test_absorbed.py)."""
    from finetune.model import replay, routing

    config = EAGER if backend == "eager" else None

    model = load_model(resolve_source("tiny", None), dtype="bfloat16").cuda().eval()
    kwargs = {**_inputs(model), "max_new_tokens": 8}

    def observed(on):
        recorder = replay.RoutingReplay(model, mode="off", eos_token_ids=[])
        monitor = routing.RouterMonitor(model)
        try:
            with generation.compiled_decoding(model, on, compile_config=config, absorb=False) as extra:
                assert ("get_compiled_call" in vars(generation._top(model))) == on
                # The plain run uses the same static cache: the monitor counts padded positions too,
                # whose (masked-out) hidden states depend on the cache's length.
                extra = extra or {"cache_implementation": "static", "disable_compile": True}
                sequences = model.generate(**kwargs, **extra)
            return sequences, recorder.records, {i: c.clone() for i, c in monitor.counts.items()}
        finally:
            recorder.remove()
            monitor.remove()

    plain, fast = observed(False), observed(True)
    assert torch.equal(fast[0], plain[0])
    assert sorted(fast[1]) == sorted(plain[1])
    differ = {
        k: (fast[1][k] != plain[1][k]).sum().item()
        for k in plain[1]
        if not torch.equal(fast[1][k], plain[1][k])
    }
    assert not differ, f"records differ (key: elements): {differ}"
    counts = {
        i: (plain[2][i].tolist(), fast[2][i].tolist())
        for i in plain[2]
        if not torch.equal(fast[2][i], plain[2][i])
    }
    assert not counts, f"expert counts differ (layer: plain, fast): {counts}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_give_the_plain_tokens():
    model = load_model(resolve_source("tiny", None), dtype="bfloat16").cuda().eval()
    kwargs = {**_inputs(model), "max_new_tokens": 8}
    plain = model.generate(**kwargs)
    with generation.compiled_decoding(model, True) as extra:
        assert "get_compiled_call" in vars(generation._top(model))
        assert all(m.mode.grouped_kernel for m in mode.experts(model))  # CUDA default
        fast = model.generate(**kwargs, **extra)
        again = model.generate(**kwargs, **extra)  # same signature, new cache: a new capture
    assert torch.equal(fast, plain) and torch.equal(again, plain)


def test_grpo_generates_through_graphs_and_records_the_rollout_experts_exactly(tmp_path, monkeypatch):
    """GRPO under `model.kernels: auto`: TRL's `generate` runs the graphed step (here the CPU stand-in),
    routing replay records through its observers. With a learning rate of 0 the training passes route
    every token exactly as the records say the rollout did, and as many tokens are recorded as when
    generating eagerly (prompt and completion: a decode step missed would leave its token unrecorded)."""
    from test_grpo import _grpo

    from finetune import pipeline, recipe, rundir

    def run(folder, kernels):
        data = _grpo(folder, train={"max_steps": 2, "learning_rate": 0.0})
        data["model"]["kernels"] = kernels
        summary = pipeline.run(recipe.Recipe.model_validate(data))["grpo"]
        metrics = rundir.read_metrics(folder / "run" / "grpo" / "metrics.jsonl")
        counted = ("routing/compared_tokens", "routing/replayed_tokens")  # replay off / on
        return summary["routing"], sum(m.get(k, 0) for m in metrics for k in counted)

    plain = run(tmp_path / "plain", "off")
    fast_generate = generation.fast_generate
    monkeypatch.setattr(generation, "enabled", lambda kernels, model: kernels == "auto")
    monkeypatch.setattr(
        generation,
        "fast_generate",
        lambda model, on: fast_generate(model, on, compile_config=EAGER, graphs=ReplayingGraph),
    )
    ReplayingGraph.captures.clear()
    fast = run(tmp_path / "fast", "auto")
    assert ReplayingGraph.captures  # the decode steps went through graphs
    assert fast[0]["router_mismatch"] == plain[0]["router_mismatch"] == 0.0
    assert fast[1] == plain[1] > 0


def test_a_cache_let_go_takes_its_graph_with_it(model):
    """A call that decodes nothing (one new token: the prefill only) still takes a cache from the
    block's pool; the cache it pushes out must not live on in its graph."""
    import gc
    import weakref

    with generation.compiled_decoding(model, True, compile_config=EAGER, graphs=ReplayingGraph) as extra:
        generation._top(model).get_compiled_call().max_graphs = 2
        out = model.generate(
            **_inputs(model, batch=1), max_new_tokens=3, **extra, return_dict_in_generate=True
        )
        first = weakref.ref(out.past_key_values)
        del out
        model.generate(**_inputs(model, batch=2), max_new_tokens=3, **extra)
        model.generate(**_inputs(model, batch=3), max_new_tokens=1, **extra)
        ReplayingGraph.captures.clear()
        gc.collect()
        assert first() is None
