"""Supervised fine-tuning on TRL's SFTTrainer, with LoRA on a 4-bit DeepSeek-V2."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from finetune import data, heldout, rundir
from finetune.recipe import SFTStage, train_arguments
from finetune.stages.context import StageContext


@dataclass
class SFTInputs:
    args: SFTConfig
    train: Dataset
    eval: Dataset | None
    heldout: tuple[list, list[str]] | None


def check(name: str, stage: SFTStage, ctx: StageContext) -> SFTInputs:
    """Build the trainer config and load the data (files exist, columns fit, not empty). Writes nothing."""
    args = ctx.trainer_config(SFTConfig, name, train_arguments(stage, dtype=ctx.dtype, cuda=ctx.cuda))
    d = stage.data
    key = f"stages.{name}.data"
    train = data.sft_format(
        data.load_rows(d.train, key=f"{key}.train", split=d.train_split, max_samples=d.max_samples),
        key=f"{key}.train",
    )
    evaluation = None
    if d.eval is not None:
        rows = data.load_rows(d.eval, key=f"{key}.eval", split=d.eval_split)
        evaluation = data.sft_format(rows, key=f"{key}.eval")
    pairs = None
    if stage.heldout is not None:
        hkey = f"stages.{name}.heldout.data"
        rows = data.load_rows(
            stage.heldout.data, key=hkey, split=d.eval_split, max_samples=stage.heldout.max_samples
        )
        pairs = data.prompt_target_pairs(rows, key=hkey)
    return SFTInputs(args, train, evaluation, pairs)


def run(name: str, stage: SFTStage, inputs: SFTInputs, ctx: StageContext) -> dict[str, Any]:
    out = ctx.stage_dir(name)
    tokenizer = ctx.tokenizer()
    model = ctx.adapted_model()

    def check_heldout(when: str) -> dict | None:
        if inputs.heldout is None:
            return None
        h = stage.heldout
        return heldout.exact_match(
            model,
            tokenizer,
            *inputs.heldout,
            max_new_tokens=h.max_new_tokens,
            batch_size=h.batch_size,
            desc=f"held-out check ({when})",
        )

    before = check_heldout("before")
    trainer = SFTTrainer(
        model=model,
        args=inputs.args,
        train_dataset=inputs.train,
        eval_dataset=inputs.eval,
        processing_class=tokenizer,
        callbacks=[rundir.MetricsLogger(out / "metrics.jsonl")],
    )
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(str(out / "adapter"))
    final_eval = trainer.evaluate() if inputs.eval is not None else {}
    after = check_heldout("after")

    summary: dict[str, Any] = {
        "stage": name,
        "type": "sft",
        "train": {**result.metrics, "seconds": round(seconds, 2), "steps": result.global_step},
        "eval": final_eval,
        "adapter": str(out / "adapter"),
    }
    if before is not None:
        summary["heldout"] = {"metric": "exact_match", "before": before, "after": after}
    if trainer.is_world_process_zero():
        rundir.write_summary(out / "summary.json", summary)
        rundir.plot_loss(rundir.read_metrics(out / "metrics.jsonl"), out / "loss.png", f"{ctx.name} / {name}")
    return summary
