"""Datasets: local files and folders or Hub names, checked and put in the shape TRL expects; what TRL makes of them.

`load_rows` reads a split (a local file, a folder written by `Dataset.save_to_disk`, a folder of data
files or a local copy of a Hub dataset repository, or a Hub dataset name), `sft_format` checks the rows
and shapes them for TRL's SFTTrainer, and `measure` runs TRL's own dataset preparation on them to report
how many rows the trainer keeps and how long they are in tokens. Every problem is a one-line `UserError`
naming the recipe key, the file and, where it helps, the row or line.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, IterableDataset

from finetune.compat import CompatError
from finetune.compat import trl as compat_trl
from finetune.errors import UserError, first_line

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
LOCAL_SUFFIXES = (*_BUILDERS, ".arrow")
QUIET_ROWS = 20_000  # below this, reading and mapping take a blink: no progress bars
# A Hub dataset name: `name` or `owner/name`. Anything else (more slashes, spaces, ...) can only be a path.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Share of a split's rows whose trainable tokens `max_length` cuts above which `validate` and `run` warn.
CUT_WARN_SHARE = 0.05


@contextlib.contextmanager
def quiet(enabled: bool) -> Iterator[None]:
    """No progress bars for small data, and none of datasets' own error logging (we raise our own)."""
    was = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    if enabled:
        datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if was:
            datasets.enable_progress_bars()


def is_local(spec: str) -> bool:
    """A path on this machine (never sent to the Hub): a known data suffix, `.`/`/`/`~`, an existing path,
    or anything that cannot be a Hub dataset name (`name` or `owner/name`)."""
    return (
        Path(spec).suffix in LOCAL_SUFFIXES
        or spec.startswith((".", "/", "~"))
        or Path(spec).expanduser().exists()
        or not _HUB_NAME.match(spec)
    )


def load_rows(
    spec: str,
    *,
    key: str,
    split: str = "train",
    config: str | None = None,
    max_samples: int | None = None,
    split_key: str | None = None,
    config_key: str | None = None,
) -> Dataset:
    """One split of a local file or folder, or of a Hub dataset (`datasets.load_dataset(name, config,
    split=...)`), capped at `max_samples` rows. Missing, unreadable or empty data is a `UserError`.

    `key` names the recipe key of `spec`; `split_key` / `config_key` those of the split and config names.
    """
    where = _Where(spec, key, split, config, split_key, config_key)
    rows = _load_local(Path(spec).expanduser(), where) if is_local(spec) else _load_hub(spec, where)
    if len(rows) == 0:
        raise UserError(f"{key}: dataset is empty: {spec}")
    if max_samples is not None and max_samples < len(rows):
        rows = rows.select(range(max_samples))
    return rows


@dataclass
class _Where:
    spec: str
    key: str
    split: str
    config: str | None
    split_key: str | None
    config_key: str | None

    def named(self, what: str, name: str | None) -> str:
        key = self.split_key if what == "split" else self.config_key
        return f"{what} {name!r}" + (f" (`{key}`)" if key else "")

    def load_error(self, what: str, err: BaseException) -> UserError:
        """`load_dataset` failed: one line with what was asked, the cause, and the key that fixes it."""
        asked = (
            f"split {self.split!r}"
            if self.config is None
            else f"config {self.config!r}, split {self.split!r}"
        )
        text = str(err)
        fix = None
        if "Config name is missing" in text or "BuilderConfig" in text:
            fix = self.config_key
        elif "Unknown split" in text:
            fix = self.split_key
        hint = f"; set `{fix}`" if fix else ""
        return UserError(f"{self.key}: cannot load {what} ({asked}): {_one_line(err)}{hint}")


def _load_hub(spec: str, where: _Where) -> Dataset:
    try:
        with quiet(False):
            rows = datasets.load_dataset(spec, where.config, split=where.split)
    except Exception as err:  # network, missing repo, missing config or split: all one line for the user
        raise where.load_error(f"Hub dataset {spec!r}", err) from None
    return _one_split(rows, where, f"Hub dataset {spec!r}")


