"""Sequence classification on transformers' Trainer: `DeepseekV2ForSequenceClassification` with one
output per label on the 4-bit base, LoRA from `adapter.targets`, the `score` head trained and saved with
the adapter. TRL has no classification trainer; transformers' Trainer with a loss function is enough."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from finetune import data, labels, scoring
from finetune.context import StageContext
from finetune.model import routing
from finetune.schema import train_arguments
from finetune.stages import common
from finetune.stagetypes import STAGE_TYPES, ClassifySchema

TYPE = STAGE_TYPES["classify"]
Schema = ClassifySchema  # the `stages.<name>` section, declared with the type
TRAINER_CONFIG = TYPE.trainer_config  # `stages.<name>.train` takes its fields


@dataclass
class Split:
    items: list  # texts or conversations
    ids: list  # label ids (a sorted list of ids per row with multi_label)


@dataclass
class ClassifyInputs:
    args: TrainingArguments
    names: list[str] | None  # label names in id order; None: Hub data `validate` does not fetch
    train_split: Split | None = None
    eval_split: Split | None = None
    train: Dataset | None = None  # `input_ids` + `labels`, built by `encode` (a run) or `check` (local data)
    eval: Dataset | None = None
    report: list = field(default_factory=list)


def check(name: str, stage: Schema, ctx: StageContext, *, fetch: bool = True) -> ClassifyInputs:
    """The trainer config; the rows (columns, labels, classes, class weights) and their token lengths
    (`validate`'s report). Writes nothing."""
    arguments = train_arguments(stage, dtype=ctx.dtype, cuda=ctx.cuda)
    arguments.setdefault("remove_unused_columns", False)  # the collator pads `input_ids`, keeps `labels`
    common.check_precision(name, arguments, ctx)
    args = ctx.trainer_config(TrainingArguments, name, arguments)
    d, key = stage.data, f"stages.{name}.data"
    common.check_trainer(name, args, has_eval=d.eval is not None)
    common.check_fsdp(name, stage.type, args, ctx)
    where = labels.Where(name, stage.labels, stage.num_labels, stage.multi_label)
    splits = common.read_splits(d, key, fetch=fetch, seed=ctx.seed)
    reports = [report for report, _ in splits]
    read: dict[str, tuple[data.SplitReport, list, list]] = {}
    named_ids = None
    for report, rows in splits:
        if rows is None:
            continue
        read[report.split] = (report, *labels.rows(rows, key=f"{key}.{report.split}"))
        if report.split == "train":
            named_ids = labels.class_names(rows)
    inputs = ClassifyInputs(args, None, report=reports)
    if "train" not in read:  # Hub data in validate: the label set is known once a run reads it
        return inputs
    inputs.names = labels.names(read["train"][2], where, f"{key}.train", named_ids)
    splits = {
        w: Split(items, labels.ids(values, inputs.names, where, f"{key}.{w}"))
        for w, (_, items, values) in read.items()
    }
    inputs.train_split, inputs.eval_split = splits["train"], splits.get("eval")
    labels.class_weights(stage.class_weights, inputs.names, inputs.train_split.ids, where)
    skipped = common.tokenizer_unfetched(ctx, fetch)
    if skipped:
        for report, _, _ in read.values():
            report.note = skipped
        return inputs
    for which, (report, items, _) in read.items():
        data.check_roles(items, ctx.tokenizer(), key=f"{key}.{which}", source=report.source)
    encode(inputs, stage, ctx.tokenizer(), f"stages.{name}.max_length")
    return inputs


def encode(inputs: ClassifyInputs, stage: Schema, tokenizer: Any, setting: str) -> None:
    """Tokenize both splits for the trainer (keeping `max_length` tokens) and measure them."""
    assert inputs.names is not None
    for report, split, which in zip(
        inputs.report, (inputs.train_split, inputs.eval_split), ("train", "eval"), strict=False
    ):
        if split is None:
            continue
        sequences = [scoring.encode(tokenizer, item) for item in split.items]
        _measure(report, [len(s) for s in sequences], stage.max_length, setting)
        rows = {
            "input_ids": [s[: stage.max_length] for s in sequences],
            "labels": labels.as_targets(split.ids, len(inputs.names), stage.multi_label),
        }
        setattr(inputs, which, Dataset.from_dict(rows))


def _measure(report: data.SplitReport, lengths: list[int], limit: int, setting: str) -> None:
    cut = sum(n > limit for n in lengths)
    report.kept, report.cut = len(lengths), cut
    data.fill_lengths(report, lengths)
    if cut > data.CUT_WARN_SHARE * len(lengths):
        assert report.p95 is not None and report.max is not None
        data.warn(
            f"{setting}: {limit} cuts {cut} of {len(lengths)} {report.split} rows ({cut / len(lengths):.1%}; "
            f"p95 {report.p95}, max {report.max} tokens); "
            f"{setting}={data.suggest_max_length(report.p95, report.max)} keeps them whole"
        )


def loss_function(weights: torch.Tensor | None, multi_label: bool):
    """Cross-entropy (multi-label: binary cross-entropy per label), with class weights, summed and
    divided by the labels of the whole accumulated batch as the Trainer counts them."""

    def loss(outputs: Any, targets: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        logits = outputs.logits.float()
        w = weights.to(logits.device) if weights is not None else None
        if multi_label:
            each = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, targets.float(), pos_weight=w, reduction="none"
            )
        else:
            each = torch.nn.functional.cross_entropy(logits, targets, weight=w, reduction="none")
        count = num_items_in_batch if num_items_in_batch is not None else each.numel()
        return each.sum() / count

    return loss


def run(
    name: str,
    stage: Schema,
    inputs: ClassifyInputs,
    ctx: StageContext,
    *,
    resume_from: str | None = None,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Train the classifier; accuracy, macro-F1 and per-class precision/recall of the eval rows go into
    the summary, the confusion matrix into `confusion_matrix.png`."""
    assert inputs.names is not None and inputs.train_split is not None, (
        "check() with fetch=True reads the data"
    )
    names, multi = inputs.names, stage.multi_label
    out = ctx.stage_dir(name)
    tokenizer = ctx.tokenizer()
    if inputs.train is None:  # checked without the Hub model's tokenizer
        encode(inputs, stage, tokenizer, f"stages.{name}.max_length")
    if model is None:
        model = ctx.adapted_model(
            TYPE.head,
            num_labels=len(names),
            pad_token_id=tokenizer.pad_token_id,
            labels=names,
            multi_label=multi,
        )
    where = labels.Where(name, stage.labels, stage.num_labels, multi)
    weights = labels.class_weights(stage.class_weights, names, inputs.train_split.ids, where)
    head = {"type": "classify", "labels": names, "multi_label": multi, "max_length": stage.max_length}
    monitor = routing.RouterMonitor(model, aux_loss_coef=ctx.aux_loss_coef)
    trainer, tokenizer, trained, adapter = common.fit(
        Trainer,
        model,
        inputs,
        tokenizer,
        out,
        monitor,
        resume_from,
        thresholds=ctx.routing,
        head=head,
        kernels=ctx.kernels,
        esft=ctx.esft,
        compute_loss_func=loss_function(weights, multi),
    )
    monitor.remove()
    summary: dict[str, Any] = {"stage": name, "type": "classify", "labels": names, "train": trained}
    summary["adapter"] = str(adapter)
    if inputs.eval_split is not None:
        split = inputs.eval_split
        sequences = [scoring.encode(tokenizer, item, stage.max_length) for item in split.items]
        logits = scoring.head_outputs(
            trainer.model,
            tokenizer,
            sequences,
            batch_size=inputs.args.per_device_eval_batch_size,
            desc="eval rows",
        )
        predicted = labels.decide(logits, multi)
        summary["eval"] = labels.metrics(split.ids, predicted, names, multi)
        if trainer.is_world_process_zero():
            labels.plot_confusion(
                split.ids, predicted, names, multi, out / "confusion_matrix.png", f"{ctx.name} / {name}"
            )
    common.finish(trainer, out, f"{ctx.name} / {name}", summary)
    return summary
