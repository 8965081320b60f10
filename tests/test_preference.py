"""The preference stages (DPO, KTO) and the reference policy: the tiny DPO recipe learns a preference the
SFT adapter does not have; the reference is the starting adapter (routed-expert LoRA included) or the
base, in DPO, KTO and GRPO alike; base weights stay, LoRA moves, adapters reload and export; bad
preference data is one error line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, fails, write_jsonl, write_recipe
from safetensors.torch import load_file

from finetune import pipeline, recipe
from finetune.model import adapters, routing
from finetune.model.experts import NF4Experts
from finetune.stages import dpo, kto, sft

CAPITALS = REPO / "recipes" / "data" / "capitals"
REVERSE = REPO / "recipes" / "data" / "reverse"
ADAPTER = {"r": 8, "alpha": 16, "targets": ["mla", "routed_experts"], "expert_r": 4}


def _recipe(tmp_path, stage_type: str, **stage) -> dict:
    """A short SFT (a nonzero adapter, expert LoRA included), then a `stage_type` stage continuing it."""
    train = {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "max_length": 32}
    return {
        "name": "t",
        "output_dir": str(tmp_path / "run"),
        "seed": 1,
        "model": {"preset": "tiny", "dtype": "float32"},
        "adapter": ADAPTER,
        "stages": {
            "sft": {
                "type": "sft",
                "data": {"train": str(REVERSE / "test.jsonl")},
                "train": {**train, "max_steps": 6, "learning_rate": 2e-2},
            },
            "pref": {
                "type": stage_type,
                "init_from": "sft",
                "data": {"train": str(CAPITALS / "test.jsonl"), **stage.pop("data", {})},
                **stage,
                "train": {
                    **{k: v for k, v in train.items() if stage_type != "grpo" or k != "max_length"},
                    "learning_rate": 1e-2,
                    **stage.pop("train", {}),
                },
            },
        },
    }


def _metrics(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """The short SFT stage, run once: (recipe data, plan) with runs/…/sft/adapter written."""
    tmp_path = tmp_path_factory.mktemp("sft")
    data = _recipe(tmp_path, "dpo")
    r = recipe.Recipe.model_validate(data)
    plan = pipeline.plan(r)
    (tmp_path / "run").mkdir()
    sft.run("sft", r.stages["sft"], plan.inputs["sft"], plan.context)
    experts = load_file(str(tmp_path / "run" / "sft" / "adapter" / adapters.EXPERTS_FILE))
    assert any(k.endswith("_B") and v.abs().max() > 0 for k, v in experts.items())  # a real start
    return tmp_path, data


def _stage(sft_run, stage_type: str, **stage):
    tmp_path, _ = sft_run
    data = _recipe(tmp_path, stage_type, **stage)
    r = recipe.Recipe.model_validate(data)
    return r, pipeline.plan(r)


def _completion_logps(model, batch) -> torch.Tensor:
    """Sum of log p(completion tokens) of each sequence of a DPO batch, by a plain forward."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = logits[:, :-1].log_softmax(-1).gather(2, batch["input_ids"][:, 1:, None])[..., 0]
    return (logps * batch["completion_mask"][:, 1:]).sum(1)


def test_reference_is_the_starting_adapter_with_expert_lora(sft_run):
    """After the policy has moved, TRL's reference pass still computes base + the SFT adapter (compared
    with a separately loaded copy), and the policy's own values are back after it."""
    _, plan = _stage(sft_run, "dpo")
    ctx, inputs = plan.context, plan.inputs["pref"]
    model = ctx.policy_model("sft")
    trainer = dpo.Trainer(
        model=model,
        args=inputs.args,
        train_dataset=inputs.train,
        processing_class=ctx.tokenizer(),
        router_monitor=routing.RouterMonitor(model),
        reference="init",
    )
    assert "ref" not in trainer.model.peft_config  # TRL's copy (without the expert LoRA) is gone
    assert trainer.reference is not None and trainer.reference.frozen_bytes > 0
    with torch.no_grad():  # the policy moves away from its start, expert LoRA included
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    moved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_down_B" in n for n in moved)
    batch = next(iter(trainer.get_train_dataloader()))
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    start = adapters.load_adapter(ctx.base_model(), sft_run[0] / "run" / "sft" / "adapter").eval()
    assert any(layer.has_lora for layer in start.modules() if isinstance(layer, NF4Experts))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    for name, p in start.named_parameters():  # the trainer's dtypes: TRL runs a 4-bit model's LoRA in bf16
        p.data = p.data.to(dtypes[name])
    separate = _completion_logps(start, batch)
    torch.testing.assert_close(torch.cat([chosen, rejected]).float(), separate, rtol=0, atol=1e-4)
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n].detach(), v) for n, v in moved.items())
    # The base reference: the same pass with every adapter off differs.
    trainer.reference.mode = "base"
    base_chosen, _ = trainer.compute_ref_log_probs(trainer.model, batch)
    assert (base_chosen - chosen).abs().max() > 1e-2


