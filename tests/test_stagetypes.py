"""Stage types declared once (`finetune.stagetypes`): the runtime registry has the same types, no other list
names them, each capability is the one the code reads, `rewards` stays a leaf (`reward_model` is
registered by finetune), and the MoE trainer mixin does what GRPO's trainer did."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import REPO, one_error_line, write_recipe

import rewards
from finetune import recipe
from finetune.cli import main
from finetune.context import StageContext
from finetune.errors import UserError
from finetune.stages import REGISTRY, common, moe_trainer
from finetune.stages import eval as eval_stage
from finetune.stagetypes import STAGE_TYPES

REVERSE = REPO / "recipes" / "data" / "reverse"


def _changed(monkeypatch, kind: str, **capabilities) -> None:
    monkeypatch.setitem(STAGE_TYPES, kind, dataclasses.replace(STAGE_TYPES[kind], **capabilities))


def test_the_runtime_registry_has_the_declared_types():
    assert list(REGISTRY) == list(STAGE_TYPES)
    for kind, module in REGISTRY.items():
        declared = STAGE_TYPES[kind]
        assert module.TYPE is declared and module.Schema is declared.schema
        assert module.TRAINER_CONFIG is declared.trainer_config
        assert recipe.stage_schema(kind) is declared.schema


def test_no_other_list_names_the_stage_types():
    """A tuple / list / set of two or more stage-type names outside `finetune/stagetypes.py` is a second
    registry that can drift (the runtime registry is a dict, checked above)."""
    found = []
    for path in sorted((REPO / "finetune").rglob("*.py")):
        if path.name == "stagetypes.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Tuple | ast.List | ast.Set):
                names = [e.value for e in node.elts if isinstance(e, ast.Constant)]
                if len(names) >= 2 and all(isinstance(n, str) and n in STAGE_TYPES for n in names):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {names}")
    assert found == []


def test_capabilities_are_consistent():
    for kind, t in STAGE_TYPES.items():
        assert t.adapter == (t.head is not None), kind
        assert (t.trainer_config is None) == (not t.adapter), kind  # a type that trains saves an adapter
        if t.predict:  # predict reads a trained head's outputs
            assert t.head == "seq_cls", kind
        if t.policy_init:  # a policy continues a causal-LM adapter
            assert t.head == "causal_lm", kind


def test_declarations_import_no_trainer():
    code = (
        "import sys, finetune.stagetypes, finetune.recipe; "
        "bad = [m for m in sys.modules if m.startswith('finetune.stages') or m.endswith('_trainer')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_import_rewards_imports_no_finetune():
    code = (
        "import rewards, sys; assert not any(m.startswith('finetune') for m in sys.modules); "
        "rewards.build('reward_model', stage='x')"  # its name and arguments are known without finetune
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_reward_model_is_registered_by_finetune():
    from finetune.stages import reward_model

    reward_model.register()
    assert rewards.resolve("reward_model") is reward_model.reward_model
    assert repr(rewards.build("reward_model", stage="s")) == "reward_model(stage='s')"


# ------------------------------------------------------------------------ each capability is read


def _grpo_after(tmp_path, first_type: str) -> Path:
    stages = {
        "first": {"type": first_type, "data": {"train": str(REVERSE / "test.jsonl")}},
        "grpo": {
            "type": "grpo",
            "data": {"train": str(REVERSE / "test.jsonl")},
            "rewards": [{"name": "similarity"}],
            "init_from": "first",
            "train": {"max_steps": 1, "per_device_train_batch_size": 8, "num_generations": 4},
        },
    }
    data = {
        "name": "t",
        "output_dir": str(tmp_path / "run"),
        "model": {"preset": "tiny", "dtype": "float32"},
        "stages": stages,
    }
    return write_recipe(tmp_path / "r.yaml", data)


def test_policy_init_decides_what_a_grpo_policy_continues(tmp_path, capsys, monkeypatch):
    path = _grpo_after(tmp_path, "sft")
    assert main(["validate", str(path)]) == 0
    capsys.readouterr()
    _changed(monkeypatch, "sft", policy_init=False)
    assert main(["validate", str(path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "stages.grpo.init_from: stage 'first' is a sft stage; it must be " in line
    assert "sft" not in line.split("must be")[1] and line.endswith(" grpo"), line


def test_fsdp_decides_what_trains_under_an_fsdp_launch(monkeypatch):
    monkeypatch.setenv("FINETUNE_FSDP", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = SimpleNamespace(fsdp="", save_strategy="no")
    ctx = SimpleNamespace(model_kwargs={"quantization": "nf4"})
    with pytest.raises(UserError, match="type: grpo stage does not train under FSDP yet"):
        common.check_fsdp("s", "grpo", args, ctx)
    _changed(monkeypatch, "grpo", fsdp=True)
    common.check_fsdp("s", "grpo", args, ctx)
    _changed(monkeypatch, "sft", fsdp=False)
    with pytest.raises(
        UserError, match=r"type: sft stage does not train under FSDP yet \(only reward, classify, grpo"
    ):
        common.check_fsdp("s", "sft", args, ctx)


def test_predict_decides_which_stages_predict_loads(tmp_path, monkeypatch):
    from finetune import predict

    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    recipe.dump(recipe.load(REPO / "recipes" / "tiny" / "sft.yaml"), run / "recipe.yaml")
    with pytest.raises(UserError, match="predict needs a classify or reward stage; 'sft' is a sft stage"):
        predict.stage_of(run / "sft")
    _changed(monkeypatch, "sft", predict=True)
    with pytest.raises(UserError, match="the stage has not finished"):
        predict.stage_of(run / "sft")


def test_adapter_decides_what_an_eval_stage_compares(tmp_path, monkeypatch):
    ctx = StageContext(
        name="t",
        seed=0,
        output_dir=tmp_path,
        source=None,
        model_kwargs={},
        adapter_kwargs={},
        stages={"first": "sft", "e": "eval"},
    )
    stage = eval_stage.Schema(type="eval", benchmarks=["reverse"], compare=["base", "first"], limit=2)
    eval_stage.check("e", stage, ctx)
    _changed(monkeypatch, "sft", head=None)
    with pytest.raises(
        UserError, match=r"stage 'first' is a sft stage; it must be reward or classify or (\w+ or )*grpo$"
    ):
        eval_stage.check("e", stage, ctx)


# ------------------------------------------------------------------------------ the trainer mixin


class _Parent:
    """What the mixin needs of a TRL trainer: it copies the config's `beta` at construction."""

    def __init__(self, *, args, model=None):
        self.built_with = args.beta
        self.beta = args.beta
        self.current_gradient_accumulation_steps = 4
        self.state = SimpleNamespace(global_step=7)
        self.accelerator = SimpleNamespace(is_main_process=True)
        self.logged: list[dict] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return torch.tensor(2.0)

    def log(self, logs, start_time=None):
        self.logged.append(logs)
        self.rows.clear()  # TRL's log empties what the samples are read from


