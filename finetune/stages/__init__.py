"""Stage types as plug-ins: one module per type, one line in `REGISTRY`.

Each module exports `Schema` (its `stages.<name>` section, a `finetune.schema.Strict` model with a
`type: Literal[...]`), `TRAINER_CONFIG` (the TRL config class whose fields `train:` takes), `check(name,
stage, ctx, *, fetch)` (everything that can fail before training, no model load; returns the stage's
inputs: `train`, the training rows or None for a Hub dataset not fetched, and `report`, what
validate prints per split) and `run(name, stage, inputs, ctx, *, resume_from)`.
The recipe's stage union, the override checks, the pipeline and the CLI all go through `REGISTRY`.
"""

from __future__ import annotations

from types import ModuleType

from finetune.stages import classify, eval, grpo, reward, sft

REGISTRY: dict[str, ModuleType] = {
    "sft": sft,
    "reward": reward,
    "classify": classify,
    "grpo": grpo,
    "eval": eval,
}
