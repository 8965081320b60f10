"""What a stage gets from the pipeline: where to write, and how to build the tokenizer and adapted model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from finetune.errors import UserError, first_line
from finetune.health import Thresholds
from finetune.model import adapters
from finetune.model.load import Source, load_model, load_tokenizer


@dataclass
class StageContext:
    name: str
    seed: int
    output_dir: Path
    source: Source
    model_kwargs: dict[str, Any]  # plain arguments of finetune.model.load.load_model
    adapter_kwargs: dict[str, Any]  # plain arguments of finetune.model.adapters.attach
    aux_loss_coef: float = 0.0  # expert-balance loss weight (only with a trainable router)
    kernels: str = "auto"  # model.kernels: fast generation where it applies (finetune.fast.generation)
    # adapter.experts: {select: esft}: plain arguments of `finetune.esft.apply`, run by `stages.common.fit`
    esft: dict[str, Any] | None = None
    stages: dict[str, str] = field(default_factory=dict)  # every stage of the recipe, in order: name → type
    routing: Thresholds = field(default_factory=Thresholds)  # the recipe's `routing:` alarms
    _tokenizer: PreTrainedTokenizerBase | None = field(default=None, repr=False)

    @property
    def dtype(self) -> str:
        return self.model_kwargs.get("dtype", "bfloat16")

    @property
    def cuda(self) -> bool:
        return torch.cuda.is_available()

    def trainer_config(self, cls: type, stage: str, arguments: dict[str, Any]) -> Any:
        """The TRL config of a stage; its own consistency checks become user errors naming the stage."""
        try:
            return cls(output_dir=str(self.output_dir / stage / "checkpoints"), seed=self.seed, **arguments)
        except (ValueError, TypeError) as err:
            raise UserError(f"stages.{stage}.train: {first_line(err)}") from None

    def earlier_stage(
        self, name: str, other: str, key: str, allowed: tuple[str, ...], listed: str = "stages: "
    ) -> None:
        """`other`, named at `key` by stage `name`, is a stage of this recipe that runs before it and has
        one of the `allowed` types (`init_from`, a reward model's `stage:`, an eval stage's `compare`)."""
        order = list(self.stages)
        if other not in self.stages:
            raise UserError(f"{key}: no stage {other!r} in this recipe ({listed}{', '.join(order)})")
        if order.index(other) >= order.index(name):
            raise UserError(f"{key}: stage {other!r} runs after {name!r}; name an earlier stage")
        if self.stages[other] not in allowed:
            raise UserError(
                f"{key}: stage {other!r} is a {self.stages[other]} stage; it must be {' or '.join(allowed)}"
            )

    def stage_dir(self, stage: str) -> Path:
        path = self.output_dir / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.source, seed=self.model_kwargs.get("seed", 0))
        return self._tokenizer

    def base_model(self, head: str = "causal_lm", **head_kwargs: Any) -> torch.nn.Module:
        """`head_kwargs`: `num_labels`, `pad_token_id` of a `seq_cls` head."""
        return load_model(self.source, **self.model_kwargs, head=head, **head_kwargs)

    def adapted_model(self, head: str = "causal_lm", **head_kwargs: Any) -> torch.nn.Module:
        # Seed before LoRA init so the same recipe gives the same starting adapter.
        torch.manual_seed(self.seed)
        return adapters.attach(self.base_model(head, **head_kwargs), **self.adapter_kwargs, head=head)

    def policy_model(self, init_from: str | None) -> torch.nn.Module:
        """A policy to train: the base + a fresh adapter, or + the adapter of the earlier stage `init_from`
        (trainable, routed-expert LoRA and router included)."""
        if init_from is None:
            return self.adapted_model()
        torch.manual_seed(self.seed)
        return adapters.load_adapter(
            self.base_model(), self.output_dir / init_from / "adapter", trainable=True
        )