def _one_line(err: BaseException) -> str:
    """datasets' messages run over several lines; the first two usually hold the cause and the options."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith("."):
        return f"{lines[0]} {lines[1]}"
    return first_line(err)


def _one_split(rows: Any, where: _Where, what: str) -> Dataset:
    if isinstance(rows, DatasetDict):
        if where.split not in rows:
            raise UserError(
                f"{where.key}: {what} has no {where.named('split', where.split)}; "
                f"its splits: {', '.join(rows)}"
            )
        rows = rows[where.split]
    if not isinstance(rows, Dataset):
        raise UserError(f"{where.key}: {what} is a {type(rows).__name__}, not a dataset split")
    return rows


def _load_local(path: Path, where: _Where) -> Dataset:
    key = where.key
    if not path.exists():
        raise UserError(f"{key}: data file not found: {path}")
    if path.is_dir():
        return _load_folder(path, where)
    suffix = path.suffix
    if suffix not in LOCAL_SUFFIXES:
        raise UserError(
            f"{key}: {path}: unsupported file type {suffix or '(no suffix)'!r} "
            f"(use {', '.join(LOCAL_SUFFIXES)}, or a folder written by `Dataset.save_to_disk`)"
        )
    if path.stat().st_size == 0:
        raise UserError(f"{key}: dataset is empty: {path}")
    small = path.stat().st_size < 50_000_000
    if suffix == ".arrow":
        try:
            with quiet(small):
                return Dataset.from_file(str(path))
        except Exception as err:
            raise UserError(
                f"{key}: cannot read {path} as an Arrow file written by `datasets` "
                f"(e.g. the data-*.arrow of a `save_to_disk` folder): {first_line(err)}"
            ) from None
    builder = _BUILDERS[suffix]
    try:
        with quiet(small):
            rows = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # the datasets library raises many types for malformed files
        cause = _bad_json(path) if builder == "json" else None
        if cause is not None:
            raise UserError(f"{key}: {path}: {cause}") from None
        raise UserError(f"{key}: cannot read {path}: {_cause(err)}") from None
    if builder == "text":  # one row per line; blank lines would train on an end-of-sequence token alone
        with quiet(len(rows) < QUIET_ROWS):
            rows = rows.filter(lambda r: bool(r["text"].strip()))
    return rows


def _cause(err: BaseException) -> str:
    """datasets wraps a reader's error in a generic DatasetGenerationError; the cause names the problem."""
    while err.__cause__ is not None and "error occurred while generating" in str(err):
        err = err.__cause__
    return first_line(err)


def _load_folder(path: Path, where: _Where) -> Dataset:
    key = where.key
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            with quiet(True):
                saved = datasets.load_from_disk(str(path))
        except Exception as err:
            raise UserError(
                f"{key}: cannot read {path} (a folder written by `save_to_disk`): {first_line(err)}"
            ) from None
        return _one_split(saved, where, f"{path} (saved with `save_to_disk`)")
    entries = sorted(path.iterdir())
    has_data = (path / "README.md").is_file() or any(
        p.suffix in _BUILDERS or (p.is_dir() and any(q.suffix in _BUILDERS for q in p.iterdir()))
        for p in entries
        if not p.name.startswith(".")
    )
    if not has_data:
        found = ", ".join(p.name + "/" * p.is_dir() for p in entries[:8]) or "nothing"
        raise UserError(
            f"{key}: {path} is a folder, but neither a dataset written by `Dataset.save_to_disk` "
            f"(no state.json or dataset_dict.json) nor a folder of data files "
            f"({', '.join(_BUILDERS)}); found: {found}"
        )
    # A folder of data files (train.jsonl, test.jsonl, ...) or a local copy of a Hub dataset repository.
    try:
        with quiet(True):
            rows = datasets.load_dataset(str(path), where.config, split=where.split)
    except Exception as err:
        raise where.load_error(f"the data folder {path}", err) from None
    return _one_split(rows, where, str(path))


