"""The GRPO stage: TRL's GRPOTrainer on the 4-bit tiny model raises the toy reward; routing replay makes
the training passes use the rollout's experts; generation uses the adapter (routed-expert LoRA
included) and the reference pass does not; bad stage input is one error line before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, one_error_line, write_jsonl, write_recipe
from trl import GRPOConfig

from finetune import pipeline, recipe
from finetune.cli import main
from finetune.model import adapters
from finetune.model.experts import NF4Experts
from finetune.stages.common import documented_values

REVERSE = REPO / "recipes" / "data" / "reverse"


@pytest.mark.long
def test_tiny_grpo_recipe_raises_the_reward(tmp_path):
    r = recipe.load(REPO / "recipes" / "tiny" / "grpo.yaml", [f"output_dir={tmp_path / 'run'}"])
    summaries = pipeline.run(r)
    # The held-out check before GRPO measures the SFT adapter it continues, as the SFT stage did after.
    held = summaries["grpo"]["heldout"]
    assert held["before"]["exact_match"] == summaries["sft"]["heldout"]["after"]["exact_match"]
    assert held["before"]["n"] == held["after"]["n"] == 100
    # Measured on seed 42: 41 % → 57 %, reward windows 1.109 → 1.325 (seeds 1 and 7 do not gain: issue
    # 24's bar of +10 on each is not met, docs/benchmarks.md says why).
    assert held["after"]["exact_match"] >= held["before"]["exact_match"] + 0.08, held
    windows = summaries["grpo"]["rewards"]
    assert windows["last"] > windows["first"] + 0.1, windows
    stage = tmp_path / "run" / "grpo"
    metrics = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    logged = metrics[0]
    for key in (
        "rewards/exact_match/mean",
        "rewards/similarity/std",
        "completions/mean_length",
        "clip_ratio/region_mean",
    ):
        assert key in logged, key
    assert logged["routing/mismatch"] == 0.0 and logged["routing/replayed_tokens"] > 0
    assert 0 < logged["routing/entropy"] <= 1 and (stage / "routing.png").stat().st_size > 0
    samples = [json.loads(line) for line in (stage / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * len([m for m in metrics if "loss" in m])
    assert set(samples[0]) == {"step", "prompt", "completion", "rewards"}
    assert set(samples[0]["rewards"]) == {"exact_match", "similarity"}
    assert (stage / "reward.png").stat().st_size > 0 and (stage / "adapter" / "adapter_config.json").is_file()
    # The policy continued the SFT adapter and moved it.
    from safetensors.torch import load_file

    before = load_file(str(tmp_path / "run" / "sft" / "adapter" / "adapter_model.safetensors"))
    after = load_file(str(stage / "adapter" / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k].float(), after[k].float()) for k in before)


def _grpo(tmp_path, **stage) -> dict:
    train = {
        "max_steps": 3,
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 6,
        "logging_steps": 1,
        **stage.pop("train", {}),
    }
    return {
        "name": "t",
        "output_dir": str(tmp_path / "run"),
        "seed": 1,
        "model": {"preset": "tiny", "dtype": "float32"},
        "adapter": stage.pop("adapter", {"r": 8, "alpha": 16, "targets": ["mla", "shared_experts"]}),
        "stages": {
            "grpo": {
                "type": "grpo",
                "data": {"train": str(REVERSE / "test.jsonl")},
                "rewards": [{"name": "similarity"}],
                **stage,
                "train": train,
            }
        },
    }


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("rollout", marks=pytest.mark.long),
        "old_policy",
        pytest.param("off", marks=pytest.mark.long),
    ],
)
def test_routing_replay_trains_on_the_recorded_experts(tmp_path, mode):
    """Two optimisation passes per rollout (num_iterations: 2) at a high learning rate move the router's
    choices; with replay the experts used still equal the record's (the rollout's, or the old-policy
    pass's), per layer too."""
    r = recipe.Recipe.model_validate(
        _grpo(
            tmp_path,
            routing_replay=mode,
            train={"max_steps": 4, "num_iterations": 2, "learning_rate": 3e-2},
        )
    )
    routing = pipeline.run(r)["grpo"]["routing"]
    assert routing["replay"] == mode
    assert routing["router_mismatch"] > 0.05, routing  # 0.32 measured either way
    stage = tmp_path / "run" / "grpo"
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < row["routing/entropy/layer2"] <= 1 for row in rows if "loss" in row)
    assert (stage / "routing.png").stat().st_size > 0
    if mode == "off":
        assert routing["mismatch"] == routing["router_mismatch"]
    else:
        assert routing["mismatch"] == 0.0
    logged = [json.loads(line) for line in (tmp_path / "run" / "grpo" / "metrics.jsonl").open()]
    layers = [k for k in logged[0] if k.startswith("routing/router_mismatch/layer")]
    assert layers and all(0 <= logged[0][k] <= 1 for k in layers)


