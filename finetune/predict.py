"""Batch inference with a trained classifier or reward model: the run's loader (4-bit base, same
adapter), the sequences read as the stage read them (`finetune.scoring`).

    from finetune.predict import Predictor
    rm = Predictor.load("runs/tiny-reward/reward")
    rm.scores(["a text", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]])

`finetune predict RUN_DIR/STAGE --input FILE --output FILE.jsonl` writes `Predictor.predict`'s rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune import data, labels, rundir, scoring
from finetune import recipe as recipe_mod
from finetune.errors import UserError, first_line
from finetune.model import adapters
from finetune.model.load import resolve_source
from finetune.stagetypes import STAGE_TYPES


@dataclass
class Predictor:
    model: torch.nn.Module
    tokenizer: Any
    kind: str  # classify | reward
    labels: list[str]  # the classifier's label names in id order; ["score"] for a reward model
    multi_label: bool
    max_length: int | None
    batch_size: int = 8

    @classmethod
    def load(cls, stage_dir: str | Path, *, batch_size: int = 8) -> Predictor:
        """A finished `classify` or `reward` stage of a run folder, loaded as the run loaded its model."""
        from transformers import AutoTokenizer

        recipe, kind, head = stage_of(stage_dir)
        folder = Path(stage_dir) / "adapter"
        names = head.get("labels") or ["score"]
        multi = bool(head.get("multi_label"))
        ctx = recipe_mod.stage_context(recipe, resolve_source(recipe.model.preset, recipe.model.path))
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = ctx.base_model(
            STAGE_TYPES[kind].head,
            num_labels=len(names),
            pad_token_id=tokenizer.pad_token_id,
            labels=names if kind == "classify" else None,
            multi_label=multi,
        )
        try:
            model = adapters.load_adapter(model, folder)
        except (RuntimeError, ValueError, KeyError) as err:
            raise UserError(
                f"{folder}: the adapter does not fit the run's model ({first_line(err)})"
            ) from None
        model.eval()
        return cls(model, tokenizer, kind, names, multi, head.get("max_length"), batch_size)

    def outputs(self, items: Sequence[str | list[dict]], desc: str | None = None) -> torch.Tensor:
        """The head's raw outputs for texts or conversations ([len(items), len(self.labels)])."""
        sequences = [scoring.encode(self.tokenizer, item, self.max_length) for item in items]
        return scoring.head_outputs(
            self.model, self.tokenizer, sequences, batch_size=self.batch_size, desc=desc
        )

    def scores(self, items: Sequence[str | list[dict]], desc: str | None = None) -> list[float]:
        """A reward model's score of each text or conversation."""
        return self.outputs(items, desc)[:, 0].tolist()

    def classify(self, items: Sequence[str | list[dict]], desc: str | None = None) -> list[dict[str, Any]]:
        """A classifier's `label` (multi-label: `labels`) and `probabilities` (label → probability) per item."""
        logits = self.outputs(items, desc)
        probabilities = labels.probabilities(logits, self.multi_label)
        out = []
        for chosen, row in zip(labels.decide(logits, self.multi_label), probabilities.tolist(), strict=True):
            answer = (
                {"labels": [self.labels[j] for j in chosen]}
                if self.multi_label
                else {"label": self.labels[chosen]}
            )
            out.append({**answer, "probabilities": dict(zip(self.labels, row, strict=True))})
        return out

    def predict(
        self, rows: Sequence[dict[str, Any]], *, key: str = "--input", progress: bool = False
    ) -> list[dict]:
        """One output row per input row, in order (see `items_of` for the columns each kind reads)."""
        form, items = items_of(self.kind, rows, key)
        desc = "predict" if progress else None
        if form == "classify":
            return self.classify(items, desc)
        values = self.scores(items, desc)
        if form == "pairs":
            return [
                {"chosen_score": c, "rejected_score": r}
                for c, r in zip(values[0::2], values[1::2], strict=True)
            ]
        return [{"score": v} for v in values]


def stage_of(stage_dir: str | Path) -> tuple[Any, str, dict[str, Any]]:
    """(the run's recipe, the stage type, its head description) of a finished classify or reward stage."""
    stage_dir = Path(stage_dir)
    run_dir, name = stage_dir.parent, stage_dir.name
    recipe_path = run_dir / "recipe.yaml"
    if not recipe_path.is_file():
        raise UserError(f"{stage_dir}: not a stage of a run folder (no {recipe_path}); give RUN_DIR/STAGE")
    recipe = recipe_mod.load(recipe_path)
    stage = recipe.stages.get(name)
    if stage is None:
        raise UserError(f"{stage_dir}: the run has no stage {name!r} (stages: {', '.join(recipe.stages)})")
    if not STAGE_TYPES[stage.type].predict:
        raise UserError(
            f"{stage_dir}: predict needs a classify or reward stage; {name!r} is a {stage.type} stage"
        )
    head_file = stage_dir / "adapter" / adapters.HEAD_FILE
    if not head_file.is_file():
        raise UserError(f"{stage_dir}: the stage has not finished (no {head_file}); run it first")
    return recipe, stage.type, json.loads(head_file.read_text())


def items_of(kind: str, rows: Sequence[dict[str, Any]], key: str) -> tuple[str, list]:
    """What a model of `kind` reads from the rows: (`classify` | `pairs` | `single`, items in order).

    A classifier reads `text` or `messages`. A reward model reads `chosen` + `rejected` (optional
    `prompt`; two items per row, chosen first), or one sequence: `prompt` + `completion`, `text`, or
    `messages`."""
    columns = set(rows[0]) if rows else set()
    found = ", ".join(sorted(columns))
    if kind == "classify":
        column = "text" if "text" in columns else "messages" if "messages" in columns else None
        if column is None:
            raise UserError(f"{key}: a classifier reads a `text` or `messages` column (found: {found})")
        return "classify", [r[column] for r in rows]
    try:
        if {"chosen", "rejected"} <= columns:
            return "pairs", scoring.pair_items(rows)
        if {"prompt", "completion"} <= columns:
            return "single", [scoring.join(r["prompt"], r["completion"]) for r in rows]
    except ValueError as err:
        raise UserError(f"{key}: {err}") from None
    if "text" in columns or "messages" in columns:
        return "single", [r["text" if "text" in columns else "messages"] for r in rows]
    raise UserError(
        f"{key}: a reward model reads `chosen` + `rejected` pairs, `prompt` + `completion`, `text` or "
        f"`messages` (found: {found})"
    )


def predict_file(stage_dir: str | Path, source: str, output: str | Path, *, batch_size: int = 8) -> int:
    """`finetune predict`: read `source` (a local file, or a Hub dataset's train split), write one JSON
    row per input row to `output`; returns the row count. Nothing is written on bad input."""
    output = Path(output)
    if output.is_dir():
        raise UserError(f"--output: {output} is a folder; give a file such as predictions.jsonl")
    rows = data.load_rows(source, key="--input").to_list()
    _, kind, _ = stage_of(stage_dir)
    items_of(kind, rows, "--input")  # columns checked before the model loads
    predictor = Predictor.load(stage_dir, batch_size=batch_size)
    results = predictor.predict(rows, progress=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_text(output, "".join(json.dumps(r) + "\n" for r in results))
    return len(results)
