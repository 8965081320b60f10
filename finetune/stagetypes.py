"""The stage types, declared: each type's `stages.<name>` section (`Schema`), the trainer config class
whose fields `train:` takes, and what the type can do (`StageType`). One registry, `STAGE_TYPES`.

Declarative: no trainer and no model is imported here (TRL's config classes only), so the recipe
builds its stage union from this module. A config class of TRL's unstable `trl.experimental` (ORPO's,
CPO's), whose package imports its trainer, is declared by the `finetune.compat.trl` function that
returns it, called on first use. What a type does when it runs is its runtime module,
`finetune/stages/<type>.py`, registered in `finetune.stages.REGISTRY` (the same keys, checked there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator
from transformers import TrainingArguments
from trl import DPOConfig, GRPOConfig, KTOConfig, RewardConfig, SFTConfig

from finetune.compat import trl as compat_trl
from finetune.schema import DataConfig, Float, HeldoutConfig, Int, PushConfig, Strict

# ------------------------------------------------------------------------------------------- schemas


class SFTSchema(Strict):
    """`stages.<name>` of `type: sft`."""

    type: Literal["sft"]
    data: DataConfig
    train: dict[str, Any] = Field(default_factory=dict)
    push: PushConfig | None = None  # upload the adapter (or its export) when the stage finishes
    heldout: HeldoutConfig | None = None


class RewardSchema(Strict):
    """`stages.<name>` of `type: reward`: `chosen` / `rejected` pairs (optional `prompt`, `margin`)."""

    type: Literal["reward"]
    data: DataConfig
    train: dict[str, Any] = Field(default_factory=dict)
    push: PushConfig | None = None  # upload the adapter (or its export) when the stage finishes


class ClassifySchema(Strict):
    """`stages.<name>` of `type: classify`: `text` or `messages` rows with a `label` (a name or an id;
    a list of them with `multi_label`)."""

    type: Literal["classify"]
    data: DataConfig
    labels: list[str] | None = Field(None, min_length=2)  # names in id order; default: from the train data
    num_labels: Int | None = Field(None, ge=2)  # a check: must agree with the labels found
    multi_label: bool = False
    class_weights: Literal["balanced"] | dict[str, Float] | None = None
    max_length: Int = Field(512, gt=0)  # tokens kept from the start of each text
    train: dict[str, Any] = Field(default_factory=dict)
    push: PushConfig | None = None  # upload the adapter (or its export) when the stage finishes


class GRPOSchema(Strict):
    """`stages.<name>` of `type: grpo`: prompts (`prompt`, or `messages` whose last assistant turn becomes
    the `answer` column) scored by `rewards`."""

    type: Literal["grpo"]
    data: DataConfig
    rewards: list[dict[str, Any]] = Field(min_length=1)  # {name: ..., on_error: raise|zero, <arguments>}
    init_from: str | None = None  # an earlier stage (`policy_init`) whose adapter the policy continues
    reference: Literal["init", "base"] = "init"  # the KL's reference (beta > 0): the starting policy, or base
    # Whose experts the training passes use: the rollout's (R3), the old-policy pass's (R2), or their own.
    routing_replay: Literal["rollout", "old_policy", "off"] = "rollout"
    # Prompts from other columns: a Python format string over a row's columns (e.g. "{question}"), sent as
    # the user turn of a conversation (after `system_prompt`, when given).
    prompt_template: str | None = None
    system_prompt: str | None = None
    max_prompt_length: Int | None = Field(None, gt=0)  # longer prompts are dropped (validate counts them)
    samples_per_log: Int = Field(4, ge=0)  # completions written to samples.jsonl per logging step
    heldout: HeldoutConfig | None = None  # greedy exact match before / after, as SFT's
    train: dict[str, Any] = Field(default_factory=dict)
    push: PushConfig | None = None  # upload the adapter (or its export) when the stage finishes

    @field_validator("routing_replay", mode="before")
    @classmethod
    def _replay_as_bool(cls, value: Any) -> Any:
        """The earlier spelling: true (the rollout's experts) or false (off)."""
        if isinstance(value, bool):
            return "rollout" if value else "off"
        return {"true": "rollout", "false": "off"}.get(value, value) if isinstance(value, str) else value


class _PreferenceSchema(Strict):
    data: DataConfig
    init_from: str | None = None  # an earlier stage (`policy_init`) whose adapter the policy continues
    # The reference policy: the starting policy (base + the `init_from` adapter; the base without one),
    # or the base model whatever the start.
    reference: Literal["init", "base"] = "init"
    train: dict[str, Any] = Field(default_factory=dict)
    push: PushConfig | None = None  # upload the adapter (or its export) when the stage finishes


class DPOSchema(_PreferenceSchema):
    """`stages.<name>` of `type: dpo`: `chosen` / `rejected` pairs (optional `prompt`), through TRL's
    DPOTrainer and any of its `loss_type`s."""

    type: Literal["dpo"]


class KTOSchema(_PreferenceSchema):
    """`stages.<name>` of `type: kto`: `prompt` / `completion` / `label` rows (a boolean: desirable or
    not), or preference pairs, each split into a desirable and an undesirable row."""

    type: Literal["kto"]


class _ReferenceFreeSchema(Strict):
    data: DataConfig
    init_from: str | None = None  # an earlier stage (`policy_init`) whose adapter the policy continues
    # No reference policy: the loss reads the policy alone. Accepted by the schema so that setting it is
    # the stage's own one-line error (`preference.check`), not a bare unknown key.
    reference: Literal["init", "base"] | None = None
    train: dict[str, Any] = Field(default_factory=dict)
    push: PushConfig | None = None  # upload the adapter (or its export) when the stage finishes


class ORPOSchema(_ReferenceFreeSchema):
    """`stages.<name>` of `type: orpo`: `chosen` / `rejected` pairs (optional `prompt`), through TRL's
    ORPOTrainer (`trl.experimental`): the chosen side's language-model loss plus an odds-ratio term
    (`beta`, ORPO's lambda), reference-free."""

    type: Literal["orpo"]


class SimPOSchema(_ReferenceFreeSchema):
    """`stages.<name>` of `type: simpo`: `chosen` / `rejected` pairs (optional `prompt`), through TRL's
    CPOTrainer (`trl.experimental`) with its SimPO loss (`loss_type: simpo`, `cpo_alpha: 0` by
    default): length-normalized log-probs with a target margin (`simpo_gamma`), reference-free."""

    type: Literal["simpo"]


class EvalSchema(Strict):
    """`stages.<name>` of `type: eval`."""

    type: Literal["eval"]
    benchmarks: list[str] = Field(min_length=1)  # names of eval/<name>.yaml, or spec files
    compare: list[str] = Field(default_factory=lambda: ["base"])  # `base` and/or earlier stages
    limit: Int | None = Field(None, gt=0)  # the first N items of each benchmark
    batch_size: Int = Field(16, gt=0)


# -------------------------------------------------------------------------------------- capabilities


@dataclass(frozen=True)
class StageType:
    """A stage type's declaration: its section, its trainer config and what it can do."""

    schema: type[Strict]  # the `stages.<name>` section, with `type: Literal[<name>]`
    # The config class whose fields `train:` takes, or a function returning it (imported on first use:
    # `trainer_config`); None: trains nothing.
    config: type | Callable[[], type] | None
    head: Literal["causal_lm", "seq_cls"] | None  # the head its adapter is trained on; None: no adapter
    fsdp: bool = False  # trains under an FSDP launch (`stages.common.fit` shards the model)
    policy_init: bool = False  # its adapter may start a GRPO policy (`init_from`)
    predict: bool = False  # `finetune predict` / `Predictor` load it (a trained head's outputs)
    reward_model: bool = False  # its model scores completions as a reward (GRPO's `reward_model`, `stage:`)
    reference_free: bool = False  # no reference policy in its loss: no reference pass, `reference:` refused
    esft: bool = False  # trains with `adapter.experts: {select: esft}` (scored from its own data)

    @property
    def trainer_config(self) -> type | None:
        """The config class whose fields `train:` takes (None: the type trains nothing)."""
        config = self.config
        return config if config is None or isinstance(config, type) else config()

    @property
    def adapter(self) -> bool:
        """It saves an adapter (an eval stage's `compare` may name it)."""
        return self.head is not None


STAGE_TYPES: dict[str, StageType] = {
    "sft": StageType(SFTSchema, SFTConfig, "causal_lm", fsdp=True, policy_init=True, esft=True),
    "reward": StageType(
        RewardSchema, RewardConfig, "seq_cls", fsdp=True, predict=True, reward_model=True, esft=True
    ),
    "classify": StageType(ClassifySchema, TrainingArguments, "seq_cls", fsdp=True, predict=True, esft=True),
    "dpo": StageType(DPOSchema, DPOConfig, "causal_lm", policy_init=True),
    "kto": StageType(KTOSchema, KTOConfig, "causal_lm", policy_init=True),
    # Reference-free; their config classes are TRL's experimental ones, imported on first use.
    "orpo": StageType(ORPOSchema, compat_trl.orpo_config, "causal_lm", policy_init=True, reference_free=True),
    "simpo": StageType(
        SimPOSchema, compat_trl.cpo_config, "causal_lm", policy_init=True, reference_free=True
    ),
    "grpo": StageType(GRPOSchema, GRPOConfig, "causal_lm", policy_init=True, esft=True),
    "eval": StageType(EvalSchema, None, None),
}


def types_with(capability: str) -> tuple[str, ...]:
    """The stage types that have `capability` (a `StageType` flag or property), in registry order."""
    return tuple(name for name, t in STAGE_TYPES.items() if getattr(t, capability))
