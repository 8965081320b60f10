"""The recipe: one typed schema, YAML loading with `extends:`, and dotted `key=value` overrides.

Nothing else in the toolkit reads YAML. Every mistake becomes a `UserError` naming the key path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from finetune.errors import UserError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    preset: Literal["tiny", "tiny-v2"] | None = None
    path: str | None = None
    seed: int = 0  # seeds the embedded presets' random weights, independent of the training seed
    quantization: Literal["nf4", "none"] = "nf4"
    double_quant: bool = True
    blocksize: Literal[32, 64, 128, 256] = 64  # NF4 block size of the routed experts
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    attn_implementation: str | None = None
    experts_implementation: Literal["eager", "grouped_mm", "batched_mm"] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.preset is None) == (self.path is None):
            raise ValueError("give exactly one of `preset` (embedded model) or `path` (folder or Hub id)")
        return self


class AdapterConfig(Strict):
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["mla"], min_length=1)
    # Routed-expert LoRA (target `routed_experts`): its own rank/alpha, on all experts or {layer: [ids]}.
    expert_r: int | None = Field(None, gt=0)
    expert_alpha: float | None = Field(None, gt=0)
    experts: Literal["all"] | dict[int, list[int] | Literal["all"]] = "all"
    # Whole modules trained beside the LoRA (saved in the adapter folder): embeddings and/or lm_head.
    trainable_modules: list[Literal["embeddings", "lm_head"]] = Field(default_factory=list)
    # The MoE router: frozen, or its full fp32 weight trained with DeepSeek's expert-balance loss.
    router: Literal["frozen", "trainable"] = "frozen"
    router_aux_loss_coef: float = Field(0.001, ge=0)  # DeepSeek-V2's aux_loss_alpha


class DataConfig(Strict):
    train: str
    eval: str | None = None
    train_split: str = "train"  # splits apply to Hub datasets
    eval_split: str = "test"
    max_samples: int | None = Field(None, gt=0)


class HeldoutConfig(Strict):
    """Exact-match check on held-out prompts, run before and after the stage trains."""

    data: str
    max_samples: int | None = Field(100, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    batch_size: int = Field(32, gt=0)


class SFTStage(Strict):
    type: Literal["sft"]
    data: DataConfig
    train: dict[str, Any] = Field(default_factory=dict)
    heldout: HeldoutConfig | None = None


Stage = SFTStage


class Recipe(Strict):
    name: str
    output_dir: str
    seed: int = 42
    model: ModelConfig
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    stages: dict[str, Stage] = Field(min_length=1)
    # Written by `finetune run` into <output_dir>/recipe.yaml (library versions); ignored when read.
    provenance: dict[str, Any] | None = None

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, stages: dict[str, Stage]) -> dict[str, Stage]:
        for name in stages:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"stage name {name!r} may only hold letters, digits, '-' and '_'")
        return stages


# Trainer arguments the toolkit sets itself, and the defaults it gives the rest. One place for both.
OWNED_TRAIN_KEYS = {
    "output_dir": "it is set to <output_dir>/<stage>",
    "seed": "set the top-level `seed` instead",
}
TRAIN_DEFAULTS: dict[str, Any] = {
    "report_to": "none",
    "save_strategy": "no",
    "logging_steps": 5,
}


def trainer_config_class(stage_type: str) -> type:
    """The TRL config dataclass whose fields `stages.<name>.train` may set."""
    from trl import SFTConfig

    return {"sft": SFTConfig}[stage_type]


@functools.cache
def _trainer_fields(stage_type: str) -> dict[str, TypeAdapter]:
    cls = trainer_config_class(stage_type)
    hints = typing.get_type_hints(cls)
    return {f.name: TypeAdapter(hints[f.name]) for f in dataclasses.fields(cls) if f.init}


# ---------------------------------------------------------------------------------------------- errors


def _suggest(word: str, options: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean `{match[0]}`?)" if match else ""


def _fields_at(loc: tuple) -> list[str]:
    """Valid keys of the schema node at `loc` (stage names are skipped)."""
    node: Any = Recipe
    i = 0
    while i < len(loc):
        key = loc[i]
        field = node.model_fields.get(key)
        if field is None:
            return []
        node = field.annotation
        if key == "stages":
            node, i = Stage, i + 1  # skip the stage name
        args = [a for a in typing.get_args(node) if isinstance(a, type) and issubclass(a, BaseModel)]
        node = args[0] if args else node
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return []
        i += 1
    return list(node.model_fields)


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _explain(err: ValidationError, source: str) -> UserError:
    first = err.errors()[0]
    # Drop pydantic's union-member tags (`literal['all']`, `dict[int,...]`) from the key path.
    loc = tuple(
        p for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))
    )
    path = _dotted(loc) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        hint = _suggest(str(loc[-1]), _fields_at(loc[:-1]))
        return UserError(f"{source}: unknown key `{path}`{hint}")
    if kind == "missing":
        return UserError(f"{source}: missing key `{path}`")
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f", got {value!r}"
    return UserError(f"{source}: `{path}`: {msg}{shown}")


# ----------------------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
    return data


def _is_local_data(value: str) -> bool:
    return value.startswith((".", "/", "~")) or value.endswith(DATA_SUFFIXES)


def _anchor_paths(data: dict[str, Any], base: Path) -> None:
    """Make relative local paths absolute against `base` (the recipe file's folder), in place."""

    def anchor(value: Any) -> Any:
        if isinstance(value, str) and _is_local_data(value) and not Path(value).expanduser().is_absolute():
            return str((base / value).resolve())
        return value

    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        path = model["path"]
        if path.startswith(".") or (base / path).exists():
            model["path"] = str((base / path).resolve())
    stages = data.get("stages")
    for stage in stages.values() if isinstance(stages, dict) else ():
        if not isinstance(stage, dict):
            continue
        for section, keys in (("data", {"train", "eval"}), ("heldout", {"data"})):
            block = stage.get(section)
            if isinstance(block, dict):
                for key in keys & block.keys():
                    block[key] = anchor(block[key])


def _merge(base: dict[str, Any], child: dict[str, Any], path: tuple = ()) -> dict[str, Any]:
    """Deep-merge mappings (child wins, lists are replaced); a model source in the child replaces the base's."""
    out = dict(base)
    if path == ("model",) and ({"preset", "path"} & child.keys()):
        out.pop("preset", None)
        out.pop("path", None)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, (*path, key))
        else:
            out[key] = value
    return out


