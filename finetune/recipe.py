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
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from finetune.context import StageContext
from finetune.errors import UserError
from finetune.health import Thresholds
from finetune.model.load import Source
from finetune.schema import (  # noqa: F401  (re-exported: the recipe's sections are part of its API)
    OWNED_TRAIN_KEYS,
    TRAIN_BOUNDS,
    TRAIN_DEFAULTS,
    AdapterConfig,
    DataConfig,
    ESFTConfig,
    Float,
    HeldoutConfig,
    Int,
    ModelConfig,
    RoutingConfig,
    Spelled,
    Strict,
    _plain_str,
    _takes,
    _typed,
    train_arguments,
)
from finetune.stagetypes import STAGE_TYPES

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")


def _stage_union() -> Any:
    """The stage schemas of the registry, told apart by their `type` (one schema: that schema)."""
    schemas = tuple(t.schema for t in STAGE_TYPES.values())
    if len(schemas) == 1:
        return schemas[0]
    return Annotated[typing.Union[schemas], Field(discriminator="type")]  # noqa: UP007


Stage = _stage_union()


def _known_type(stage_type: Any) -> str:
    """`stage_type` if registered, else the first registered type (to name keys before validation)."""
    if isinstance(stage_type, str) and stage_type in STAGE_TYPES:
        return stage_type
    return next(iter(STAGE_TYPES))


def stage_schema(stage_type: Any) -> type[BaseModel]:
    """The schema of a stage type (see `_known_type` for a type the registry does not have)."""
    return STAGE_TYPES[_known_type(stage_type)].schema


class Recipe(Strict):
    name: str
    output_dir: str
    seed: Int = 42
    model: ModelConfig
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)  # routing-health alarms
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

    def to_yaml(self) -> str:
        """The recipe as YAML text (`dump`; `rundir.write_recipe` writes it into the run folder)."""
        return yaml.dump(self.model_dump(exclude_none=True), Dumper=_Dumper, sort_keys=False)


def stage_context(recipe: Recipe, source: Source | None) -> StageContext:
    """What the stages of `recipe` get (`finetune.context`): its model and adapter sections as the plain
    arguments of `load_model` and `attach`. The pipeline, `predict` and `finetune eval` build it here."""
    m, a = recipe.model, recipe.adapter
    return StageContext(
        name=recipe.name,
        seed=recipe.seed,
        output_dir=Path(recipe.output_dir),
        source=source,
        model_kwargs=dict(
            quantization=m.quantization,
            dtype=m.dtype,
            double_quant=m.double_quant,
            blocksize=m.blocksize,
            attn_implementation=m.attn_implementation,
            experts_implementation=m.experts_implementation,
            seed=m.seed,
        ),
        aux_loss_coef=a.router_aux_loss_coef if a.router == "trainable" else 0.0,
        kernels=m.kernels,
        esft=_esft_arguments(a) if isinstance(a.experts, ESFTConfig) else None,
        stages={name: stage.type for name, stage in recipe.stages.items()},
        routing=Thresholds(**recipe.routing.model_dump()),
        adapter_kwargs=dict(
            r=a.r,
            alpha=a.alpha,
            dropout=a.dropout,
            targets=a.targets,
            expert_r=a.expert_r,
            expert_alpha=a.expert_alpha,
            router=a.router,
            trainable_modules=a.trainable_modules,
            experts=None
            if a.experts == "all"
            # ESFT: no expert LoRA at attach; the stage adds what the scores choose (`finetune.esft`)
            else {}
            if isinstance(a.experts, ESFTConfig)
            else {k: None if v == "all" else v for k, v in a.experts.items()},
        ),
    )


def _esft_arguments(a: AdapterConfig) -> dict[str, Any]:
    """`adapter.experts: {select: esft}` as the plain arguments of `finetune.esft.apply`."""
    e = a.experts
    assert isinstance(e, ESFTConfig)
    return dict(
        score=e.score,
        p=e.threshold,
        min_experts=e.min_experts,
        max_experts=e.max_experts,
        train=e.train,
        samples=e.samples,
        max_length=e.max_length,
        lora_r=a.expert_r or a.r,
        lora_alpha=a.expert_alpha or a.alpha,
        dropout=a.dropout,
    )


def trainer_config_class(stage_type: str) -> type | None:
    """The TRL config dataclass whose fields `stages.<name>.train` may set (None: the type trains nothing)."""
    return STAGE_TYPES[stage_type].trainer_config


@functools.cache
def _trainer_types(stage_type: str) -> dict[str, Any]:
    """Trainer argument → its annotation in the TRL config class."""
    cls = trainer_config_class(stage_type)
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


