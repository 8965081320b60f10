"""Check every stage's inputs, then run the stages in order and write the run directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Experts

from finetune import rundir
from finetune.errors import UserError
from finetune.model import adapters, routing
from finetune.model.load import Source, model_skeleton, resolve_source
from finetune.recipe import AdapterConfig, Recipe
from finetune.stages import sft
from finetune.stages.context import StageContext

STAGES = {"sft": sft}


@dataclass
class Plan:
    recipe: Recipe
    context: StageContext
    inputs: dict[str, Any]  # stage name → the stage module's checked inputs


def plan(recipe: Recipe, *, fetch: bool = False) -> Plan:
    """Everything `validate` checks: model source, adapter targets, trainer arguments, each stage's data.

    Writes nothing into the run directory. Hub datasets are only loaded with `fetch=True` (a run).
    """
    m = recipe.model
    check_output_dir(Path(recipe.output_dir))
    source = resolve_source(m.preset, m.path)
    ctx = context(recipe, source)
    inputs = {
        name: STAGES[stage.type].check(name, stage, ctx, fetch=fetch) for name, stage in recipe.stages.items()
    }
    skeleton = model_skeleton(source, seed=m.seed)
    if skeleton is not None:  # a Hub id is only checked when a run downloads it
        adapters.resolve_targets(skeleton, recipe.adapter.targets)
        check_experts(skeleton, recipe.adapter)
    return Plan(recipe, ctx, inputs)


def check_output_dir(path: Path) -> None:
    """`output_dir` is a folder, or can be made one, that this user may write into. Writes nothing."""
    path = Path(os.path.abspath(path.expanduser()))
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"output_dir: {path} is a file, not a folder")
        probe = path
        while not probe.exists():  # the nearest folder that exists is where the run folder gets created
            probe = probe.parent
    except OSError as err:
        raise UserError(f"output_dir: cannot look at {path} ({err.strerror or err})") from None
    if not probe.is_dir():
        raise UserError(f"output_dir: {path} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output_dir: {probe} is not writable (permissions or a read-only file system)")


def check_experts(skeleton: torch.nn.Module, adapter: AdapterConfig) -> None:
    """`adapter.experts` names MoE layers of this model and expert ids they have (run time: `attach`)."""
    if adapter.experts == "all":
        return
    layers = routing.by_layer(skeleton, DeepseekV2Experts)
    for index, ids in adapter.experts.items():
        if index not in layers:
            raise UserError(
                f"adapter.experts: layer {index} has no routed experts (MoE layers: {sorted(layers)})"
            )
        n = layers[index].num_experts
        bad = [e for e in ids if not 0 <= e < n] if isinstance(ids, list) else []
        if bad:
            raise UserError(f"adapter.experts: layer {index}: no expert {bad[0]} (0..{n - 1})")


def context(recipe: Recipe, source: Source) -> StageContext:
    m, a = recipe.model, recipe.adapter
    return StageContext(
        name=recipe.name,
        seed=recipe.seed,
        output_dir=Path(recipe.output_dir),
        source=source,
        model_kwargs=dict(
            quantization=m.quantization,
            dtype=m.dtype,
            double_quant=m.double_quant,
            blocksize=m.blocksize,
            attn_implementation=m.attn_implementation,
            experts_implementation=m.experts_implementation,
            seed=m.seed,
        ),
        aux_loss_coef=a.router_aux_loss_coef if a.router == "trainable" else 0.0,
        adapter_kwargs=dict(
            r=a.r,
            alpha=a.alpha,
            dropout=a.dropout,
            targets=a.targets,
            expert_r=a.expert_r,
            expert_alpha=a.expert_alpha,
            router=a.router,
            trainable_modules=a.trainable_modules,
            experts=None
            if a.experts == "all"
            else {k: None if v == "all" else v for k, v in a.experts.items()},
        ),
    )


def run(recipe: Recipe) -> dict[str, dict]:
    """Check all inputs first (so bad input writes nothing), then train stage by stage."""
    checked = plan(recipe, fetch=True)
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_recipe(recipe, out)
    summaries = {}
    for name, stage in recipe.stages.items():
        torch.manual_seed(recipe.seed)
        summaries[name] = STAGES[stage.type].run(name, stage, checked.inputs[name], checked.context)
    return summaries