def stream_rows(spec: str, *, key: str, split: str = "train", config: str | None = None) -> IterableDataset:
    """One split read lazily, as `datasets` streams it (`load_dataset(..., streaming=True)`): local JSON
    Lines / JSON / Parquet / CSV / text files, folders of data files and Hub datasets; an `.arrow` file
    or a `save_to_disk` folder (memory-mapped already) through `to_iterable_dataset`. Nothing is read
    here: a bad file shows when the rows are first read (`peek`)."""
    where = _Where(spec, key, split, config, None, None)
    if not is_local(spec):
        try:
            with quiet(False):
                return datasets.load_dataset(spec, config, split=split, streaming=True)
        except Exception as err:
            raise where.load_error(f"Hub dataset {spec!r}", err) from None
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"{key}: data file not found: {path}")
    saved = path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())
    if saved or path.suffix == ".arrow":
        return _load_local(path, where).to_iterable_dataset()
    if path.is_dir():
        try:
            with quiet(True):
                return datasets.load_dataset(str(path), config, split=split, streaming=True)
        except Exception as err:
            raise where.load_error(f"the data folder {path}", err) from None
    if path.suffix not in _BUILDERS:
        raise UserError(
            f"{key}: {path}: cannot stream a {path.suffix or 'suffix-less'!r} file (use {', '.join(_BUILDERS)})"
        )
    if path.stat().st_size == 0:
        raise UserError(f"{key}: dataset is empty: {path}")
    rows = datasets.load_dataset(_BUILDERS[path.suffix], data_files=str(path), split="train", streaming=True)
    return rows.filter(lambda r: bool(r["text"].strip())) if path.suffix == ".txt" else rows


def peek(rows: IterableDataset, n: int, *, key: str, source: str) -> list[dict[str, Any]]:
    """The first `n` rows of a stream (fewer if it is shorter; none is an error), errors as `load_rows`'."""
    try:
        with quiet(True):
            head = list(rows.take(n))
    except UserError:
        raise
    except Exception as err:  # a malformed file shows only when it is read
        path = Path(source).expanduser()
        cause = _bad_json(path) if path.suffix in (".json", ".jsonl") and path.is_file() else None
        raise UserError(f"{key}: {shown(source)}: {cause or _cause(err)}") from None
    if not head:
        raise UserError(f"{key}: dataset is empty: {source}")
    return head


# ------------------------------------------------------------------------------------ malformed JSON


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        inner = next((_kind(v) for v in value if v is not None), None)
        return f"list of {inner}s" if inner else "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _bad_json(path: Path) -> str | None:
    """The first line of a JSON / JSON Lines file that datasets' reader cannot take, and why.

    The reader's own error names no line, so the file is scanned with `json.loads` once it has failed.
    """
    with path.open(encoding="utf-8", errors="replace") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):  # one JSON array of objects
        try:
            value = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as err:
            return f"line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})"
        bad = next((i for i, v in enumerate(value) if not isinstance(v, dict)), None)
        if bad is not None:
            return f"item {bad + 1} of the top-level list is a {_kind(value[bad])}, not an object"
        return None
    seen: dict[str, tuple[str, int]] = {}
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number}: not valid JSON ({err.msg}, column {err.colno})"
            if not isinstance(value, dict):
                return (
                    f"line {number}: a JSON {_kind(value)}, not an object (JSON Lines: one object per line)"
                )
            for name, item in value.items():
                if item is None:
                    continue
                kind, first = seen.setdefault(name, (_kind(item), number))
                if kind != _kind(item):
                    return f"line {number}: `{name}` is a {_kind(item)}, but line {first} has a {kind}"
    return None


# --------------------------------------------------------------------------------------- row checks


