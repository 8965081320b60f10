"""`model.kernels: auto` in training (finetune.fast.fusion, finetune.fast.lm_head) against the eager path.

The fused kernels are inductor-compiled on the CPU here (the same graphs the GPU compiles, other code
generation): in fp32 they must agree with the eager modules to rounding, and switching them off must
give back the eager model bit for bit.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from bitsandbytes.nn import Linear4bit
from conftest import base_recipe, write_recipe
from trl.trainer.utils import add_fused_lm_head

from finetune import family, pipeline, recipe, rundir
from finetune.fast import fusion, generation, lm_head, pieces
from finetune.model import adapters
from finetune.model.experts import NF4Experts
from finetune.stages import sft

pytestmark = pytest.mark.compat


def _model(tmp_path, *, dtype="float32", expert_lora=True, quantization="nf4"):
    data = base_recipe(tmp_path)
    data["model"].update(dtype=dtype, quantization=quantization)
    if expert_lora:
        data["adapter"].update(targets=["mla", "routed_experts"], expert_r=8)
    model = pipeline.plan(recipe.load(write_recipe(tmp_path / "r.yaml", data))).context.adapted_model()
    torch.manual_seed(0)
    with torch.no_grad():  # B factors start at zero: give every LoRA factor a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith(("lora_gate_up_B", "lora_down_B")):
                p.normal_(std=0.1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model.train()


IDS = torch.tensor(
    [[5, 89, 76, 93, 76, 89, 90, 76, 33, 7, 72, 73, 74, 75, 6, 9], [9, 8, 7, 6, 5, 4, 3, 2] * 2]
)


def _step(model, ids=IDS):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().clone(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_combine_and_permute_match_autograd_of_the_eager_expressions():
    torch.manual_seed(0)
    tokens, top_k, hidden = 7, 3, 16
    weights = torch.rand(tokens, top_k, requires_grad=True)
    ids = torch.randint(0, 4, (tokens * top_k,))
    _, perm = torch.sort(ids, stable=True)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    x = torch.randn(tokens, hidden, requires_grad=True)
    grad_out = torch.randn(tokens, hidden)

    def eager(x, w):
        y = x[perm // top_k] * 1.5  # any per-row function of the permuted rows
        y = y.float() * w.reshape(-1)[perm].float().unsqueeze(-1)
        return y[inverse].view(tokens, top_k, hidden).sum(dim=1)

    def fused(x, w):
        return pieces.combine(pieces.permute(x, perm, inverse, top_k) * 1.5, w, perm, inverse)

    ref = eager(x, weights)
    ref_grads = torch.autograd.grad(ref, (x, weights), grad_out)
    out = fused(x, weights)
    grads = torch.autograd.grad(out, (x, weights), grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_apply_patches_each_module_kind_and_remove_gives_the_eager_model_back(tmp_path):
    model = _model(tmp_path)
    logits, grads = _step(model)
    modules = list(model.modules())
    counts = fusion.apply(model)
    assert counts["rms_norm"] == sum(isinstance(m, family.RMSNorm) for m in modules) > 0
    assert counts["mlp"] == sum(isinstance(m, family.MLP) for m in modules) > 0
    assert counts["experts"] == sum(isinstance(m, NF4Experts) for m in modules) == 2
    layers = [m for m in modules if isinstance(m, family.DecoderLayer)]
    assert counts["layers"] == len(layers) == 3 and all("forward" in m.__dict__ for m in layers)
    # On the CPU in fp32 the experts' grouped kernel does not apply (its host-side loop would break a
    # compiled graph): the MoE layers' experts run outside the layer's regions, and their shared
    # experts as a region of their own.
    assert counts["compiled_regions"] == counts["experts"]
    assert all(m.mode.fused for m in modules if isinstance(m, NF4Experts))
    assert counts["linear4bit"] == sum(isinstance(m, Linear4bit) for m in modules) > 0
    fusion.remove(model)
    assert not any(
        "forward" in m.__dict__
        for m in modules
        if isinstance(m, family.RMSNorm | family.MLP | Linear4bit | family.DecoderLayer)
    )
    assert not any(m.mode.fused for m in modules if isinstance(m, NF4Experts))
    again, again_grads = _step(model)
    assert torch.equal(again, logits) and all(torch.equal(again_grads[n], g) for n, g in grads.items())


def test_fused_training_step_matches_eager_in_fp32(tmp_path):
    model = _model(tmp_path)
    logits, grads = _step(model)
    experts = adapters.expert_layers(model)
    with fusion.fused(model, True):
        calls = []
        for layer in experts.values():
            original = layer.dequantize
            layer.dequantize = lambda name, dtype=None, f=original: calls.append(name) or f(name, dtype)
        fused_logits, fused_grads = _step(model)
        for layer in experts.values():
            del layer.dequantize
    assert set(fused_grads) == set(grads) and any(".experts.lora_" in n for n in grads)
    assert _rel(fused_logits, logits) < 1e-5
    worst = max(_rel(fused_grads[n], g) for n, g in grads.items())
    assert worst < 1e-4, worst
    # Checkpointed layers: forward and recomputation dequantize (2 weights x 2 layers each); the
    # backward reuses the recomputation's weights instead of a third dequantization.
    assert len(calls) == 2 * 2 * 2, calls


def test_fused_training_step_in_bf16_stays_within_bf16_tolerance(tmp_path):
    model = _model(tmp_path, dtype="bfloat16")
    for layer in adapters.expert_layers(model).values():
        layer.use_grouped_mm = True  # the CUDA path: the experts trace whole, inside their layer's region
    logits, grads = _step(model)
    counts = fusion.apply(model)
    # The CUDA path: every layer is two regions, nothing is compiled on its own.
    assert counts["layers"] == 3 and counts["compiled_regions"] == 0
    fused_logits, fused_grads = _step(model)
    fusion.remove(model)
    # Eager bf16 rounds after every op, inductor keeps fp32 inside a fused kernel: the two differ by a
    # few bf16 ulps per op. Stated tolerance: logits within 3 % (relative norm), LoRA gradients 15 %.
    assert _rel(fused_logits.float(), logits.float()) < 0.03
    assert max(_rel(fused_grads[n].float(), g.float()) for n, g in grads.items()) < 0.15


def _fused_head_model(tmp_path, temperature: float = 1.0):
    model = _model(tmp_path, expert_lora=False)
    add_fused_lm_head(
        model.get_base_model(), temperature=temperature, outputs=("log_probs", "entropy", "is_top1")
    )
    return model


def _head_step(model, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=IDS, labels=labels, fused_lm_head=True)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_lm_head_gives_trl_outputs_and_gradients(tmp_path, temperature):
    """At GRPO's sampling temperature too (TRL's head divides the logits by it)."""
    model = _fused_head_model(tmp_path, temperature)
    labels = IDS.clone()
    labels[0, :5] = -100
    trl_out, trl_grads = _head_step(model, labels)
    assert lm_head.patch(model, temperature=temperature)
    out, grads = _head_step(model, labels)
    for key in ("loss", "log_probs", "entropy"):
        torch.testing.assert_close(getattr(out, key), getattr(trl_out, key), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.is_top1, trl_out.is_top1) and torch.equal(out.label_mask, trl_out.label_mask)
    assert max(_rel(grads[n], g) for n, g in trl_grads.items()) < 1e-5
    with torch.no_grad():  # evaluation: the same numbers, no gradient pass
        evaluated = model(input_ids=IDS, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(evaluated.log_probs, out.log_probs.detach(), rtol=0, atol=0)
    # A batch whose labels are all ignored: a zero loss that still backpropagates.
    empty, _ = _head_step(model, torch.full_like(IDS, -100))
    assert empty.loss.item() == 0.0
    lm_head.unpatch(model)
    back, _ = _head_step(model, labels)
    assert torch.equal(back.loss, trl_out.loss)


def test_lm_head_leaves_a_trainable_head_to_trl(tmp_path):
    model = _fused_head_model(tmp_path)
    head = model.get_base_model().get_output_embeddings().weight
    head.requires_grad_(True)
    assert lm_head.patch(model)
    _head_step(model, IDS)
    assert head.grad is not None and head.grad.abs().sum() > 0  # TRL's head: a weight gradient
    lm_head.unpatch(model)


@pytest.fixture(scope="module")
def sft_losses(tmp_path_factory):
    """20 SFT steps of the tiny model with model.kernels auto (forced on, as on CUDA) and off."""

    def run(kernels: str, monkeypatch: pytest.MonkeyPatch) -> tuple[list[float], dict]:
        tmp = tmp_path_factory.mktemp(f"sft-{kernels}")
        data = base_recipe(tmp, max_steps=20, learning_rate=1e-3)
        data["model"]["kernels"] = kernels
        r = recipe.load(write_recipe(tmp / "r.yaml", data))
        plan = pipeline.plan(r)
        seen: dict = {}
        apply = fusion.apply

        def record(model, **kw):
            seen.update(apply(model, **kw))
            return seen

        monkeypatch.setattr(generation, "enabled", lambda k, m: k == "auto")
        monkeypatch.setattr(fusion, "apply", record)
        (tmp / "run").mkdir()
        sft.run("sft", r.stages["sft"], plan.inputs["sft"], plan.context)
        rows = rundir.read_metrics(tmp / "run" / "sft" / "metrics.jsonl")
        return [row["loss"] for row in rows if "loss" in row], seen

    with pytest.MonkeyPatch.context() as mp:
        on = run("auto", mp)
    with pytest.MonkeyPatch.context() as mp:
        off = run("off", mp)
    return on, off


def test_sft_with_kernels_patches_the_model_and_matches_20_losses(sft_losses):
    (on, seen_on), (off, seen_off) = sft_losses
    assert seen_on["lm_head"] == 1 and seen_on["layers"] == 3 and not seen_off
    assert seen_on["linear4bit"] > 0  # the 4-bit MLA projections train through linear4bit
    assert len(on) == len(off) == 20
    assert max(abs(a - b) / abs(b) for a, b in zip(on, off, strict=True)) < 0.01
    assert on[-1] < on[0]  # and it learns


@pytest.mark.long  # compiles the regions on the CPU: ~2 minutes
def test_grpo_with_kernels_trains_through_the_regions_and_generates_eager(tmp_path, monkeypatch):
    """GRPO's training passes run through the compiled regions and our LM head (at the sampling
    temperature); every rollout's generate sees the eager modules (the compiled decode step traces
    them), the regions patched back after it; routing replay still trains on the rollout's experts."""
    from test_grpo import _grpo

    applied: list[dict] = []
    apply = fusion.apply
    monkeypatch.setattr(generation, "enabled", lambda k, m: k == "auto")
    monkeypatch.setattr(fusion, "apply", lambda model, **kw: applied.append({**apply(model, **kw), **kw}))
    patched_while_generating: list[bool] = []
    from finetune.fast import lm_head
    from finetune.model import sampler

    recording = sampler.recording

    @contextlib.contextmanager
    def watch(model):
        layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        patched_while_generating.append(any("forward" in m.__dict__ for m in layers))
        with recording(model) as recorded:
            yield recorded

    monkeypatch.setattr(sampler, "recording", watch)
    data = _grpo(
        tmp_path,
        adapter={"r": 8, "alpha": 16, "targets": ["mla", "routed_experts"], "expert_r": 8},
        routing_replay="rollout",
        train={"max_steps": 2, "num_iterations": 2, "learning_rate": 3e-2, "temperature": 0.7},
    )
    summary = pipeline.run(recipe.Recipe.model_validate(data))["grpo"]
    first = applied[0]
    assert first["layers"] == 3 and first["lm_head"] == 1 and first["temperature"] == 0.7
    assert first["experts"] == 2 and first["linear4bit"] > 0
    rollouts = len(patched_while_generating)
    assert rollouts >= 1 and len(applied) == 1 + rollouts  # patched again after each rollout
    assert all({k: again[k] for k in first} == first for again in applied[1:])  # same counts, settings
    assert patched_while_generating == [False] * rollouts
    assert summary["routing"]["router_mismatch"] > 0.05  # the router moved ...
    assert summary["routing"]["mismatch"] == 0.0  # ... and training still used the rollout's experts
    assert lm_head  # imported for the monkeypatched names' module


def test_an_entropy_bonus_keeps_trl_head(tmp_path):
    """Our LM head gives no gradient through the entropy: with an entropy bonus GRPO keeps TRL's."""
    model = _fused_head_model(tmp_path)
    counts = fusion.apply(model, chunked_head=True, head=False)
    assert counts["lm_head"] == 0 and counts["layers"] == 3
    fusion.remove(model)


def test_fused_step_with_16_bit_experts_matches_eager(tmp_path):
    """quantization: none keeps the routed experts in 16 bits (`PlainExperts`), the same fused path."""
    model = _model(tmp_path, quantization="none")
    assert all(type(m).__name__ == "PlainExperts" for m in adapters.expert_layers(model).values())
    logits, grads = _step(model)
    with fusion.fused(model, True):
        fused_logits, fused_grads = _step(model)
    assert _rel(fused_logits, logits) < 1e-5
    assert max(_rel(fused_grads[n], g) for n, g in grads.items()) < 1e-4
