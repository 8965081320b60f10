"""Supervised fine-tuning on TRL's SFTTrainer, with LoRA on a 4-bit DeepSeek-V2."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from datasets import Dataset
from pydantic import Field
from trl import SFTConfig, SFTTrainer

from finetune import data, heldout
from finetune.model import routing
from finetune.schema import DataConfig, HeldoutConfig, Strict, train_arguments
from finetune.stages import common
from finetune.stages.context import StageContext


class Schema(Strict):
    """`stages.<name>` of `type: sft`."""

    type: Literal["sft"]
    data: DataConfig
    train: dict[str, Any] = Field(default_factory=dict)
    heldout: HeldoutConfig | None = None


SFTStage = Schema
TRAINER_CONFIG = SFTConfig  # `stages.<name>.train` takes its fields


@dataclass
class SFTInputs:
    args: SFTConfig
    train: Dataset | None  # None: a Hub dataset not fetched (validate stays offline)
    eval: Dataset | None
    heldout: tuple[list, list[str]] | None
    report: tuple[data.SplitReport, ...] = ()  # per split: rows read and kept, token lengths (`validate`)


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


def _check_precision(name: str, arguments: dict[str, Any], ctx: StageContext) -> None:
    """bf16 the trainer would refuse (no GPU) or crash on (CPU autocast over a non-bf16 model)."""
    import torch

    from finetune.errors import UserError

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


def _check_trainer(name: str, args: SFTConfig, has_eval: bool) -> None:
    """Trainer settings that TRL's config accepts but `Trainer` itself refuses once a run has started."""
    from transformers.integrations import integration_utils

    from finetune.errors import UserError

    train = f"stages.{name}.train"
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
        if reporter not in integration_utils.INTEGRATION_TO_CALLBACK:
            known = ", ".join(sorted(integration_utils.INTEGRATION_TO_CALLBACK))
            raise UserError(
                f"{train}.report_to: unknown integration {reporter!r} (known: none, all, {known})"
            )
        available, package = _REPORTERS.get(reporter, (None, reporter))
        check = getattr(integration_utils, available, None) if available else None
        if check is not None and not check():
            raise UserError(
                f"{train}.report_to: {reporter!r} is not installed (pip install {package}), "
                "or drop it (metrics.jsonl and loss.png are written anyway)"
            )


def check(name: str, stage: SFTStage, ctx: StageContext, *, fetch: bool = True) -> SFTInputs:
    """Build the trainer config, load the data (files exist, columns fit, not empty) and measure it as
    TRL's SFTTrainer will prepare it: rows kept after templating and truncation, token lengths.

    With `fetch=False`, Hub datasets are accepted by name and only loaded by a run, and a Hub model's
    tokenizer is not fetched (no token counts). Each split's figures are in `SFTInputs.report`; a
    `max_length` that drops every row of a split is an error, one that cuts more than
    `data.CUT_WARN_SHARE` of them a warning on stderr. Writes nothing.
    """
    arguments = train_arguments(stage, dtype=ctx.dtype, cuda=ctx.cuda)
    _check_precision(name, arguments, ctx)
    args = ctx.trainer_config(SFTConfig, name, arguments)
    d = stage.data
    _check_trainer(name, args, has_eval=d.eval is not None)
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
        tokenizer = ctx.tokenizer()
        for r in measured:
            if r.split == "heldout":
                assert pairs is not None and h is not None
                data.measure_prompts(r, pairs[0], tokenizer=tokenizer, max_new_tokens=h.max_new_tokens)
                continue
            packing = args.packing if r.split == "train" or args.eval_packing is None else args.eval_packing
            data.measure(
                r,
                train if r.split == "train" else evaluation,
                tokenizer=tokenizer,
                args=args,
                packing=packing,
                key=f"{key}.{r.split}",
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
    trainer, tokenizer, trained, adapter = common.fit(
        SFTTrainer, model, inputs, tokenizer, out, monitor, resume_from
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
