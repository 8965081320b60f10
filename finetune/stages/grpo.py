"""GRPO on TRL's GRPOTrainer: the policy is the 4-bit base + LoRA (fresh, or an earlier stage's adapter
with `init_from`), the KL's reference policy the starting policy (`reference: init`, a frozen copy of the
starting adapter) or the base (`reference: base`, the adapter disabled, routed-expert LoRA included),
rewards from the `rewards` package, and optional routing replay for the MoE layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from trl import GRPOConfig

import rewards
from finetune import data, rundir, stagetypes
from finetune.context import StageContext
from finetune.errors import UserError
from finetune.fast import generation
from finetune.model import replay, routing, sampler
from finetune.schema import train_arguments
from finetune.stages import common, reward_model
from finetune.stages.grpo_trainer import Trainer
from finetune.stagetypes import STAGE_TYPES, GRPOSchema

TYPE = STAGE_TYPES["grpo"]
Schema = GRPOSchema  # the `stages.<name>` section, declared with the type
TRAINER_CONFIG = TYPE.trainer_config  # `stages.<name>.train` takes its fields


@dataclass
class GRPOInputs:
    args: GRPOConfig
    train: Dataset | None  # None: a Hub dataset not fetched (validate stays offline)
    eval: Dataset | None
    reward_funcs: list = field(default_factory=list)
    report: list = field(default_factory=list)
    heldout: tuple[list, list[str]] | None = None  # (prompts, answers) of `heldout:`


def _rewards(name: str, stage: Schema, ctx: StageContext) -> tuple[list, list[tuple[str, list[str]]]]:
    """The reward functions (arguments bound and checked, failures named) and the columns each reads."""
    reward_model.register()  # `rewards` holds a placeholder until finetune provides it
    funcs, needs = [], []
    for i, spec in enumerate(stage.rewards):
        key = f"stages.{name}.rewards[{i}]"
        spec = dict(spec)
        reward_name = spec.pop("name", None)
        if not isinstance(reward_name, str):
            raise UserError(
                f"{key}: needs `name` (one of {', '.join(sorted(rewards.REGISTRY))}, or pkg.module:fn)"
            )
        on_error = spec.pop("on_error", "raise")
        if on_error not in ("raise", "zero"):
            raise UserError(f"{key}.on_error: {on_error!r}; use raise or zero")
        if reward_name == "reward_model" and isinstance(spec.get("stage"), str):
            ctx.earlier_stage(name, spec["stage"], f"{key}.stage", stagetypes.types_with("reward_model"))
            spec["stage"] = str(ctx.output_dir / spec["stage"])
        try:
            bound = rewards.build(reward_name, **spec)
        except ValueError as err:
            raise UserError(f"{key}: {err}") from None
        funcs.append(rewards.guarded(bound, on_error=on_error, name=reward_name))
        needs.append((key, rewards.needed_columns(bound)))
    return funcs, needs


def prompt_rows(rows: Dataset, key: str, stage: Schema, stage_key: str) -> Dataset:
    """With `prompt_template`, a user turn rendered from each row's columns; otherwise `prompt` rows as
    they are, and `messages` rows become their turns before the last assistant turn (`prompt`) and that
    turn's text (`answer`, unless the rows have one)."""
    columns = set(rows.column_names)
    if stage.prompt_template is not None:
        return _templated(rows, key, stage, stage_key)
    if stage.system_prompt is not None:
        raise UserError(
            f"{stage_key}.system_prompt: applies to prompts built by {stage_key}.prompt_template; set one"
        )
    if "prompt" in columns:
        return rows
    if "messages" not in columns:
        raise UserError(
            f"{key}: a GRPO stage needs a `prompt` column (text or messages), or `messages` ending with the "
            f"reference answer (found: {', '.join(sorted(columns))})"
        )

    def split(row: dict) -> dict:
        messages = row["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise UserError(f"{key}: `messages` must end with an assistant turn (the reference answer)")
        out = {"prompt": messages[:-1]}
        if "answer" not in columns:
            out["answer"] = messages[-1]["content"]
        return out

    return rows.map(split, remove_columns=["messages"])


def _templated(rows: Dataset, key: str, stage: Schema, stage_key: str) -> Dataset:
    import string

    template = stage.prompt_template
    assert template is not None
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:
        raise UserError(
            f"{stage_key}.prompt_template: {err} (write a literal brace as {{{{ or }}}})"
        ) from None
    names = {f.split(".")[0].split("[")[0] for f in fields}
    missing = sorted(n for n in names if n not in rows.column_names)
    if missing or "" in names:
        raise UserError(
            f"{stage_key}.prompt_template: names column `{(missing or [''])[0]}`, which {key} lacks "
            f"(columns: {', '.join(rows.column_names)})"
        )
    system = [{"role": "system", "content": stage.system_prompt}] if stage.system_prompt else []

    def render(row: dict) -> dict:
        return {"prompt": [*system, {"role": "user", "content": template.format(**row)}]}

    return rows.map(render)


def check(name: str, stage: Schema, ctx: StageContext, *, fetch: bool = True) -> GRPOInputs:
    """Trainer config, rewards (names, arguments, the stages they name, the columns they read), prompts
    and their token lengths. Writes nothing."""
    arguments = train_arguments(stage, dtype=ctx.dtype, cuda=ctx.cuda)
    common.check_precision(name, arguments, ctx)
    args = ctx.trainer_config(GRPOConfig, name, arguments)
    d, key = stage.data, f"stages.{name}.data"
    common.check_trainer(name, args, has_eval=d.eval is not None)
    common.check_fsdp(name, stage.type, args, ctx)
    if args.use_vllm or args.use_transformers_continuous_batching:
        which = "use_vllm" if args.use_vllm else "use_transformers_continuous_batching"
        raise UserError(
            f"stages.{name}.train.{which}: finetune generates rollouts with the model itself (compiled "
            "decode steps under model.kernels: auto, routing recorded for replay); remove it"
        )
    common.check_documented(name, args, GRPOConfig, "loss_type", "a loss")
    common.check_documented(name, args, GRPOConfig, "importance_sampling_level", "a level")
    if stage.init_from is not None:
        ctx.earlier_stage(
            name, stage.init_from, f"stages.{name}.init_from", stagetypes.types_with("policy_init")
        )
    funcs, needs = _rewards(name, stage, ctx)
    if args.reward_weights is not None and len(args.reward_weights) != len(funcs):
        raise UserError(
            f"stages.{name}.train.reward_weights: {len(args.reward_weights)} weights for {len(funcs)} rewards"
        )
    splits = common.read_splits(d, key, fetch=fetch, seed=ctx.seed)
    loaded: dict[str, Dataset | None] = {}
    for report, rows in splits:
        if rows is None:
            continue
        which = report.split
        rows = prompt_rows(rows, f"{key}.{which}", stage, f"stages.{name}")
        for i, prompt in enumerate(rows["prompt"], 1):
            problem = data.conversation_problem(prompt, "prompt") if isinstance(prompt, list) else None
            if problem is not None:
                raise UserError(f"{key}.{which}: {report.source}: row {i}: {problem}")
        for reward_key, columns in needs:
            missing = [c for c in columns if c not in rows.column_names]
            if missing:
                raise UserError(
                    f"{reward_key}: reads column `{missing[0]}`, which {key}.{which} lacks "
                    f"(columns: {', '.join(rows.column_names)})"
                )
        skipped = common.tokenizer_unfetched(ctx, fetch)
        if skipped:
            report.note = skipped
        else:
            rows = _measure(report, rows, ctx.tokenizer(), stage, name, args.max_completion_length)
        loaded[which] = rows
    held_report, pairs = common.read_heldout(name, stage, ctx, args, fetch=fetch)
    reports = [r for r, _ in splits] + ([held_report] if held_report is not None else [])
    return GRPOInputs(args, loaded.get("train"), loaded.get("eval"), funcs, reports, pairs)


def _measure(
    report: data.SplitReport, rows: Dataset, tokenizer: Any, stage: Schema, name: str, new_tokens: int
) -> Dataset:
    """Prompt token lengths (as TRL templates them); rows over `max_prompt_length` are dropped."""
    data.check_roles(
        rows["prompt"], tokenizer, key=f"stages.{name}.data.{report.split}", source=report.source
    )
    lengths = [
        len(tokenizer(data.prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"])
        for p in rows["prompt"]
    ]
    data.fill_lengths(report, lengths)
    limit = stage.max_prompt_length
    keep = [i for i, n in enumerate(lengths) if limit is None or n <= limit]
    report.kept, report.cut = len(keep), len(lengths) - len(keep)
    report.note = f"prompt tokens; each completion adds up to {new_tokens}"
    setting = f"stages.{name}.max_prompt_length"
    if not keep:
        raise UserError(
            f"{setting}: {limit} drops every prompt of {report.source} (p95 {report.p95}, max {report.max} "
            f"tokens); set it to {data.suggest_max_length(report.p95 or 0, report.max or 0)}"
        )
    if report.cut > data.CUT_WARN_SHARE * len(lengths):
        data.warn(f"{setting}: {limit} drops {report.cut} of {len(lengths)} {report.split} prompts")
    return rows.select(keep) if report.cut else rows


def run(
    name: str,
    stage: Schema,
    inputs: GRPOInputs,
    ctx: StageContext,
    *,
    resume_from: str | None = None,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Train the policy; the summary holds the mean reward of the first and last logging windows, and
    with `heldout:` the greedy exact match before and after."""
    out = ctx.stage_dir(name)
    tokenizer = ctx.tokenizer()
    if model is None:
        model = ctx.policy_model(stage.init_from)
    before = common.check_heldout(model, tokenizer, inputs.heldout, stage, ctx, "before")
    eos = tokenizer.eos_token_id
    replayer = replay.RoutingReplay(
        model, mode=stage.routing_replay, eos_token_ids=[eos] if eos is not None else []
    )
    args = inputs.args
    mismatch = (
        sampler.Mismatch(
            args.vllm_importance_sampling_mode,
            args.vllm_importance_sampling_clip_min,
            args.vllm_importance_sampling_clip_max,
        )
        if args.vllm_importance_sampling_correction
        else None
    )
    reports = [replayer.report] + ([mismatch.report] if mismatch is not None else [])
    monitor = routing.RouterMonitor(model, aux_loss_coef=ctx.aux_loss_coef, also=reports)
    samples = out / "samples.jsonl"
    if resume_from is None:
        samples.unlink(missing_ok=True)
    try:
        # TRL generates through the model's `generate`: decoding compiled and graphed like evaluation's.
        with generation.fast_generate(model, generation.enabled(ctx.kernels, model)):
            trainer, tokenizer, trained, adapter = common.fit(
                Trainer,
                model,
                inputs,
                tokenizer,
                out,
                monitor,
                resume_from,
                thresholds=ctx.routing,
                kernels=ctx.kernels,
                # Training passes through the compiled regions and our LM head (eager while generating:
                # `fusion.suspended` in the trainer), unless an entropy bonus needs the entropy's gradient.
                chunked_head=True,
                head_temperature=args.temperature,
                loss_head=not (args.entropy_coef or args.use_adaptive_entropy),
                esft=ctx.esft,
                reward_funcs=inputs.reward_funcs,
                router_monitor=monitor,
                replayer=replayer,
                mismatch=mismatch,
                samples=samples,
                samples_per_log=stage.samples_per_log,
                reference=reference_mode(stage, inputs.args.beta),
            )
    finally:
        monitor.remove()
        replayer.remove()
    after = common.check_heldout(model, tokenizer, inputs.heldout, stage, ctx, "after")
    metrics = rundir.read_metrics(out / "metrics.jsonl")
    summary: dict[str, Any] = {"stage": name, "type": "grpo", "train": trained, "adapter": str(adapter)}
    if before is not None:
        summary["heldout"] = {"metric": "exact_match", "before": before, "after": after}
    summary["rewards"] = _reward_windows(metrics)
    mismatch = [m["routing/mismatch"] for m in metrics if "routing/mismatch" in m]
    if mismatch:
        summary["routing"] = {
            "replay": stage.routing_replay,
            "mismatch": sum(mismatch) / len(mismatch),
            "router_mismatch": sum(
                m["routing/router_mismatch"] for m in metrics if "routing/router_mismatch" in m
            )
            / len(mismatch),
        }
    if trainer.is_world_process_zero():
        keys = (
            ["reward", *sorted(k for k in metrics[-1] if k.startswith("rewards/") and k.endswith("/mean"))]
            if metrics
            else []
        )
        rundir.plot_curves(metrics, keys, out / "reward.png", f"{ctx.name} / {name}: reward")
    common.finish(trainer, out, f"{ctx.name} / {name}", summary)
    return summary


def reference_mode(stage: Any, beta: float = 1.0) -> str | None:
    """What the reference pass computes: nothing without one (`beta` 0), the frozen starting adapter
    (`init` after `init_from`), else the base model (a fresh adapter starts as the base)."""
    if not beta:
        return None
    return "init" if stage.reference == "init" and stage.init_from is not None else "base"


def _reward_windows(metrics: list[dict[str, Any]], window: int = 3) -> dict[str, Any]:
    """Mean reward of the first and the last `window` logging steps (the learning signal)."""
    values = [m["reward"] for m in metrics if m.get("reward") is not None and "loss" in m]
    if not values:
        return {}
    first, last = values[:window], values[-window:]
    return {"first": sum(first) / len(first), "last": sum(last) / len(last), "logged_steps": len(values)}
