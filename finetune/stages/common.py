"""What every training stage does around its TRL trainer, in one place: the callbacks (metrics.jsonl with
the expert load, checkpoints completed with the expert LoRA and router), training from a checkpoint, the
rank-0 save of adapter + tokenizer, and the plot and summary written last."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from finetune import data, distributed, esft, formats, health, heap, heldout, mixture, rundir, stagetypes
from finetune.compat import transformers as compat_transformers
from finetune.errors import UserError
from finetune.fast import fusion, generation
from finetune.model import adapters, fsdp, routing
from finetune.stagetypes import STAGE_TYPES


def callbacks(
    out: Path, fields: rundir.RouterFields, routing_health: health.RoutingHealth, resume_from: str | None
) -> list[TrainerCallback]:
    """Ours, after the trainer's own and its trackers'; `fields` itself goes first (`add_router_fields`)."""
    return [
        routing_health,  # checks what `fields` computed for this log (warnings), counts steps
        rundir.MetricsLogger(out / "metrics.jsonl", extra=lambda: fields.fields, resumed_from=resume_from),
        rundir.CompleteCheckpoints(),  # routed-expert LoRA + router into each checkpoint, then its marker
        heap.FreezeHeapAfterFirstStep(),  # no full collections walking the model and kernel caches
        rundir.HideRouterFields(
            fields
        ),  # before the console's progress callback, which the Trainer adds last
    ]


def add_router_fields(trainer: Trainer, fields: rundir.RouterFields) -> None:
    """`fields` first among the trainer's callbacks, before the `report_to` integrations read a log.
    `Trainer.add_callback` appends; the handler's list is the public way to put one first."""
    trainer.callback_handler.callbacks.insert(0, fields)


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
    loss_head: bool = True,
    head_temperature: float = 1.0,
    thresholds: health.Thresholds | None = None,
    esft: dict[str, Any] | None = None,
    **trainer_kwargs: Any,
) -> tuple[Trainer, Any, dict[str, Any], Path]:
    """Build the stage's trainer on `inputs` (args, train, eval), train it (from `resume_from`) and
    save the adapter: (trainer, its tokenizer, the summary's `train` section, the adapter folder).

    `esft`: `finetune.esft.apply`'s arguments (`adapter.experts: {select: esft}`): once the trainer has
    tokenized the rows, the experts are scored on them and the chosen ones made trainable.
    `head`: what a classifier or reward model's users need to read its outputs (`adapters.HEAD_FILE`).
    `kernels`: `model.kernels`; where it resolves on (CUDA, not sharded) training runs with the fused
    norms, SwiGLU and expert combine of `finetune.fast.fusion`, and with `compiled_regions` its
    compiled modules and (`loss_head`) its LM head for TRL's chunked one (logits / `head_temperature`).
    `thresholds`: the recipe's `routing:` alarms (`ctx.routing`; None: their defaults), checked by the
    `health.RoutingHealth` callback on the routing statistics of each log.

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
    thresholds = thresholds or health.Thresholds()
    fields = rundir.RouterFields(lambda: monitor.report(dead_after=thresholds.dead_after_steps))
    routing_health = health.RoutingHealth(monitor, out.name, thresholds, fields)
    trainer = trainer_cls(
        model=model,
        args=inputs.args,
        train_dataset=inputs.train,
        eval_dataset=inputs.eval,
        processing_class=tokenizer,
        callbacks=callbacks(out, fields, routing_health, resume_from),
        **trainer_kwargs,
    )
    add_router_fields(trainer, fields)
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
        with fusion.fused(
            trainer.model,
            fused,
            regions=compiled_regions,
            chunked_head=chunked_head,
            head=loss_head,
            temperature=head_temperature,
        ):
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
    """The summary's figures to the trackers, the loss and routing plots, then `summary.json` (last: a
    stage with a summary is finished), on rank 0."""
    if trainer.is_world_process_zero():
        report_summary(trainer, summary)
        metrics = rundir.read_metrics(out / "metrics.jsonl")
        rundir.plot_loss(metrics, out / "loss.png", title)
        found = [c for c in trainer.callback_handler.callbacks if isinstance(c, health.RoutingHealth)]
        thresholds = found[0].thresholds if found else health.Thresholds()
        health.plot_routing(metrics, out / "routing.png", f"{title}: routing", thresholds)
        rundir.write_summary(out / "summary.json", summary)


def report_summary(trainer: Trainer, summary: dict[str, Any]) -> None:
    """What the stage computed after training (held-out exact match before / after, its eval section) to
    the `report_to` trackers, as `eval_final/<section>/<key>` (trackers show `eval/final/...`); then each
    is closed again as at the end of training. Straight to their callbacks: `Trainer.log` would add a
    row to metrics.jsonl, whose rows are the training's logs."""
    trackers = [
        cb
        for cb in trainer.callback_handler.callbacks
        if isinstance(cb, compat_transformers.reporter_callbacks())
    ]
    figures = {
        "eval_final/" + key.replace(".", "/"): value
        for key, value in rundir.summary_numbers(summary).items()
        if not key.startswith("train.")  # the trainer logged those itself
    }
    if not trackers or not figures:
        return
    for callback in trackers:
        callback.on_log(trainer.args, trainer.state, trainer.control, logs=dict(figures), model=trainer.model)
        callback.on_train_end(trainer.args, trainer.state, trainer.control, model=trainer.model)


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


