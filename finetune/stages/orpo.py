"""ORPO on TRL's ORPOTrainer (`trl.experimental`, through `finetune.compat.trl`): the policy is the 4-bit
base + LoRA (fresh, or an earlier stage's adapter with `init_from`), trained on the chosen side's
language-model loss plus an odds-ratio term weighted by `beta` (ORPO's lambda). No reference policy:
no reference pass, no frozen adapter copy; `reference:` is refused. `train:` takes ORPOConfig's fields.

TRL's experimental module is imported on first use of `TRAINER_CONFIG` or `Trainer` (a recipe with an
orpo stage), never by importing this module."""

from __future__ import annotations

import functools
from typing import Any

import torch

from finetune import preferences
from finetune.compat import trl as compat_trl
from finetune.context import StageContext
from finetune.stages import preference
from finetune.stages.moe_trainer import MoETrainerMixin
from finetune.stagetypes import STAGE_TYPES, ORPOSchema

TYPE = STAGE_TYPES["orpo"]
Schema = ORPOSchema  # the `stages.<name>` section, declared with the type
# Ours, under the recipe's `train:`: the pair collator needs the rows' columns (TRL would switch
# `remove_unused_columns` off itself, with a warning).
DEFAULTS: dict[str, Any] = {"remove_unused_columns": False}


def __getattr__(name: str) -> Any:
    """`TRAINER_CONFIG` (`stages.<name>.train` takes its fields) and `Trainer`, built on first use."""
    if name == "TRAINER_CONFIG":
        return TYPE.trainer_config
    if name == "Trainer":
        return trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def trainer_class() -> type:
    """TRL's ORPOTrainer with the MoE parts (`MoETrainerMixin`, no reference installed) and the starting
    policy's evaluation."""

    class Trainer(preference.StartEvaluation, MoETrainerMixin, compat_trl.orpo_trainer()):
        copies_reference = False  # nothing to copy: ORPOTrainer builds no reference model

    Trainer.__qualname__ = "Trainer"
    return Trainer


def check(name: str, stage: Schema, ctx: StageContext, *, fetch: bool = True) -> preference.PreferenceInputs:
    return preference.check(
        name,
        stage,
        ctx,
        fetch=fetch,
        config_cls=TYPE.trainer_config,
        rows_of=lambda rows, key: preferences.dpo_pairs(rows, key=key, stage="orpo"),
        items_of=preference.pair_items,
        defaults=DEFAULTS,
        title="ORPO",
    )


def run(
    name: str,
    stage: Schema,
    inputs: preference.PreferenceInputs,
    ctx: StageContext,
    *,
    resume_from: str | None = None,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    return preference.run(
        name, stage, inputs, ctx, trainer_cls=trainer_class(), resume_from=resume_from, model=model
    )
