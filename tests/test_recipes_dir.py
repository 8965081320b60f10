"""Every shipped recipe validates offline, and the bundled toy data is the generator's output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForCausalLM

from finetune import pipeline, recipe, toy
from finetune.model import adapters
from finetune.model.presets import preset_config

RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


def test_every_stage_type_is_a_plugin():
    """A stage type is one module + one registry line + one recipes/tiny/<type>.yaml (validated below)."""
    from typing import Literal

    from finetune.stages import REGISTRY

    for kind, module in REGISTRY.items():
        assert (REPO / "recipes" / "tiny" / f"{kind}.yaml").is_file(), kind
        assert module.Schema.model_fields["type"].annotation == Literal[kind]
        # TRAINER_CONFIG is None for a stage that trains nothing (eval): it has no `train:` section.
        trainer = module.TRAINER_CONFIG
        assert (trainer is None) == ("train" not in module.Schema.model_fields), kind
        assert (
            (trainer is None or isinstance(trainer, type)) and callable(module.check) and callable(module.run)
        )
        assert (
            recipe.stage_schema(kind) is module.Schema
            and recipe.trainer_config_class(kind) is module.TRAINER_CONFIG
        )


def test_there_are_recipes():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    assert {
        "quickstart.yaml",
        "tiny/sft.yaml",
        "tiny/reward.yaml",
        "tiny/classify.yaml",
        "deepseek-v2-lite/sft.yaml",
        "deepseek-v2-lite/reward.yaml",
        "deepseek-v2-lite/classify.yaml",
        "deepseek-v2/sft.yaml",
        "tiny/grpo.yaml",
        "tiny/pipeline.yaml",
        "tiny/eval.yaml",
        "deepseek-v2-lite/grpo.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_recipe_validates(path: Path):
    plan = pipeline.plan(recipe.load(path))
    for inputs in plan.inputs.values():
        assert inputs.train is None or len(inputs.train) > 0  # None: a Hub dataset, offline here


def test_bundled_toy_data_matches_generator():
    expected = toy.splits()
    for split, rows in expected.items():
        lines = (REPO / "recipes" / "data" / "reverse" / f"{split}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == rows
    train_words = {r["messages"][0]["content"] for r in expected["train"]}
    assert not train_words & {r["messages"][0]["content"] for r in expected["test"]}


# The Hub checkpoints the real-model recipes name, and the embedded shape each one has.
REAL_SHAPES = {
    "deepseek-ai/DeepSeek-V2-Lite-Chat": "v2-lite",
    "deepseek-ai/DeepSeek-V2-Lite": "v2-lite",
    "deepseek-ai/DeepSeek-V2-Chat": "v2",
}
REAL_RECIPES = sorted(
    p.relative_to(REPO / "recipes").as_posix()
    for p in RECIPES
    if p.parent.name in ("deepseek-v2-lite", "deepseek-v2")
)


@pytest.mark.parametrize("name", REAL_RECIPES)
def test_real_model_recipes_fit_the_real_architecture(name):
    """Offline, `validate` cannot see a Hub model's modules; check the adapter against its exact shape."""
    r = recipe.load(REPO / "recipes" / name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(preset_config(REAL_SHAPES[r.model.path]))
    modules = adapters.resolve_targets(skeleton, r.adapter.targets)
    layers = skeleton.config.num_hidden_layers
    assert len(modules) == layers * (4 if skeleton.config.q_lora_rank is None else 5)
    pipeline.check_experts(skeleton, r.adapter)


def test_bundled_preference_data_matches_generator():
    for split, rows in toy.preferences().items():
        lines = (REPO / "recipes" / "data" / "preference" / f"{split}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == rows
    for row in toy.preferences(n_train=50, n_test=5)["train"]:
        word = row["chosen"][0]["content"].split()[-1]
        assert row["chosen"][1]["content"] == word[::-1] != row["rejected"][1]["content"]


def test_bundled_classification_data_matches_generator():
    for split, rows in toy.classes().items():
        lines = (REPO / "recipes" / "data" / "classify" / f"{split}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == rows
    assert {r["label"] for r in toy.classes()["test"]} == {"early", "middle", "late"}
    assert all(r["text"][0] in toy.CLASSES[r["label"]] for r in toy.classes()["train"])
