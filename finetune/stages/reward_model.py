"""`reward_model`: a trained reward model (a `type: reward` stage) as a reward function of the `rewards`
package. It loads a model through `finetune.predict`, so it lives here, and `register` puts it into
`rewards.REGISTRY` (GRPO does before it builds its rewards); the `rewards` package imports nothing of
`finetune`."""

from __future__ import annotations

from typing import Any

import rewards
from finetune.predict import Predictor
from finetune.scoring import join

_LOADED: dict[tuple[str, int], Any] = {}  # one loaded model per stage folder, shared by every call


def reward_model(
    completions: list, prompts: list | None = None, *, stage: str, batch_size: int = 8, **kwargs
) -> list[float]:
    """The score a reward stage's model gives each prompt + completion (`stage`: its folder,
    `RUN_DIR/STAGE`; in a recipe, the name of an earlier `type: reward` stage of the same run).

    Loaded once through `finetune.predict.Predictor` (the run's 4-bit loader and the stage's adapter);
    the prompt and completion are joined as the stage read its pairs, so the scores are the ones
    `finetune predict` writes for a `prompt` + `completion` row.
    """
    key = (stage, batch_size)
    if key not in _LOADED:
        _LOADED[key] = Predictor.load(stage, batch_size=batch_size)
    items = (
        completions if prompts is None else [join(p, c) for p, c in zip(prompts, completions, strict=True)]
    )
    return _LOADED[key].scores(items)


def register() -> None:
    """`reward_model` in `rewards.REGISTRY`, in place of the package's placeholder (idempotent)."""
    rewards.register("reward_model", reward_model)
