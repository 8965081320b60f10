"""Supervised fine-tuning on TRL's SFTTrainer, with LoRA on a 4-bit DeepSeek-V2."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from trl import SFTConfig, SFTTrainer

from finetune import data
from finetune.context import StageContext
from finetune.errors import UserError
from finetune.model import routing
from finetune.schema import train_arguments
from finetune.stages import common
from finetune.stagetypes import STAGE_TYPES, SFTSchema

TYPE = STAGE_TYPES["sft"]
Schema = SFTSchema  # the `stages.<name>` section, declared with the type
SFTStage = Schema
TRAINER_CONFIG = TYPE.trainer_config  # `stages.<name>.train` takes its fields


@dataclass
class SFTInputs:
    args: SFTConfig
    train: Dataset | IterableDataset | None  # None: a Hub dataset not fetched (validate stays offline)
    eval: Dataset | None
    heldout: tuple[list, list[str]] | None
    report: tuple[data.SplitReport, ...] = ()  # per split: rows read and kept, token lengths (`validate`)


def check(name: str, stage: SFTStage, ctx: StageContext, *, fetch: bool = True) -> SFTInputs:
    """Build the trainer config, load the data (files exist, columns fit, not empty) and measure it as
    TRL's SFTTrainer will prepare it: rows kept after templating and truncation, token lengths.

    With `fetch=False`, Hub datasets are accepted by name and only loaded by a run, and a Hub model's
    tokenizer is not fetched (no token counts). Each split's figures are in `SFTInputs.report`; a
    `max_length` that drops every row of a split is an error, one that cuts more than
    `data.CUT_WARN_SHARE` of them a warning on stderr. Writes nothing.
    """
    arguments = train_arguments(stage, dtype=ctx.dtype, cuda=ctx.cuda)
    common.check_precision(name, arguments, ctx)
    args = ctx.trainer_config(SFTConfig, name, arguments)
    d = stage.data
    common.check_trainer(name, args, has_eval=d.eval is not None)
    common.check_fsdp(name, stage.type, args, ctx)
    key = f"stages.{name}.data"
    reports: list[data.SplitReport] = []
    if d.streaming and args.max_steps <= 0:
        raise UserError(
            f"stages.{name}.train.max_steps: streamed data ({key}.streaming) has no length to count epochs "
            "by; set max_steps (the number of optimizer steps to train)"
        )
    splits: dict[
        str, tuple[Dataset | IterableDataset, Dataset]
    ] = {}  # split → (trainer's rows, checked rows)
    for which in ("train", "eval"):
        got = common.read_split(
            d,
            which,
            key,
            fetch=fetch,
            seed=ctx.seed,
            shape=lambda rows, k, src: data.sft_format(rows, key=k, source=src),
        )
        if got is None:
            continue
        report, read = got
        reports.append(report)
        if read is not None:
            rows = read.rows if read.sample is None else _stream_shape(read.rows, read.sample.column_names)
            splits[which] = (rows, read.rows if read.sample is None else read.sample)
    train, evaluation = (splits[w][0] if w in splits else None for w in ("train", "eval"))
    held_report, pairs = common.read_heldout(name, stage, ctx, args, fetch=fetch)
    if held_report is not None:
        reports.append(held_report)

    measured = [r for r in reports if r.rows is not None and r.split != "heldout"]
    if measured and ctx.source.kind == "hub" and not fetch:
        for r in measured:
            r.note = f"token counts skipped: the tokenizer of Hub model {ctx.source.ref} is fetched by a run"
    elif measured:
        tokenizer = data.stage_template(ctx.tokenizer(), args)
        sources = {
            "train": (f"{key}.train", d.train if isinstance(d.train, str) else None),
            "eval": (f"{key}.eval", d.eval if isinstance(d.eval, str) else None),
        }
        for r in measured:
            split_key, source = sources[r.split]
            rows = splits[r.split][1]
            if "prompt" in rows.column_names:
                conversations = zip(rows["prompt"], rows["completion"], strict=True)
                turns = [p + c if isinstance(p, list) else None for p, c in conversations]
                data.check_roles(turns, tokenizer, key=split_key, source=source)
            packing = args.packing if r.split == "train" or args.eval_packing is None else args.eval_packing
            data.measure(
                r,
                rows,
                tokenizer=tokenizer,
                args=args,
                packing=packing,
                key=split_key,
                max_length_key=f"stages.{name}.train.max_length",
            )
    return SFTInputs(args, train, evaluation, pairs, tuple(reports))


def _stream_shape(rows: IterableDataset, columns: list[str]) -> IterableDataset:
    """A streamed split as `data.sft_format` shapes rows (its checks ran on the first rows, whose shaped
    `columns` these are): a `messages` conversation becomes a prompt (all turns but the last) and a
    completion (the last)."""

    def split(row: dict[str, Any]) -> dict[str, Any]:
        if "messages" not in row:
            return {}
        return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}

    if "prompt" in columns and "completion" in columns:
        rows = rows.map(split)
    return rows.select_columns(columns)


def run(
    name: str,
    stage: SFTStage,
    inputs: SFTInputs,
    ctx: StageContext,
    *,
    resume_from: str | None = None,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Train the stage; with `resume_from` (a complete checkpoint folder), continue from that step.

    `model`: an adapted model to train instead of building one from `ctx` (tests keep a handle on it)."""
    out = ctx.stage_dir(name)
    tokenizer = ctx.tokenizer()
    model = model if model is not None else ctx.adapted_model()

    before = common.check_heldout(model, tokenizer, inputs.heldout, stage, ctx, "before")
    monitor = routing.RouterMonitor(model, aux_loss_coef=ctx.aux_loss_coef)
    trainer, tokenizer, trained, adapter = common.fit(
        SFTTrainer,
        model,
        inputs,
        tokenizer,
        out,
        monitor,
        resume_from,
        thresholds=ctx.routing,
        kernels=ctx.kernels,
        esft=ctx.esft,
        chunked_head=True,  # SFTTrainer always puts TRL's chunked head on: ours replaces it (an error if not found)
    )
    final_eval = trainer.evaluate() if inputs.eval is not None else {}
    monitor.remove()
    after = common.check_heldout(model, tokenizer, inputs.heldout, stage, ctx, "after")

    summary: dict[str, Any] = {
        "stage": name,
        "type": "sft",
        "train": trained,
        "eval": final_eval,
        "adapter": str(adapter),
    }
    if before is not None:
        summary["heldout"] = {"metric": "exact_match", "before": before, "after": after}
    common.finish(trainer, out, f"{ctx.name} / {name}", summary)
    return summary
