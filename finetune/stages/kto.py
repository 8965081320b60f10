"""KTO on TRL's KTOTrainer: unpaired desirable / undesirable completions (or preference pairs, split),
on the 4-bit base + LoRA, with the same starting policy and reference as DPO (`stages.preference`);
`desirable_weight` / `undesirable_weight` and TRL's KTO loss types pass through `train:`."""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from trl import KTOTrainer

from finetune import preferences, scoring
from finetune.context import StageContext
from finetune.stages import preference
from finetune.stages.moe_trainer import MoETrainerMixin
from finetune.stagetypes import STAGE_TYPES, KTOSchema

TYPE = STAGE_TYPES["kto"]
Schema = KTOSchema  # the `stages.<name>` section, declared with the type
TRAINER_CONFIG = TYPE.trainer_config  # `stages.<name>.train` takes its fields


class Trainer(preference.StartEvaluation, MoETrainerMixin, KTOTrainer):
    """TRL's KTOTrainer with the MoE parts (`MoETrainerMixin`) and the starting policy's evaluation."""

    copies_reference = True


def _items(rows: Dataset) -> list[list]:
    return [[scoring.join(r["prompt"], r["completion"])] for r in rows]


def check(name: str, stage: Schema, ctx: StageContext, *, fetch: bool = True) -> preference.PreferenceInputs:
    return preference.check(
        name,
        stage,
        ctx,
        fetch=fetch,
        config_cls=TRAINER_CONFIG,
        rows_of=lambda rows, key: preferences.kto_rows(rows, key=key),
        items_of=_items,
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
