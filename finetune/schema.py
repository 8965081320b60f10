"""The typed pieces of a recipe that stage modules build on: strict models, YAML-1.1-safe scalar typing,
the model / adapter / data sections, and the trainer-argument defaults and bounds. `finetune.recipe`
assembles the whole recipe from these and the stage registry; nothing here reads YAML."""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from finetune import distributed
from finetune.errors import UserError
from finetune.health import Thresholds

# ------------------------------------------------------------------------------- values typed by schema


class Spelled(str):
    """A plain YAML scalar that YAML 1.1 reads as a bool or null (`no`, `off`, `yes`, `true`, `null`, `~`).

    YAML 1.1 turns `eval_strategy: no` (TRL's own spelling) into False before any schema sees it. The
    loader keeps the text as the user spelled it, with the YAML value in `.value`, and the schema decides
    (`_typed`): a field whose type takes a bool (or None) gets the YAML value, any other field (a string, a
    Literal of strings, a number) gets the text, so `no` stays "no" and `seed: true` is not an integer.
    Quoted scalars are plain strings, as before. Both the pydantic schema (`Strict`) and the TRL trainer
    fields (`_check_train_args`) resolve these, so a recipe file and a `key=value` override read alike.
    """

    value: bool | None

    def __new__(cls, text: str, value: bool | None = None) -> Spelled:
        self = super().__new__(cls, text)
        self.value = value
        return self


def _union_args(annotation: Any) -> tuple:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _union_args(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return tuple(a for arg in typing.get_args(annotation) for a in _union_args(arg))
    return (annotation,)


def _takes(annotation: Any, value: bool | None) -> bool:
    """Does the type accept this YAML 1.1 value (a bool or None) as it is?"""
    for arg in _union_args(annotation):
        if arg is Any or (value is None and arg is type(None)) or (isinstance(value, bool) and arg is bool):
            return True
        if typing.get_origin(arg) is Literal and any(v is value for v in typing.get_args(arg)):
            return True
    return False


def _typed(value: Any, annotation: Any) -> Any:
    """Give every `Spelled` scalar in `value` the form its type asks for (see `Spelled`), recursively."""
    if isinstance(value, Spelled):
        return value.value if _takes(annotation, value.value) else str(value)
    if isinstance(value, list | dict):
        for arg in _union_args(annotation):
            origin, params = typing.get_origin(arg) or arg, typing.get_args(arg)
            if arg is Any:
                origin, params = type(value), ()
            if isinstance(value, list) and origin in (list, tuple, set):
                item = params[0] if params else Any
                return [_typed(v, item) for v in value]
            if isinstance(value, dict) and origin is dict:
                k, v = params if len(params) == 2 else (Any, Any)
                return {_typed(key, k): _typed(val, v) for key, val in value.items()}
    return value


def _plain_str(value: Any) -> bool:
    """A string the user wrote as text (quoted, or any word YAML would not read as a bool or null)."""
    return isinstance(value, str) and not isinstance(value, Spelled)


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


# Numbers that refuse booleans (pydantic's lax mode reads True as 1).
Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]

# Fields holding raw mappings: trainer arguments are typed by the TRL config class (`_check_train_args`).
_UNTYPED_FIELDS = {"train", "provenance"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _spelled_values(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            str(key) if isinstance(key, Spelled) else key: value
            if key not in fields or key in _UNTYPED_FIELDS
            else _typed(value, fields[key].annotation)
            for key, value in data.items()
        }


class ModelConfig(Strict):
    preset: Literal["tiny", "tiny-v2"] | None = None
    path: str | None = None
    seed: Int = 0  # seeds the embedded presets' random weights, independent of the training seed
    quantization: Literal["nf4", "none"] = "nf4"
    double_quant: bool = True
    blocksize: Literal[32, 64, 128, 256] = 64  # NF4 block size of the routed experts
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    attn_implementation: str | None = None
    experts_implementation: Literal["eager", "grouped_mm", "batched_mm"] | None = None
    # auto: generation (eval, held-out checks) with a static cache and a compiled decode step on CUDA
    kernels: Literal["auto", "off"] = "auto"

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.preset is None) == (self.path is None):
            raise ValueError("give exactly one of `preset` (embedded model) or `path` (folder or Hub id)")
        return self


def _experts_kind(value: Any) -> str:
    """Which form `adapter.experts` takes (tags in brackets: error paths leave them out)."""
    if isinstance(value, ESFTConfig) or (isinstance(value, dict) and "select" in value):
        return "[esft]"
    return "[ids]" if isinstance(value, dict) else "[all]"


