"""A decoder layer as two compiled regions (finetune.fast.blocks), against the eager layer."""

from __future__ import annotations

import collections

import pytest
import torch
from test_fusion import IDS, _model, _rel, _step

from finetune import family
from finetune.compat import torch as compat_torch
from finetune.fast import blocks, fusion
from finetune.model import adapters
from finetune.model.experts import NF4Experts


def _grouped(model):
    for layer in adapters.expert_layers(model).values():
        layer.use_grouped_mm = True  # the CUDA path: the experts' module traces whole
    return model


def _grouped_mm_reference(x, w, offs):
    """torch's grouped product in plain ops (every group's product, each row keeping its own group's):
    it traces in fp32, where the grouped kernel's compiled form accepts bf16 only."""
    group = torch.searchsorted(offs, torch.arange(x.shape[0], device=x.device), right=True)
    mask = torch.nn.functional.one_hot(group, w.shape[0]).T.unsqueeze(-1).to(x.dtype)
    return (torch.stack([x @ w[g] for g in range(w.shape[0])]) * mask).sum(0)


@pytest.fixture
def fp32_grouped(monkeypatch):
    monkeypatch.setattr(compat_torch, "grouped_mm", lambda: _grouped_mm_reference)


@pytest.fixture
def entries(monkeypatch):
    """Calls of each block kind's compiled function."""
    seen: collections.Counter = collections.Counter()
    region = blocks._region

    def counted(name, fn, in_graph=False):
        compiled = region(name, fn, in_graph)

        def call(*args, **kwargs):
            seen[name] += 1
            return compiled(*args, **kwargs)

        return call

    monkeypatch.setattr(blocks, "_region", counted)
    return seen


@pytest.mark.parametrize("reentrant", [False, True])
def test_layers_compile_as_blocks_that_match_the_eager_step_in_fp32(
    tmp_path, entries, fp32_grouped, reentrant
):
    model = _grouped(_model(tmp_path))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    logits, grads = _step(model)
    counts = fusion.apply(model, recompute_in_graph=False)  # torch's checkpoint around the blocks
    assert counts["layers"] == 3 and counts["compiled_regions"] == 0
    # Nothing inside a block is compiled on its own (a nested region would be a second entry).
    for m in model.modules():
        if isinstance(m, family.Attention | NF4Experts):
            assert "forward" not in m.__dict__
        if isinstance(m, family.MLP):
            assert not hasattr(m.forward, "_torchdynamo_orig_callable")
    fused_logits, fused_grads = _step(model)
    # One layer dense, two MoE; each entered in the forward and again in the checkpoint's recomputation.
    assert entries == {"attention": 6, "moe": 4, "mlp": 2}
    assert set(fused_grads) == set(grads) and any(".experts.lora_" in n for n in grads)
    assert _rel(fused_logits, logits) < 1e-5
    assert max(_rel(fused_grads[n], g) for n, g in grads.items()) < 1e-4
    # The scheme before blocks: each attention, MLP and experts module compiled on its own.
    assert fusion.apply(model, layer_regions=False) == {**counts, "layers": 0, "compiled_regions": 8}
    assert all(
        hasattr(m.forward, "_torchdynamo_orig_callable") for m in model.modules() if isinstance(m, family.MLP)
    )
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, family.DecoderLayer))
    fusion.remove(model)
    again, again_grads = _step(model)
    assert torch.equal(again, logits) and all(torch.equal(again_grads[n], g) for n, g in grads.items())


