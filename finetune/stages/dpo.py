"""DPO on TRL's DPOTrainer: the policy is the 4-bit base + LoRA (fresh, or an earlier stage's adapter with
`init_from`), the reference the starting policy (a frozen copy of the starting adapter, or reference
log-probs precomputed once through it with `precompute_ref_log_probs`) or the base model; every
`loss_type` TRL's DPOConfig accepts passes through `train:`."""

from __future__ import annotations

from typing import Any

import torch
from trl import DPOTrainer

from finetune import preferences
from finetune.context import StageContext
from finetune.stages import preference
from finetune.stages.moe_trainer import MoETrainerMixin
from finetune.stagetypes import STAGE_TYPES, DPOSchema

TYPE = STAGE_TYPES["dpo"]
Schema = DPOSchema  # the `stages.<name>` section, declared with the type
TRAINER_CONFIG = TYPE.trainer_config  # `stages.<name>.train` takes its fields


class Trainer(preference.StartEvaluation, MoETrainerMixin, DPOTrainer):
    """TRL's DPOTrainer with the MoE parts (`MoETrainerMixin`) and the starting policy's evaluation."""

    copies_reference = True


def check(name: str, stage: Schema, ctx: StageContext, *, fetch: bool = True) -> preference.PreferenceInputs:
    return preference.check(
        name,
        stage,
        ctx,
        fetch=fetch,
        config_cls=TRAINER_CONFIG,
        rows_of=lambda rows, key: preferences.dpo_pairs(rows, key=key, stage="dpo"),
        items_of=preference.pair_items,
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
    return preference.run(name, stage, inputs, ctx, trainer_cls=Trainer, resume_from=resume_from, model=model)