class ESFTConfig(Strict):
    """`adapter.experts: {select: esft, ...}`: train the routed experts a stage's data uses (docs/recipes.md, ESFT)."""

    select: Literal["esft"]
    score: Literal["gate", "token"] = "token"
    p: Float | None = Field(None, gt=0, le=1)  # cumulative score per layer; None: 0.1 (gate) / 0.2 (token)
    min_experts: Int | None = Field(None, ge=1)
    max_experts: Int | None = Field(None, ge=1)
    train: Literal["full", "lora"] = "full"
    samples: Int = Field(32, gt=0)  # training rows scored, from the start of the stage's train split
    max_length: Int = Field(4096, gt=0)  # tokens per scored row

    @model_validator(mode="after")
    def _bounds(self) -> ESFTConfig:
        if self.min_experts and self.max_experts and self.min_experts > self.max_experts:
            raise ValueError(f"min_experts {self.min_experts} is above max_experts {self.max_experts}")
        return self

    @property
    def threshold(self) -> float:
        return self.p if self.p is not None else {"gate": 0.1, "token": 0.2}[self.score]


class AdapterConfig(Strict):
    r: Int = Field(16, gt=0)
    alpha: Float = Field(32.0, gt=0)
    dropout: Float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["mla"], min_length=1)
    # Routed-expert LoRA (target `routed_experts`): its own rank/alpha, on all experts or {layer: [ids]}.
    expert_r: Int | None = Field(None, gt=0)
    expert_alpha: Float | None = Field(None, gt=0)
    # or {select: esft, ...}: the experts chosen by their scores on each stage's data (`ESFTConfig`).
    experts: Annotated[
        Annotated[Literal["all"], Tag("[all]")]
        | Annotated[ESFTConfig, Tag("[esft]")]
        | Annotated[dict[Int, list[Int] | Literal["all"]], Tag("[ids]")],
        Discriminator(_experts_kind),
    ] = "all"
    # Whole modules trained beside the LoRA (saved in the adapter folder): embeddings and/or lm_head.
    trainable_modules: list[Literal["embeddings", "lm_head"]] = Field(default_factory=list)
    # The MoE router: frozen, or its full fp32 weight trained with DeepSeek's expert-balance loss.
    router: Literal["frozen", "trainable"] = "frozen"
    router_aux_loss_coef: Float = Field(0.001, ge=0)  # DeepSeek-V2's aux_loss_alpha

    @model_validator(mode="before")
    @classmethod
    def _esft_alone(cls, data: Any) -> Any:
        experts = data.get("experts") if isinstance(data, dict) else None
        if isinstance(experts, dict) and "select" in experts and any(not isinstance(k, str) for k in experts):
            raise UserError(
                "adapter.experts: `select: esft` chooses the experts itself; drop the {layer: [ids]} entries "
                "or the `select` key"
            )
        return data

    @model_validator(mode="after")
    def _esft_targets(self) -> AdapterConfig:
        if isinstance(self.experts, ESFTConfig) and "routed_experts" not in self.targets:
            raise UserError(
                "adapter.targets: `experts: {select: esft}` trains routed experts; add `routed_experts` to targets"
            )
        return self


# How a source's rows are read (docs/recipes.md, Data sources): `auto` detects the format by its columns.
SourceFormat = Literal[
    "auto", "messages", "prompt_completion", "text", "alpaca", "sharegpt", "preference", "kto"
]


class SourceConfig(Strict):
    """One source of a mixture (`data.train` / `data.eval` as a list)."""

    path: str  # a local file or folder, or a Hub dataset name
    config: str | None = None  # Hub config name (default: data.config)
    split: str | None = None  # default: data.train_split (data.eval_split for eval sources)
    # A share of the mixture (≤ 1; the shares add up to 1) or a row count (a whole number > 1).
    weight: Float | None = Field(None, gt=0)
    columns: dict[str, str] = Field(default_factory=dict)  # {ours: theirs}: the source's columns renamed
    format: SourceFormat = "auto"


_ROUTING = Thresholds()  # the defaults live with the alarms (finetune/health.py)


class RoutingConfig(Strict):
    """Routing-health alarms of every training stage (docs/recipes.md, Routing health)."""

    min_entropy: Float = Field(_ROUTING.min_entropy, ge=0, le=1)  # 0: never warns
    max_share: Float = Field(_ROUTING.max_share, gt=0, le=1)  # 1: never warns
    dead_after_steps: Int = Field(_ROUTING.dead_after_steps, gt=0)
    max_sampler_kl: Float = Field(_ROUTING.max_sampler_kl, gt=0)


class DataConfig(Strict):
    train: str | Annotated[list[SourceConfig], Field(min_length=1)]
    eval: str | Annotated[list[SourceConfig], Field(min_length=1)] | None = None
    train_split: str = "train"  # splits and configs apply to Hub datasets (and local dataset folders)
    eval_split: str = "test"
    config: str | None = None  # Hub config name, e.g. `main` for openai/gsm8k: load_dataset(train, config)
    eval_config: str | None = None  # config of the eval and held-out data (default: `config`)
    max_samples: int | None = Field(None, gt=0)
    # Of a `train` / `eval` given as one path (a list's sources carry their own).
    format: SourceFormat = "auto"
    columns: dict[str, str] = Field(default_factory=dict)
    # Read `train` as it trains (datasets' IterableDataset): needs `train.max_steps`.
    streaming: bool = False

    @model_validator(mode="before")
    @classmethod
    def _list_is_train(cls, data: Any) -> Any:
        """`data: [sources]` is short for `data: {train: [sources]}`."""
        return {"train": data} if isinstance(data, list) else data

    @model_validator(mode="after")
    def _one_path_keys(self) -> DataConfig:
        if (self.format != "auto" or self.columns) and not any(
            isinstance(x, str) for x in (self.train, self.eval)
        ):
            key = "format" if self.format != "auto" else "columns"
            raise ValueError(f"`{key}` applies to a train or eval given as one path; set it on each source")
        return self


