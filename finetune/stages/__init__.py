"""The stage types' runtime: one module per type, one line in `REGISTRY`.

A type is declared in `finetune.stagetypes` (its `Schema`, trainer config class and capabilities, in
`STAGE_TYPES`); its runtime module here exports `check(name, stage, ctx, *, fetch)` (everything that
can fail before training, no model load; returns the stage's inputs: `train`, the training rows or None
for a Hub dataset not fetched, and `report`, what validate prints per split) and `run(name, stage,
inputs, ctx, *, resume_from)`, plus `Schema` and `TRAINER_CONFIG` taken from its declaration.
The pipeline runs every stage through `REGISTRY`; the two registries have the same types, in order.
"""

from __future__ import annotations

from types import ModuleType

from finetune.stages import classify, dpo, eval, grpo, kto, orpo, reward, sft, simpo
from finetune.stagetypes import STAGE_TYPES

REGISTRY: dict[str, ModuleType] = {
    "sft": sft,
    "reward": reward,
    "classify": classify,
    "dpo": dpo,
    "kto": kto,
    "orpo": orpo,
    "simpo": simpo,
    "grpo": grpo,
    "eval": eval,
}

if list(REGISTRY) != list(STAGE_TYPES) or any(m.TYPE is not STAGE_TYPES[t] for t, m in REGISTRY.items()):
    raise ImportError(
        f"finetune.stages.REGISTRY ({', '.join(REGISTRY)}) and finetune.stagetypes.STAGE_TYPES "
        f"({', '.join(STAGE_TYPES)}) must register the same stage types in the same order"
    )
