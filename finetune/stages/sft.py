"""Supervised fine-tuning on TRL's SFTTrainer, with LoRA on a 4-bit DeepSeek-V2."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from trl import SFTConfig, SFTTrainer

from finetune import data, formats, heldout
from finetune.context import StageContext
from finetune.distributed import is_primary
from finetune.errors import UserError
from finetune.model import fsdp, routing
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
    # `config` names the Hub config of the train data, and of eval/held-out data unless `eval_config` does.
    eval_config, eval_config_key = (
        (d.config, f"{key}.config") if d.eval_config is None else (d.eval_config, f"{key}.eval_config")
    )
    reports: list[data.SplitReport] = []

    def load_heldout(spec: str, spec_key: str, max_samples: int | None) -> Dataset | None:
        report = data.SplitReport("heldout", data.shown(spec))
        reports.append(report)
        if not fetch and not data.is_local(spec):
            report.note = "Hub dataset: loaded when a run starts"
            return None
        rows = data.load_rows(
            spec,
            key=spec_key,
            split=d.eval_split,
            config=eval_config,
            split_key=f"{key}.eval_split",
            config_key=eval_config_key,
        )
        if max_samples is not None and max_samples < len(rows):
            report.total, rows = len(rows), rows.select(range(max_samples))
        report.rows = len(rows)
        # Alpaca and ShareGPT held-out rows are read as conversations, as training rows are.
        fmt = formats.detect(rows.column_names)
        return formats.convert(rows, fmt, rows.column_names, key=spec_key, source=spec)

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
    h = stage.heldout
    hkey = f"stages.{name}.heldout.data"
    held = load_heldout(h.data, hkey, h.max_samples) if h is not None else None
    pairs = data.prompt_target_pairs(held, key=hkey, source=h.data) if held is not None else None

    measured = [r for r in reports if r.rows is not None]
    if measured and ctx.source.kind == "hub" and not fetch:
        for r in measured:
            r.note = f"token counts skipped: the tokenizer of Hub model {ctx.source.ref} is fetched by a run"
    elif measured:
        tokenizer = data.stage_template(ctx.tokenizer(), args)
        sources = {
            "train": (f"{key}.train", d.train if isinstance(d.train, str) else None),
            "eval": (f"{key}.eval", d.eval if isinstance(d.eval, str) else None),
            "heldout": (hkey, h.data if h is not None else None),
        }
        for r in measured:
            split_key, source = sources[r.split]
            if r.split == "heldout":
                assert pairs is not None and h is not None
                data.check_roles(pairs[0], tokenizer, key=split_key, source=source)
                data.measure_prompts(r, pairs[0], tokenizer=tokenizer, max_new_tokens=h.max_new_tokens)
                continue
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

    def check_heldout(when: str) -> dict | None:
        # One process generates and the others go on, unless the model is FSDP-sharded (after training
        # under an FSDP launch): then every rank generates the same prompts in step, as each forward
        # all-gathers the layers, and rank 0 reports.
        sharded = fsdp.is_sharded(model)
        if inputs.heldout is None or not (is_primary() or sharded):
            return None
        h = stage.heldout
        return heldout.exact_match(
            model,
            tokenizer,
            *inputs.heldout,
            max_new_tokens=h.max_new_tokens,
            batch_size=h.batch_size,
            desc=f"held-out check ({when})",
            kernels=ctx.kernels,
            synced=sharded,
        )

    before = check_heldout("before")
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
        chunked_head=True,  # SFTTrainer always puts TRL's chunked head on: ours replaces it (an error if not found)
    )
    final_eval = trainer.evaluate() if inputs.eval is not None else {}
    monitor.remove()
    after = check_heldout("after")

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
