"""Router: frozen by default, trainable on request with DeepSeek's balance loss; expert load is logged."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_recipe, write_recipe

from finetune import pipeline, recipe
from finetune.model import adapters, routing
from finetune.model.load import load_model, resolve_source
from finetune.stages import sft


def test_balance_loss_matches_the_formula():
    model = load_model(resolve_source("tiny", None), quantization="none", dtype="float32")
    model.train()
    ids = torch.randint(7, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    captured = {}
    hooks = [
        r.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
        for i, r in routing.routers(model).items()
    ]
    plain = model(input_ids=ids, labels=ids).loss
    monitor = routing.RouterMonitor(model, aux_loss_coef=0.5)
    with_aux = model(input_ids=ids, labels=ids).loss
    for h in hooks:
        h.remove()
    expected = 0.0
    for logits, _, top_k in captured.values():
        experts = logits.shape[-1]
        f = torch.bincount(top_k.flatten(), minlength=experts).float() * experts / top_k.numel()
        expected += (f * logits.softmax(-1).mean(0)).sum()
    torch.testing.assert_close(with_aux - plain, 0.5 * expected)
    report = monitor.report()
    assert set(report) >= {"expert_load/layer1", "expert_load/layer2", "router_aux_loss"}
    assert sum(report["expert_load/layer1"]) == pytest.approx(1.0)
    assert report["expert_load/layer1/max_over_mean"] >= 1.0
    monitor.remove()


@pytest.mark.parametrize("router", ["frozen", "trainable"])
def test_router_through_sft(tmp_path, router):
    data = base_recipe(tmp_path, learning_rate=1e-2, gradient_checkpointing=True)
    data["adapter"]["router"] = router
    r = recipe.load(write_recipe(tmp_path / "r.yaml", data))
    plan = pipeline.plan(r)
    model = plan.context.adapted_model()
    gates = routing.routers(model)
    before = {i: g.weight.detach().clone() for i, g in gates.items()}
    assert all(g.weight.dtype == torch.float32 for g in gates.values())
    (tmp_path / "run").mkdir()
    sft.run("sft", r.stages["sft"], plan.inputs["sft"], plan.context, model=model)
    changed = [not torch.equal(g.weight, before[i]) for i, g in gates.items()]
    assert all(changed) if router == "trainable" else not any(changed)
    # TRL casts trainable parameters of a 4-bit model to bf16; the router must train and be saved in fp32.
    assert all(g.weight.dtype == torch.float32 for g in gates.values())
    assert not any(hasattr(g, "lora_A") for g in gates.values())  # never wrapped
    rows = [json.loads(x) for x in (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "loss" in row]
    assert all(len(row["expert_load/layer1"]) == 8 for row in logged)
    assert all(("router_aux_loss" in row) == (router == "trainable") for row in logged)
    saved = tmp_path / "run" / "sft" / "adapter" / adapters.ROUTER_FILE
    assert saved.is_file() == (router == "trainable")
    if router == "trainable":
        reloaded = adapters.load_adapter(plan.context.base_model(), saved.parent)
        for i, g in routing.routers(reloaded).items():
            assert torch.equal(g.weight, gates[i].weight.detach())
