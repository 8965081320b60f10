"""Routed-expert LoRA through the SFT stage, and the inspect report's quantization coverage."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_recipe, train_sft_keeping_before, write_recipe

from finetune import pipeline, recipe
from finetune.cli import main
from finetune.errors import UserError
from finetune.model import adapters

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("expert-lora")
    data = base_recipe(tmp, learning_rate=1e-2, max_steps=4)
    data["adapter"].update(targets=["mla", "routed_experts"], expert_r=2, experts={1: [0, 3], 2: "all"})
    return train_sft_keeping_before(recipe.load(write_recipe(tmp / "r.yaml", data)), tmp)


def test_expert_lora_trains_and_nf4_base_stays(trained):
    _, model, before = trained
    now = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    expert_lora = [n for n in before if ".mlp.experts.lora_" in n and n.endswith(("_A", "_B"))]
    assert expert_lora and all(not torch.equal(now[n], before[n]) for n in expert_lora if n.endswith("_B"))
    packed = [n for n in before if n.endswith("_packed")]
    assert len(packed) == 4 and all(torch.equal(now[n], before[n]) for n in packed)
    frozen = [n for n in before if "lora" not in n]
    assert all(torch.equal(now[n], before[n]) for n in frozen)
    layers = adapters.expert_layers(model)
    assert layers[1].lora_experts.tolist() == [0, 3] and layers[2].lora_experts.tolist() == list(range(8))
    assert layers[1].lora_r == 2


def test_expert_lora_saved_and_reloaded(trained):
    plan, model, _ = trained
    folder = plan.context.output_dir / "sft" / "adapter"
    assert (folder / adapters.EXPERTS_FILE).is_file() and (folder / "adapter_config.json").is_file()
    reloaded = adapters.load_adapter(plan.context.base_model(), folder)
    ids = torch.tensor([[5, 89, 76, 93, 76, 89, 90, 76, 33, 7, 72, 73, 74, 75, 6]])
    model.eval()
    with torch.no_grad():
        a, b = model(ids).logits, reloaded(ids).logits
        without = adapters.load_adapter(plan.context.base_model(), folder)
        for layer in adapters.expert_layers(without).values():
            layer.lora_gate_up_B.zero_()
            layer.lora_down_B.zero_()
        c = without(ids).logits
    reload_gap, expert_effect = (a - b).abs().max(), (a - c).abs().max()
    # bitsandbytes' CPU kernels differ slightly between module instances; the expert LoRA's own effect
    # on the logits must dwarf that, or the reload check proves nothing.
    assert expert_effect > 2e-2 and reload_gap < 0.1 * expert_effect, (reload_gap, expert_effect)


def test_routed_experts_in_16_bit_save_and_reload(tmp_path):
    data = base_recipe(tmp_path)
    data["model"]["quantization"] = "none"
    data["adapter"]["targets"] = ["mla", "routed_experts"]
    ctx = pipeline.plan(recipe.load(write_recipe(tmp_path / "r.yaml", data))).context
    model = ctx.adapted_model()
    layer = adapters.expert_layers(model)[1]
    assert type(layer).__name__ == "PlainExperts" and layer.has_lora
    with torch.no_grad():
        layer.lora_down_B.normal_(std=0.5)
    ids = torch.tensor([[5, 10, 20, 30, 40, 50]])
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    adapters.save_adapter(model, tmp_path / "adapter")
    reloaded = adapters.load_adapter(ctx.base_model(), tmp_path / "adapter").eval()
    base = ctx.base_model().eval()
    with torch.no_grad():
        again, untouched = reloaded(ids).logits, base(ids).logits
    assert (trained - untouched).abs().max() > 1e-3  # the expert LoRA has an effect
    torch.testing.assert_close(again, trained)


def test_inspect_json_coverage(tmp_path, capsys):
    assert main(["inspect", "recipes/quickstart.yaml", "adapter.targets=[mla]", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    experts = rows["routed_experts"]
    assert experts["bytes"] <= 0.6 * experts["params"] and experts["dtypes"] == ["nf4"]
    assert rows["router"]["trainable_params"] == 0 and rows["router"]["dtypes"] == ["float32"]
    assert rows["mla"]["trainable_params"] > 0 and rows["shared_experts"]["trainable_params"] == 0
    assert set(rows) >= {
        "mla",
        "dense_mlp",
        "shared_experts",
        "routed_experts",
        "router",
        "embeddings",
        "norms",
        "total",
    }
    assert rows["total"]["params"] == sum(v["params"] for k, v in rows.items() if k != "total")


def test_inspect_counts_expert_lora_as_trainable(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", base_recipe(tmp_path))
    assert main(["inspect", str(path), "adapter.targets=[mla, routed_experts]", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    # 2 MoE layers x 8 experts x r=4 x (A of gate_up: H, B: 2I, A of down: I, B: H) with H=64, I=32
    assert rows["routed_experts"]["trainable_params"] == 2 * 8 * 4 * (64 + 64 + 32 + 64)
    assert "nf4" in rows["routed_experts"]["dtypes"]


def test_trainable_embeddings_show_in_inspect(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", base_recipe(tmp_path))
    assert main(["inspect", str(path), "adapter.trainable_modules=[embeddings]", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["embeddings"]["trainable_params"] == 128 * 64  # vocabulary x hidden of the tiny preset
    assert rows["router"]["trainable_params"] == 0


def test_unknown_trainable_module_is_refused(tmp_path):
    data = base_recipe(tmp_path)
    data["adapter"]["trainable_modules"] = ["router"]
    with pytest.raises(UserError, match=r"adapter\.trainable_modules"):
        recipe.load(write_recipe(tmp_path / "r.yaml", data))


def test_routed_experts_alone_train_save_reload_and_export(tmp_path):
    """`targets: [routed_experts]` alone: PEFT wraps nothing, the expert LoRA trains, reloads and exports."""
    from safetensors.torch import load_file as read

    from finetune.model.load import embedded_checkpoint

    data = base_recipe(tmp_path, learning_rate=1e-2, max_steps=2)
    data["adapter"]["targets"] = ["routed_experts"]
    r = recipe.load(write_recipe(tmp_path / "r.yaml", data))
    pipeline.run(r)
    folder = tmp_path / "run" / "sft" / "adapter"
    saved = read(str(folder / adapters.EXPERTS_FILE))
    assert all(saved[f"layers.{i}.lora_down_B"].abs().max() > 0 for i in (1, 2))  # trained: B starts at 0
    ctx = pipeline.plan(r).context
    reloaded = adapters.load_adapter(ctx.base_model(), folder).eval()
    assert not any(".lora_A." in n for n, _ in reloaded.named_parameters())  # no linear LoRA at all
    base = ctx.base_model().eval()
    ids = torch.tensor([[5, 10, 20, 30, 40, 50]])
    with torch.no_grad():
        assert (reloaded(ids).logits - base(ids).logits).abs().max() > 1e-4

    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "run" / "sft"), "--out", str(out)]) == 0
    original = read(str(embedded_checkpoint("tiny", 0) / "model.safetensors"))
    merged = read(str(out / "model.safetensors"))
    changed = {k for k in original if not torch.equal(original[k], merged[k])}
    # Only routed-expert tensors move (saved per expert: `mlp.experts.<j>.<proj>.weight`), in both MoE layers.
    assert changed and all(".mlp.experts." in k for k in changed), sorted(changed)[:5]
    assert {k.split(".")[2] for k in changed} == {"1", "2"}
