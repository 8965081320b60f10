"""The reward stage: a 4-bit DeepseekV2ForSequenceClassification with one output learns the bundled
preference pairs; base frozen, LoRA and the `score` head trained, metrics and histogram written."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, write_jsonl, write_recipe

from finetune import pipeline, recipe
from finetune.cli import main
from finetune.stages import REGISTRY, reward


def test_tiny_reward_recipe_learns_the_preferences(tmp_path):
    r = recipe.load(REPO / "recipes" / "tiny" / "reward.yaml", [f"output_dir={tmp_path / 'run'}"])
    plan = pipeline.plan(r)
    ctx = plan.context
    model = ctx.adapted_model("seq_cls", num_labels=1, pad_token_id=ctx.tokenizer().pad_token_id)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    (tmp_path / "run").mkdir()
    summary = reward.run("reward", r.stages["reward"], plan.inputs["reward"], ctx, model=model)

    assert summary["eval"]["pairs"] == 200
    assert summary["eval"]["pairwise_accuracy"] >= 0.9, summary["eval"]  # 0.995 measured; chance: 0.5
    assert summary["eval"]["mean_margin"] > 1.0
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n].detach(), v) for n, v in frozen.items())
    moved = {n for n, v in trained.items() if not torch.equal(now[n].detach(), v)}
    assert any(".score." in n for n in moved) and any("lora_B" in n for n in moved)
    stage = tmp_path / "run" / "reward"
    assert json.loads((stage / "summary.json").read_text())["eval"] == summary["eval"]
    assert (stage / "routing.png").stat().st_size > 0
    assert (stage / "reward_margins.png").stat().st_size > 0 and (
        stage / "adapter" / "adapter_config.json"
    ).is_file()
    config = json.loads((stage / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"chosen": "a", "answer": "b"}, "needs `chosen` and `rejected` columns; missing rejected"),
        ({"chosen": "a", "rejected": [{"role": "user", "content": "b"}]}, "row 1: `chosen` and `rejected`"),
        ({"chosen": "a", "rejected": "b", "margin": "big"}, "row 1: `margin` must be a number"),
    ],
)
def test_bad_pairs_are_one_line(tmp_path, capsys, row, message):
    data = write_jsonl(tmp_path / "pairs.jsonl", [row])
    path = write_recipe(
        tmp_path / "r.yaml",
        {
            "name": "t",
            "output_dir": str(tmp_path / "run"),
            "model": {"preset": "tiny", "dtype": "float32"},
            "stages": {"rm": {"type": "reward", "data": {"train": str(data)}}},
        },
    )
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stages.rm.data.train" in err and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        (
            {"data": {"train": "x.jsonl"}},
            f"missing key `stages.rm.type` (stage types: {', '.join(REGISTRY)})",
        ),
        ({"type": "ppo", "data": {"train": "x.jsonl"}}, "`stages.rm.type`: no stage type 'ppo'"),
        ({"type": "reward", "data": {"train": "x.jsonl"}, "heldout": {}}, "unknown key `stages.rm.heldout`"),
        (
            {"type": "reward", "data": {"train": "x.jsonl", "evl": "y.jsonl"}},
            "unknown key `stages.rm.data.evl` (did you mean `eval`?)",
        ),
    ],
)
def test_stage_type_errors_name_the_key(tmp_path, capsys, stage, message):
    recipe_file = {"name": "t", "output_dir": str(tmp_path / "run"), "model": {"preset": "tiny"}}
    path = write_recipe(tmp_path / "r.yaml", {**recipe_file, "stages": {"rm": stage}})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


@pytest.mark.parametrize("q_lora_rank", [None, 24], ids=["lite-mla", "v2-mla"])
def test_reward_on_a_hub_layout_checkpoint_with_expert_lora(tmp_path, q_lora_rank):
    """Both MLA variants, deepseek-ai Hub layout (per-expert keys), `[mla, routed_experts]` targets."""
    from hub_layout import write_hub_checkpoint
    from safetensors.torch import load_file

    from finetune.model import adapters

    folder = tmp_path / "ckpt"
    write_hub_checkpoint(folder, q_lora_rank=q_lora_rank)
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"model.path={folder}",
        "adapter.targets=[mla, routed_experts]",
        "stages.reward.data.max_samples=64",
        "stages.reward.train.max_steps=3",
        "stages.reward.train.per_device_train_batch_size=8",
    ]
    r = recipe.load(REPO / "recipes" / "tiny" / "reward.yaml", overrides)
    summary = pipeline.run(r)["reward"]
    assert summary["train"]["steps"] == 3 and summary["eval"]["pairs"] == 200
    saved = load_file(str(tmp_path / "run" / "reward" / "adapter" / adapters.EXPERTS_FILE))
    assert all(saved[f"layers.{i}.lora_down_B"].abs().max() > 0 for i in (1, 2))  # expert LoRA trained