def row_namer(source: str | None) -> Callable[[int], str]:
    """`<source>: row N` (1-based, in file order); in a JSON Lines file with blank lines, its line too."""
    path = Path(source).expanduser() if source else None
    jsonl = path is not None and path.suffix == ".jsonl" and path.is_file()
    prefix = f"{shown(source)}: " if source else ""

    def name(i: int) -> str:
        if jsonl:
            assert path is not None
            with path.open(encoding="utf-8", errors="replace") as f:
                lines = (n for n, line in enumerate(f, 1) if line.strip())
                line = next((n for j, n in enumerate(lines) if j == i), None)
            if line is not None and line != i + 1:
                return f"{prefix}row {i + 1} (line {line})"
        return f"{prefix}row {i + 1}"

    return name


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def turn_problem(turn: Any, j: int, field: str = "messages") -> str | None:
    """What is wrong with message `j` (1-based) of a conversation in column `field`, else None: a
    {role, content} message whose role and content are text (chat templates render text only)."""
    if not isinstance(turn, dict):
        return f"`{field}` item {j} is a {_kind(turn)} {_short(turn)}, not a {{role, content}} message"
    for name in ("role", "content"):
        if turn.get(name) is None:
            return f"`{field}` item {j} has no `{name}`"
    role, content = turn["role"], turn["content"]
    if not isinstance(role, str):
        return f"`{field}` item {j}: `role` is {_a(_kind(role))} {_short(role)}, not text"
    if isinstance(content, list):
        return (
            f"`{field}` item {j} ({role}): `content` is {_a(_kind(content))}: multimodal content "
            "(a list of parts) is not supported; give the text as a string"
        )
    if not isinstance(content, str):
        return f"`{field}` item {j} ({role}): `content` is {_a(_kind(content))} {_short(content)}, not text"
    return None


def _a(kind: str) -> str:
    return f"an {kind}" if kind[:1] in "aeiou" else f"a {kind}"


def conversation_problem(messages: Any, field: str = "messages") -> str | None:
    """What is wrong with a conversation (a non-empty list of `turn_problem`-free messages), else None."""
    if not isinstance(messages, list) or not messages:
        return f"`{field}` must be a non-empty list of {{role, content}} messages"
    return next((p for j, t in enumerate(messages, 1) if (p := turn_problem(t, j, field))), None)


def _messages_problem(messages: Any) -> str | None:
    if messages is None or messages == []:
        return "`messages` is empty"
    if not isinstance(messages, list):
        return f"`messages` must be a list of {{role, content}} messages, got a {_kind(messages)} {_short(messages)}"
    for j, turn in enumerate(messages, 1):
        problem = turn_problem(turn, j)
        if problem is not None:
            return problem
    if messages[-1]["role"] != "assistant":
        return f"`messages` must end with an assistant turn (the last is {messages[-1]['role']!r})"
    return None


def _parsed_messages(rows: Dataset, *, key: str, name: Callable[[int], str]) -> Dataset:
    """Check every `messages` value; JSON strings (a CSV column) are parsed into message lists."""
    values = rows["messages"]
    parse = False
    for i, value in enumerate(values):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise UserError(
                    f"{key}: {name(i)}: `messages` is a string that is not a JSON list of messages: {_short(value)}"
                ) from None
            parse = True
        problem = _messages_problem(value)
        if problem is not None:
            raise UserError(f"{key}: {name(i)}: {problem}")
    if not parse:
        return rows
    with quiet(len(rows) < QUIET_ROWS):
        return rows.map(
            lambda r: {
                "messages": json.loads(r["messages"]) if isinstance(r["messages"], str) else r["messages"]
            }
        )


def _check_prompt_completion(rows: Dataset, *, key: str, name: Callable[[int], str]) -> None:
    for i, (prompt, completion) in enumerate(zip(rows["prompt"], rows["completion"], strict=True)):
        for field, value in (("prompt", prompt), ("completion", completion)):
            if value is None:
                raise UserError(f"{key}: {name(i)}: `{field}` is empty")
            if not isinstance(value, str | list):
                raise UserError(
                    f"{key}: {name(i)}: `{field}` must be a string or a list of messages, got a {_kind(value)}"
                )
            problem = conversation_problem(value, field) if isinstance(value, list) else None
            if problem is not None:
                raise UserError(f"{key}: {name(i)}: {problem}")
        if isinstance(prompt, str) != isinstance(completion, str):
            raise UserError(
                f"{key}: {name(i)}: `prompt` and `completion` must both be strings or both message lists, "
                f"got a {_kind(prompt)} and a {_kind(completion)}"
            )


