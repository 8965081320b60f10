"""The reference-free preference stages, ORPO and SimPO (TRL's experimental ORPOTrainer / CPOTrainer): they
train the starting policy (an SFT adapter with `init_from`, expert LoRA included) with no reference pass
at all, keep the base weights, evaluate the starting policy's own preference before training; `reference:`
and a non-SimPO loss are one error line; TRL's experimental module loads only when a stage uses it."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, fails, write_jsonl, write_recipe
from safetensors.torch import load_file
from test_preference import CAPITALS, _bad, _recipe  # the same SFT start and bad-input recipe

from finetune import pipeline, recipe
from finetune.compat import trl as compat_trl
from finetune.model import adapters
from finetune.stages import REGISTRY, moe_trainer, preference, sft


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """The short SFT stage, run once: its tmp folder, with run/sft/adapter written."""
    tmp_path = tmp_path_factory.mktemp("sft")
    r = recipe.Recipe.model_validate(_recipe(tmp_path, "orpo"))
    plan = pipeline.plan(r)
    (tmp_path / "run").mkdir()
    sft.run("sft", r.stages["sft"], plan.inputs["sft"], plan.context)
    experts = load_file(str(tmp_path / "run" / "sft" / "adapter" / adapters.EXPERTS_FILE))
    assert any(k.endswith("_B") and v.abs().max() > 0 for k, v in experts.items())  # a real start
    return tmp_path


def _stage(tmp_path, stage_type: str, **stage):
    shutil.rmtree(tmp_path / "run" / "pref", ignore_errors=True)  # an earlier test's stage folder
    r = recipe.Recipe.model_validate(_recipe(tmp_path, stage_type, **stage))
    return r, pipeline.plan(r)


@pytest.mark.parametrize("stage_type", ["orpo", "simpo"])
def test_trains_the_starting_policy_with_no_reference_pass(sft_run, tmp_path, stage_type):
    rows = [json.loads(line) for line in (CAPITALS / "test.jsonl").read_text().splitlines()]
    held_out = write_jsonl(tmp_path / "eval.jsonl", rows[:12])
    r, plan = _stage(sft_run, stage_type, data={"eval": str(held_out)}, train={"max_steps": 3})
    ctx, inputs = plan.context, plan.inputs["pref"]
    model = ctx.policy_model("sft")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    entered = []  # every way TRL and ours compute a reference goes through the model's disable_adapter
    disable = model.disable_adapter

    @contextlib.contextmanager
    def counted():
        entered.append(1)
        with disable():
            yield

    model.disable_adapter = counted
    summary = REGISTRY[stage_type].run("pref", r.stages["pref"], inputs, ctx, model=model)

    assert entered == [] and "ref" not in model.peft_config
    assert summary["reference"] is None and summary["init_from"] == "sft"
    before, after = summary["eval"]["before"], summary["eval"]["after"]  # the SFT adapter's own, then ours
    assert "reference" not in before and 0 <= before["preference_accuracy"] <= 1
    assert after["rewards/margins"] != before["rewards/margins"]
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n].detach(), v) for n, v in frozen.items())  # base bit-identical
    moved = {n for n, v in start.items() if not torch.equal(now[n].detach(), v)}
    assert any("lora_down_B" in n for n in moved) and any("kv_b_proj.lora_B" in n for n in moved)
    stage = sft_run / "run" / "pref"
    logged = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in logged if "loss" in m and "rewards/accuracies" in m]
    assert len(train) == 3
    if stage_type == "orpo":
        assert "log_odds_ratio" in train[0] and "log_odds_ratio" in after
    else:  # SimPO: CPO's loss with no behaviour-cloning term
        assert inputs.args.loss_type == "simpo" and inputs.args.cpo_alpha == 0.0
        assert all(m["nll_loss"] == 0.0 for m in train)
    for plot in ("logps.png", "rewards.png", "loss.png", "routing.png"):
        assert (stage / plot).stat().st_size > 0
    reloaded = adapters.load_adapter(ctx.base_model(), stage / "adapter").eval()
    model.eval()
    ids = torch.tensor([[5, 89, 76, 93, 76, 89, 90, 76, 33, 7, 72, 73, 74, 75, 6]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_a_fresh_adapter_trains_too(sft_run):
    """Without `init_from` the policy starts as the base model (a fresh adapter)."""
    r, plan = _stage(sft_run, "orpo", init_from=None, train={"max_steps": 1})
    summary = REGISTRY["orpo"].run("pref", r.stages["pref"], plan.inputs["pref"], plan.context)
    assert summary["train"]["steps"] == 1 and "init_from" not in summary and summary["reference"] is None


def test_simpo_defaults_and_what_train_overrides(sft_run):
    inputs = _stage(sft_run, "simpo")[1].inputs["pref"]
    assert (inputs.args.loss_type, inputs.args.cpo_alpha, inputs.args.remove_unused_columns) == (
        "simpo",
        0.0,
        False,
    )
    args = _stage(sft_run, "simpo", train={"cpo_alpha": 0.5, "simpo_gamma": 1.0, "beta": 2.0})[1]
    args = args.inputs["pref"].args
    assert (args.loss_type, args.cpo_alpha, args.simpo_gamma, args.beta) == ("simpo", 0.5, 1.0, 2.0)
    # TRL's AlphaPO is SimPO's loss with its reward reshaped (its config says simpo, cpo_alpha 0).
    args = _stage(sft_run, "simpo", train={"loss_type": "alphapo", "alpha": 0.1})[1].inputs["pref"].args
    assert (args.loss_type, args.cpo_alpha, args.alpha) == ("simpo", 0.0, 0.1)
    orpo_args = _stage(sft_run, "orpo", train={"beta": 0.5})[1].inputs["pref"].args
    assert type(orpo_args) is compat_trl.orpo_config() and orpo_args.beta == 0.5


def test_the_trainers_are_the_mixin_on_trl():
    for kind, trl_trainer in (("orpo", compat_trl.orpo_trainer()), ("simpo", compat_trl.cpo_trainer())):
        module = REGISTRY[kind]
        assert module.Trainer.__mro__[1:4] == (
            preference.StartEvaluation,
            moe_trainer.MoETrainerMixin,
            trl_trainer,
        )
        assert not module.Trainer.copies_reference
        assert module.TRAINER_CONFIG is module.TYPE.trainer_config
        # The Trainer divides TRL's batch-mean loss for gradient accumulation (the balance loss with it).
        assert module.Trainer.loss_is_scaled_for_ga is False


class _Monitor:
    def __init__(self, aux):
        self.aux = aux

    def take_pending(self):
        aux, self.aux = self.aux, None
        return aux


@pytest.mark.parametrize(("scaled", "expected"), [(True, 2.0 + 0.8 / 4), (False, 2.8), (None, 2.0 + 0.8 / 4)])
def test_the_balance_loss_is_scaled_as_the_trainer_loss_is(scaled, expected):
    """A trainer whose loss the Trainer divides for accumulation (DPO, KTO, ORPO, CPO) gets the balance
    loss undivided, or it would be divided twice; GRPO's comes divided, so it is divided too."""

    class _Parent:
        current_gradient_accumulation_steps = 4
        loss_is_scaled_for_ga = scaled

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return torch.tensor(2.0)

    class _Trainer(moe_trainer.MoETrainerMixin, _Parent):
        pass

    trainer = object.__new__(_Trainer)
    trainer._monitor = _Monitor(torch.tensor(0.8))
    assert trainer.compute_loss(torch.nn.Linear(1, 1), {}).item() == pytest.approx(expected)