@functools.cache
def _trainer_fields(stage_type: str) -> dict[str, TypeAdapter]:
    return {name: TypeAdapter(hint) for name, hint in _trainer_types(stage_type).items()}


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
            # Skip the stage name; with several stage types pydantic adds the `type` tag after it.
            tag = loc[i + 2] if len(STAGE_TYPES) > 1 and len(loc) > i + 2 else None
            node, i = stage_schema(tag), i + (2 if tag in STAGE_TYPES else 1)
        args = [a for a in typing.get_args(node) if isinstance(a, type) and issubclass(a, BaseModel)]
        node = args[0] if args else node
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return []
        i += 1
    return list(node.model_fields)


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _explain(err: ValidationError, source: str) -> UserError:
    def untagged(loc: tuple) -> tuple:
        # Drop pydantic's union-member tags (`literal['all']`, `dict[int,...]`) from the key path.
        return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))

    # Of a union's failed members, the one that got deepest into the value says the most.
    first = max(err.errors(), key=lambda e: len(untagged(e["loc"])))
    loc = untagged(first["loc"])
    # With several stage types pydantic puts the stage's `type` tag after its name: not a key to show.
    tagged = len(loc) > 2 and loc[0] == "stages" and loc[2] in STAGE_TYPES
    path = _dotted(loc[:2] + loc[3:] if tagged else loc) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        hint = _suggest(str(loc[-1]), _fields_at(loc[:-1]))
        return UserError(f"{source}: unknown key `{path}`{hint}")
    if kind == "missing":
        return UserError(f"{source}: missing key `{path}`")
    if kind == "union_tag_not_found":
        return UserError(f"{source}: missing key `{path}.type` (stage types: {', '.join(STAGE_TYPES)})")
    if kind == "union_tag_invalid":
        tag = first.get("ctx", {}).get("tag")
        return UserError(
            f"{source}: `{path}.type`: no stage type {tag!r} (stage types: {', '.join(STAGE_TYPES)})"
        )
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f", got {value!r}"
    return UserError(f"{source}: `{path}`: {msg}{shown}")


