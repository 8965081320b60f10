"""Datasets: local JSONL/JSON/Parquet/CSV files or Hub names, checked and put in the shape TRL expects."""

from __future__ import annotations

import contextlib
from pathlib import Path

import datasets
from datasets import Dataset

from finetune.errors import UserError, first_line

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_QUIET_ROWS = 20_000  # below this, reading and mapping take a blink: no progress bars


@contextlib.contextmanager
def _quiet(enabled: bool):
    was = datasets.is_progress_bar_enabled()
    if enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def is_local(spec: str) -> bool:
    return Path(spec).suffix in _BUILDERS or spec.startswith((".", "/", "~"))


def load_rows(spec: str, *, key: str, split: str = "train", max_samples: int | None = None) -> Dataset:
    """A local file, or a Hub dataset name through `datasets.load_dataset`. Empty data is an error."""
    if is_local(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"{key}: data file not found: {path}")
        builder = _BUILDERS.get(path.suffix)
        if builder is None:
            raise UserError(f"{key}: {path}: unsupported file type (use {', '.join(_BUILDERS)})")
        if path.stat().st_size == 0:
            raise UserError(f"{key}: dataset is empty: {path}")
        try:
            with _quiet(path.stat().st_size < 50_000_000):
                rows = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:  # the datasets library raises many types for malformed files
            raise UserError(f"{key}: cannot read {path}: {first_line(err)}") from None
    else:
        try:
            rows = datasets.load_dataset(spec, split=split)
        except Exception as err:
            raise UserError(f"{key}: cannot load Hub dataset {spec!r} (split {split!r}): {err}") from None
    if len(rows) == 0:
        raise UserError(f"{key}: dataset is empty: {spec}")
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    return rows


def sft_format(rows: Dataset, *, key: str) -> Dataset:
    """Conversational `messages`, `prompt`+`completion`, or plain `text`, shaped for TRL's SFTTrainer.

    `messages` become a conversational prompt (all turns but the last) and completion (the last,
    assistant turn). TRL then masks the prompt for any chat template, whereas its assistant-only
    loss needs `{% generation %}` markers that most real templates (DeepSeek's included) lack.
    """
    columns = set(rows.column_names)
    if "messages" in columns:
        bad = next(
            (i for i, r in enumerate(rows["messages"]) if not r or r[-1].get("role") != "assistant"), None
        )
        if bad is not None:
            raise UserError(f"{key}: row {bad}: `messages` must end with an assistant turn")
        with _quiet(len(rows) < _QUIET_ROWS):
            return rows.map(
                lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]},
                remove_columns=rows.column_names,
            )
    if {"prompt", "completion"} <= columns:
        return rows.select_columns(["prompt", "completion"])
    if "text" in columns:
        return rows.select_columns(["text"])
    raise UserError(
        f"{key}: needs a `messages` column, `prompt` + `completion` columns, or a `text` column; "
        f"found: {', '.join(sorted(columns))}"
    )


def prompt_target_pairs(rows: Dataset, *, key: str) -> tuple[list, list[str]]:
    """(prompts, reference answers) for generation checks; prompts are message lists or strings."""
    shaped = sft_format(rows, key=key)
    if "prompt" not in shaped.column_names:
        raise UserError(f"{key}: a held-out check needs `messages` or `prompt` + `completion` rows")
    targets = [c[-1]["content"] if isinstance(c, list) else c for c in shaped["completion"]]
    return list(shaped["prompt"]), targets