def test_experimental_trl_loads_on_first_use_and_quietly():
    """The declarations import none of `trl.experimental` and apply nothing (tests/test_compat.py: nor
    does any module of finetune); the first use imports it through the declared compat patches, with
    TRL's warning on that import silenced."""
    code = """
        import sys, warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            from finetune import compat
            from finetune.stagetypes import STAGE_TYPES
            assert "trl.experimental" not in sys.modules and compat.APPLIED == set()
            STAGE_TYPES["orpo"].trainer_config, STAGE_TYPES["simpo"].trainer_config
        assert compat.APPLIED == {"trl.experimental_orpo", "trl.experimental_cpo"}, compat.APPLIED
        noted = [str(w.message) for w in caught if "experimental" in str(w.message)]
        assert noted == [], noted
        """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]


PAIR = {"prompt": "x", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize(
    ("stage_type", "rows", "stage", "message"),
    [
        (
            "orpo",
            [PAIR],
            {"reference": "init"},
            "stages.p.reference: ORPO is reference-free (no reference pass); drop it",
        ),
        (
            "simpo",
            [PAIR],
            {"reference": "base"},
            "stages.p.reference: SimPO is reference-free (no reference pass); drop it",
        ),
        (
            "simpo",
            [PAIR],
            {"train": {"loss_type": "sigmoid"}},
            "stages.p.train.loss_type: a simpo stage trains SimPO's loss ('simpo', or 'alphapo'), not "
            "'sigmoid'; drop the key",
        ),
        (
            "simpo",
            [PAIR],
            {"train": {"loss_type": "nope"}},
            "stages.p.train.loss_type: 'nope' is not a loss of TRL's CPOConfig",
        ),
        (
            "orpo",
            [PAIR],
            {"train": {"loss_type": "sigmoid"}},
            "unknown trainer argument `stages.p.train.loss_type` (see trl.experimental.orpo.ORPOConfig)",
        ),
        (
            "orpo",
            [{"prompt": "x", "chosen": "same", "rejected": "same"}],
            {},
            "stages.p.data.train: row 1: `chosen` and `rejected` are identical",
        ),
        (
            "simpo",
            [{"prompt": "x", "chosen": "a"}],
            {},
            "stages.p.data.train: a simpo stage needs `chosen` and `rejected` columns; missing rejected",
        ),
        ("orpo", [PAIR], {"init_from": "sft"}, "stages.p.init_from: no stage 'sft' in this recipe"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, stage_type, rows, stage, message):
    path = write_recipe(tmp_path / "r.yaml", _bad(tmp_path, stage_type, rows, **stage))
    for verb in ("validate", "run"):
        assert message in fails(capsys, tmp_path, [verb, str(path)])


@pytest.mark.long
def test_tiny_orpo_recipe_learns_a_preference_sft_lacks(tmp_path):
    """recipes/tiny/orpo.yaml: held-out preference accuracy (mean log-prob of the chosen side above the
    rejected side's) from the SFT adapter's own to ≥ 0.9; base weights bit-identical, MLA and expert
    LoRA moved."""
    r = recipe.load(REPO / "recipes" / "tiny" / "orpo.yaml", [f"output_dir={tmp_path / 'run'}"])
    plan = pipeline.plan(r)
    ctx = plan.context
    (tmp_path / "run").mkdir()
    sft.run("sft", r.stages["sft"], plan.inputs["sft"], ctx)
    model = ctx.policy_model("sft")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    summary = REGISTRY["orpo"].run("orpo", r.stages["orpo"], plan.inputs["orpo"], ctx, model=model)

    before, after = summary["eval"]["before"], summary["eval"]["after"]
    # Measured (seeds 42, 1, 7): before 0.02, 0.02, 0.04 (SFT writes lowercase); after 1.0, 0.99, 1.0.
    assert before["preference_accuracy"] <= 0.6, before
    assert after["preference_accuracy"] >= 0.9, after
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n].detach(), v) for n, v in frozen.items())
    moved = {n for n, v in start.items() if not torch.equal(now[n].detach(), v)}
    assert any("lora_down_B" in n for n in moved) and any("kv_b_proj.lora_B" in n for n in moved)
