"""`finetune run --resume` after a `kill -9`: the same steps and the same adapter as a run never interrupted.

The recipe has three stages on the tiny model with routed-expert LoRA and a trainable router (so the
two files transformers' checkpoints lack are exercised): `first` (finished before the kill: skipped on
resume), `second` (killed after its checkpoint of step 4 while training a later step: continues from
it) and `third` (never started: starts fresh).

Tolerance: adapter tensors equal within 1e-6 absolute (on the CPU they come out bit-identical: resume
restores the weights, optimizer, scheduler, RNG and data position exactly; the bound leaves room for
kernels that are not deterministic on other hardware), per-step losses within 1e-5.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import base_recipe, write_recipe
from safetensors.torch import load_file

from finetune import rundir
from finetune.cli import main

ADAPTER_FILES = ("adapter_model.safetensors", "routed_experts.safetensors", "router.safetensors")
KILL_AFTER_CHECKPOINT = 4
STEPS = {"first": 1, "second": 8, "third": 1}


def _recipe(tmp: Path) -> Path:
    data = base_recipe(
        tmp,
        learning_rate=5e-3,
        save_steps=KILL_AFTER_CHECKPOINT,
        per_device_train_batch_size=2,
        gradient_checkpointing=False,  # the tiny model needs no memory saving; a third less compute
    )
    data["adapter"].update(targets=["mla", "routed_experts"], router="trainable", expert_r=2)
    sft = data["stages"].pop("sft")
    for name, steps in STEPS.items():
        data["stages"][name] = {**sft, "train": {**sft["train"], "max_steps": steps}}
    return write_recipe(tmp / "r.yaml", data)


def _rows(path: Path) -> list[dict]:
    return rundir.read_metrics(path)


def _kill_during_second_stage(recipe: Path, out: Path) -> None:
    """Run in a subprocess that SIGKILLs itself while `second` trains the step after its checkpoint-4."""
    killer = [
        sys.executable,
        str(Path(__file__).parent / "kill_at_step.py"),
        "second",
        str(KILL_AFTER_CHECKPOINT + 1),
    ]
    process = subprocess.run(
        [*killer, "run", str(recipe), f"output_dir={out}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=300,
    )
    assert process.returncode == -signal.SIGKILL, "the run was not killed"
    checkpoint = out / "second" / rundir.CHECKPOINTS / f"checkpoint-{KILL_AFTER_CHECKPOINT}"
    steps = [r["step"] for r in _rows(out / "second" / "metrics.jsonl") if "loss" in r]
    assert rundir.is_complete(checkpoint) and steps[-1] == KILL_AFTER_CHECKPOINT + 1, steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    recipe = _recipe(tmp)
    killed, full = tmp / "killed", tmp / "full"
    _kill_during_second_stage(recipe, killed)
    before = {
        "first": json.loads((killed / "first" / "summary.json").read_text()),
        "rows": _rows(killed / "second" / "metrics.jsonl"),
    }
    # A checkpoint cut short by the kill (no completion marker) must be ignored and removed on resume.
    partial = killed / "second" / rundir.CHECKPOINTS / "checkpoint-8"
    partial.mkdir(exist_ok=True)
    (partial / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    assert main(["run", str(recipe), f"output_dir={killed}", "--resume"]) == 0
    assert main(["run", str(recipe), f"output_dir={full}"]) == 0
    return killed, full, before, partial


def test_same_steps_as_an_uninterrupted_run(runs):
    killed, full, _, _ = runs
    for name, steps in STEPS.items():
        resumed = json.loads((killed / name / "summary.json").read_text())
        reference = json.loads((full / name / "summary.json").read_text())
        assert resumed["train"]["steps"] == reference["train"]["steps"] == steps
        state = json.loads((rundir.last_checkpoint(killed / name) / "trainer_state.json").read_text())
        assert state["global_step"] == steps
    assert json.loads((killed / "second" / "summary.json").read_text())["train"]["resumed_from"].endswith(
        f"checkpoint-{KILL_AFTER_CHECKPOINT}"
    )


@pytest.mark.parametrize("stage", list(STEPS))
def test_same_adapter_as_an_uninterrupted_run(runs, stage):
    killed, full, _, _ = runs
    for file in ADAPTER_FILES:
        resumed = load_file(str(killed / stage / "adapter" / file))
        reference = load_file(str(full / stage / "adapter" / file))
        assert resumed.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-6, msg=f"{file}: {key}")


def test_finished_stage_skipped_and_partial_checkpoint_ignored(runs):
    killed, _, before, partial = runs
    assert json.loads((killed / "first" / "summary.json").read_text()) == before["first"]
    # The resumed run saved its own checkpoint-8 where the partial one was.
    assert rundir.is_complete(partial) and (partial / "adapter_model.safetensors").stat().st_size > 10
    # The run folder's recipe records the attempt that resumed it.
    assert "resumed" in (killed / "recipe.yaml").read_text()


def test_metrics_continue_without_repeated_steps(runs):
    killed, full, before, _ = runs
    rows = _rows(killed / "second" / "metrics.jsonl")
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, STEPS["second"] + 1))
    marker = [r for r in rows if "resumed_from" in r]
    assert marker == [{"step": KILL_AFTER_CHECKPOINT, "resumed_from": f"checkpoint-{KILL_AFTER_CHECKPOINT}"}]
    # Rows the killed run logged after its checkpoint were dropped: those steps were trained again.
    assert max(r["step"] for r in before["rows"] if "loss" in r) > KILL_AFTER_CHECKPOINT
    reference = [r["loss"] for r in _rows(full / "second" / "metrics.jsonl") if "loss" in r]
    assert [r["loss"] for r in losses] == pytest.approx(reference, abs=1e-5)
