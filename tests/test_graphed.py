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

from finetune.model import generation, graphed
from finetune.model.load import load_model, resolve_source

EAGER = CompileConfig(backend="eager", mode=None)


class ReplayingGraph:
    captures: ClassVar[list[ReplayingGraph]] = []

    def capture(self, fn, warmup, state):
        warmup()
        saved = [t.clone() for t in state]
        self.fn, self.output = fn, fn()
        for tensor, value in zip(state, saved, strict=True):
            tensor.copy_(value)
        ReplayingGraph.captures.append(self)
        return self.output

    def replay(self):
        fresh = self.fn()
        if isinstance(self.output, torch.Tensor):
            self.output.copy_(fresh)
            return
        for name, value in self.output.items():
            if isinstance(value, torch.Tensor):
                value.copy_(fresh[name])


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


def test_a_new_batch_size_is_a_new_capture_and_the_first_still_replays(model):
    small = {**_inputs(model, batch=2, seed=1), "max_new_tokens": 4}
    large = {**_inputs(model, batch=4, seed=2), "max_new_tokens": 4}
    plain = [model.generate(**small), model.generate(**large)]
    ReplayingGraph.captures.clear()
    with generation.compiled_decoding(model, True, compile_config=EAGER, graphs=ReplayingGraph) as extra:
        fast = [model.generate(**small, **extra), model.generate(**large, **extra)]
    assert all(torch.equal(a, b) for a, b in zip(fast, plain, strict=True))
    assert len(ReplayingGraph.captures) == 2


def test_graphs_are_capped_oldest_first():
    calls: list[int] = []
    step = graphed.GraphedStep(lambda x: calls.append(x.shape[0]) or x * 2, ReplayingGraph, max_graphs=2)
    for batch in (1, 2, 3, 1):
        assert torch.equal(step(x=torch.ones(batch)), torch.full((batch,), 2.0))
    assert [key[0][1] for key in step.entries] == [(3,), (1,)]  # batch 1 evicted, then captured again


def test_hooks_keep_the_model_off_graphs(model):
    assert not graphed.has_hooks(model)
    router = next(m for name, m in model.named_modules() if name.endswith("mlp.gate"))
    handle = router.register_forward_hook(lambda *args: None)
    try:
        assert graphed.has_hooks(model)
    finally:
        handle.remove()
    # Off CUDA the default is transformers' compiled call, not ours.
    with generation.compiled_decoding(model, True, compile_config=EAGER):
        assert "get_compiled_call" not in vars(generation._top(model))
    # The input-grads hook training leaves on the embeddings is lifted for decoding: no obstacle.
    model.enable_input_require_grads()
    try:
        assert graphed.has_hooks(model)
        with generation.compiled_decoding(model, True, compile_config=EAGER):
            assert not graphed.has_hooks(model)
    finally:
        model.disable_input_require_grads()


def test_step_signature_tells_shapes_and_values_apart():
    a = {"input_ids": torch.zeros(2, 1, dtype=torch.long), "logits_to_keep": 1}
    assert graphed._signature(a) == graphed._signature({**a, "input_ids": torch.ones(2, 1, dtype=torch.long)})
    assert graphed._signature(a) != graphed._signature(
        {**a, "input_ids": torch.zeros(3, 1, dtype=torch.long)}
    )
    assert graphed._signature(a) != graphed._signature({**a, "logits_to_keep": 2})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_give_the_plain_tokens():
    model = load_model(resolve_source("tiny", None), dtype="bfloat16").cuda().eval()
    kwargs = {**_inputs(model), "max_new_tokens": 8}
    plain = model.generate(**kwargs)
    with generation.compiled_decoding(model, True) as extra:
        assert "get_compiled_call" in vars(generation._top(model))
        fast = model.generate(**kwargs, **extra)
        again = model.generate(**kwargs, **extra)  # same signature, new cache: a new capture
    assert torch.equal(fast, plain) and torch.equal(again, plain)