def sft_format(rows: Dataset, *, key: str, source: str | None = None) -> Dataset:
    """Conversational `messages`, `prompt`+`completion`, or plain `text`, shaped for TRL's SFTTrainer.

    `messages` become a conversational prompt (all turns but the last) and completion (the last,
    assistant turn). TRL then masks the prompt for any chat template, whereas its assistant-only
    loss needs `{% generation %}` markers that most real templates (DeepSeek's included) lack.
    `source` (the local path, if any) lets errors name a JSON Lines file's line.
    """
    columns = set(rows.column_names)
    name = row_namer(source)
    if "messages" in columns:
        rows = _parsed_messages(rows, key=key, name=name)
        with quiet(len(rows) < QUIET_ROWS):
            return rows.map(
                lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]},
                remove_columns=rows.column_names,
            )
    if {"prompt", "completion"} <= columns:
        _check_prompt_completion(rows, key=key, name=name)
        return rows.select_columns(["prompt", "completion"])
    if "text" in columns:
        bad = next((i for i, t in enumerate(rows["text"]) if not isinstance(t, str) or not t), None)
        if bad is not None:
            value = rows[bad]["text"]
            what = "empty" if not value else f"a {_kind(value)}, not a string"
            raise UserError(f"{key}: {name(bad)}: `text` is {what}")
        return rows.select_columns(["text"])
    raise UserError(
        f"{key}: needs a `messages` column, `prompt` + `completion` columns, or a `text` column; "
        f"found: {', '.join(sorted(columns))}"
    )


def prompt_target_pairs(rows: Dataset, *, key: str, source: str | None = None) -> tuple[list, list[str]]:
    """(prompts, reference answers) for generation checks; prompts are message lists or strings."""
    shaped = sft_format(rows, key=key, source=source)
    if "prompt" not in shaped.column_names:
        raise UserError(f"{key}: a held-out check needs `messages` or `prompt` + `completion` rows")
    targets = [c[-1]["content"] if isinstance(c, list) else c for c in shaped["completion"]]
    return list(shaped["prompt"]), targets


# -------------------------------------------------------------------------- roles a template renders

# The roles chat templates use (Hugging Face's chat format, OpenAI's, Llama 3's `ipython`): a template's
# accepted roles, as an error lists them, are those of these (and of the data) that it renders.
KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython", "function")
_PROBE = "finetune-role-probe"
_rendered: dict[tuple[str, str], bool] = {}


def _probes(role: str) -> list[list[dict]]:
    """Short conversations with one `role` message (its text `_PROBE`) where templates put such a turn:
    first (a system prompt), before an answer (a user turn), as the answer, after a tool call."""
    probe = {"role": role, "content": _PROBE}
    user, answer = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}],
    }
    return [
        [probe, user, answer],
        [probe, answer],
        [user, probe],
        [user, call, probe, answer],
        [user, answer, probe],
    ]


def renders_role(tokenizer: Any, role: str) -> bool:
    """Whether the tokenizer's chat template renders a message of `role`: its text appears in the output
    of one of `_probes(role)`. A template that drops the turn or raises (an unknown role) does not."""
    template = tokenizer.chat_template
    if (template, role) not in _rendered:
        found = False
        for conversation in _probes(role):
            try:
                text = tokenizer.apply_chat_template(conversation, tokenize=False)
            except Exception:  # templates raise on roles and orders they do not take
                continue
            if isinstance(text, str) and _PROBE in text:
                found = True
                break
        _rendered[(template, role)] = found
    return _rendered[(template, role)]


