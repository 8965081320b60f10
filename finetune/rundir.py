"""What a run writes: the resolved recipe with provenance, per-stage metrics.jsonl, summary.json, loss.png."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune import recipe as recipe_mod

LIBRARIES = ("finetune", "torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_recipe(recipe: recipe_mod.Recipe, output_dir: Path) -> None:
    """`<output_dir>/recipe.yaml`: the recipe as resolved (extends and overrides applied) plus versions."""
    resolved = recipe.model_copy(
        update={
            "provenance": {
                "versions": versions(),
                "seed": recipe.seed,
                "created": datetime.now(UTC).isoformat(),
            }
        }
    )
    recipe_mod.dump(resolved, output_dir / "recipe.yaml")


class MetricsLogger(TrainerCallback):
    """Appends every trainer log (one JSON object per logging step) to metrics.jsonl."""

    def __init__(self, path: Path, extra: Callable[[], dict[str, Any]] | None = None):
        self.path = path
        self.extra = extra  # more fields per row (expert load), kept out of the console log
        path.write_text("")  # a rerun into the same run directory starts a fresh log

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            more = self.extra() if self.extra else {}
            row = {"step": state.global_step, "epoch": state.epoch, **logs, **more}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Training (and eval) loss against step; False when nothing was logged."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")
