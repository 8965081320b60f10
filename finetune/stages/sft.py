"""Supervised fine-tuning on TRL's SFTTrainer, with LoRA on a 4-bit DeepSeek-V2."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from finetune import data, heldout
from finetune.context import StageContext
from finetune.distributed import is_primary
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
    train: Dataset | None  # None: a Hub dataset not fetched (validate stays offline)
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

    def load(split: str, spec: str | None, spec_key: str, max_samples: int | None) -> Dataset | None:
        if spec is None:
            return None
        report = data.SplitReport(split, data.shown(spec))
        reports.append(report)
        if not fetch and not data.is_local(spec):
            report.note = "Hub dataset: loaded when a run starts"
            return None
        train_split = split == "train"
        rows = data.load_rows(
            spec,
            key=spec_key,
            split=d.train_split if train_split else d.eval_split,
            config=d.config if train_split else eval_config,
            split_key=f"{key}.train_split" if train_split else f"{key}.eval_split",
            config_key=f"{key}.config" if train_split else eval_config_key,
        )
        if max_samples is not None and max_samples < len(rows):
            report.total, rows = len(rows), rows.select(range(max_samples))
        report.rows = len(rows)
        return rows

    train = load("train", d.train, f"{key}.train", d.max_samples)
    train = data.sft_format(train, key=f"{key}.train", source=d.train) if train is not None else None
    evaluation = load("eval", d.eval, f"{key}.eval", None)
    evaluation = (
        data.sft_format(evaluation, key=f"{key}.eval", source=d.eval) if evaluation is not None else None
    )
    h = stage.heldout
    hkey = f"stages.{name}.heldout.data"
    held = load("heldout", h.data, hkey, h.max_samples) if h is not None else None
    pairs = data.prompt_target_pairs(held, key=hkey, source=h.data) if held is not None else None

    measured = [r for r in reports if r.rows is not None]
    if measured and ctx.source.kind == "hub" and not fetch:
        for r in measured:
            r.note = f"token counts skipped: the tokenizer of Hub model {ctx.source.ref} is fetched by a run"
    elif measured:
        tokenizer = data.stage_template(ctx.tokenizer(), args)
        sources = {
            "train": (f"{key}.train", d.train),
            "eval": (f"{key}.eval", d.eval),
            "heldout": (hkey, h.data if h is not None else None),
        }
        for r in measured:
            split_key, source = sources[r.split]
            if r.split == "heldout":
                assert pairs is not None and h is not None
                data.check_roles(pairs[0], tokenizer, key=split_key, source=source)
                data.measure_prompts(r, pairs[0], tokenizer=tokenizer, max_new_tokens=h.max_new_tokens)
                continue
            rows = train if r.split == "train" else evaluation
            assert rows is not None
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
        kernels=ctx.kernels,
        esft=ctx.esft,
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