def check_roles(conversations: Any, tokenizer: Any, *, key: str, source: str | None = None) -> None:
    """Every role in `conversations` (per row: a list of messages, or a text that has none) is one the
    chat template renders; else one line naming the file, the row and the roles it does render."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return  # no template (text rows only) or several named ones: the trainer reports what it meets
    first: dict[str, int] = {}
    for i, turns in enumerate(conversations):
        for turn in turns if isinstance(turns, list) else ():
            first.setdefault(turn["role"], i)
    bad = [role for role in first if not renders_role(tokenizer, role)]
    if not bad:
        return
    role = min(bad, key=first.__getitem__)
    accepted = [r for r in dict.fromkeys([*KNOWN_ROLES, *first]) if renders_role(tokenizer, r)]
    raise UserError(
        f"{key}: {row_namer(source)(first[role])}: role {role!r} is not one the chat template renders "
        f"(it renders: {', '.join(accepted) or 'none of ' + ', '.join(KNOWN_ROLES)})"
    )


def stage_template(tokenizer: Any, args: Any) -> Any:
    """The tokenizer as the stage's trainer templates with it: TRL's SFTTrainer reads a `.jinja`/`.j2`
    `chat_template_path` into it (a tokenizer to clone a template from is only loaded by the trainer)."""
    path = getattr(args, "chat_template_path", None)
    if not path or not str(path).endswith((".jinja", ".j2")) or not Path(path).is_file():
        return tokenizer
    staged = copy.copy(tokenizer)
    staged.chat_template = Path(path).read_text(encoding="utf-8")
    return staged


# ------------------------------------------------------------------------ what the trainer will see


def preference_format(rows: Dataset, *, key: str, what: str = "a reward stage") -> Dataset:
    """Pairwise rows for TRL's RewardTrainer (and DPOTrainer): `chosen` and `rejected` (texts, or
    conversations when both are message lists), an optional explicit `prompt`, an optional numeric `margin`."""
    columns = set(rows.column_names)
    missing = [c for c in ("chosen", "rejected") if c not in columns]
    if missing:
        raise UserError(
            f"{key}: {what} needs `chosen` and `rejected` columns; missing {', '.join(missing)} "
            f"(found: {', '.join(sorted(columns))})"
        )
    for i, row in enumerate(rows, 1):
        kinds = {type(row["chosen"]).__name__, type(row["rejected"]).__name__}
        if not kinds <= {"str", "list"} or len(kinds) > 1:
            raise UserError(
                f"{key}: row {i}: `chosen` and `rejected` must both be texts or both message lists"
            )
        for field in ("prompt", "chosen", "rejected"):
            value = row.get(field)
            problem = conversation_problem(value, field) if isinstance(value, list) else None
            if problem is not None:
                raise UserError(f"{key}: row {i}: {problem}")
        if "margin" in columns and not isinstance(row["margin"], int | float):
            raise UserError(f"{key}: row {i}: `margin` must be a number, got {row['margin']!r}")
    keep = [c for c in ("prompt", "chosen", "rejected", "margin") if c in columns]
    return rows.select_columns(keep)


@dataclass
class SplitReport:
    """One split of a stage's data as the trainer will see it (`validate` prints these)."""

    split: str  # train | eval | heldout
    source: str
    rows: int | None = None  # rows read (after max_samples); None: a Hub dataset `validate` does not fetch
    total: int | None = None  # rows in the source when max_samples took fewer
    kept: int | None = None  # rows left after templating and truncation; None: not tokenized
    cut: int | None = None  # rows whose trainable tokens max_length cuts (dropped rows included)
    p50: int | None = None  # token lengths of the templated rows, before truncation
    p95: int | None = None
    max: int | None = None
    note: str = ""
    parts: list[SourcePart] = dataclass_field(default_factory=list)  # a mixture's sources
    info: list[str] = dataclass_field(default_factory=list)  # how it was read: the format, a mixture's notes


@dataclass
class SourcePart:
    """One source of a mixture: rows read, kept in the mixture, cut by its weight, realized share."""

    source: str
    format: str  # as read: `sharegpt (auto)`, `alpaca`, ...
    read: int | None = None  # None: streamed (not counted ahead)
    kept: int | None = None
    weight: float | None = None
    share: float | None = None  # kept / rows of the mixture

    @property
    def cut(self) -> int | None:
        return None if self.read is None or self.kept is None else max(0, self.read - self.kept)


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile (a value of the data) of an ascending list."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def suggest_max_length(p95: int, longest: int) -> int:
    """A max_length that keeps every row whole (or 95 % of them when a few outliers are far longer),
    rounded up to a multiple of 64."""
    target = longest if longest <= 2 * p95 else p95
    return max(64, math.ceil(target / 64) * 64)