def _saved_bytes(model, ids=IDS) -> tuple[int, set[tuple[int, ...]]]:
    """Bytes and shapes of the tensors a training forward keeps for its backward, parameters and
    buffers aside (what activation checkpointing exists to bound)."""
    held = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, torch.Tensor] = {}

    def pack(t):
        if t.data_ptr() not in held:
            saved[t.data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(t.numel() * t.element_size() for t in saved.values()), {tuple(t.shape) for t in saved.values()}


def test_recomputation_inside_the_graphs_matches_eager_and_saves_only_the_regions_inputs(
    tmp_path, entries, fp32_grouped
):
    model = _grouped(_model(tmp_path))
    logits, grads = _step(model)
    fusion.apply(model, recompute_in_graph=False)
    _step(model)  # graphs compiled under torch's checkpoint, in the state the budget's are called in
    counts = fusion.apply(model)  # the default: recomputed inside the graphs
    assert counts["layers"] == 3
    assert all(m.recompute_in_graph for m in model.modules() if isinstance(m, family.DecoderLayer))
    # Without checkpointing the blocks run once a pass, their plain graphs keeping every activation ...
    model.gradient_checkpointing_disable()
    kept_all, shapes_all = _saved_bytes(model)
    entries.clear()
    # ... with it, graphs of their own (not the checkpoint's, which dynamo would reuse), still one pass.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fused_logits, fused_grads = _step(model)
    assert entries == {"attention": 3, "moe": 2, "mlp": 1}
    assert _rel(fused_logits, logits) < 1e-5
    assert max(_rel(fused_grads[n], g) for n, g in grads.items()) < 1e-4
    kept, shapes = _saved_bytes(model)
    experts = next(iter(adapters.expert_layers(model).values()))
    assert not shapes & set(experts._shapes.values())  # no dequantized expert weight kept
    assert kept < kept_all / 3, (kept, kept_all)
    # Attention's own [batch, heads, tokens, tokens] probabilities and per-head tensors: kept by the
    # plain graphs, recomputed by the budget's.
    assert any(len(shape) == 4 for shape in shapes_all) and not any(len(shape) == 4 for shape in shapes)
    with torch.no_grad():  # evaluation: the plain regions, nothing to recompute
        entries.clear()
        assert _rel(model(input_ids=IDS).logits, logits) < 1e-5 and entries["attention"] == 3
    fusion.remove(model)
    assert not any("recompute_in_graph" in m.__dict__ for m in model.modules())


def test_a_layer_with_an_eager_part_keeps_torch_checkpoint_for_every_layer(tmp_path, entries):
    """Experts that do not trace whole run eagerly between the regions: their activations are bounded
    by torch's checkpoint only, so such a layer keeps it, and so do the others (else attention would
    compile twice, with and without the budget)."""
    model = _model(tmp_path)  # fp32 on the CPU: the experts' loop, not a region
    counts = fusion.apply(model)
    layers = [m for m in model.modules() if isinstance(m, family.DecoderLayer)]
    assert counts["layers"] == 3 and not any(m.recompute_in_graph for m in layers)
    _step(model)
    assert entries == {"attention": 2 * 3, "mlp": 2}  # every layer entered again in the recomputation
    fusion.remove(model)


def test_moe_layers_whose_experts_do_not_trace_whole_keep_their_modules_regions(tmp_path, entries):
    """LoRA on some experts only selects rows by a data-dependent `nonzero`: such experts break a graph,
    so their layer's MoE runs outside the blocks, the shared experts compiled on their own."""
    model = _grouped(_model(tmp_path))
    for experts in adapters.expert_layers(model).values():
        state = experts.lora_state_dict()
        experts.remove_lora()
        experts.add_lora(8, 16.0, experts=[0, 2])
        with torch.no_grad():
            experts.lora_gate_up_B.normal_(std=0.1)
        assert state  # (the fixture's adapters were on all experts)
    logits, grads = _step(model)
    counts = fusion.apply(model)
    assert counts["layers"] == 3 and counts["compiled_regions"] == 2  # the two shared experts
    fused_logits, fused_grads = _step(model)
    assert entries == {"attention": 6, "mlp": 2}  # an eager part: torch's checkpoint for every layer
    assert _rel(fused_logits, logits) < 1e-5
    assert max(_rel(fused_grads[n], g) for n, g in grads.items()) < 1e-4
    fusion.remove(model)


def test_only_deepseek_layers_of_known_modules_are_supported(tmp_path):
    model = _model(tmp_path)
    layers = [m for m in model.modules() if isinstance(m, family.DecoderLayer)]
    assert all(blocks.supported(layer) for layer in layers)
    assert not blocks.supported(layers[0].self_attn)
    layers[0].mlp.act_fn = torch.nn.GELU()  # a dense MLP of another activation: not SwiGLU
    assert not blocks.supported(layers[0])
    blocks.unpatch(layers[1])  # never patched: its class forward stays
    assert "forward" not in layers[1].__dict__


def test_a_classify_stage_trains_through_the_blocks_as_it_does_eagerly(tmp_path, monkeypatch):
    """The sequence-classification model's decoder layers are the same blocks (its head stays eager)."""
    from test_classify import _stage_recipe

    from finetune import pipeline, recipe, rundir
    from finetune.fast import generation
    from finetune.stages import classify

    rows = [{"text": w, "label": w[0]} for w in ["abcd", "wxyz", "hijk", "mnop"] * 4]
    seen: dict = {}
    apply = fusion.apply
    monkeypatch.setattr(fusion, "apply", lambda model, **kw: seen.update(apply(model, **kw)) or seen)
    losses = {}
    for kernels in ("auto", "off"):
        monkeypatch.setattr(generation, "enabled", lambda k, m: k == "auto")
        data = _stage_recipe(tmp_path / kernels, rows)
        data["model"]["kernels"] = kernels
        r = recipe.Recipe.model_validate(data)
        plan = pipeline.plan(r)
        (tmp_path / kernels / "run").mkdir(parents=True)
        classify.run("cls", r.stages["cls"], plan.inputs["cls"], plan.context)
        rows_logged = rundir.read_metrics(tmp_path / kernels / "run" / "cls" / "metrics.jsonl")
        losses[kernels] = [row["loss"] for row in rows_logged if "loss" in row]
    assert seen["layers"] == 3
    assert len(losses["auto"]) == len(losses["off"]) == 2
    assert max(abs(a - b) / abs(b) for a, b in zip(losses["auto"], losses["off"], strict=True)) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_blocks_run_the_grouped_kernel_and_agree_with_the_module_regions(tmp_path, entries):
    """On CUDA in bf16 (the path `kernels: auto` takes): both MoE layers as blocks, torch's grouped kernel
    inside, recomputed inside their graphs. bf16 tolerance, stated against the truth (the same model's
    fp32 eager step): the blocks' error is at most 1.5x the eager bf16 step's own + 1 %, and
    as small for the per-module regions (bf16 rounds differently in every scheme: a fused kernel keeps
    fp32 where eager rounds after each op, and a recomputation inside a graph is fused anew)."""
    truth = _model(tmp_path / "fp32")  # placed where the pipeline puts it (CUDA here)
    truth_logits, truth_grads = _step(truth, IDS.to(truth.device))
    truth_logits, truth_grads = truth_logits.cpu(), {n: g.cpu() for n, g in truth_grads.items()}
    del truth
    model = _model(tmp_path, dtype="bfloat16").cuda()
    ids = IDS.cuda()
    logits, grads = _step(model, ids)
    counts = fusion.apply(model)
    assert counts["layers"] == 3 and counts["compiled_regions"] == 0
    fused_logits, fused_grads = _step(model, ids)
    assert entries == {"attention": 3, "moe": 2, "mlp": 1}  # recomputed inside the graphs: one pass
    fusion.apply(model, layer_regions=False)
    module_logits, module_grads = _step(model, ids)
    fusion.remove(model)

    def error(got_logits, got_grads) -> tuple[float, float]:
        assert set(got_grads) == set(truth_grads)
        worst = max(_rel(got_grads[n].float().cpu(), g) for n, g in truth_grads.items())
        return _rel(got_logits.float().cpu(), truth_logits), worst

    eager, fused, modules = (
        error(logits, grads),
        error(fused_logits, fused_grads),
        error(module_logits, module_grads),
    )
    print(
        f"relative error against fp32 (logits, worst LoRA gradient): eager {eager}, blocks {fused}, modules {modules}"
    )
    for got in (fused, modules):
        assert got[0] < 1.5 * eager[0] + 0.01 and got[1] < 1.5 * eager[1] + 0.01, (got, eager)


def test_regions_trace_whole_in_a_fresh_process(tmp_path):
    """The compat checks a region's code makes have run before it compiles. In a fresh process (a user's
    run) their first run inside a region, an import and a set mutation, broke its graph into pieces and
    lost the in-graph recomputation: the V2-Lite step's peak doubled (docs/benchmarks.md, issue 22)."""
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import pathlib, torch, torch._dynamo.utils as counters
from test_blocks import _grouped
from test_fusion import _model, _step
from finetune.fast import fusion
model = _grouped(_model(pathlib.Path({str(tmp_path)!r}), dtype="bfloat16"))
fusion.apply(model)
_step(model)
print(sorted(counters.counters["graph_break"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-2000:]
