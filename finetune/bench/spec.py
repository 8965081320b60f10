"""Benchmark specs: one YAML file per benchmark under `eval/` naming its data and how to prompt and score
it. Three kinds: `generate` (sample or decode, extract an answer, score it), `multiple_choice`
(log-likelihood of each choice) and `classification` (a classifier adapter's predicted label)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError

from finetune.errors import UserError
from finetune.schema import Float, Int, Strict

SPECS = Path(__file__).resolve().parents[2] / "eval"  # the repository's eval/ folder


class Hub(Strict):
    path: str  # datasets.load_dataset name
    config: str | None = None
    split: str = "test"


class Data(Strict):
    sample: str | None = None  # bundled JSONL, relative to the spec file
    hub: Hub | None = None  # the full test set, fetched with `finetune eval fetch`


class FewShot(Strict):
    n: Int = Field(0, ge=0)
    data: str | None = None  # JSONL of examples (relative to the spec); default: the benchmark's own rows
    separator: str = "\n\n"


class Base(Strict):
    name: str
    description: str = ""
    version: Int = 1
    data: Data
    prompt: str  # a Python format string over a row's fields
    fewshot: FewShot = Field(default_factory=FewShot)


class Generate(Base):
    kind: Literal["generate"]
    target: str  # format string: the reference answer (before extraction)
    chat: bool = False  # send the prompt as a user turn through the model's chat template
    stop: list[str] = Field(default_factory=list)
    max_new_tokens: Int = Field(256, gt=0)
    samples: Int = Field(1, gt=0)  # completions per item (n > 1: sampled, for pass@k)
    temperature: Float = Field(0.0, ge=0)  # 0: greedy
    extract: Literal["none", "gsm8k", "boxed", "last_number", "choice_letter", "regex"] = "none"
    pattern: str | None = None  # the `regex` extractor's pattern (its first group is the answer)
    extract_target: bool = True  # apply the extractor to the target as well (GSM8K's "#### n")
    score: Literal["exact_match", "math_verify", "code_execution"] = "exact_match"
    normalize: list[Literal["strip", "lower", "no_commas", "no_punctuation"]] = Field(
        default_factory=lambda: ["strip"]
    )
    k: list[Int] = Field(default_factory=lambda: [1])  # pass@k reported for each k (code_execution)
    tests: str | None = None  # code_execution: format string of the test code appended to the completion
    choices: str | None = None  # choice_letter: the field listing the choices (to know the letters)
    timeout: Float = Field(10.0, gt=0)


class MultipleChoice(Base):
    kind: Literal["multiple_choice"]
    choices: str  # the field holding the list of choice texts (a dotted path: `choices.text`)
    gold: str  # the field holding the answer: an index, a letter, or a label of `labels`
    labels: str | None = None  # the field holding the choice labels (ARC's `choices.label`)
    continuation: str = " {choice}"  # how a choice follows the prompt


class Classification(Base):
    kind: Literal["classification"]
    label: str = "label"  # the field holding the gold label (a name or an id)


Spec = Annotated[Generate | MultipleChoice | Classification, Field(discriminator="kind")]


def known() -> list[str]:
    return sorted(p.stem for p in SPECS.glob("*.yaml"))


def load(name: str) -> Generate | MultipleChoice | Classification:
    """The spec `eval/<name>.yaml` (or a path to a spec file), checked: fields must fit its kind."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else SPECS / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown benchmark {name!r}; known: {', '.join(known())}")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a benchmark spec is a mapping")
    from pydantic import TypeAdapter

    try:
        spec = TypeAdapter(Spec).validate_python(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:] if not isinstance(p, int)) or ".".join(
            str(p) for p in first["loc"]
        )
        kind = raw.get("kind")
        if first["type"] == "extra_forbidden":
            raise UserError(f"{path}: `{where}` is not a field of a {kind} benchmark") from None
        raise UserError(f"{path}: `{where}`: {first['msg']}") from None
    if spec.kind == "generate":
        if spec.extract == "regex" and not spec.pattern:
            raise UserError(f"{path}: `extract: regex` needs `pattern`")
        if spec.extract == "choice_letter" and not spec.choices:
            raise UserError(
                f"{path}: `extract: choice_letter` needs `choices` (the field listing the choices)"
            )
        if spec.score == "code_execution" and not spec.tests:
            raise UserError(f"{path}: `score: code_execution` needs `tests`")
    spec_dir = path.parent
    for holder in (spec.data, spec.fewshot):
        for attr in ("sample", "data"):
            value = getattr(holder, attr, None)
            if value is not None and not Path(value).is_absolute():
                setattr(holder, attr, str(spec_dir / value))
    return spec


def field(row: dict[str, Any], path: str) -> Any:
    """A row's value at a dotted path (`choices.text`)."""
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(path)
        value = value[part]
    return value
