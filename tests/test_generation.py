"""`model.kernels`: generation with a static cache and a compiled decode step gives the plain tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig

from finetune.fast import generation
from finetune.model.load import load_model, resolve_source

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def model():
    return load_model(resolve_source("tiny", None), dtype="float32").eval()


def test_kernels_auto_is_off_on_the_cpu_and_off_is_off(model):
    assert not generation.enabled("auto", model)
    assert not generation.enabled("off", model)
    with pytest.raises(ValueError, match="kernels must be one of"):
        generation.enabled("on", model)


def test_compiled_decoding_compiles_the_step_and_keeps_the_tokens(model):
    graphs: list[int] = []

    def counting_backend(gm, example_inputs):
        graphs.append(len(example_inputs))
        return gm.forward

    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as the harness pads
    kwargs = {
        "input_ids": ids,
        "attention_mask": mask,
        "max_new_tokens": 6,
        "do_sample": False,
        "pad_token_id": 0,
    }
    plain = model.generate(**kwargs)
    config = CompileConfig(backend=counting_backend, mode=None, fullgraph=True)
    with generation.compiled_decoding(model, True, compile_config=config) as extra:
        assert extra == {"cache_implementation": "static"}
        fast = model.generate(**kwargs, **extra)
    assert graphs, "the decode step was not compiled"
    assert torch.equal(fast, plain)
    # Afterwards generate is as before: no static cache, nothing compiled.
    graphs.clear()
    assert torch.equal(model.generate(**kwargs), plain) and not graphs
    with generation.compiled_decoding(model, False) as extra:
        assert extra == {}


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def lora_model(request):
    """The tiny NF4 model (bnb Linear4bit, NF4Experts) with PEFT LoRA on MLA and expert LoRA on some
    experts of layer 1, as training leaves it (the input-grads hook on)."""
    from finetune.model import adapters

    base = load_model(resolve_source("tiny", None), dtype=request.param)
    model = adapters.attach(
        base, r=8, alpha=16, dropout=0.1, targets=["mla", "routed_experts"], experts={1: [0, 3, 5]}
    )
    with torch.no_grad():  # B starts at zero: give the LoRA a value
        for name, p in model.named_parameters():
            if "lora_B" in name or (name.endswith("_B") and ".experts." in name):
                p.normal_(std=0.1)
    return model.eval()


# Batch 1 is 2 (token, expert) pairs of 8 experts: the few-token path; batch 5 is 10 pairs: the grouped
# path where it traces whole (grouped kernel, as on CUDA in bf16), chunked few-token pairs where it
# would not (the per-expert loop's counts.tolist(), the nonzero of LoRA on some experts only). The
# grouped kernel traces in bf16 only; fp32 takes the per-expert loop, as on the CPU.
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("absorb", [False, True])  # MLA in latent space (finetune.fast.absorbed)
def test_the_compiled_decode_step_has_no_graph_break(lora_model, batch, absorb):
    # A break inside a forward called through transformers' variadic wrappers (`func(*args, **kwargs)`)
    # cannot resume in the callers: whole frames fall back to eager, and the step is many graphs.
    from torch._dynamo.utils import counters

    from finetune.model.adapters import expert_layers

    graphs: list[int] = []

    def counting_backend(gm, example_inputs):
        graphs.append(1)
        return gm.forward

    layers = list(expert_layers(lora_model).values())
    fp32 = lora_model.dtype == torch.float32
    grouped = None if fp32 else True
    torch.manual_seed(batch)
    ids = torch.randint(3, lora_model.config.vocab_size, (batch, 6))
    kwargs = {"input_ids": ids, "max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    try:
        for layer in layers:
            layer.use_grouped_mm = grouped
        plain = lora_model.generate(**kwargs)
        torch._dynamo.reset()
        counters.clear()
        config = CompileConfig(backend=counting_backend, mode=None, fullgraph=False)
        with generation.compiled_decoding(lora_model, True, compile_config=config, absorb=absorb) as extra:
            fast = lora_model.generate(**kwargs, **extra)
    finally:
        for layer in layers:
            layer.use_grouped_mm = None
    assert not counters["graph_break"], list(counters["graph_break"])
    assert len(graphs) == 1, f"the decode step compiled to {len(graphs)} graphs"
    if fp32:  # in bf16 the few-token path rounds differently from the grouped one
        assert torch.equal(fast, plain)


def _recorded(monkeypatch) -> list[str]:
    """The `kernels` values generation was asked to resolve (the real resolution still runs)."""
    seen: list[str] = []
    real = generation.enabled

    def enabled(kernels, model):
        seen.append(kernels)
        return real(kernels, model)

    monkeypatch.setattr(generation, "enabled", enabled)
    return seen


def test_the_kernels_setting_reaches_eval_generation(monkeypatch, tmp_path):
    from conftest import base_recipe, write_recipe

    from finetune.cli import main

    seen = _recorded(monkeypatch)
    args = ["eval", "reverse", "--model", "tiny", "--limit", "2", "--batch-size", "2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--kernels", "off"]) == 0
    data = base_recipe(tmp_path)
    data["model"]["kernels"] = "off"
    r = write_recipe(tmp_path / "r.yaml", data)
    args = ["eval", "reverse", "--recipe", str(r), "--limit", "2", "--batch-size", "2"]
    assert main([*args, "--out", str(tmp_path / "c")]) == 0
    assert main([*args, "--out", str(tmp_path / "d"), "--kernels", "auto"]) == 0  # the flag wins
    assert seen == ["auto", "off", "off", "auto"]


def test_the_recipe_key_is_checked_and_reaches_the_stages(tmp_path):
    from conftest import base_recipe, write_recipe

    from finetune import pipeline, recipe
    from finetune.errors import UserError

    data = base_recipe(tmp_path)
    assert pipeline.context(recipe.load(write_recipe(tmp_path / "r.yaml", data)), None).kernels == "auto"
    data["model"]["kernels"] = "off"
    assert pipeline.context(recipe.load(write_recipe(tmp_path / "r.yaml", data)), None).kernels == "off"
    data["model"]["kernels"] = "fast"
    with pytest.raises(UserError, match=r"model\.kernels"):
        recipe.load(write_recipe(tmp_path / "r.yaml", data))


def test_heldout_generation_resolves_its_kernels_argument(monkeypatch, model):
    from finetune import heldout
    from finetune.model.load import load_tokenizer

    seen = _recorded(monkeypatch)
    tokenizer = load_tokenizer(resolve_source("tiny", None))
    out = heldout.exact_match(
        model, tokenizer, ["abc"], ["cba"], max_new_tokens=2, batch_size=1, kernels="off"
    )
    assert out["n"] == 1 and seen == ["off"]


def test_compiled_decoding_lifts_the_input_grads_hook_and_puts_it_back(model):
    # The hook calls requires_grad_ on the embeddings' output, a graph break in every decode step.
    # Twice, as a benchmark or a trainer may: transformers then lists only the second registration.
    model.enable_input_require_grads()
    first = model._require_grads_hooks
    model.enable_input_require_grads()
    embeddings = model.get_input_embeddings()
    before = dict(embeddings._forward_hooks)
    assert len(before) == 2
    graphs: list[int] = []

    def counting_backend(gm, example_inputs):
        graphs.append(1)
        return gm.forward

    ids = torch.randint(3, model.config.vocab_size, (2, 5))
    config = CompileConfig(backend=counting_backend, mode=None, fullgraph=True)  # a break would raise
    try:
        with generation.compiled_decoding(model, True, compile_config=config) as extra:
            assert not embeddings._forward_hooks
            model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0, **extra)
        assert graphs and dict(embeddings._forward_hooks) == before
    finally:
        for hook in first:
            hook.remove()
        model.disable_input_require_grads()
        assert not embeddings._forward_hooks