def tokenize_like_trainer(rows: Dataset, *, tokenizer: Any, args: Any, split: str) -> Dataset:
    """`input_ids` and `labels` (-100 where no loss) of every row, before truncation and packing.

    Runs TRL's own `SFTTrainer._prepare_dataset` (templating, EOS, tokenization, label masks) with
    `max_length=None`, so the counts are the trainer's; truncation is then applied by `measure`.
    """
    full = copy.copy(args)
    full.max_length, full.shuffle_dataset = None, False
    with quiet(len(rows) < QUIET_ROWS):
        prepared = compat_trl.prepare_sft_dataset(rows, tokenizer, full, split)
    return prepared.select_columns(["input_ids", "labels"])


def measure(
    report: SplitReport,
    rows: Dataset,
    *,
    tokenizer: Any,
    args: Any,
    packing: bool,
    key: str,
    max_length_key: str,
) -> None:
    """Fill `report` with what TRL's preparation makes of a train or eval split; raise or warn on truncation.

    Without packing TRL truncates each row to `max_length` (keeping the start, or the end with
    `truncation_mode: keep_end`) and drops rows left without a trainable token. A row is cut when
    truncation removes any of its trainable tokens. Packing drops no row; its `bfd` strategy truncates.
    Every row dropped: `UserError` naming `max_length_key`. More than `CUT_WARN_SHARE` cut: a warning.
    """
    try:
        prepared = tokenize_like_trainer(rows, tokenizer=tokenizer, args=args, split=report.split)
    except CompatError:  # TRL's preparation changed: its own one-line error
        raise
    except Exception as err:  # a template that cannot render these rows, assistant masks missing, ...
        raise UserError(f"{key}: the trainer cannot template these rows: {first_line(err)}") from err
    limit = args.max_length
    truncates = limit is not None and (not packing or args.packing_strategy == "bfd")
    keep_end = not packing and args.truncation_mode == "keep_end"
    lengths: list[int] = []
    kept = cut = 0
    special = set(tokenizer.all_special_ids)
    empty: list[int] = []  # rows whose trained tokens hold no text: an empty answer and its end-of-turn token
    for batch in prepared.iter(batch_size=1000):
        for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
            trained = [t for t in labels if t != -100 and t not in special]
            if not tokenizer.decode(trained).strip():
                empty.append(len(lengths))
            lengths.append(len(ids))
            if not truncates or len(ids) <= limit:
                kept += 1
                continue
            inside = labels[-limit:] if keep_end else labels[:limit]
            outside = labels[:-limit] if keep_end else labels[limit:]
            kept += packing or any(t != -100 for t in inside)
            cut += any(t != -100 for t in outside)
    report.kept, report.cut = kept, cut
    fill_lengths(report, lengths)
    _check_empty_answers(empty, len(lengths), key=key, source=report.source)
    if report.rows is None or not cut:
        return
    assert report.p95 is not None and report.max is not None
    suggestion = suggest_max_length(report.p95, report.max)
    lengths_text = f"templated rows are p95 {report.p95}, max {report.max} tokens"
    if kept == 0:
        raise UserError(
            f"{max_length_key}: {limit} drops every row of {key}: none of its {report.rows} rows keeps a "
            f"trainable token within {limit} tokens ({lengths_text}); set max_length to {suggestion}"
        )
    if cut > CUT_WARN_SHARE * report.rows:
        dropped = report.rows - kept
        also = f", {dropped} of them dropped (no trainable token left)" if dropped else ""
        warn(
            f"{key}: max_length {limit} cuts trainable tokens of {cut} of {report.rows} rows "
            f"({cut / report.rows:.1%}, over {CUT_WARN_SHARE:.0%}){also}; {lengths_text} "
            f"({max_length_key}={suggestion} keeps them)"
        )


