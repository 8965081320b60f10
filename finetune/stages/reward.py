"""Reward modeling on TRL's RewardTrainer: `DeepseekV2ForSequenceClassification` with one output on the
4-bit base, LoRA from `adapter.targets`, the `score` head trained and saved with the adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from datasets import Dataset
from pydantic import Field
from trl import RewardConfig, RewardTrainer

from finetune import data, rundir
from finetune.model import routing
from finetune.schema import DataConfig, Strict, train_arguments
from finetune.stages import common
from finetune.stages.context import StageContext


class Schema(Strict):
    """`stages.<name>` of `type: reward`: `chosen` / `rejected` pairs (optional `prompt`, `margin`)."""

    type: Literal["reward"]
    data: DataConfig
    train: dict[str, Any] = Field(default_factory=dict)


TRAINER_CONFIG = RewardConfig


@dataclass
class RewardInputs:
    args: RewardConfig
    train: Dataset | None  # None: a Hub dataset not fetched (validate stays offline)
    eval: Dataset | None
    report: list = field(default_factory=list)


def check(name: str, stage: Schema, ctx: StageContext, *, fetch: bool = True) -> RewardInputs:
    """The trainer config and the pairs (files exist, columns fit, not empty). Writes nothing."""
    args = ctx.trainer_config(RewardConfig, name, train_arguments(stage, dtype=ctx.dtype, cuda=ctx.cuda))
    d, key = stage.data, f"stages.{name}.data"

    def load(spec: str | None, which: str, split: str, config: str | None, cap: int | None) -> Dataset | None:
        if spec is None or (not fetch and not data.is_local(spec)):
            return None
        rows = data.load_rows(spec, key=f"{key}.{which}", split=split, config=config, max_samples=cap)
        return data.preference_format(rows, key=f"{key}.{which}")

    train = load(d.train, "train", d.train_split, d.config, d.max_samples)
    evaluation = load(d.eval, "eval", d.eval_split, d.eval_config or d.config, None)
    return RewardInputs(args, train, evaluation)


@torch.no_grad()
def margins(trainer: RewardTrainer) -> list[float]:
    """reward(chosen) - reward(rejected) for every eval pair, batched as the trainer batches them."""
    model, out = trainer.model, []
    was_training = model.training
    model.eval()
    try:
        for batch in trainer.get_eval_dataloader():
            batch = {
                k: v.to(trainer.args.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")
            }
            chosen, rejected = torch.chunk(model(**batch).logits.squeeze(-1).float(), 2)
            out += (chosen - rejected).tolist()
    finally:
        model.train(was_training)
    return out


def run(
    name: str,
    stage: Schema,
    inputs: RewardInputs,
    ctx: StageContext,
    *,
    resume_from: str | None = None,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Train the reward model; pairwise accuracy and mean margin on the eval pairs go into the summary."""
    out = ctx.stage_dir(name)
    tokenizer = ctx.tokenizer()
    if model is None:
        model = ctx.adapted_model("seq_cls", num_labels=1, pad_token_id=tokenizer.pad_token_id)
    monitor = routing.RouterMonitor(model, aux_loss_coef=ctx.aux_loss_coef)
    trainer, tokenizer, trained, adapter = common.fit(
        RewardTrainer, model, inputs, tokenizer, out, monitor, resume_from
    )
    monitor.remove()
    summary: dict[str, Any] = {"stage": name, "type": "reward", "train": trained, "adapter": str(adapter)}
    if inputs.eval is not None:
        pairs = margins(trainer)
        summary["eval"] = {
            "pairwise_accuracy": sum(m > 0 for m in pairs) / len(pairs),
            "mean_margin": sum(pairs) / len(pairs),
            "pairs": len(pairs),
        }
        if trainer.is_world_process_zero():
            rundir.plot_histogram(
                pairs, out / "reward_margins.png", f"{ctx.name} / {name}: chosen - rejected"
            )
    common.finish(trainer, out, f"{ctx.name} / {name}", summary)
    return summary