class PushConfig(Strict):
    """`stages.<name>.push`: upload the stage's adapter (or its export) to the Hub once it finishes."""

    repo: str  # the Hub model repo, e.g. you/model-name (created if missing)
    private: bool = False
    export: bool = False  # push `finetune export`'s merged checkpoint (base original) instead of the adapter

    @field_validator("repo")
    @classmethod
    def _hub_repo(cls, repo: str) -> str:
        try:
            validate_repo_id(repo)
        except HFValidationError:
            raise ValueError(
                "not a Hub repo id (name or namespace/name: letters, digits, '-', '_', '.'); e.g. you/model-name"
            ) from None
        return repo


class HeldoutConfig(Strict):
    """Exact-match check on held-out prompts, run before and after the stage trains."""

    data: str
    max_samples: Int | None = Field(100, gt=0)
    max_new_tokens: Int = Field(32, gt=0)
    batch_size: Int = Field(32, gt=0)


# Trainer arguments the toolkit sets itself, and the defaults it gives the rest. One place for both.
OWNED_TRAIN_KEYS = {
    "output_dir": "it is set to <output_dir>/<stage>",
    "seed": "set the top-level `seed` instead",
    "resume_from_checkpoint": "use `finetune run RECIPE --resume`, which continues every stage of the run folder",
}
# Checkpoints every 100 steps (and at the end), the last two kept: what `finetune run --resume` continues from.
TRAIN_DEFAULTS: dict[str, Any] = {
    "report_to": "none",
    "save_strategy": "steps",
    "save_steps": 100,
    "save_total_limit": 2,
    "logging_steps": 5,
}

# Bounds of the common numeric trainer arguments (None always passes): a value outside is a user error.
_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
TRAIN_BOUNDS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "learning_rate": _POSITIVE,
    "per_device_train_batch_size": _POSITIVE,
    "per_device_eval_batch_size": _POSITIVE,
    "gradient_accumulation_steps": _POSITIVE,
    "eval_accumulation_steps": _POSITIVE,
    "max_length": _POSITIVE,
    "max_steps": (lambda v: v == -1 or v > 0, "-1 (train num_train_epochs) or > 0"),
    "logging_steps": _POSITIVE,
    "save_steps": _POSITIVE,
    "eval_steps": _POSITIVE,
    "save_total_limit": _POSITIVE,
    "warmup_steps": _NON_NEGATIVE,
    "weight_decay": _NON_NEGATIVE,
    "max_grad_norm": _NON_NEGATIVE,
    "adam_beta1": _FRACTION,
    "adam_beta2": _FRACTION,
    "adam_epsilon": _POSITIVE,
    "label_smoothing_factor": _FRACTION,
    "dataloader_num_workers": _NON_NEGATIVE,
    "dataset_num_proc": _POSITIVE,
}


def train_arguments(stage: Any, *, dtype: str, cuda: bool) -> dict[str, Any]:
    """The stage's trainer arguments with the toolkit defaults filled in.

    Mixed precision follows `model.dtype` (TRL defaults to bf16, which the trainer refuses on CPU).
    """
    precision = {
        "bf16": dtype == "bfloat16" and cuda,
        "fp16": dtype == "float16" and cuda,
        "dataloader_pin_memory": cuda,
    }
    # Checkpoints are not written under FSDP (their routed-expert LoRA is saved by rank 0 alone).
    defaults = {**TRAIN_DEFAULTS, "save_strategy": "no"} if distributed.fsdp_launch() else TRAIN_DEFAULTS
    return split_global_batch({**defaults, **precision, **stage.train}, stage)


def split_global_batch(arguments: dict[str, Any], stage: Any) -> dict[str, Any]:
    """The recipe's batch (per_device_train_batch_size × gradient_accumulation_steps) is the global batch
    whatever the number of processes: under N processes the accumulation steps, else the per-device
    batch, are divided by N, so a recipe trains the same way on 1 or N GPUs."""
    n = distributed.world_size()
    if n == 1:
        return arguments
    per_device = arguments.get("per_device_train_batch_size", 8)
    accumulation = arguments.get("gradient_accumulation_steps", 1)
    if accumulation % n == 0:
        return {**arguments, "gradient_accumulation_steps": accumulation // n}
    if per_device % n == 0:
        return {**arguments, "per_device_train_batch_size": per_device // n}
    raise UserError(
        f"stages: the global batch ({per_device} × {accumulation} accumulation steps) does not split over "
        f"{n} processes; make per_device_train_batch_size or gradient_accumulation_steps a multiple of {n}"
    )
