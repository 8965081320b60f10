"""SimPO on TRL's CPOTrainer (`trl.experimental`, through `finetune.compat.trl`) with its SimPO loss:
`loss_type: simpo` and `cpo_alpha: 0` (no behaviour-cloning term) unless `train:` says otherwise; the
reward is `beta` times the mean log-prob per completion token, the loss asks a margin of `simpo_gamma`
between the chosen and rejected rewards. The policy is the 4-bit base + LoRA (fresh, or an earlier
stage's adapter with `init_from`). No reference policy: no reference pass, no frozen adapter copy;
`reference:` is refused, and so is a `loss_type` other than SimPO's (CPO's DPO-like losses). `train:`
takes CPOConfig's fields.

TRL's experimental module is imported on first use of `TRAINER_CONFIG` or `Trainer` (a recipe with a
simpo stage), never by importing this module."""

from __future__ import annotations

from typing import Any

import torch

from finetune import preferences
from finetune.compat import trl as compat_trl
from finetune.context import StageContext
from finetune.errors import UserError
from finetune.stages import preference
from finetune.stagetypes import STAGE_TYPES, SimPOSchema

TYPE = STAGE_TYPES["simpo"]
Schema = SimPOSchema  # the `stages.<name>` section, declared with the type
# Ours, under the recipe's `train:`: CPOConfig defaults to CPO (sigmoid loss, cpo_alpha 1); its pair
# collator needs the rows' columns (TRL would switch `remove_unused_columns` off itself, with a warning).
DEFAULTS: dict[str, Any] = {"loss_type": "simpo", "cpo_alpha": 0.0, "remove_unused_columns": False}


trainer_class = preference.lazy_trainer(compat_trl.cpo_trainer)  # TRL's CPOTrainer + the MoE parts
__getattr__ = preference.lazy_attributes(TYPE, trainer_class)  # `TRAINER_CONFIG`, `Trainer` on first use


def check(name: str, stage: Schema, ctx: StageContext, *, fetch: bool = True) -> preference.PreferenceInputs:
    inputs = preference.check(
        name,
        stage,
        ctx,
        fetch=fetch,
        config_cls=TYPE.trainer_config,
        rows_of=lambda rows, key: preferences.dpo_pairs(rows, key=key, stage="simpo"),
        items_of=preference.pair_items,
        defaults=DEFAULTS,
        title="SimPO",
    )
    if inputs.args.loss_type != "simpo":  # TRL's `alphapo` is SimPO's loss too (its config says simpo)
        raise UserError(
            f"stages.{name}.train.loss_type: a simpo stage trains SimPO's loss ('simpo', or 'alphapo'), "
            f"not {stage.train['loss_type']!r}; drop the key"
        )
    return inputs


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
