"""`finetune export`: adapter (MLA, routed experts, trained router) merged into a plain checkpoint."""

from __future__ import annotations

import json

import torch
from conftest import base_recipe, write_recipe
from transformers import AutoModelForCausalLM

from finetune import pipeline, recipe
from finetune.cli import main
from finetune.model import adapters


def test_export_matches_adapted_model(tmp_path, capsys):
    data = base_recipe(tmp_path, learning_rate=1e-2, max_steps=3)
    data["adapter"].update(
        targets=["mla", "shared_experts", "routed_experts"],
        router="trainable",
        trainable_modules=["embeddings"],
    )
    r = recipe.load(write_recipe(tmp_path / "r.yaml", data))
    pipeline.run(r)
    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "run" / "sft"), "--out", str(out), "--dtype", "float32"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v2" and "quantization_config" not in config

    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(plain.model.layers[1].mlp.experts).__name__ == "DeepseekV2Experts"
    ctx = pipeline.plan(r).context
    adapted = adapters.load_adapter(ctx.base_model(), tmp_path / "run" / "sft" / "adapter")
    base = ctx.base_model()
    ids = torch.tensor([[5, 89, 76, 93, 76, 89, 90, 76, 33, 7, 72, 73, 74, 75, 6]])
    for m in (plain, adapted, base):
        m.eval()
    with torch.no_grad():
        merged, lora, untouched = plain(ids).logits, adapted(ids).logits, base(ids).logits
    gap, effect = (merged - lora).abs().max(), (lora - untouched).abs().max()
    # Same dequantized weights plus the same deltas: the merge must sit far closer to the adapted
    # model than the adapter's own effect, which must be real.
    assert effect > 0.1 and gap < 0.05 * effect, (gap, effect)


def test_export_of_a_folder_without_adapter(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no adapter/ folder" in capsys.readouterr().err
