"""Preference rows as DPO and KTO read them: pairs (`chosen` / `rejected`, optional `prompt`) checked for
what teaches nothing, and KTO's unpaired rows (`prompt` / `completion` / `label`), from either form.

Pairs with an implicit prompt (two conversations sharing their first turns) are left to TRL, which
splits the shared turns off itself; KTO's conversion of pairs uses TRL's own `unpair_preference_dataset`
after the same split (`maybe_extract_prompt`), so each pair gives a desirable and an undesirable row.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from finetune import data
from finetune.errors import UserError


def _same(row: dict[str, Any]) -> bool:
    return row["chosen"] == row["rejected"]


def dpo_pairs(rows: Dataset, *, key: str, stage: str) -> Dataset:
    """`chosen` / `rejected` (+ `prompt`) pairs, both sides texts or both conversations, never identical."""
    pairs = data.preference_format(rows, key=key, what=f"a {stage} stage")
    for i, row in enumerate(pairs, 1):
        if _same(row):
            raise UserError(
                f"{key}: row {i}: `chosen` and `rejected` are identical; a pair without a difference "
                "teaches nothing, drop it"
            )
    return pairs.remove_columns([c for c in ("margin",) if c in pairs.column_names])


def kto_rows(rows: Dataset, *, key: str) -> Dataset:
    """`prompt` / `completion` / `label` rows, the label a boolean (True: desirable); preference pairs are
    split into one desirable and one undesirable row each."""
    from trl.data_utils import maybe_extract_prompt, unpair_preference_dataset

    columns = set(rows.column_names)
    if {"chosen", "rejected"} <= columns:
        pairs = dpo_pairs(rows, key=key, stage="kto")
        if "prompt" not in pairs.column_names:
            pairs = pairs.map(maybe_extract_prompt)
        return unpair_preference_dataset(pairs)
    missing = [c for c in ("prompt", "completion", "label") if c not in columns]
    if missing:
        raise UserError(
            f"{key}: a kto stage needs `prompt`, `completion` and `label` columns (or `chosen` / `rejected` "
            f"pairs); missing {', '.join(missing)} (found: {', '.join(sorted(columns))})"
        )
    for i, row in enumerate(rows, 1):
        if not isinstance(row["label"], bool):
            raise UserError(
                f"{key}: row {i}: `label` must be true or false (desirable or not), got {row['label']!r}"
            )
        kinds = {type(row["prompt"]).__name__, type(row["completion"]).__name__}
        if not kinds <= {"str", "list"} or len(kinds) > 1:
            raise UserError(
                f"{key}: row {i}: `prompt` and `completion` must both be texts or both message lists"
            )
        for field in ("prompt", "completion"):
            problem = data.conversation_problem(row[field], field) if isinstance(row[field], list) else None
            if problem is not None:
                raise UserError(f"{key}: row {i}: {problem}")
    labels = set(rows["label"])
    if len(labels) < 2:
        only = "desirable" if True in labels else "undesirable"
        data.warn(f"{key}: every row is {only}; KTO learns from both kinds (its weights balance them)")
    return rows.select_columns(["prompt", "completion", "label"])
