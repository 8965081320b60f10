"""Two CPU processes (torchrun, gloo) train what one process trains: the recipe's batch is the global
batch, metrics are summed over processes, and rank 0 alone writes the run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, write_recipe
from safetensors.torch import load_file

from finetune import schema
from finetune.errors import UserError

pytestmark = pytest.mark.long  # multi-process runs: .ci/run's own step, out of the default suite


def _recipe(tmp_path, out) -> str:
    data = {
        "name": "ddp",
        "output_dir": str(out),
        "seed": 3,
        "model": {"preset": "tiny", "quantization": "nf4", "dtype": "float32"},
        "adapter": {"r": 8, "alpha": 16, "targets": ["mla", "routed_experts"]},
        "stages": {
            "sft": {
                "type": "sft",
                "data": {
                    "train": str(REPO / "recipes" / "data" / "reverse" / "train.jsonl"),
                    "max_samples": 512,
                },
                "heldout": {
                    "data": str(REPO / "recipes" / "data" / "reverse" / "test.jsonl"),
                    "max_samples": 8,
                },
                "train": {
                    "max_steps": 8,
                    "per_device_train_batch_size": 16,
                    "gradient_accumulation_steps": 2,  # 32 rows per step; 1 accumulation step each on 2 ranks
                    "learning_rate": 3e-3,
                    "logging_steps": 2,
                    "use_cpu": True,
                },
            },
            "eval": {"type": "eval", "benchmarks": ["reverse"], "compare": ["base", "sft"], "limit": 8},
        },
    }
    return str(write_recipe(tmp_path / f"{out.name}.yaml", data))


def _run(argv: list[str], cache: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    if cache is not None:  # an empty cache: both processes build the embedded model at once
        env["FINETUNE_CACHE"] = cache
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_train_what_one_process_trains(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "finetune", "run", _recipe(tmp_path, one)])
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = _run([*launch, "-m", "finetune", "run", _recipe(tmp_path, two)])

    # The same optimizer steps on the same 32-row batches: equal to bf16 rounding (TRL keeps LoRA in bf16
    # for a 4-bit model), measured ≤ 1 ulp (4.9e-4 on LoRA factors of magnitude ≤ 0.19).
    for name in ("adapter_model.safetensors", "routed_experts.safetensors"):
        a, b = load_file(str(one / "sft" / "adapter" / name)), load_file(str(two / "sft" / "adapter" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert (a[key].float() - b[key].float()).abs().max() <= 2e-3 * max(
                1.0, float(a[key].abs().max())
            ), key
    rows = [
        [json.loads(x) for x in (d / "sft" / "metrics.jsonl").read_text().splitlines()] for d in (one, two)
    ]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]  # written once, not per rank
    assert any("expert_load/layer1" in r for r in rows[0])
    for r1, r2 in zip(rows[0], rows[1], strict=True):
        if "loss" in r1:
            assert r2["loss"] == pytest.approx(r1["loss"], abs=1e-3)
        # Expert load is summed over both processes: the same counts as one process over the same rows.
        load = "expert_load/layer1"
        assert (load in r1) == (load in r2)
        if load in r1:
            assert r2[load] == pytest.approx(r1[load], abs=1e-4)
    # The eval stage shards its items over the two processes and gathers them in order: the same outputs
    # and figures as one process; one process reports and writes.
    assert result.stdout.count("run directory:") == 1
    summaries = [json.loads((d / "eval" / "summary.json").read_text()) for d in (one, two)]
    assert summaries[1]["results"] == summaries[0]["results"] and set(summaries[1]["results"]) == {
        "base",
        "sft",
    }
    for model in ("base", "sft"):
        outputs = [
            [
                json.loads(x)["output"]
                for x in (d / "eval" / model / "samples_reverse.jsonl").read_text().splitlines()
            ]
            for d in (one, two)
        ]
        assert outputs[1] == outputs[0] and len(outputs[0]) == 8


def test_the_global_batch_splits_over_processes(monkeypatch):
    stage = type("S", (), {"train": {}})()
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = schema.split_global_batch(
        {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 4}, stage
    )
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == (16, 2)
    args = schema.split_global_batch(
        {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1}, stage
    )
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == (8, 1)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match="does not split over 3 processes"):
        schema.split_global_batch(
            {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 2}, stage
        )


def test_grpo_with_two_processes_writes_once_and_sums_the_routing_counts(tmp_path):
    """TRL spreads the generations over the processes; the replay records and replays each process's
    own rollouts, its token counts are summed, and rank 0 alone writes metrics and samples."""
    out = tmp_path / "grpo"
    data = {
        "name": "g2",
        "output_dir": str(out),
        "seed": 1,
        "model": {"preset": "tiny", "dtype": "float32"},
        "adapter": {"r": 8, "alpha": 16, "targets": ["mla", "routed_experts"]},
        "stages": {
            "grpo": {
                "type": "grpo",
                "data": {"train": str(REPO / "recipes" / "data" / "reverse" / "test.jsonl")},
                "rewards": [{"name": "similarity"}],
                "routing_replay": True,
                "train": {
                    "max_steps": 3,
                    "per_device_train_batch_size": 16,  # global: 8 per process, 4 prompts × 4 generations
                    "num_generations": 4,
                    "max_completion_length": 6,
                    "logging_steps": 1,
                    "use_cpu": True,
                    "beta": 0.04,
                },
            }
        },
    }
    recipe = str(write_recipe(tmp_path / "g2.yaml", data))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*launch, "-m", "finetune", "run", recipe], cache=str(tmp_path / "cache"))
    rows = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "reward" in r]
    assert len(logged) == 3 and all(r["routing/mismatch"] == 0.0 for r in logged)
    # 16 completions of up to 6 new tokens after ~15 prompt tokens, from both processes together.
    assert all(r["routing/replayed_tokens"] > 16 * 15 for r in logged)
    assert len((out / "grpo" / "samples.jsonl").read_text().splitlines()) == 3 * 4


@pytest.mark.parametrize("kind", ["reward", "classify"])
def test_reward_and_classify_with_two_processes(tmp_path, kind):
    out = tmp_path / kind
    overrides = [
        f"output_dir={out}",
        f"stages.{kind}.train.max_steps=2",
        f"stages.{kind}.train.logging_steps=1",
        f"stages.{kind}.train.use_cpu=true",
    ]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = _run(
        [*launch, "-m", "finetune", "run", str(REPO / "recipes" / "tiny" / f"{kind}.yaml"), *overrides]
    )
    assert result.stdout.count("run directory:") == 1
    rows = [json.loads(x) for x in (out / kind / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 2]  # two logged steps and the final row, written once
    summary = json.loads((out / kind / "summary.json").read_text())
    assert summary["train"]["steps"] == 2 and summary["eval"]  # the held-out figures, from rank 0