# ----------------------------------------------------------------------------------------- loading


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as `safe_load` reads it, but bool/null words stay `Spelled` and duplicate keys are errors."""

    def construct_spelled(self, node: yaml.ScalarNode) -> Spelled | None:
        if node.value == "":  # `key:` with nothing after it
            return None
        return Spelled(node.value, self.construct_yaml_bool(node) if node.tag.endswith(":bool") else None)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                with contextlib.suppress(TypeError):  # unhashable keys: the base class reports them
                    if key in seen:
                        raise _DuplicateKey(
                            None,
                            None,
                            f"duplicate key `{key}` (first at line {seen[key]})",
                            key_node.start_mark,
                        )
                    seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.add_constructor("tag:yaml.org,2002:bool", _Loader.construct_spelled)
_Loader.add_constructor("tag:yaml.org,2002:null", _Loader.construct_spelled)


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(Spelled, lambda dumper, value: dumper.represent_str(str(value)))


def _yaml_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read the recipe ({err.strerror or err})") from None
    if b"\x00" in raw:
        raise UserError(f"{path}: a binary file, not a YAML recipe")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); save the recipe as UTF-8"
        ) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        data = yaml.load(_yaml_text(path), Loader=_Loader)  # a SafeLoader subclass
    except _DuplicateKey as err:
        raise UserError(f"{path}: line {err.problem_mark.line + 1}: {err.problem}") from None
    except yaml.reader.ReaderError as err:
        raise UserError(
            f"{path}: not a YAML text file (character #x{err.character:04x} at offset {err.position})"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a recipe") from None
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
        if not _plain_str(value) or Path(value).expanduser().is_absolute():
            return value
        # A relative folder beside the recipe (a `save_to_disk` dataset) is local too, not a Hub name.
        if _is_local_data(value) or (base / value).exists():
            return str((base / value).resolve())
        return value

    model = data.get("model")
    if isinstance(model, dict) and _plain_str(model.get("path")):
        path = model["path"]
        if path.startswith(".") or (base / path).exists():
            model["path"] = str((base / path).resolve())
    stages = data.get("stages")
    for stage in stages.values() if isinstance(stages, dict) else ():
        if not isinstance(stage, dict):
            continue
        for section, keys in (("data", {"train", "eval"}), ("heldout", {"data"})):
            block = stage.get(section)
            if isinstance(block, list):  # `data: [sources]`
                block = {"train": block}
            if isinstance(block, dict):
                for key in keys & block.keys():
                    if isinstance(block[key], list):  # a mixture's sources
                        for source in block[key]:
                            if isinstance(source, dict) and "path" in source:
                                source["path"] = anchor(source["path"])
                    else:
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
    if parent is None or (isinstance(parent, Spelled) and parent.value is None):
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
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""  # a SafeLoader subclass
    except yaml.YAMLError:
        value = raw
    if _plain_str(value):
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
            stage = stages[name]
            node, i = stage_schema(stage.get("type") if isinstance(stage, dict) else None), i + 2
            continue
        stage = data["stages"].get(keys[1]) if keys[0] == "stages" and i == 2 else None
        kind = stage.get("type") if isinstance(stage, dict) else None
        if key == "train" and keys[0] == "stages" and i == 2 and trainer_config_class(_known_type(kind)):
            fields = _trainer_fields(_known_type(kind))
            arg = keys[i + 1] if i + 1 < len(keys) else None
            if arg is None:
                raise UserError(f"override `{text}`: name a trainer argument, e.g. {key}.learning_rate=1e-4")
            if arg not in fields:
                raise UserError(f"override `{text}`: no trainer argument `{arg}`{_suggest(arg, fields)}")
            if i + 2 != len(keys):
                raise UserError(f"override `{text}`: `{arg}` has no sub-keys")
            return
        models = _models_in(node.model_fields[key].annotation)
        node = models[0] if models else None
        i += 1


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The schema classes a field's type can hold, through `Annotated` and unions at any depth (so
    `adapter.experts`, a tagged union, leads to `ESFTConfig`'s keys)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def apply_override(data: dict[str, Any], text: str) -> None:
    keys, value = parse_override(text)
    _check_override_key(keys, data, text)
    if _plain_str(value) and _is_local_data(value) and keys[-1] in ("train", "eval", "data", "path"):
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


def _public_name(cls: type) -> str:
    """Where users find a config class: `trl.SFTConfig`, `transformers.TrainingArguments`,
    `trl.experimental.orpo.ORPOConfig` (the package that exports it, not its defining module)."""
    parts = cls.__module__.split(".")
    package = parts[:3] if parts[1:2] == ["experimental"] else parts[:1]
    return ".".join([*package, cls.__name__])


def _check_train_args(recipe: Recipe, source: str) -> None:
    for name, stage in recipe.stages.items():
        if trainer_config_class(stage.type) is None:  # a stage that trains nothing has no `train:`
            continue
        fields = _trainer_fields(stage.type)
        for key, value in list(stage.train.items()):
            path = f"stages.{name}.train.{key}"
            if key in OWNED_TRAIN_KEYS:
                raise UserError(f"{source}: `{path}` cannot be set: {OWNED_TRAIN_KEYS[key]}")
            if key not in fields:
                cls = _public_name(trainer_config_class(stage.type))
                raise UserError(
                    f"{source}: unknown trainer argument `{path}`{_suggest(key, fields)} (see {cls})"
                )
            annotation = _trainer_types(stage.type)[key]
            typed = _typed(value, annotation)
            if isinstance(typed, bool) and not _takes(annotation, typed):  # lax pydantic reads True as 1
                raise UserError(
                    f"{source}: `{path}`: expected {getattr(annotation, '__name__', annotation)}, got {typed!r}"
                )
            try:
                stage.train[key] = checked = fields[key].validate_python(typed)
            except ValidationError as err:
                msg = err.errors()[0]["msg"]
                raise UserError(f"{source}: `{path}`: {msg}, got {value!r}") from None
            if key in TRAIN_BOUNDS and isinstance(checked, int | float):
                ok, text = TRAIN_BOUNDS[key]
                if not ok(checked):
                    raise UserError(f"{source}: `{path}` must be {text}, got {checked!r}")
        _check_training_length(name, stage, source)


def _check_training_length(name: str, stage: Stage, source: str) -> None:
    """`max_steps: -1` trains `num_train_epochs`: at 0 or below, no step would run and an untrained adapter
    would be saved as the result."""
    defaults = {f.name: f.default for f in dataclasses.fields(trainer_config_class(stage.type))}
    args = {**defaults, **TRAIN_DEFAULTS, **stage.train}
    if args["max_steps"] <= 0 and args["num_train_epochs"] <= 0:
        raise UserError(
            f"{source}: `stages.{name}.train.num_train_epochs` must be > 0 when max_steps is -1 "
            f"(no training step would run), got {args['num_train_epochs']!r}"
        )


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


def dump(recipe: Recipe, path: Path) -> None:
    path.write_text(recipe.to_yaml())
