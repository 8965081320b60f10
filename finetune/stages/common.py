"""What every training stage does around its TRL trainer, in one place: the callbacks (metrics.jsonl with
the expert load, checkpoints completed with the expert LoRA and router), training from a checkpoint, the
rank-0 save of adapter + tokenizer, and the plot and summary written last."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from finetune import rundir
from finetune.model import adapters, routing


def callbacks(out: Path, monitor: routing.RouterMonitor, resume_from: str | None) -> list[TrainerCallback]:
    return [
        rundir.MetricsLogger(out / "metrics.jsonl", extra=monitor.report, resumed_from=resume_from),
        rundir.CompleteCheckpoints(),  # routed-expert LoRA + router into each checkpoint, then its marker
    ]


def fit(
    trainer_cls: type[Trainer],
    model: Any,
    inputs: Any,
    tokenizer: Any,
    out: Path,
    monitor: routing.RouterMonitor,
    resume_from: str | None,
    *,
    head: dict[str, Any] | None = None,
    **trainer_kwargs: Any,
) -> tuple[Trainer, Any, dict[str, Any], Path]:
    """Build the stage's trainer on `inputs` (args, train, eval), train it (from `resume_from`) and
    save the adapter: (trainer, its tokenizer, the summary's `train` section, the adapter folder).

    `head`: what a classifier or reward model's users need to read its outputs (`adapters.HEAD_FILE`)."""
    trainer = trainer_cls(
        model=model,
        args=inputs.args,
        train_dataset=inputs.train,
        eval_dataset=inputs.eval,
        processing_class=tokenizer,
        callbacks=callbacks(out, monitor, resume_from),
        **trainer_kwargs,
    )
    tokenizer = prepare(trainer, resume_from)
    trained = train(trainer, out, resume_from)
    return trainer, tokenizer, trained, save(trainer, out, tokenizer, head)


def prepare(trainer: Trainer, resume_from: str | None) -> Any:
    """Undo what the trainer must not change and hook our checkpoint loader; returns its tokenizer."""
    # TRL casts every trainable parameter of a quantized model to bf16; the router is fp32 by design.
    adapters.keep_router_fp32(trainer.model)
    # ... and its full trained copies (`modules_to_save`: the `score` head, embeddings) must keep the
    # dtype of the module they replace, or their matmul meets activations of another dtype.
    adapters.keep_full_copies_dtype(trainer.model)
    if resume_from is not None:
        # The Trainer's loader restores PEFT's weights only (through PEFT's transformers-4 MoE name shim);
        # ours restores the routed-expert LoRA and the router too, before the optimizer is built.
        trainer._load_from_checkpoint = lambda checkpoint, model=None: rundir.load_checkpoint_weights(
            trainer.model, checkpoint
        )
    return trainer.processing_class  # carries `chat_template_path` when the recipe sets one


def train(trainer: Trainer, out: Path, resume_from: str | None) -> dict[str, Any]:
    """Train (from `resume_from` when given); the summary's `train` section."""
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
    section = {**metrics, "seconds": round(time.perf_counter() - start, 2), "steps": steps}
    if resume_from is not None:
        section["resumed_from"] = str(resume_from)
    return section


def save(trainer: Trainer, out: Path, tokenizer: Any, head: dict[str, Any] | None = None) -> Path:
    """`<stage>/adapter/` on rank 0, never half-written, with the tokenizer and chat template trained with
    (and the head's description, when given)."""
    folder = out / "adapter"
    if trainer.is_world_process_zero():
        with rundir.replaced_folder(folder) as tmp:
            adapters.save_adapter(trainer.model, tmp)
            tokenizer.save_pretrained(str(tmp))
            if head is not None:
                (tmp / adapters.HEAD_FILE).write_text(json.dumps(head, indent=2) + "\n")
    return folder


def finish(trainer: Trainer, out: Path, title: str, summary: dict[str, Any]) -> None:
    """The loss plot, then `summary.json` (last: a stage with a summary is finished), on rank 0."""
    if trainer.is_world_process_zero():
        rundir.plot_loss(rundir.read_metrics(out / "metrics.jsonl"), out / "loss.png", title)
        rundir.write_summary(out / "summary.json", summary)