def _correction_run(tmp_path, **train) -> list[dict]:
    r = recipe.Recipe.model_validate(_grpo(tmp_path, train={"max_steps": 2, **train}))
    pipeline.run(r)
    return [json.loads(line) for line in (tmp_path / "run" / "grpo" / "metrics.jsonl").open()][:-1]


@pytest.mark.long
def test_the_sampler_correction_sees_no_mismatch_where_there_is_none(tmp_path):
    """Sampler and trainer share temperature and numerics (eager CPU): ratios 1, nothing corrected."""
    logged = _correction_run(tmp_path, temperature=0.7)
    for step in logged:
        assert step["mismatch/kl"] < 1e-6, step
        assert abs(step["mismatch/ratio_mean"] - 1) < 1e-4 and step["mismatch/ratio_max"] < 1.001
        assert step["mismatch/corrected_share"] == 0.0
        assert abs(step["sampling/importance_sampling_ratio/mean"] - 1) < 1e-4


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("token_truncate", marks=pytest.mark.long),
        "token_mask",
        pytest.param("sequence_mask", marks=pytest.mark.long),
    ],
)
def test_an_unknown_sampling_temperature_is_measured_and_corrected(tmp_path, mode):
    """Rollouts sampled at temperature 3 for a trainer at 1 (`generation_kwargs`, which the trainer
    does not read): the KL and the ratios move, and the correction truncates or masks them."""
    logged = _correction_run(
        tmp_path,
        generation_kwargs={"temperature": 3.0},
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_max=1.5,
    )
    for step in logged:
        assert step["mismatch/kl"] > 0.05, step
        assert step["mismatch/ratio_max"] > 1.5 and step["mismatch/corrected_share"] > 0.05
        if mode == "token_truncate":  # clipped to the cap
            assert step["sampling/importance_sampling_ratio/max"] <= 1.5 + 1e-6
        else:  # masked: the corrected tokens (or sequences) weigh 0
            assert step["sampling/importance_sampling_ratio/min"] == 0.0


@pytest.mark.long
def test_the_correction_can_be_turned_off(tmp_path):
    logged = _correction_run(tmp_path, vllm_importance_sampling_correction=False)
    assert not any(k.startswith(("mismatch/", "sampling/importance")) for k in logged[0])


def test_generation_uses_the_expert_lora_and_the_reference_does_not(tmp_path):
    r = recipe.Recipe.model_validate(
        _grpo(
            tmp_path,
            adapter={"r": 4, "alpha": 8, "targets": ["mla", "routed_experts"]},
            train={"max_steps": 2, "beta": 0.1},
        )
    )
    plan = pipeline.plan(r)
    model = plan.context.adapted_model()
    layers = [m for m in model.modules() if isinstance(m, NF4Experts)]
    top = next(m for m in model.modules() if type(m).__name__ == "DeepseekV2ForCausalLM")
    seen = {"generate": set(), "no_grad": set()}
    generating = []
    original = top.generate

    def generate(*args, **kwargs):
        generating.append(True)
        try:
            return original(*args, **kwargs)
        finally:
            generating.pop()

    top.generate = generate

    def hook(module, args):
        where = "generate" if generating else "no_grad" if not torch.is_grad_enabled() else None
        if where:
            seen[where].add(module.has_lora and module.lora_enabled)

    for layer in layers:
        layer.register_forward_pre_hook(hook)
    (tmp_path / "run").mkdir()
    from finetune.stages import grpo

    grpo.run("grpo", r.stages["grpo"], plan.inputs["grpo"], plan.context, model=model)
    assert seen["generate"] == {True}  # every rollout forward went through the expert LoRA
    assert False in seen["no_grad"]  # the reference log-probs (beta > 0) ran with it disabled


