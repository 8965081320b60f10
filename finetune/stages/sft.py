"""Supervised fine-tuning on TRL's SFTTrainer, with LoRA on a 4-bit DeepSeek-V2."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from finetune import data, heldout, rundir
from finetune.model import adapters, routing
from finetune.recipe import SFTStage, train_arguments
from finetune.stages.context import StageContext


@dataclass
class SFTInputs:
    args: SFTConfig
    train: Dataset | None  # None: a Hub dataset not fetched (validate stays offline)
    eval: Dataset | None
    heldout: tuple[list, list[str]] | None


def check(name: str, stage: SFTStage, ctx: StageContext, *, fetch: bool = True) -> SFTInputs:
    """Build the trainer config and load the data (files exist, columns fit, not empty). Writes nothing.

    With `fetch=False`, Hub datasets are accepted by name and only loaded by a run.
    """
    args = ctx.trainer_config(SFTConfig, name, train_arguments(stage, dtype=ctx.dtype, cuda=ctx.cuda))
    d = stage.data
    key = f"stages.{name}.data"

    def load(spec: str | None, key: str, split: str, max_samples: int | None = None) -> Dataset | None:
        if spec is None or (not fetch and not data.is_local(spec)):
            return None
        return data.load_rows(spec, key=key, split=split, max_samples=max_samples)

    train = load(d.train, f"{key}.train", d.train_split, d.max_samples)
    train = data.sft_format(train, key=f"{key}.train") if train is not None else None
    evaluation = load(d.eval, f"{key}.eval", d.eval_split)
    evaluation = data.sft_format(evaluation, key=f"{key}.eval") if evaluation is not None else None
    h = stage.heldout
    hkey = f"stages.{name}.heldout.data"
    held = load(h.data, hkey, d.eval_split, h.max_samples) if h is not None else None
    pairs = data.prompt_target_pairs(held, key=hkey) if held is not None else None
    return SFTInputs(args, train, evaluation, pairs)


def run(
    name: str, stage: SFTStage, inputs: SFTInputs, ctx: StageContext, *, resume_from: str | None = None
) -> dict[str, Any]:
    """Train the stage; with `resume_from` (a complete checkpoint folder), continue from that step."""
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
    monitor = routing.RouterMonitor(model, aux_loss_coef=ctx.aux_loss_coef)
    trainer = SFTTrainer(
        model=model,
        args=inputs.args,
        train_dataset=inputs.train,
        eval_dataset=inputs.eval,
        processing_class=tokenizer,
        callbacks=[
            rundir.MetricsLogger(out / "metrics.jsonl", extra=monitor.report, resumed_from=resume_from),
            rundir.CompleteCheckpoints(),  # routed-expert LoRA + router into each checkpoint, then its marker
        ],
    )
    if resume_from is not None:
        # The Trainer's loader restores PEFT's weights only (through PEFT's transformers-4 MoE name shim);
        # ours restores the routed-expert LoRA and the router too, before the optimizer is built.
        trainer._load_from_checkpoint = lambda checkpoint, model=None: rundir.load_checkpoint_weights(
            trainer.model, checkpoint
        )
    start = time.perf_counter()
    done = rundir.trained_to_the_end(resume_from) if resume_from is not None else None
    if done is not None:  # resuming from the final step: Trainer would train one step past max_steps
        rundir.load_checkpoint_weights(trainer.model, resume_from)
        metrics, steps = {"epoch": done["epoch"]}, done["global_step"]
    else:
        try:
            result = trainer.train(resume_from_checkpoint=resume_from)
        except Exception as err:  # a checkpoint the trainer could not write (full disk): one line naming it
            error = rundir.write_error(err, out / rundir.CHECKPOINTS)
            if error is None:
                raise
            raise error from None
        metrics, steps = result.metrics, result.global_step
    seconds = time.perf_counter() - start
    if trainer.is_world_process_zero():
        with rundir.replaced_folder(out / "adapter") as folder:  # never a half-written adapter/
            adapters.save_adapter(trainer.model, folder)
    final_eval = trainer.evaluate() if inputs.eval is not None else {}
    monitor.remove()
    after = check_heldout("after")

    summary: dict[str, Any] = {
        "stage": name,
        "type": "sft",
        "train": {**metrics, "seconds": round(seconds, 2), "steps": steps},
        "eval": final_eval,
        "adapter": str(out / "adapter"),
    }
    if resume_from is not None:
        summary["train"]["resumed_from"] = str(resume_from)
    if before is not None:
        summary["heldout"] = {"metric": "exact_match", "before": before, "after": after}
    if trainer.is_world_process_zero():
        rundir.plot_loss(rundir.read_metrics(out / "metrics.jsonl"), out / "loss.png", f"{ctx.name} / {name}")
        rundir.write_summary(out / "summary.json", summary)  # last: a stage with a summary is finished
    return summary