def documented_values(config_cls: type, field: str) -> list[str]:
    """The values the installed TRL documents for a config field: its `choices`, else the quoted names
    its help lists after "values are", else every backquoted quoted name of its help. TRL checks most of
    them only mid-training."""
    spec = getattr(config_cls, "__dataclass_fields__", {}).get(field)
    if spec is None:
        return []
    if spec.metadata.get("choices"):
        return list(spec.metadata["choices"])
    text = spec.metadata.get("help", "")
    listed = re.search(r"values are:?\s(.*?)\.(\s|$)", text)
    names = (
        re.findall(r"'([a-z0-9_]+)'", listed.group(1)) if listed else re.findall(r"`'([a-z0-9_]+)'`", text)
    )
    return list(dict.fromkeys(names))


def check_documented(name: str, args: Any, config_cls: type, field: str, what: str) -> None:
    """`stages.<name>.train.<field>` (a value or a list of them) is one of `documented_values`; `what`
    names such a value in the message ("a loss")."""
    known = documented_values(config_cls, field)
    value = getattr(args, field, None)
    given = value if isinstance(value, list) else [value]
    unknown = [v for v in given if v not in known]
    if known and unknown:
        raise UserError(
            f"stages.{name}.train.{field}: {unknown[0]!r} is not {what} of TRL's {config_cls.__name__} "
            f"(it has: {', '.join(known)})"
        )


def sources(d: Any, which: str, key: str) -> list[mixture.Source]:
    """The `train` or `eval` sources of a stage's `data` section as plain arguments: one path (with the
    section's `format` / `columns`) or a mixture's list, each source's split and config defaulting to
    the section's."""
    spec = d.train if which == "train" else d.eval
    split, split_key = (d.train_split, "train_split") if which == "train" else (d.eval_split, "eval_split")
    config = d.config if which == "train" else d.eval_config or d.config
    config_key = "config" if which == "train" or d.eval_config is None else "eval_config"
    if isinstance(spec, str):
        one = mixture.Source(
            path=spec,
            key=f"{key}.{which}",
            split=split,
            config=config,
            columns=dict(d.columns),
            format=d.format,
            split_key=f"{key}.{split_key}",
            config_key=f"{key}.{config_key}",
            at=key,
        )
        return [one]
    return [
        mixture.Source(
            path=s.path,
            key=f"{key}.{which}.{i}",
            split=s.split or split,
            config=s.config or config,
            weight=s.weight,
            columns=dict(s.columns),
            format=s.format,
            split_key=f"{key}.{which}.{i}.split" if s.split else f"{key}.{split_key}",
            config_key=f"{key}.{which}.{i}.config" if s.config else f"{key}.{config_key}",
        )
        for i, s in enumerate(spec)
    ]