# TRL's loss types (its GRPOConfig documents them), and GSPO: sequence-level importance ratios with the
# per-sequence `grpo` loss (TRL warns that the token-summing losses reweight it by length); LUSPO is
# sequence-level by definition.
LOSSES = [(t, "sequence" if t == "luspo" else "token") for t in documented_values(GRPOConfig, "loss_type")]
LOSSES.append(("grpo", "sequence"))
# The default suite runs the four the issue names and GSPO (a few seconds each); the others run in the long job.
_DEFAULT_SUITE = {
    ("grpo", "token"),
    ("dr_grpo", "token"),
    ("dapo", "token"),
    ("bnpo", "token"),
    ("grpo", "sequence"),
}
_LOSS_CASES = [
    pytest.param(t, lv, id=f"{t}-{lv}", marks=() if (t, lv) in _DEFAULT_SUITE else pytest.mark.long)
    for t, lv in LOSSES
]
# The metric each family logs: the clipped losses their clip ratios, CISPO its clipped weights, VESPO its
# sequence weights; SAPO's soft gate none of them.
_LOSS_METRIC = {"cispo": "cispo_clip_ratio", "vespo": "vespo/phi_seq_mean", "sapo": None}


def test_the_loss_types_include_grpo_dr_grpo_dapo_and_bnpo():
    assert {"grpo", "dr_grpo", "dapo", "bnpo"} <= {t for t, _ in LOSSES}


@pytest.mark.parametrize(("loss_type", "level"), _LOSS_CASES)
def test_each_loss_type_trains_the_adapter(tmp_path, loss_type, level):
    """Three steps of each loss (2 prompts x 2 generations, 4 new tokens) reach TRL's trainer and move
    the adapter; the metrics name the loss that ran."""
    r = recipe.Recipe.model_validate(
        _grpo(
            tmp_path,
            train={
                "loss_type": loss_type,
                "importance_sampling_level": level,
                "per_device_train_batch_size": 4,
                "num_generations": 2,
                "max_completion_length": 4,
                "learning_rate": 1e-2,
                "save_strategy": "no",
            },
        )
    )
    plan = pipeline.plan(r)
    args = plan.inputs["grpo"].args
    assert (args.loss_type, args.importance_sampling_level) == (loss_type, level)
    model = plan.context.adapted_model()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    (tmp_path / "run").mkdir()
    from finetune.stages import grpo

    summary = grpo.run("grpo", r.stages["grpo"], plan.inputs["grpo"], plan.context, model=model)
    assert summary["train"]["steps"] == 3
    now = dict(model.named_parameters())
    assert any(not torch.equal(now[n].detach(), v) for n, v in start.items())
    metrics = [
        json.loads(line) for line in (tmp_path / "run" / "grpo" / "metrics.jsonl").read_text().splitlines()
    ]
    logged = set().union(*(m.keys() for m in metrics if "loss" in m))
    family = {"cispo_clip_ratio", "vespo/phi_seq_mean", "clip_ratio/region_mean"}
    expected = _LOSS_METRIC.get(loss_type, "clip_ratio/region_mean")
    assert logged & family == ({expected} if expected else set()), sorted(logged & family)


def test_heldout_check_before_and_after_grpo(tmp_path, capsys):
    """`heldout:` on a GRPO stage: validate counts its prompts; the summary and the run's table hold the
    greedy check of the starting policy and of the trained one, which a step at a high rate changed."""
    heldout = {"data": str(REVERSE / "test.jsonl"), "max_samples": 4, "max_new_tokens": 4}
    data = _grpo(
        tmp_path, heldout=heldout, train={"max_steps": 1, "learning_rate": 3e-2, "save_strategy": "no"}
    )
    path = write_recipe(tmp_path / "r.yaml", data)
    assert main(["validate", str(path)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert next(r for r in rows if r[:1] == ["heldout"])[:3] == ["heldout", "4", "4"]
    assert main(["run", str(path)]) == 0
    assert any(line.split()[:2] == ["grpo", "exact_match"] for line in capsys.readouterr().out.splitlines())
    summary = json.loads((tmp_path / "run" / "grpo" / "summary.json").read_text())
    held = summary["heldout"]
    assert held["metric"] == "exact_match" and held["before"]["n"] == held["after"]["n"] == 4
    assert [e["output"] for e in held["before"]["examples"]] != [
        e["output"] for e in held["after"]["examples"]
    ]


def test_disable_adapter_covers_the_expert_lora():
    from finetune.model.load import load_model, resolve_source

    source = resolve_source("tiny", None)
    base = load_model(source, dtype="float32")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        reference = base(ids).logits
    model = adapters.attach(base, r=4, alpha=8, dropout=0.0, targets=["routed_experts"])
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, NF4Experts)):
            layer.lora_down_B.normal_()
        adapted = model(ids).logits
        with model.disable_adapter():
            disabled = model(ids).logits
    assert not torch.allclose(adapted, reference, atol=1e-4)
    assert torch.allclose(disabled, reference, atol=1e-6)


