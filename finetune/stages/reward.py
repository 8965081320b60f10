"""Reward modeling on TRL's RewardTrainer: `DeepseekV2ForSequenceClassification` with one output on the
4-bit base, LoRA from `adapter.targets`, the `score` head trained and saved with the adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from finetune import data, rundir, scoring
from finetune.context import StageContext
from finetune.errors import UserError
from finetune.model import routing
from finetune.schema import train_arguments
from finetune.stages import common
from finetune.stagetypes import STAGE_TYPES, RewardSchema

TYPE = STAGE_TYPES["reward"]
Schema = RewardSchema  # the `stages.<name>` section, declared with the type
TRAINER_CONFIG = TYPE.trainer_config  # `stages.<name>.train` takes its fields


@dataclass
class RewardInputs:
    args: RewardConfig
    train: Dataset | None  # None: a Hub dataset not fetched (validate stays offline)
    eval: Dataset | None
    report: list = field(default_factory=list)


def check(name: str, stage: Schema, ctx: StageContext, *, fetch: bool = True) -> RewardInputs:
    """The trainer config and the pairs (files exist, columns fit, not empty), measured in tokens as the
    trainer reads them: it drops a pair whose longer side exceeds `max_length`. Writes nothing."""
    arguments = train_arguments(stage, dtype=ctx.dtype, cuda=ctx.cuda)
    common.check_precision(name, arguments, ctx)
    args = ctx.trainer_config(RewardConfig, name, arguments)
    d, key = stage.data, f"stages.{name}.data"
    common.check_trainer(name, args, has_eval=d.eval is not None)
    common.check_fsdp(name, stage.type, args, ctx)
    splits = common.read_splits(
        d, key, fetch=fetch, seed=ctx.seed, shape=lambda rows, k, _: data.preference_format(rows, key=k)
    )
    pairs_of = {
        r.split: data.preference_format(rows, key=f"{key}.{r.split}")
        for r, rows in splits
        if rows is not None
    }
    measured = [(r, pairs_of[r.split]) for r, rows in splits if rows is not None]
    train, evaluation = pairs_of.get("train"), pairs_of.get("eval")
    reports = [r for r, _ in splits]
    for report, pairs in measured:
        skipped = common.tokenizer_unfetched(ctx, fetch)
        if skipped:
            report.note = skipped
            continue
        _measure(report, pairs, ctx.tokenizer(), args.max_length, f"{key}.{report.split}", name)
    return RewardInputs(args, train, evaluation, reports)


def _measure(
    report: data.SplitReport, pairs: Dataset, tokenizer: Any, limit: int | None, key: str, name: str
) -> None:
    """Token lengths of each pair's longer side; pairs over `limit` are the ones the trainer drops."""
    sides = ("prompt", "chosen", "rejected")
    turns = [[t for side in sides if isinstance(row.get(side), list) for t in row[side]] for row in pairs]
    data.check_roles(turns, tokenizer, key=key, source=report.source)
    sequences = pair_sequences(pairs, tokenizer, None)
    lengths = [max(len(a), len(b)) for a, b in zip(sequences[0::2], sequences[1::2], strict=True)]
    dropped = sum(n > limit for n in lengths) if limit is not None else 0
    report.kept, report.cut = len(lengths) - dropped, dropped
    report.note = "tokens of the longer side; pairs over max_length are dropped by the trainer"
    data.fill_lengths(report, lengths)
    if not dropped:
        return
    assert report.p95 is not None and report.max is not None
    suggestion = data.suggest_max_length(report.p95, report.max)
    setting = f"stages.{name}.train.max_length"
    if dropped == len(lengths):
        raise UserError(
            f"{setting}: {limit} drops every pair of {key} (longer sides p95 {report.p95}, max {report.max} "
            f"tokens); set max_length to {suggestion}"
        )
    if dropped > data.CUT_WARN_SHARE * len(lengths):
        data.warn(
            f"{key}: max_length {limit} drops {dropped} of {len(lengths)} pairs ({dropped / len(lengths):.1%}); "
            f"{setting}={suggestion} keeps them"
        )


def pair_sequences(pairs: Dataset, tokenizer: Any, max_length: int | None) -> list[list[int]]:
    """Every pair's chosen then rejected sequence (`prompt` prepended when explicit), as `scoring.encode`
    reads them; predict scores the same sequences."""
    return [scoring.encode(tokenizer, item, max_length) for item in scoring.pair_items(pairs)]


def margins(
    model: torch.nn.Module, tokenizer: Any, pairs: Dataset, *, max_length: int | None, batch_size: int
) -> list[float]:
    """reward(chosen) - reward(rejected) of every pair."""
    scores = scoring.head_outputs(
        model,
        tokenizer,
        pair_sequences(pairs, tokenizer, max_length),
        batch_size=batch_size,
        desc="eval pairs",
    )[:, 0]
    return (scores[0::2] - scores[1::2]).tolist()


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
        model = ctx.adapted_model(TYPE.head, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    monitor = routing.RouterMonitor(model, aux_loss_coef=ctx.aux_loss_coef)
    max_length = inputs.args.max_length
    head = {"type": "reward", "max_length": max_length}
    trainer, tokenizer, trained, adapter = common.fit(
        RewardTrainer,
        model,
        inputs,
        tokenizer,
        out,
        monitor,
        resume_from,
        head=head,
        kernels=ctx.kernels,
        thresholds=ctx.routing,
        esft=ctx.esft,
    )
    monitor.remove()
    summary: dict[str, Any] = {"stage": name, "type": "reward", "train": trained, "adapter": str(adapter)}
    if inputs.eval is not None:
        batch = inputs.args.per_device_eval_batch_size
        pairs = margins(trainer.model, tokenizer, inputs.eval, max_length=max_length, batch_size=batch)
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
