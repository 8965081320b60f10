"""`report_to`: tensorboard, trackio and W&B (offline) get the trainer's metrics and ours (routing, the
held-out figures computed after training), read back from the files each one wrote. The run is a real
`python -m finetune run` (each tracker reads its environment once, at import) with nothing reachable:
W&B offline, trackio's local database."""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, base_recipe, chat_rows, write_jsonl, write_recipe

TRACKERS = ["tensorboard", "trackio", "wandb"]
for _name in TRACKERS:
    pytest.importorskip(_name)

pytestmark = pytest.mark.long  # a training run in a fresh process (~20 s)


def tensorboard_keys(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    keys: set[str] = set()
    for events in folder.rglob("events.out.tfevents*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        keys |= set(accumulator.Tags()["scalars"])
    return keys


def trackio_rows(database: Path) -> list[dict]:
    with sqlite3.connect(database) as db:
        return [json.loads(row[0]) for row in db.execute("select metrics from metrics order by id")]


def wandb_rows(folder: Path) -> list[dict]:
    """The history rows of an offline W&B run file: records in LevelDB's log framing (32 KiB blocks,
    7-byte headers) after W&B's 7-byte file header, each a `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    raw, pos, pieces, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left  # block padding
            continue
        pieces += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                )
    return rows


def test_every_tracker_gets_loss_learning_rate_routing_and_eval(tmp_path):
    data = base_recipe(
        tmp_path,
        report_to=TRACKERS,
        save_strategy="no",
        eval_strategy="steps",
        eval_steps=2,
        project="finetune-trackers",  # trackio's project (its database's name)
        run_name="sft-run",
    )
    data["adapter"]["router"] = "trainable"  # the balance loss is logged too
    data["stages"]["sft"]["data"]["eval"] = str(write_jsonl(tmp_path / "data" / "eval.jsonl", chat_rows(4)))
    # Computed after training: the held-out exact match before / after goes to the trackers too.
    data["stages"]["sft"]["heldout"] = {"data": data["stages"]["sft"]["data"]["eval"], "max_new_tokens": 4}
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb"),
        "WANDB_SILENT": "true",
        "TRACKIO_DIR": str(tmp_path / "trackio"),
    }
    (tmp_path / "wandb").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "finetune", "run", str(write_recipe(tmp_path / "r.yaml", data))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The console's log line stays the trainer's own: our fields go to the trackers and metrics.jsonl.
    assert "expert_load" not in done.stdout + done.stderr
    metrics = [
        json.loads(line) for line in (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()
    ]
    assert isinstance(metrics[0]["expert_load/layer1"], list)  # per-expert shares: metrics.jsonl only

    routing = "expert_load/layer1/max_over_mean"
    final = "eval/final/heldout/after/exact_match"
    wanted = {
        "train/loss",
        "train/learning_rate",
        f"train/{routing}",
        "train/router_aux_loss",
        "eval/loss",
        final,
    }
    assert wanted <= tensorboard_keys(tmp_path / "run" / "sft"), "tensorboard"

    rows = trackio_rows(tmp_path / "trackio" / "finetune-trackers.db")
    assert wanted <= set().union(*rows), "trackio"
    wandb = wandb_rows(tmp_path / "wandb")
    assert wanted <= set().union(*wandb), "wandb"

    summary = json.loads((tmp_path / "run" / "sft" / "summary.json").read_text())
    for name, logged in (("trackio", rows), ("wandb", wandb)):
        assert [r[final] for r in logged if final in r] == [summary["heldout"]["after"]["exact_match"]], name
    # The values are the run's: the routing figure of step 1 in each tracker equals metrics.jsonl's.
    first = next(m for m in metrics if m["step"] == 1 and "loss" in m)
    for name, logged in (("trackio", rows), ("wandb", wandb)):
        step1 = next(r for r in logged if r.get("train/global_step") == 1 and "train/loss" in r)
        assert step1[f"train/{routing}"] == first[routing], name
        assert step1["train/learning_rate"] == pytest.approx(first["learning_rate"]), name
        assert step1["train/loss"] == pytest.approx(first["loss"]), name


def test_grpo_rewards_kl_and_routing_replay_reach_tensorboard(tmp_path):
    """GRPO's own logs (rewards per function, KL) and ours (expert load, routing replay's mismatch) go
    through the same trainer log: read back from tensorboard's event file."""
    from test_grpo import _grpo

    from finetune import pipeline, recipe

    data = _grpo(
        tmp_path,
        routing_replay=True,
        train={"max_steps": 2, "beta": 0.04, "report_to": ["tensorboard"], "save_strategy": "no"},
    )
    summary = pipeline.run(recipe.Recipe.model_validate(data))["grpo"]
    keys = tensorboard_keys(tmp_path / "run" / "grpo")
    wanted = {
        "train/reward",
        "train/kl",
        "train/rewards/similarity/mean",
        "train/expert_load/layer1/max_over_mean",
    }
    assert wanted <= keys, sorted(keys)
    assert any(k.startswith("train/") and "mismatch" in k for k in keys), sorted(keys)  # routing replay
    assert summary["routing"]["mismatch"] == 0.0