def test_trainable_router_adds_the_balance_loss_to_grpo(tmp_path):
    r = recipe.Recipe.model_validate(
        _grpo(
            tmp_path,
            adapter={
                "r": 4,
                "alpha": 8,
                "targets": ["mla"],
                "router": "trainable",
                "router_aux_loss_coef": 0.1,
            },
            train={"max_steps": 2},
        )
    )
    plan = pipeline.plan(r)
    model = plan.context.adapted_model()
    gates = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    (tmp_path / "run").mkdir()
    from finetune.stages import grpo

    grpo.run("grpo", r.stages["grpo"], plan.inputs["grpo"], plan.context, model=model)
    metrics = [
        json.loads(line) for line in (tmp_path / "run" / "grpo" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any(m.get("router_aux_loss", 0) > 0 for m in metrics)
    now = dict(model.named_parameters())
    assert any(not torch.equal(now[n].detach(), v) for n, v in gates.items())


def _stage_error(tmp_path, capsys, data: dict) -> str:
    path = write_recipe(tmp_path / "r.yaml", data)
    assert main(["validate", str(path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert main(["run", str(path)]) == 2
    capsys.readouterr()
    assert not (tmp_path / "run").exists()
    return line


def _two_stages(tmp_path, first_type: str, **grpo_stage) -> dict:
    base = _grpo(tmp_path, **grpo_stage)
    if first_type == "reward":
        first = {
            "type": "reward",
            "data": {"train": str(REPO / "recipes" / "data" / "preference" / "test.jsonl")},
        }
    else:
        first = {"type": first_type, "data": {"train": str(REVERSE / "test.jsonl")}}
    base["stages"] = {"first": first, **base["stages"]}
    return base


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda t: _grpo(t, rewards=[{"name": "nope"}]),
            "stages.grpo.rewards[0]: cannot load reward function 'nope': expected one of",
        ),
        (
            lambda t: _grpo(t, rewards=[{"name": "length", "targt": 3}]),
            "stages.grpo.rewards[0]: reward 'length': unknown argument 'targt'",
        ),
        (lambda t: _grpo(t, rewards=[{"target": 3}]), "stages.grpo.rewards[0]: needs `name`"),
        (
            lambda t: _grpo(t, rewards=[{"name": "similarity", "on_error": "skip"}]),
            "stages.grpo.rewards[0].on_error: 'skip'",
        ),
        (
            lambda t: _grpo(t, init_from="sft"),
            "stages.grpo.init_from: no stage 'sft' in this recipe (stages: grpo)",
        ),
        (
            lambda t: _two_stages(t, "reward", init_from="first"),
            "stages.grpo.init_from: stage 'first' is a reward stage; it must be sft or dpo or kto or orpo or "
            "simpo or grpo",
        ),
        (
            lambda t: _two_stages(t, "sft", rewards=[{"name": "reward_model", "stage": "first"}]),
            "stages.grpo.rewards[0].stage: stage 'first' is a sft stage; it must be reward",
        ),
        (
            lambda t: _grpo(t, rewards=[{"name": "reward_model", "stage": "grpo"}]),
            "stages.grpo.rewards[0].stage: stage 'grpo' runs after 'grpo'",
        ),
        (
            lambda t: _grpo(t, rewards=[{"name": "math_accuracy", "column": "solution"}]),
            "stages.grpo.rewards[0]: reads column `solution`, which stages.grpo.data.train lacks",
        ),
        (
            lambda t: _grpo(t, rewards=[{"name": "code_execution"}]),
            "stages.grpo.rewards[0]: reads column `tests`, which stages.grpo.data.train lacks",
        ),
        (lambda t: _grpo(t, train={"num_generations": 3}), "stages.grpo.train:"),
        (
            lambda t: _grpo(t, train={"reward_weights": [1.0, 2.0]}),
            "stages.grpo.train.reward_weights: 2 weights for 1 rewards",
        ),
        (lambda t: _grpo(t, max_prompt_length=2), "stages.grpo.max_prompt_length: 2 drops every prompt"),
        (
            lambda t: _grpo(t, train={"loss_type": "gspo"}),
            "stages.grpo.train.loss_type: 'gspo' is not a loss of TRL's GRPOConfig (it has: grpo, dr_grpo, "
            "dapo, bnpo,",
        ),
        (
            lambda t: _grpo(t, train={"importance_sampling_level": "seq"}),
            "stages.grpo.train.importance_sampling_level: 'seq' is not a level of TRL's GRPOConfig (it has: "
            "token, sequence)",
        ),
    ],
)
def test_bad_grpo_stages_are_one_line_and_write_nothing(tmp_path, capsys, make, message):
    assert message in _stage_error(tmp_path, capsys, make(tmp_path))


def test_prompts_without_a_prompt_or_messages_column(tmp_path, capsys):
    data = _grpo(tmp_path)
    data["stages"]["grpo"]["data"]["train"] = str(write_jsonl(tmp_path / "p.jsonl", [{"question": "hi"}]))
    line = _stage_error(tmp_path, capsys, data)
    assert "needs a `prompt` column (text or messages), or `messages`" in line


@pytest.mark.long
def test_pipeline_recipe_chains_sft_reward_and_grpo(tmp_path):
    """recipes/tiny/pipeline.yaml end to end: the policy continues the SFT adapter and is scored by the
    reward stage's model (finetune.predict), in one run folder."""
    r = recipe.load(REPO / "recipes" / "tiny" / "pipeline.yaml", [f"output_dir={tmp_path / 'run'}"])
    summaries = pipeline.run(r)
    assert list(summaries) == ["sft", "reward", "grpo"]
    assert summaries["reward"]["eval"]["pairwise_accuracy"] >= 0.9
    metrics = [
        json.loads(line) for line in (tmp_path / "run" / "grpo" / "metrics.jsonl").read_text().splitlines()
    ]
    logged = [m for m in metrics if "rewards/reward_model/mean" in m]
    assert logged and all(m["kl"] > 0 for m in logged)  # beta > 0: KL to the adapter-disabled base
    assert summaries["grpo"]["rewards"]["logged_steps"] == 6


def test_prompt_template_builds_conversations_from_columns(tmp_path, capsys):
    rows = [{"question": "What is 2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5"}] * 8
    data = _grpo(
        tmp_path,
        rewards=[{"name": "math_accuracy"}],
        prompt_template="{question}\nAnswer as \\boxed{{n}}.",
        system_prompt="You are careful.",
    )
    data["stages"]["grpo"]["data"]["train"] = str(write_jsonl(tmp_path / "gsm.jsonl", rows))
    inputs = pipeline.plan(recipe.Recipe.model_validate(data)).inputs["grpo"]
    assert inputs.train[0]["prompt"] == [
        {"role": "system", "content": "You are careful."},
        {"role": "user", "content": "What is 2+3?\nAnswer as \\boxed{n}."},
    ]
    assert inputs.train[0]["answer"].endswith("#### 5")
    data["stages"]["grpo"]["prompt_template"] = "{quesion}"
    line = _stage_error(tmp_path, capsys, data)
    assert "stages.grpo.prompt_template: names column `quesion`, which stages.grpo.data.train lacks" in line
    data["stages"]["grpo"]["prompt_template"] = "{question"
    assert "stages.grpo.prompt_template:" in _stage_error(tmp_path, capsys, data)
    del data["stages"]["grpo"]["prompt_template"]
    data["stages"]["grpo"]["data"]["train"] = str(REVERSE / "test.jsonl")
    line = _stage_error(tmp_path, capsys, data)
    assert "stages.grpo.system_prompt: applies to prompts built by stages.grpo.prompt_template" in line


def test_max_prompt_length_drops_the_longer_prompts(tmp_path, capsys):
    rows = [{"prompt": "reverse: abcd", "answer": "dcba"}] * 3 + [
        {"prompt": "reverse: " + "x" * 40, "answer": "x"}
    ]
    data = _grpo(tmp_path, max_prompt_length=20)
    data["stages"]["grpo"]["data"]["train"] = str(write_jsonl(tmp_path / "p.jsonl", rows))
    inputs = pipeline.plan(recipe.Recipe.model_validate(data)).inputs["grpo"]
    assert len(inputs.train) == 3 and all(len(p) < 20 for p in inputs.train["prompt"])
    assert (inputs.report[0].kept, inputs.report[0].cut) == (3, 1)
    assert "stages.grpo.max_prompt_length: 20 drops 1 of 4 train prompts" in capsys.readouterr().err