class _Trainer(moe_trainer.MoETrainerMixin, _Parent):
    ref_copy_field = "beta"

    def _sample_rows(self):
        return list(self.rows)


class _Monitor:
    def __init__(self, aux):
        self.aux = aux

    def take_pending(self):
        aux, self.aux = self.aux, None
        return aux


def test_mixin_builds_without_the_ref_copy_and_puts_beta_back(tmp_path):
    config = SimpleNamespace(beta=0.04)
    trainer = _Trainer(args=config, router_monitor=_Monitor(None), samples=tmp_path / "s.jsonl")
    assert trainer.built_with == 0.0  # no "ref" adapter copied at construction
    assert config.beta == 0.04 and trainer.beta == 0.04


def test_mixin_adds_the_balance_loss_in_training_only(tmp_path):
    trainer = _Trainer(args=SimpleNamespace(beta=0.0), router_monitor=_Monitor(torch.tensor(0.8)))
    model = torch.nn.Linear(1, 1)
    assert trainer.compute_loss(model, {}).item() == pytest.approx(2.0 + 0.8 / 4)  # scaled for accumulation
    trainer._monitor = _Monitor(torch.tensor(0.8))
    assert trainer.compute_loss(model.eval(), {}).item() == 2.0
    trainer._monitor = _Monitor(None)
    assert trainer.compute_loss(model.train(), {}).item() == 2.0


def test_mixin_writes_the_samples_read_before_the_log(tmp_path):
    samples = tmp_path / "samples.jsonl"
    trainer = _Trainer(args=SimpleNamespace(beta=0.0), router_monitor=_Monitor(None), samples=samples)
    trainer.rows = [{"prompt": "p", "completion": "c", "rewards": {"r": 1.0}}]
    trainer.log({"reward": 1.0})  # not a training step's log: nothing written
    assert not samples.exists()
    trainer.rows = [{"prompt": "p", "completion": "c", "rewards": {"r": 1.0}}]
    trainer.log({"loss": 0.5})
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert rows == [{"step": 7, "prompt": "p", "completion": "c", "rewards": {"r": 1.0}}]
    assert list(rows[0]) == ["step", "prompt", "completion", "rewards"]
    trainer.accelerator.is_main_process = False
    trainer.rows = [{"prompt": "q", "completion": "d", "rewards": {}}]
    trainer.log({"loss": 0.4})
    assert len(samples.read_text().splitlines()) == 1


def test_grpo_trainer_is_the_mixin_on_trl():
    from trl import GRPOTrainer

    from finetune.compat import trl as compat_trl
    from finetune.stages import grpo

    assert grpo.Trainer.__mro__[1:4] == (
        compat_trl.SamplerCorrection,
        moe_trainer.MoETrainerMixin,
        GRPOTrainer,
    )
    assert grpo.Trainer.ref_copy_field == "beta"


def test_reward_model_decides_what_a_grpo_reward_model_may_name(tmp_path, capsys, monkeypatch):
    path = _grpo_after(tmp_path, "sft")
    recipe = yaml.safe_load(path.read_text())
    recipe["stages"] = {
        "first": {**recipe["stages"]["first"]},
        "grpo": {
            **recipe["stages"]["grpo"],
            "init_from": None,
            "rewards": [{"name": "reward_model", "stage": "first"}],
        },
    }
    path.write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "stages.grpo.rewards[0].stage: stage 'first' is a sft stage; it must be reward" in line
    _changed(monkeypatch, "sft", reward_model=True)
    assert main(["validate", str(path)]) == 0