def _check_empty_answers(empty: list[int], rows: int, *, key: str, source: str) -> None:
    """Rows whose trained part (the assistant turn, after the chat template) holds no text teach only
    the end-of-turn token: all of them are an error, more than `CUT_WARN_SHARE` a warning."""
    if not empty or not rows:
        return
    if len(empty) == rows:
        raise UserError(
            f"{key}: {source}: the assistant turn of every row (1 to {rows}) is empty after the chat "
            "template; training would learn nothing but end-of-turn tokens: give the assistant turns text"
        )
    if len(empty) > CUT_WARN_SHARE * rows:
        listed = ", ".join(str(i + 1) for i in empty[:5]) + (", ..." if len(empty) > 5 else "")
        warn(
            f"{key}: {source}: rows {listed} ({len(empty)} of {rows}, {len(empty) / rows:.1%}, over "
            f"{CUT_WARN_SHARE:.0%}) have an empty assistant turn after the chat template; they train only "
            "end-of-turn tokens"
        )


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def fill_lengths(report: SplitReport, lengths: list[int]) -> None:
    ordered = sorted(lengths)
    report.p50, report.p95, report.max = percentile(ordered, 0.5), percentile(ordered, 0.95), ordered[-1]


def prompt_text(tokenizer: Any, prompt: str | list[dict]) -> str:
    """A prompt as generation reads it: text as it is, a conversation through the chat template with the
    assistant turn opened (`finetune.heldout`, and GRPO's prompt lengths as TRL templates them)."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def measure_prompts(report: SplitReport, prompts: list, *, tokenizer: Any, max_new_tokens: int) -> None:
    """Token lengths of held-out prompts as `finetune.heldout` feeds them to `generate` (never truncated)."""
    lengths = []
    for prompt in prompts:
        text = prompt_text(tokenizer, prompt)
        lengths.append(len(tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"]))
    report.kept = len(lengths)
    report.note = f"prompt tokens; generation adds up to {max_new_tokens}"
    fill_lengths(report, lengths)


def shown(spec: str) -> str:
    """A data path as the report shows it: relative to the current folder when it is inside it."""
    if not is_local(spec):
        return spec
    path = Path(spec).expanduser()
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd()))
    return str(path)


def format_report(reports: list[SplitReport], indent: str = "    ") -> str:
    """A small table: rows read, kept after templating/truncation, cut by max_length, token lengths."""

    def cell(value: int | None) -> str:
        return "-" if value is None else str(value)

    head = f"{'split':<9}{'rows':>8}{'kept':>8}{'cut':>7}{'p50 tok':>9}{'p95 tok':>9}{'max tok':>9}  source"
    lines = [indent + head]
    for r in reports:
        rows = cell(r.rows)
        lines.append(
            f"{indent}{r.split:<9}{rows:>8}{cell(r.kept):>8}{cell(r.cut):>7}"
            f"{cell(r.p50):>9}{cell(r.p95):>9}{cell(r.max):>9}  {r.source}"
        )
        notes = []
        if r.total is not None:
            notes.append(f"first {r.rows} of {r.total} rows (max_samples)")
        notes += r.info
        if r.note:
            notes.append(r.note)
        lines += [f"{indent}{'':<9}  {n}" for n in notes]
        if r.parts:
            lines.append(
                f"{indent}{'':<9}  {'read':>8}{'kept':>8}{'cut':>8}{'weight':>8}{'share':>8}  {'format':<18}source"
            )
            for p in r.parts:
                weight = "-" if p.weight is None else f"{p.weight:g}"
                share = "-" if p.share is None else f"{p.share:.1%}"
                lines.append(
                    f"{indent}{'':<9}  {cell(p.read):>8}{cell(p.kept):>8}{cell(p.cut):>8}{weight:>8}{share:>8}"
                    f"  {p.format:<18}{p.source}"
                )
    return "\n".join(lines)
