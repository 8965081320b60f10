"""What the offline preference stages (DPO, KTO, ORPO, SimPO) share around their TRL trainer: the checks
before a run (trainer config, `init_from`, rows in the shape the trainer reads, token lengths), the
starting policy and its reference (`MoETrainerMixin` + `finetune.model.reference`; none for the
reference-free types), the evaluation of the held-out rows before and after training, the curves of
chosen / rejected log-probs and the summary.

The held-out preference accuracy is TRL's own `rewards/accuracies` of an evaluation pass: the share of
pairs whose implicit reward, beta * (log pi - log pi_ref), is higher for the chosen side. Before
training it is measured against the base model (with `init_from`, the starting adapter's own preference;
against itself it would be 0 by construction). A reference-free type's reward is the policy's own
(beta times the mean log-prob per completion token, ORPO and SimPO alike): before training it is the
starting policy's (the `init_from` adapter, or the base), measured as it is after.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset

from finetune import data, rundir, scoring, stagetypes
from finetune.context import StageContext
from finetune.errors import UserError
from finetune.model import routing
from finetune.schema import train_arguments
from finetune.stages import common
from finetune.stages.moe_trainer import MoETrainerMixin

# The evaluation metrics a summary keeps (TRL's names, `eval_` prefix dropped).
SUMMARY_METRICS = (
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "kl",
    "nll_loss",  # ORPO (and SimPO with cpo_alpha > 0): the chosen side's language-model loss
    "log_odds_ratio",  # ORPO: mean log sigmoid of the log odds ratio, chosen over rejected
    "log_odds_chosen",  # ORPO: mean log odds ratio
    "loss",
)


@dataclass
class PreferenceInputs:
    args: Any
    train: Dataset | None  # None: a Hub dataset not fetched (validate stays offline)
    eval: Dataset | None
    report: list = field(default_factory=list)


def reference_mode(stage: Any) -> str | None:
    """`init` only where the start differs from the base: a fresh adapter starts as the base model. None
    for a reference-free type (its loss reads the policy alone)."""
    if stagetypes.STAGE_TYPES[stage.type].reference_free:
        return None
    return "init" if stage.reference == "init" and stage.init_from is not None else "base"


def check(
    name: str,
    stage: Any,
    ctx: StageContext,
    *,
    fetch: bool,
    config_cls: type,
    rows_of: Callable[[Dataset, str], Dataset],
    items_of: Callable[[Dataset], list],
    defaults: dict[str, Any] | None = None,
    title: str | None = None,
) -> PreferenceInputs:
    """The trainer config (`defaults` under the recipe's `train:`), `init_from`, and the rows as
    `rows_of` shapes them, measured in tokens (each of `items_of`'s sequences per row; the longest
    counts). `title`: the method's name in messages (default: the stage type). Writes nothing."""
    if stagetypes.STAGE_TYPES[stage.type].reference_free and stage.reference is not None:
        raise UserError(
            f"stages.{name}.reference: {title or stage.type} is reference-free (no reference pass); drop it"
        )
    arguments = {**(defaults or {}), **train_arguments(stage, dtype=ctx.dtype, cuda=ctx.cuda)}
    common.check_precision(name, arguments, ctx)
    args = ctx.trainer_config(config_cls, name, arguments)
    d, key = stage.data, f"stages.{name}.data"
    common.check_trainer(name, args, has_eval=d.eval is not None)
    common.check_fsdp(name, stage.type, args, ctx)
    common.check_documented(name, args, config_cls, "loss_type", "a loss")
    if getattr(args, "sync_ref_model", False):
        raise UserError(
            f"stages.{name}.train.sync_ref_model: TRL does not sync a reference with an adapter; the "
            f"reference is stages.{name}.reference (init: the starting policy, base: the base model)"
        )
    if stage.init_from is not None:
        ctx.earlier_stage(
            name, stage.init_from, f"stages.{name}.init_from", stagetypes.types_with("policy_init")
        )
    loaded: dict[str, Dataset] = {}
    splits = common.read_splits(d, key, fetch=fetch, seed=ctx.seed, shape=lambda rows, k, _: rows_of(rows, k))
    for report, rows in splits:
        if rows is None:
            continue
        rows = rows_of(rows, f"{key}.{report.split}")
        skipped = common.tokenizer_unfetched(ctx, fetch)
        if skipped:
            report.note = skipped
        else:
            _measure(
                report, items_of(rows), ctx.tokenizer(), args.max_length, f"stages.{name}.train.max_length"
            )
        loaded[report.split] = rows
    return PreferenceInputs(args, loaded.get("train"), loaded.get("eval"), [r for r, _ in splits])


def _measure(
    report: data.SplitReport, rows: list[list], tokenizer: Any, limit: int | None, setting: str
) -> None:
    """Token lengths of each row's longest sequence; the trainer keeps the first `limit` tokens."""
    turns = [[t for item in items if isinstance(item, list) for t in item] for items in rows]
    data.check_roles(
        turns, tokenizer, key=setting.rsplit(".train.", 1)[0] + f".data.{report.split}", source=report.source
    )
    lengths = [max(len(scoring.encode(tokenizer, item)) for item in items) for items in rows]
    cut = sum(n > limit for n in lengths) if limit is not None else 0
    report.kept, report.cut = len(lengths), cut
    report.note = "tokens of the longest sequence of a row; the trainer truncates those over max_length"
    data.fill_lengths(report, lengths)
    if cut > data.CUT_WARN_SHARE * len(lengths):
        assert report.p95 is not None and report.max is not None
        data.warn(
            f"{report.source}: max_length {limit} truncates {cut} of {len(lengths)} rows ({cut / len(lengths):.1%}); "
            f"{setting}={data.suggest_max_length(report.p95, report.max)} keeps them whole"
        )


def pair_items(rows: Dataset) -> list[list]:
    """Each pair's two sequences (the explicit `prompt` joined in front)."""
    items = scoring.pair_items(rows)
    return [items[i : i + 2] for i in range(0, len(items), 2)]


class StartEvaluation:
    """Put before `MoETrainerMixin`. With `evaluate_start`, evaluates the held-out rows once before the
    first step (not on a resume), kept in `evaluated_before`: with the base model as reference, the
    starting adapter's own preference (not with precomputed reference log-probs: those are fixed); a
    reference-free trainer (none installed) as it evaluates after training: the starting policy's own
    reward."""

    evaluated_before: dict[str, float] | None = None

    def __init__(self, *args: Any, evaluate_start: bool = False, **kwargs: Any):
        self._evaluate_start = evaluate_start
        super().__init__(*args, **kwargs)

    def train(self, resume_from_checkpoint: Any = None, **kwargs: Any) -> Any:
        reference = getattr(self, "reference", None)
        precomputed = getattr(self.args, "precompute_ref_log_probs", False)
        wanted = self._evaluate_start and resume_from_checkpoint is None and self.eval_dataset is not None
        if wanted and reference is None:  # reference-free (`MoETrainerMixin` built with no reference)
            self.evaluated_before = self.evaluate(metric_key_prefix="before")
        elif wanted and not precomputed:
            mode, reference.mode = reference.mode, "base"
            try:
                self.evaluated_before = self.evaluate(metric_key_prefix="before")
            finally:
                reference.mode = mode
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


def lazy_trainer(trl_trainer: Callable[[], type]) -> Callable[[], type]:
    """For a reference-free type whose TRL trainer is imported on first use (`trl.experimental`, through
    `finetune.compat.trl`): the stage's `Trainer` class (`StartEvaluation`, `MoETrainerMixin`, no reference
    installed, then TRL's), built once when first asked for."""

    @functools.cache
    def trainer_class() -> type:
        class Trainer(StartEvaluation, MoETrainerMixin, trl_trainer()):
            copies_reference = False  # nothing to copy: these trainers build no reference model

        Trainer.__qualname__ = "Trainer"
        return Trainer

    return trainer_class


def lazy_attributes(stage_type: Any, trainer_class: Callable[[], type]) -> Callable[[str], Any]:
    """A module `__getattr__` giving `TRAINER_CONFIG` (what `stages.<name>.train` takes) and `Trainer` on
    first use, so importing the stage module imports no `trl.experimental`."""

    def module_getattr(name: str) -> Any:
        if name == "TRAINER_CONFIG":
            return stage_type.trainer_config
        if name == "Trainer":
            return trainer_class()
        raise AttributeError(f"module has no attribute {name!r}")

    return module_getattr


def _metrics(evaluated: dict[str, float], prefix: str) -> dict[str, float]:
    """`SUMMARY_METRICS` of an `evaluate()` result. TRL logs its own under `eval_` whatever the prefix."""
    out = {}
    for name in SUMMARY_METRICS:
        value = evaluated.get(f"{prefix}_{name}", evaluated.get(f"eval_{name}"))
        if value is not None:
            out[name.replace("rewards/accuracies", "preference_accuracy")] = value
    return out


def run(
    name: str,
    stage: Any,
    inputs: PreferenceInputs,
    ctx: StageContext,
    *,
    trainer_cls: type,
    resume_from: str | None = None,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Train the policy; the held-out metrics before and after, and the curves, go into the run folder."""
    out = ctx.stage_dir(name)
    tokenizer = ctx.tokenizer()
    model = model if model is not None else ctx.policy_model(stage.init_from)
    monitor = routing.RouterMonitor(model, aux_loss_coef=ctx.aux_loss_coef)
    mode = reference_mode(stage)
    try:
        trainer, tokenizer, trained, adapter = common.fit(
            trainer_cls,
            model,
            inputs,
            tokenizer,
            out,
            monitor,
            resume_from,
            thresholds=ctx.routing,
            kernels=ctx.kernels,
            # TRL's chunked head stays: these trainers read outputs ours does not compute (mean logits).
            chunked_head=False,
            router_monitor=monitor,
            reference=mode,
            # Reference-free: the starting policy's own reward, the base's too (a fresh adapter).
            evaluate_start=mode is None or stage.init_from is not None,
        )
        after = trainer.evaluate() if inputs.eval is not None else {}
    finally:
        monitor.remove()
    summary: dict[str, Any] = {
        "stage": name,
        "type": stage.type,
        "train": trained,
        "adapter": str(adapter),
        "reference": mode,
    }
    if init := stage.init_from:
        summary["init_from"] = init
    if inputs.eval is not None:
        summary["eval"] = {"after": _metrics(after, "eval")}
        if trainer.evaluated_before is not None:
            before = _metrics(trainer.evaluated_before, "before")
            # The starting policy's own preference: against the base, or (reference-free) by itself.
            summary["eval"]["before"] = before if mode is None else {**before, "reference": "base"}
    if trainer.is_world_process_zero():
        metrics = rundir.read_metrics(out / "metrics.jsonl")
        title = f"{ctx.name} / {name}"
        rundir.plot_curves(
            metrics, ["logps/chosen", "logps/rejected"], out / "logps.png", f"{title}: log-probs"
        )
        rundir.plot_curves(
            metrics,
            ["rewards/margins", "rewards/chosen", "rewards/rejected"],
            out / "rewards.png",
            f"{title}: implicit rewards",
        )
    common.finish(trainer, out, f"{ctx.name} / {name}", summary)
    return summary