def read_split(
    d: Any, which: str, key: str, *, fetch: bool, seed: int, shape: mixture.Shape | None = None
) -> tuple[data.SplitReport, mixture.Read | None] | None:
    """One split (`train`, capped at `max_samples` and streamed with `streaming`, or `eval`) with the
    report `validate` prints; None when the stage has no such split, no rows for a Hub dataset that
    `validate` (fetch=False) does not load. `shape`: see `mixture.read`."""
    if (d.train if which == "train" else d.eval) is None:
        return None
    listed = sources(d, which, key)
    mixed = len(listed) > 1
    report = data.SplitReport(
        which, f"mixture of {len(listed)} sources (seed {seed})" if mixed else data.shown(listed[0].path)
    )
    if not fetch and not all(data.is_local(s.path) for s in listed):
        report.note = "Hub dataset: loaded when a run starts"
        return report, None
    got = mixture.read(
        listed,
        key=f"{key}.{which}",
        seed=seed,
        max_samples=d.max_samples if which == "train" else None,
        shape=shape,
        streaming=d.streaming and which == "train",
    )
    report.total = got.total
    report.rows = len(got.rows) if got.sample is None else len(got.sample)
    if mixed:
        report.parts = got.parts
    report.info = got.notes if mixed else [f"format: {got.parts[0].format}", *got.notes]
    return report, got


def read_splits(
    d: Any, key: str, *, fetch: bool, seed: int = 0, shape: mixture.Shape | None = None
) -> list[tuple[data.SplitReport, Any]]:
    """The stage's train split (capped at `max_samples`) and eval split, each with the report `validate`
    prints; rows are None for a Hub dataset that `validate` (fetch=False) does not load. These stages
    read their rows whole: `streaming` is refused."""
    if d.streaming:
        raise UserError(
            f"{key}.streaming: this stage type reads its rows whole; streaming is for sft stages (drop it)"
        )
    out = []
    for which in ("train", "eval"):
        got = read_split(d, which, key, fetch=fetch, seed=seed, shape=shape)
        if got is not None:
            out.append((got[0], None if got[1] is None else got[1].rows))
    return out


def read_heldout(
    name: str, stage: Any, ctx: Any, args: Any, *, fetch: bool
) -> tuple[data.SplitReport | None, tuple[list, list[str]] | None]:
    """The `heldout:` section's rows (from the eval split and config of `stages.<name>.data`, the first
    `max_samples`) as (prompts, reference answers), measured in tokens as the trainer's template renders
    them; (None, None) without one, and no pairs for a Hub dataset `validate` (fetch=False) does not load."""
    h = stage.heldout
    if h is None:
        return None, None
    d, key = stage.data, f"stages.{name}.data"
    hkey = f"stages.{name}.heldout.data"
    report = data.SplitReport("heldout", data.shown(h.data))
    if not fetch and not data.is_local(h.data):
        report.note = "Hub dataset: loaded when a run starts"
        return report, None
    config, config_key = (
        (d.config, f"{key}.config") if d.eval_config is None else (d.eval_config, f"{key}.eval_config")
    )
    rows = data.load_rows(
        h.data,
        key=hkey,
        split=d.eval_split,
        config=config,
        split_key=f"{key}.eval_split",
        config_key=config_key,
    )
    if h.max_samples is not None and h.max_samples < len(rows):
        report.total, rows = len(rows), rows.select(range(h.max_samples))
    report.rows = len(rows)
    # Alpaca and ShareGPT held-out rows are read as conversations, as training rows are.
    rows = formats.convert(
        rows, formats.detect(rows.column_names), rows.column_names, key=hkey, source=h.data
    )
    pairs = data.prompt_target_pairs(rows, key=hkey, source=h.data)
    skipped = tokenizer_unfetched(ctx, fetch)
    if skipped:
        report.note = skipped
    else:
        tokenizer = data.stage_template(ctx.tokenizer(), args)
        data.check_roles(pairs[0], tokenizer, key=hkey, source=h.data)
        data.measure_prompts(report, pairs[0], tokenizer=tokenizer, max_new_tokens=h.max_new_tokens)
    return report, pairs


def check_heldout(model: Any, tokenizer: Any, pairs: Any, stage: Any, ctx: Any, when: str) -> dict | None:
    """`heldout.check` with the stage's `heldout:` settings."""
    h = stage.heldout
    if h is None:
        return None
    return heldout.check(
        model,
        tokenizer,
        pairs,
        max_new_tokens=h.max_new_tokens,
        batch_size=h.batch_size,
        kernels=ctx.kernels,
        when=when,
    )


def tokenizer_unfetched(ctx: Any, fetch: bool) -> str | None:
    """Why `validate` counts no tokens (a Hub model's tokenizer is only fetched by a run), or None."""
    if ctx.source.kind == "hub" and not fetch:
        return f"token counts skipped: the tokenizer of Hub model {ctx.source.ref} is fetched by a run"
    return None
