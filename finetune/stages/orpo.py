"""ORPO on TRL's ORPOTrainer (`trl.experimental`, through `finetune.compat.trl`): the policy is the 4-bit
base + LoRA (fresh, or an earlier stage's adapter with `init_from`), trained on the chosen side's
language-model loss plus an odds-ratio term weighted by `beta` (ORPO's lambda). No reference policy:
no reference pass, no frozen adapter copy; `reference:` is refused. `train:` takes ORPOConfig's fields.

TRL's experimental module is imported on first use of `TRAINER_CONFIG` or `Trainer` (a recipe with an
orpo stage), never by importing this module."""

from __future__ import annotations

from typing import Any

import torch

from finetune import preferences
from finetune.compat import trl as compat_trl
from finetune.context import StageContext
from finetune.stages import preference
from finetune.stagetypes import STAGE_TYPES, ORPOSchema

TYPE = STAGE_TYPES["orpo"]
Schema = ORPOSchema  # the `stages.<name>` section, declared with the type
# Ours, under the recipe's `train:`: the pair collator needs the rows' columns (TRL would switch
# `remove_unused_columns` off itself, with a warning).
DEFAULTS: dict[str, Any] = {"remove_unused_columns": False}


trainer_class = preference.lazy_trainer(compat_trl.orpo_trainer)  # TRL's ORPOTrainer + the MoE parts
__getattr__ = preference.lazy_attributes(TYPE, trainer_class)  # `TRAINER_CONFIG`, `Trainer` on first use


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
