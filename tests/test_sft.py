"""SFT on the tiny 4-bit model through TRL: base frozen bit-for-bit, LoRA learns, the adapter reloads."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import base_recipe, write_recipe
from peft import PeftModel

from finetune import pipeline, recipe
from finetune.stages import sft

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    data = base_recipe(tmp, learning_rate=5e-3)
    data["stages"]["sft"]["heldout"] = {"data": data["stages"]["sft"]["data"]["train"], "max_samples": 4}
    r = recipe.load(write_recipe(tmp / "r.yaml", data))
    plan = pipeline.plan(r)
    model = plan.context.adapted_model()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    # Hand the stage the model we snapshotted.
    (tmp / "run").mkdir()
    summary = sft.run("sft", r.stages["sft"], plan.inputs["sft"], plan.context, model=model)
    return r, plan, model, base_before, lora_before, summary


def test_base_weights_bit_identical_and_lora_changed(trained):
    _, _, model, base_before, lora_before, _ = trained
    after = dict(model.named_parameters())
    assert base_before and all(torch.equal(after[n], p) for n, p in base_before.items())
    quantized = [n for n, p in base_before.items() if p.dtype == torch.uint8]
    assert quantized, "the base linear layers should be 4-bit"
    changed = [n for n, p in lora_before.items() if not torch.equal(after[n], p)]
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)


def test_saved_adapter_reloads_with_same_logits(trained):
    _, plan, model, *_ = trained
    folder = plan.context.output_dir / "sft" / "adapter"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert not any(".gate" in t.replace("gate_proj", "") for t in config["target_modules"])
    reloaded = PeftModel.from_pretrained(plan.context.base_model(), str(folder))
    ids = torch.tensor([[5, 89, 76, 93, 76, 89, 90, 76, 33, 7, 72, 73, 74, 75, 6]])
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        trained_logits, reloaded_logits = model(ids).logits, reloaded(ids).logits
        with reloaded.disable_adapter():
            base_logits = reloaded(ids).logits
    # bitsandbytes' CPU kernels differ slightly between a trained and a fresh module (~1e-3 here),
    # while two steps of LoRA move the logits by ~1: the bound separates the two by 10x both ways.
    assert (trained_logits - reloaded_logits).abs().max() < 1e-2
    assert (trained_logits - base_logits).abs().max() > 1e-1


def test_run_directory_files(trained):
    _, plan, _, _, _, summary = trained
    stage_dir = plan.context.output_dir / "sft"
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row for row in rows if "loss" in row]
    assert [row["step"] for row in losses] == [1, 2]
    saved = json.loads((stage_dir / "summary.json").read_text())
    assert saved["train"]["steps"] == 2 and saved == json.loads(json.dumps(summary))
    assert set(saved["heldout"]) == {"metric", "before", "after"} and saved["heldout"]["before"]["n"] == 4
    assert (stage_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (stage_dir / "routing.png").read_bytes()[:4] == b"\x89PNG"
    assert all(0 < row["routing/entropy/layer1"] <= 1 and "routing/max_share" in row for row in losses)


def test_pipeline_run_writes_resolved_recipe(tmp_path):
    data = base_recipe(tmp_path, max_steps=1)
    path = write_recipe(tmp_path / "r.yaml", data)
    r = recipe.load(path, ["adapter.r=2"])
    pipeline.run(r)
    resolved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert resolved["adapter"]["r"] == 2 and resolved["provenance"]["seed"] == 1
    assert {"torch", "transformers", "peft", "trl", "bitsandbytes"} <= set(resolved["provenance"]["versions"])
    # The resolved recipe is itself a valid recipe.
    assert recipe.load(tmp_path / "run" / "recipe.yaml").adapter.r == 2
    assert (tmp_path / "run" / "sft" / "adapter" / "adapter_config.json").is_file()
    # A rerun into the same directory (--overwrite) replaces the metrics log instead of appending to it.
    pipeline.run(r, overwrite=True)
    rows = (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in row for row in rows) == 1


def test_adapter_folder_carries_the_training_chat_template(tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    data = base_recipe(tmp_path, max_steps=1, chat_template_path=str(template))
    pipeline.run(recipe.load(write_recipe(tmp_path / "r.yaml", data)))
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tmp_path / "run" / "sft" / "adapter")
    assert saved.chat_template == template.read_text()