@pytest.mark.parametrize("reference", ["init", "base"])
def test_dpo_margins_start_at_zero_against_the_starting_policy(sft_run, reference):
    r, plan = _stage(sft_run, "dpo", reference=reference, train={"max_steps": 2})
    tmp_path = sft_run[0]
    summary = dpo.run("pref", r.stages["pref"], plan.inputs["pref"], plan.context)
    first = _metrics(tmp_path / "run" / "pref" / "metrics.jsonl")[0]
    assert summary["reference"] == reference
    if reference == "init":  # policy = reference at the first step
        assert abs(first["rewards/margins"]) < 1e-4 and abs(first["rewards/chosen"]) < 1e-4, first
    else:  # the SFT adapter differs from the base
        assert abs(first["rewards/chosen"]) > 1e-3, first


@pytest.mark.long
def test_tiny_dpo_recipe_learns_a_preference_sft_lacks(tmp_path):
    """recipes/tiny/dpo.yaml: held-out preference accuracy from the SFT adapter's own (against the base)
    to ≥ 0.9; base weights bit-identical, MLA and expert LoRA moved; the adapter reloads and exports."""
    r = recipe.load(REPO / "recipes" / "tiny" / "dpo.yaml", [f"output_dir={tmp_path / 'run'}"])
    plan = pipeline.plan(r)
    ctx = plan.context
    (tmp_path / "run").mkdir()
    sft.run("sft", r.stages["sft"], plan.inputs["sft"], ctx)
    model = ctx.policy_model("sft")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    summary = dpo.run("dpo", r.stages["dpo"], plan.inputs["dpo"], ctx, model=model)

    before, after = summary["eval"]["before"], summary["eval"]["after"]
    assert before["preference_accuracy"] <= 0.6, before  # 0.0 measured: SFT writes lowercase
    assert after["preference_accuracy"] >= 0.9, after  # 1.0 measured
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n].detach(), v) for n, v in frozen.items())
    moved = {n for n, v in start.items() if not torch.equal(now[n].detach(), v)}
    assert any("lora_down_B" in n for n in moved) and any("kv_b_proj.lora_B" in n for n in moved)
    stage = tmp_path / "run" / "dpo"
    for plot in ("logps.png", "rewards.png", "loss.png", "routing.png"):
        assert (stage / plot).stat().st_size > 0
    # The saved adapter reloads to the trained policy.
    reloaded = adapters.load_adapter(ctx.base_model(), stage / "adapter").eval()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    for name, p in reloaded.named_parameters():  # the trainer's dtypes: TRL runs a 4-bit model's LoRA in bf16
        p.data = p.data.to(dtypes[name])
    model.eval()
    ids = torch.tensor([[5, 89, 76, 93, 76, 89, 90, 76, 33, 7, 72, 73, 74, 75, 6]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_kto_from_pairs_and_from_unpaired_rows(sft_run, tmp_path):
    rows = [json.loads(line) for line in (CAPITALS / "test.jsonl").read_text().splitlines()][:16]
    unpaired = write_jsonl(
        tmp_path / "kto.jsonl",
        [
            {"prompt": row["chosen"][:1], "completion": row[side][1:], "label": side == "chosen"}
            for row in rows
            for side in ("chosen", "rejected")
        ],
    )
    for source in (CAPITALS / "test.jsonl", unpaired):
        r, plan = _stage(sft_run, "kto", data={"train": str(source), "eval": str(unpaired)})
        train = plan.inputs["pref"].train
        assert set(train.column_names) == {"prompt", "completion", "label"}
        assert sorted(set(train["label"])) == [False, True]
        model = plan.context.policy_model("sft")
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        summary = kto.run("pref", r.stages["pref"], plan.inputs["pref"], plan.context, model=model)
        now = dict(model.named_parameters())
        assert any(not torch.equal(now[n].detach(), v) for n, v in start.items() if "lora_down_B" in n)
        assert summary["reference"] == "init" and "after" in summary["eval"]
    # Paired rows give a desirable and an undesirable row each.
    assert len(_stage(sft_run, "kto")[1].inputs["pref"].train) == 2 * 100


def _bad(tmp_path, stage_type: str, rows: list[dict], **stage) -> dict:
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    return {
        "name": "t",
        "output_dir": str(tmp_path / "run"),
        "model": {"preset": "tiny", "dtype": "float32"},
        "stages": {"p": {"type": stage_type, "data": {"train": str(data)}, **stage}},
    }


USER = {"role": "user", "content": "reverse: abcd"}


@pytest.mark.parametrize(
    ("stage_type", "rows", "stage", "message"),
    [
        (
            "dpo",
            [{"chosen": [USER, {"role": "assistant", "content": "dcba"}]}],
            {},
            "stages.p.data.train: a dpo stage needs `chosen` and `rejected` columns; missing rejected",
        ),
        (
            "dpo",
            [{"prompt": "x", "chosen": "same", "rejected": "same"}],
            {},
            "stages.p.data.train: row 1: `chosen` and `rejected` are identical",
        ),
        (
            "kto",
            [{"prompt": "x", "completion": "y", "label": "yes"}],
            {},
            "stages.p.data.train: row 1: `label` must be true or false (desirable or not), got 'yes'",
        ),
        (
            "dpo",
            [
                {
                    "chosen": [USER, {"role": "robot", "content": "x"}],
                    "rejected": [USER, {"role": "assistant", "content": "y"}],
                }
            ],
            {},
            "role 'robot' is not one the chat template renders (it renders: system, user, assistant)",
        ),
        (
            "kto",
            [{"prompt": [USER], "completion": [{"role": "assistant", "content": 3}], "label": True}],
            {},
            "row 1:",
        ),
        (
            "kto",
            [{"prompt": "x", "completion": "y"}],
            {},
            "a kto stage needs `prompt`, `completion` and `label` columns",
        ),
        (
            "dpo",
            [{"prompt": "x", "chosen": "a", "rejected": "b"}],
            {"train": {"sync_ref_model": True}},
            "stages.p.train.sync_ref_model: TRL does not sync a reference with an adapter",
        ),
        (
            "dpo",
            [{"prompt": "x", "chosen": "a", "rejected": "b"}],
            {"train": {"loss_type": ["sigmoid", "nope"]}},
            "stages.p.train.loss_type: 'nope' is not a loss of TRL's DPOConfig (it has: sigmoid, hinge, ipo",
        ),
        (
            "kto",
            [{"prompt": "x", "completion": "y", "label": True}],
            {"train": {"loss_type": "sigmoid"}},
            "stages.p.train.loss_type: 'sigmoid' is not a loss of TRL's KTOConfig (it has: kto, apo_zero_unpaired)",
        ),
        (
            "kto",
            [{"prompt": "x", "completion": "y", "label": True}],
            {"init_from": "sft"},
            "stages.p.init_from: no stage 'sft' in this recipe",
        ),
    ],
)
def test_bad_preference_input_is_one_line_and_writes_nothing(
    tmp_path, capsys, stage_type, rows, stage, message
):
    path = write_recipe(tmp_path / "r.yaml", _bad(tmp_path, stage_type, rows, **stage))
    for verb in ("validate", "run"):
        assert message in fails(capsys, tmp_path, [verb, str(path)])


@pytest.mark.parametrize("reference", ["init", "base"])
def test_grpo_kl_starts_at_zero_against_the_starting_policy(sft_run, reference):
    """GRPO with `init_from` and beta > 0: the KL at the first step is 0 to the starting policy, and not
    to the base (the reference before this change)."""
    from finetune.stages import grpo

    r, plan = _stage(
        sft_run,
        "grpo",
        reference=reference,
        data={"train": str(REVERSE / "test.jsonl")},
        rewards=[{"name": "similarity"}],
        train={
            "max_steps": 1,
            "beta": 0.1,
            "per_device_train_batch_size": 8,
            "num_generations": 4,
            "max_completion_length": 6,
        },
    )
    summary = grpo.run("pref", r.stages["pref"], plan.inputs["pref"], plan.context)
    first = _metrics(sft_run[0] / "run" / "pref" / "metrics.jsonl")[0]
    assert summary["train"]["steps"] == 1
    if reference == "init":
        assert abs(first["kl"]) < 1e-6, first
    else:
        assert first["kl"] > 1e-4, first


def test_a_dpo_run_exports_its_merged_adapter(tmp_path, capsys):
    """`finetune run` then `finetune export` of the DPO stage: the merged checkpoint computes what base +
    the DPO adapter (MLA and routed-expert LoRA) computes (`--base quantized`: the same 4-bit base)."""
    from test_export import IDS, export
    from transformers import AutoModelForCausalLM

    from finetune.cli import main

    path = write_recipe(tmp_path / "r.yaml", _recipe(tmp_path, "dpo"))
    assert main(["run", str(path)]) == 0
    stage = tmp_path / "run" / "pref"
    assert json.loads((stage / "summary.json").read_text())["reference"] == "init"
    ctx = pipeline.plan(recipe.load(path)).context
    adapted = adapters.load_adapter(ctx.base_model(), stage / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(
        export(stage, tmp_path / "out", "--base", "quantized"), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        gap = (merged(IDS).logits - adapted(IDS).logits).abs().max()
        effect = (adapted(IDS).logits - ctx.base_model()(IDS).logits).abs().max()
    assert effect > 1e-2 and gap < 1e-4 * effect, (gap, effect)
