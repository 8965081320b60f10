"""What every training stage does around its TRL trainer, in one place: the callbacks (metrics.jsonl with
the expert load, checkpoints completed with the expert LoRA and router), training from a checkpoint, the
rank-0 save of adapter + tokenizer, and the plot and summary written last."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from finetune import data, distributed, esft, heap, rundir, stagetypes
from finetune.compat import transformers as compat_transformers
from finetune.errors import UserError
from finetune.fast import fusion, generation
from finetune.model import adapters, fsdp, routing
from finetune.stagetypes import STAGE_TYPES


def callbacks(out: Path, monitor: routing.RouterMonitor, resume_from: str | None) -> list[TrainerCallback]:
    return [
        rundir.MetricsLogger(out / "metrics.jsonl", extra=monitor.report, resumed_from=resume_from),
        rundir.CompleteCheckpoints(),  # routed-expert LoRA + router into each checkpoint, then its marker
        heap.FreezeHeapAfterFirstStep(),  # no full collections walking the model and kernel caches
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
    kernels: str = "off",
    compiled_regions: bool = True,
    chunked_head: bool = False,
    esft: dict[str, Any] | None = None,
    **trainer_kwargs: Any,
) -> tuple[Trainer, Any, dict[str, Any], Path]:
    """Build the stage's trainer on `inputs` (args, train, eval), train it (from `resume_from`) and
    save the adapter: (trainer, its tokenizer, the summary's `train` section, the adapter folder).

    `esft`: `finetune.esft.apply`'s arguments (`adapter.experts: {select: esft}`): once the trainer has
    tokenized the rows, the experts are scored on them and the chosen ones made trainable.
    `head`: what a classifier or reward model's users need to read its outputs (`adapters.HEAD_FILE`).
    `kernels`: `model.kernels`; where it resolves on (CUDA, not sharded) training runs with the fused
    norms, SwiGLU and expert combine of `finetune.fast.fusion`, and with `compiled_regions` (all
    stages but GRPO, whose decode steps inside training would recompile them) its compiled modules.

    Under an FSDP launch (`distributed.fsdp_launch`) the model is sharded here with `fsdp.shard`, after
    the trainer has set its dtypes and before it builds the optimizer; the trainer is told the model
    manages its own distribution (transformers' flag for a model sharded at load time), so accelerate
    neither wraps it in DDP nor shards it again, and every rank takes part in the save."""
    sharded = distributed.fsdp_launch()
    if sharded:
        if resume_from is not None:
            raise UserError(
                f"{resume_from}: a run does not resume under FSDP (its checkpoints are off); run it again "
                "without --resume, or resume it with recipes/accelerate/ddp.yaml"
            )
        distributed.own_fsdp()
        compat_transformers.mark_self_sharded(model)
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
    record = _esft(trainer, out, monitor, esft) if esft is not None else None
    if sharded:
        fsdp.shard(trainer.model)
        # The Trainer's own no_sync for a self-sharded model reads transformers' `DistributedConfig`,
        # which ours has not: FSDP2's, over every unit of the model.
        compat_transformers.use_gradient_sync(trainer, lambda: fsdp.no_gradient_sync(trainer.model))
    fused = generation.enabled(kernels, trainer.model)
    if fused and distributed.is_primary():
        # The first steps compile (a minute or two on V2-Lite shapes): say so, or it looks like a hang.
        print("model.kernels: auto — the first training steps compile the fused kernels", file=sys.stderr)
    try:
        with fusion.fused(trainer.model, fused, regions=compiled_regions, chunked_head=chunked_head):
            trained = train(trainer, out, resume_from)
    finally:
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, heap.FreezeHeapAfterFirstStep):
                callback.thaw()
    if record is not None:
        trained["esft"] = {
            k: record[k] for k in ("score", "p", "train", "experts", "of", "expert_parameters")
        }
    return trainer, tokenizer, trained, save(trainer, out, tokenizer, head, record)


def _esft(trainer: Trainer, out: Path, monitor: routing.RouterMonitor, arguments: dict[str, Any]) -> dict:
    """Score and select the experts on the trainer's rows and make the chosen ones trainable."""
    before = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    record = esft.apply(trainer, out, stage=out.name, **arguments)
    monitor.counts = {}  # the scoring forwards are not training's expert load
    reference = getattr(trainer, "reference", None)
    if reference is not None:  # GRPO's `init` reference: the new trainable tensors start from it too
        reference.include([p for p in trainer.model.parameters() if p.requires_grad and id(p) not in before])
    return record


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
        compat_transformers.use_checkpoint_loader(
            trainer, lambda checkpoint: rundir.load_checkpoint_weights(trainer.model, checkpoint)
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


def save(
    trainer: Trainer,
    out: Path,
    tokenizer: Any,
    head: dict[str, Any] | None = None,
    esft_record: dict[str, Any] | None = None,
) -> Path:
    """`<stage>/adapter/` on rank 0, never half-written, with the tokenizer and chat template trained with
    (and the head's description, when given). An FSDP-sharded model's trainable parameters are gathered
    whole first, on every rank (a collective), and rank 0 writes them."""
    folder = out / "adapter"
    state = fsdp.full_trainable_state(trainer.model) if fsdp.is_sharded(trainer.model) else None
    if trainer.is_world_process_zero():
        with rundir.replaced_folder(folder) as tmp:
            adapters.save_adapter(trainer.model, tmp, state)
            tokenizer.save_pretrained(str(tmp))
            if head is not None:
                (tmp / adapters.HEAD_FILE).write_text(json.dumps(head, indent=2) + "\n")
            if esft_record is not None:
                esft.save_record(esft_record, tmp)
    return folder


def finish(trainer: Trainer, out: Path, title: str, summary: dict[str, Any]) -> None:
    """The loss plot, then `summary.json` (last: a stage with a summary is finished), on rank 0."""
    if trainer.is_world_process_zero():
        rundir.plot_loss(rundir.read_metrics(out / "metrics.jsonl"), out / "loss.png", title)
        rundir.write_summary(out / "summary.json", summary)


# Tracking integrations of `report_to` → the package that provides each (transformers' callbacks).
_REPORTERS = {
    "azure_ml": ("is_azureml_available", "azureml-core"),
    "clearml": ("is_clearml_available", "clearml"),
    "codecarbon": ("is_codecarbon_available", "codecarbon"),
    "comet_ml": ("is_comet_available", "comet_ml"),
    "dagshub": ("is_dagshub_available", "dagshub"),
    "dvclive": ("is_dvclive_available", "dvclive"),
    "flyte": ("is_flyte_deck_standard_available", "flytekitplugins-deck-standard"),
    "kubeflow": ("is_kubeflow_available", "kubeflow"),
    "mlflow": ("is_mlflow_available", "mlflow"),
    "neptune": ("is_neptune_available", "neptune"),
    "swanlab": ("is_swanlab_available", "swanlab"),
    "tensorboard": ("is_tensorboard_available", "tensorboard"),
    "trackio": ("is_trackio_available", "trackio"),
    "wandb": ("is_wandb_available", "wandb"),
}


def check_precision(name: str, arguments: dict[str, Any], ctx: Any) -> None:
    """bf16 the trainer would refuse (no GPU) or crash on (CPU autocast over a non-bf16 model)."""
    import torch

    if not arguments.get("bf16") or (ctx.cuda and not arguments.get("use_cpu")):
        return
    key = f"stages.{name}.train.bf16"
    if not arguments.get("use_cpu"):
        if torch.backends.mps.is_available():
            return  # Apple GPUs: transformers decides
        raise UserError(
            f"{key}: bf16 needs a CUDA GPU and none is available; drop it (the CPU trains in model.dtype) "
            "or set use_cpu: true with model.dtype: bfloat16"
        )
    if ctx.dtype != "bfloat16":
        raise UserError(
            f"{key}: bf16 autocast on the CPU (use_cpu: true) fails on a model.dtype {ctx.dtype} model; "
            "drop bf16 (the CPU trains in model.dtype) or set model.dtype: bfloat16"
        )


def check_fsdp(name: str, kind: str, args: Any, ctx: Any) -> None:
    """What an FSDP launch (`distributed.fsdp_launch`) cannot train; nothing without one. The stage types
    that train under it (`fit` shards the model; every rank saves and checks) declare `fsdp`."""
    train = f"stages.{name}.train"
    if getattr(args, "fsdp", None):
        raise UserError(
            f"{train}.fsdp: drop it; FSDP2 is chosen by the launch (recipes/accelerate/fsdp.yaml, or "
            "FINETUNE_FSDP=1 under torchrun), and the stage shards the model itself (docs/recipes.md)"
        )
    if not distributed.fsdp_launch():
        return
    ddp = "launch it with recipes/accelerate/ddp.yaml (the whole 4-bit model on every GPU)"
    if not STAGE_TYPES[kind].fsdp:
        raise UserError(
            f"stages.{name}: a type: {kind} stage does not train under FSDP yet (only "
            f"{', '.join(stagetypes.types_with('fsdp'))}: docs/recipes.md, Several GPUs); {ddp}"
        )
    if ctx.model_kwargs.get("quantization", "nf4") != "nf4":
        raise UserError(
            f"model.quantization: {ctx.model_kwargs.get('quantization')!r} is not sharded under FSDP (only "
            f"nf4 is tested); use nf4 or {ddp}"
        )
    strategy = getattr(args.save_strategy, "value", args.save_strategy)
    if strategy != "no":
        raise UserError(
            f"{train}.save_strategy: {strategy!r}: checkpoints are not written under FSDP (they default to "
            "'no' there); set save_strategy: 'no', or " + ddp
        )
    if distributed.world_size() == 1:
        raise UserError(
            f"stages.{name}: an FSDP launch of one process shards nothing; launch 2 or more processes, or "
            "run without FSDP (plain `finetune run`)"
        )


def check_trainer(name: str, args: Any, has_eval: bool) -> None:
    """Trainer settings that TRL's config accepts but `Trainer` itself refuses once a run has started."""
    train = f"stages.{name}.train"
    if distributed.world_size() > 1 and args.world_size == 1:
        raise UserError(
            f"{train}: {distributed.world_size()} processes were launched but each would train alone "
            f"(no GPU and use_cpu not set); set {train}.use_cpu: true to train them together on the CPU"
        )
    strategy = getattr(args.eval_strategy, "value", args.eval_strategy)
    if strategy != "no" and not has_eval:
        raise UserError(
            f"{train}.eval_strategy: {strategy!r} evaluates during training, but the stage has no eval data; "
            f"set stages.{name}.data.eval or eval_strategy: 'no'"
        )
    if args.eval_on_start and not has_eval:
        raise UserError(f"{train}.eval_on_start: the stage has no eval data; set stages.{name}.data.eval")
    for reporter in [args.report_to] if isinstance(args.report_to, str) else args.report_to or []:
        if reporter in ("none", "all"):
            continue
        if reporter not in compat_transformers.reporters():
            known = ", ".join(compat_transformers.reporters())
            raise UserError(
                f"{train}.report_to: unknown integration {reporter!r} (known: none, all, {known})"
            )
        available, package = _REPORTERS.get(reporter, (None, reporter))
        if available and compat_transformers.reporter_installed(available) is False:
            raise UserError(
                f"{train}.report_to: {reporter!r} is not installed (pip install {package}), "
                "or drop it (metrics.jsonl and loss.png are written anyway)"
            )


def read_splits(d: Any, key: str, *, fetch: bool) -> list[tuple[data.SplitReport, Any]]:
    """The stage's train split (capped at `max_samples`) and eval split, each with the report `validate`
    prints; rows are None for a Hub dataset that `validate` (fetch=False) does not load."""
    out = []
    for which, spec, split, config, cap in (
        ("train", d.train, d.train_split, d.config, d.max_samples),
        ("eval", d.eval, d.eval_split, d.eval_config or d.config, None),
    ):
        if spec is None:
            continue
        report = data.SplitReport(which, data.shown(spec))
        if not fetch and not data.is_local(spec):
            report.note = "Hub dataset: loaded when a run starts"
            out.append((report, None))
            continue
        rows = data.load_rows(spec, key=f"{key}.{which}", split=split, config=config)
        if cap is not None and cap < len(rows):
            report.total, rows = len(rows), rows.select(range(cap))
        report.rows = len(rows)
        out.append((report, rows))
    return out


def tokenizer_unfetched(ctx: Any, fetch: bool) -> str | None:
    """Why `validate` counts no tokens (a Hub model's tokenizer is only fetched by a run), or None."""
    if ctx.source.kind == "hub" and not fetch:
        return f"token counts skipped: the tokenizer of Hub model {ctx.source.ref} is fetched by a run"
    return None
