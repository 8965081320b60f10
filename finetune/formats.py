"""A data source's columns renamed (`columns: {ours: theirs}`) and its format (`format:`) detected or
checked, with the community chat formats converted to `messages`:

- Alpaca (`instruction`, optional `input`, `output`, optional `system`): the instruction, with the
  input after a blank line, is the user turn, the output the assistant turn, a non-empty `system` the
  system prompt;
- ShareGPT (`conversations`: a list of `{from, value}`, optional `system` column): `human` / `user`
  → user, `gpt` / `assistant` → assistant, `system` → system; any other role is an error naming it.

The other formats are the column sets the stages read already (`messages`, `prompt` + `completion`,
`text`, `chosen` / `rejected` pairs, KTO's `prompt` / `completion` / `label`); naming one checks that
its columns are there. Conversions are `datasets` maps, so they work on a streamed source too.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset, IterableDataset

from finetune import data
from finetune.errors import UserError

FORMATS = ("auto", "messages", "prompt_completion", "text", "alpaca", "sharegpt", "preference", "kto")
# The columns each format needs (beyond them a source may carry others, e.g. a GRPO reward's).
NEEDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
    "preference": ("chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def rename(
    rows: Dataset | IterableDataset, columns: dict[str, str], names: list[str], *, key: str, source: str
):
    """`columns` maps our column names to the source's: each source column must exist; a name of ours
    that the source already has for another column would be shadowed, so it is refused."""
    for ours, theirs in columns.items():
        if theirs not in names:
            raise UserError(
                f"{key}.columns.{ours}: no column `{theirs}` in {data.shown(source)} "
                f"(its columns: {', '.join(names)})"
            )
        if ours in names and ours != theirs and ours not in columns.values():
            raise UserError(
                f"{key}.columns.{ours}: {data.shown(source)} already has a column `{ours}`; "
                f"map it elsewhere or drop this entry"
            )
    mapping = {theirs: ours for ours, theirs in columns.items() if ours != theirs}
    return rows.rename_columns(mapping) if mapping else rows


def detect(names: list[str] | set[str]) -> str | None:
    """The format `auto` reads from the column names, or None (the stage's own checks then speak)."""
    have = set(names)
    for fmt, needs in (
        ("messages", NEEDS["messages"]),
        ("sharegpt", NEEDS["sharegpt"]),
        ("alpaca", NEEDS["alpaca"]),
        ("preference", NEEDS["preference"]),
        ("kto", NEEDS["kto"]),
        ("prompt_completion", NEEDS["prompt_completion"]),
        ("text", NEEDS["text"]),
    ):
        if set(needs) <= have:
            return fmt
    return None


def resolve(fmt: str, names: list[str], *, key: str, source: str) -> str | None:
    """The format a source is read as: `auto`'s detection, or the one named, whose columns must be there."""
    if fmt == "auto":
        return detect(names)
    missing = [c for c in NEEDS[fmt] if c not in names]
    if missing:
        raise UserError(
            f"{key}.format: {fmt} needs column{'s' * (len(missing) > 1)} {', '.join(missing)}, which "
            f"{data.shown(source)} lacks (its columns: {', '.join(names)}); map them with `columns:`"
        )
    return fmt


def _text(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)


def alpaca_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """One Alpaca row as a conversation: [system], user (instruction + input), assistant (output)."""
    user = _text(row.get("instruction"))
    extra = _text(row.get("input")).strip()
    if extra:
        user = f"{user}\n\n{extra}" if user else extra
    system = _text(row.get("system")).strip()
    head = [{"role": "system", "content": row["system"]}] if system else []
    return [
        *head,
        {"role": "user", "content": user},
        {"role": "assistant", "content": _text(row.get("output"))},
    ]


def sharegpt_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """One ShareGPT row as a conversation; `where` names the row in the error for an unknown role."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: `conversations` must be a non-empty list of {{from, value}} turns")
    system = _text(row.get("system")).strip()
    out = [{"role": "system", "content": row["system"]}] if system else []
    for j, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise UserError(f"{where}: `conversations` item {j} is not a {{from, value}} turn")
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if role not in SHAREGPT_ROLES:
            raise UserError(
                f"{where}: `conversations` item {j}: unknown ShareGPT role {role!r} "
                f"(known: {', '.join(SHAREGPT_ROLES)}); fix the row or drop it"
            )
        out.append({"role": SHAREGPT_ROLES[role], "content": _text(value)})
    return out


def convert(rows: Dataset | IterableDataset, fmt: str | None, names: list[str], *, key: str, source: str):
    """Alpaca and ShareGPT rows as `messages` (their own columns dropped, the others kept); other formats
    as they are. Rows are named in errors as the source's file counts them."""
    if fmt not in ("alpaca", "sharegpt"):
        return rows
    consumed = [c for c in ("instruction", "input", "output", "system", "conversations") if c in names]
    name = data.row_namer(source)

    def one(row: dict[str, Any], i: int) -> dict[str, Any]:
        if fmt == "alpaca":
            return {"messages": alpaca_messages(row)}
        return {"messages": sharegpt_messages(row, f"{key}: {name(i)}")}

    if isinstance(rows, IterableDataset):
        return rows.map(one, with_indices=True, remove_columns=consumed)
    with data.quiet(len(rows) < data.QUIET_ROWS):
        return rows.map(one, with_indices=True, remove_columns=consumed)