def _load_raw(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        cycle = " → ".join(p.name for p in (*chain, path))
        raise UserError(f"{chain[-1]}: `extends` cycle: {cycle}")
    data = _read_yaml(path)
    _anchor_paths(data, path.parent)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise UserError(f"{path}: `extends` must be a recipe file path, got {parent!r}")
    base_path = path.parent / parent
    if not base_path.is_file():
        raise UserError(f"{path}: `extends`: recipe not found: {base_path}")
    return _merge(_load_raw(base_path, (*chain, path)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (["a", "b", "c"], typed value). Values are YAML; `1e-4` is read as a number."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override {text!r}: expected key=value, e.g. stages.sft.train.learning_rate=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value) if any(c in value for c in ".eE") else int(value)
    return key.strip().split("."), value


def _check_override_key(keys: list[str], data: dict[str, Any], text: str) -> None:
    """The dotted key must name a key of the schema (or of the stage's TRL trainer config)."""
    node: type[BaseModel] | None = Recipe
    i = 0
    while i < len(keys):
        key = keys[i]
        if node is None:
            raise UserError(f"override `{text}`: `{'.'.join(keys[:i])}` has no sub-keys")
        if key not in node.model_fields:
            where = ".".join(keys[:i]) or "the recipe"
            raise UserError(f"override `{text}`: no key `{key}` in {where}{_suggest(key, node.model_fields)}")
        if node is Recipe and key == "stages":
            stages = data.get("stages") or {}
            name = keys[i + 1] if i + 1 < len(keys) else None
            if name not in stages:
                raise UserError(
                    f"override `{text}`: no stage `{name}` in stages{_suggest(str(name), stages)} "
                    f"(stages: {', '.join(stages) or 'none'})"
                )
            node, i = Stage, i + 2
            continue
        if issubclass(node, SFTStage) and key == "train":
            stage = data["stages"][keys[i - 1]]
            fields = _trainer_fields(stage.get("type", "sft") if isinstance(stage, dict) else "sft")
            arg = keys[i + 1] if i + 1 < len(keys) else None
            if arg is None:
                raise UserError(f"override `{text}`: name a trainer argument, e.g. {key}.learning_rate=1e-4")
            if arg not in fields:
                raise UserError(f"override `{text}`: no trainer argument `{arg}`{_suggest(arg, fields)}")
            if i + 2 != len(keys):
                raise UserError(f"override `{text}`: `{arg}` has no sub-keys")
            return
        annotation = node.model_fields[key].annotation
        models = [a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type)]
        models = [a for a in models if issubclass(a, BaseModel)]
        node = models[0] if models else None
        i += 1


def apply_override(data: dict[str, Any], text: str) -> None:
    keys, value = parse_override(text)
    _check_override_key(keys, data, text)
    if isinstance(value, str) and _is_local_data(value) and keys[-1] in ("train", "eval", "data", "path"):
        value = str(Path(value).expanduser().resolve())  # overrides are typed in the shell: CWD-relative
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"override `{text}`: `{key}` is not a mapping in this recipe")
    if keys[:1] == ["model"] and keys[-1] in ("preset", "path") and len(keys) == 2:
        node.pop("preset", None)
        node.pop("path", None)
    node[keys[-1]] = value


def _check_train_args(recipe: Recipe, source: str) -> None:
    for name, stage in recipe.stages.items():
        fields = _trainer_fields(stage.type)
        for key, value in list(stage.train.items()):
            path = f"stages.{name}.train.{key}"
            if key in OWNED_TRAIN_KEYS:
                raise UserError(f"{source}: `{path}` cannot be set: {OWNED_TRAIN_KEYS[key]}")
            if key not in fields:
                cls = trainer_config_class(stage.type).__name__
                raise UserError(
                    f"{source}: unknown trainer argument `{path}`{_suggest(key, fields)} (see trl.{cls})"
                )
            try:
                stage.train[key] = fields[key].validate_python(value)
            except ValidationError as err:
                msg = err.errors()[0]["msg"]
                raise UserError(f"{source}: `{path}`: {msg}, got {value!r}") from None


def load(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe file (following `extends:`), apply overrides, validate. Raises UserError."""
    path = Path(path)
    data = _load_raw(path)
    for text in overrides:
        apply_override(data, text)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise _explain(err, str(path)) from None
    _check_train_args(recipe, str(path))
    return recipe


def train_arguments(stage: Stage, *, dtype: str, cuda: bool) -> dict[str, Any]:
    """The stage's trainer arguments with the toolkit defaults filled in.

    Mixed precision follows `model.dtype` (TRL defaults to bf16, which the trainer refuses on CPU).
    """
    precision = {
        "bf16": dtype == "bfloat16" and cuda,
        "fp16": dtype == "float16" and cuda,
        "dataloader_pin_memory": cuda,
    }
    return {**TRAIN_DEFAULTS, **precision, **stage.train}


def dump(recipe: Recipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe.model_dump(exclude_none=True), sort_keys=False))
