"""A split read from one source or mixed from several: each source loaded (or streamed), its columns
renamed and its format converted (`finetune.formats`), shaped by the stage, then mixed by weight,
reproducibly from the recipe's seed.

Weights (one kind per mixture):
- none: every row of every source;
- shares, each in (0, 1], adding up to 1: the mixture is the largest one in which no row repeats
  (or `max_samples` rows, if fewer), each source giving its share of it, rounded to whole rows;
- row counts, whole numbers above 1: that many rows of each source (a source with fewer repeats, every
  row as often as the others, give or take one); `max_samples` keeps the first rows of the shuffled mix.

A source's rows are picked after `Dataset.shuffle(seed)`, and the mix is shuffled with the same seed:
the same recipe gives the same rows in the same order. Streamed (`streaming: true`), sources are mixed
by `datasets.interleave_datasets` with their shares as probabilities (equal without weights; counts
need a length, so they are refused) and shuffled in a buffer of `STREAM_BUFFER` rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import datasets
from datasets import Dataset, IterableDataset

from finetune import data, formats
from finetune.errors import UserError

STREAM_BUFFER = 1000  # rows held by a stream's shuffle buffer
PEEK = 200  # rows of a stream that are checked (and measured) before training
_SHARE_SUM = 1e-3  # how far the shares' sum may be from 1 (three decimals written by hand)


@dataclass
class Source:
    """One source as plain arguments; `key` is the recipe key that names it in errors."""

    path: str
    key: str
    split: str = "train"
    config: str | None = None
    weight: float | None = None
    columns: dict[str, str] = field(default_factory=dict)
    format: str = "auto"
    split_key: str | None = None
    config_key: str | None = None
    at: str | None = None  # the key holding its `format` / `columns` (default: `key`)


Shape = Callable[[Dataset, str, str], Dataset]  # (rows, key, source path) → rows as the stage reads them


@dataclass
class Read:
    """A split: its rows (a stream when streamed), the report's parts and notes."""

    rows: Dataset | IterableDataset
    parts: list[data.SourcePart]
    total: int | None = None  # rows before max_samples (one source only)
    notes: list[str] = field(default_factory=list)
    sample: Dataset | None = None  # streamed: the first PEEK rows, checked and measured


def _kind(sources: list[Source], key: str) -> str:
    """`none`, `shares` or `counts`: the one kind of weight the sources are given."""
    given = [s.weight for s in sources if s.weight is not None]
    if not given:
        return "none"
    if len(given) < len(sources):
        missing = next(s.key for s in sources if s.weight is None)
        raise UserError(f"{missing}.weight: give every source of {key} a weight, or none of them")
    shares = [w for w in given if w <= 1]
    if shares and len(shares) < len(given):
        raise UserError(
            f"{key}: weights mix shares (≤ 1) and row counts (> 1); give all sources shares adding up to 1, "
            "or all row counts"
        )
    if shares:
        total = sum(shares)
        if abs(total - 1) > _SHARE_SUM:
            raise UserError(
                f"{key}: the weights are shares (each ≤ 1) and must add up to 1, they add up to {total:g}; "
                "or give row counts (whole numbers > 1)"
            )
        return "shares"
    bad = next((s for s in sources if s.weight != int(s.weight)), None)
    if bad is not None:
        raise UserError(
            f"{bad.key}.weight: {bad.weight:g} is a row count (above 1) but not a whole number; "
            "give a whole number of rows, or shares (each ≤ 1) adding up to 1"
        )
    return "counts"


def _prepare(rows: Any, names: list[str], s: Source, key: str) -> tuple[Any, str]:
    at = s.at or s.key
    rows = formats.rename(rows, s.columns, names, key=at, source=s.path)
    names = [next((o for o, t in s.columns.items() if t == n), n) for n in names]
    fmt = formats.resolve(s.format, names, key=at, source=s.path)
    shown = "as is" if fmt is None else fmt + (" (auto)" if s.format == "auto" else "")
    return formats.convert(rows, fmt, names, key=key, source=s.path), shown


def read(
    sources: list[Source],
    *,
    key: str,
    seed: int,
    max_samples: int | None = None,
    shape: Shape | None = None,
    streaming: bool = False,
) -> Read:
    """The split of `sources` (see the module's docstring); `shape` puts each source's rows in the shape
    its stage reads (so a mixture can join formats the stage reads alike) and checks them, naming the
    source's own file and row."""
    kind = _kind(sources, key)
    if streaming:
        return _stream(sources, key=key, seed=seed, kind=kind, shape=shape)
    loaded, parts = [], []
    for s in sources:
        rows = data.load_rows(
            s.path, key=s.key, split=s.split, config=s.config, split_key=s.split_key, config_key=s.config_key
        )
        rows, shown = _prepare(rows, rows.column_names, s, s.key)
        if shape is not None:
            rows = shape(rows, s.key, s.path)
        loaded.append(rows)
        parts.append(data.SourcePart(data.shown(s.path), shown, read=len(rows), weight=s.weight))
    if len(sources) == 1 and kind != "counts":  # one source: the first max_samples rows, in file order
        rows, total = loaded[0], None
        if max_samples is not None and max_samples < len(rows):
            total, rows = len(rows), rows.select(range(max_samples))
        parts[0].kept, parts[0].share = len(rows), 1.0
        return Read(rows, parts, total)
    counts = _counts(kind, [len(r) for r in loaded], [s.weight for s in sources], max_samples)
    picked = [_pick(rows, n, seed) for rows, n in zip(loaded, counts, strict=True)]
    mixed, notes = _join(picked, sources, key)
    with data.quiet(len(mixed) < data.QUIET_ROWS):
        mixed = mixed.shuffle(seed=seed).flatten_indices()
    if max_samples is not None and max_samples < len(mixed):  # counts or no weights: the first rows
        mixed = mixed.select(range(max_samples))
        counts = [0] * len(sources)
        for origin in mixed["__source"]:
            counts[origin] += 1
    mixed = mixed.remove_columns("__source")
    for part, n in zip(parts, counts, strict=True):
        part.kept, part.share = n, n / len(mixed)
        if part.read is not None and n > part.read:
            notes.append(f"{part.source}: {n} rows from {part.read} (repeated)")
    return Read(mixed, parts, notes=notes)


def _counts(kind: str, sizes: list[int], weights: list[float | None], cap: int | None) -> list[int]:
    """Rows taken from each source."""
    if kind == "none":
        return sizes
    if kind == "counts":
        return [int(w) for w in weights if w is not None]
    shares = [float(w) for w in weights if w is not None]
    total = min(math.floor(n / w + 1e-9) for n, w in zip(sizes, shares, strict=True))
    if cap is not None:
        total = min(total, cap)
    # Largest remainder: whole rows adding up to `total`, each within one row of its share.
    exact = [w * total for w in shares]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: total - sum(counts)]:
        counts[i] += 1
    return [min(c, n) for c, n in zip(counts, sizes, strict=True)]


def _pick(rows: Dataset, n: int, seed: int) -> Dataset:
    """`n` rows of a shuffled source; more than it has: whole passes, then part of one more."""
    with data.quiet(len(rows) < data.QUIET_ROWS):
        shuffled = rows.shuffle(seed=seed)
    passes, rest = divmod(n, len(rows))
    indices = [i for _ in range(passes) for i in range(len(rows))] + list(range(rest))
    return shuffled.select(indices)


def _join(picked: list[Dataset], sources: list[Source], key: str) -> tuple[Dataset, list[str]]:
    """One dataset of the sources' rows (tagged with their source's index in `__source`): the columns
    every source has, in the first one's types."""
    notes = []
    common = [c for c in picked[0].column_names if all(c in p.column_names for p in picked[1:])]
    dropped = sorted({c for p in picked for c in p.column_names} - set(common))
    if dropped:
        notes.append(f"columns not in every source left out: {', '.join(dropped)}")
    if not common:
        raise UserError(
            f"{key}: the sources share no column ("
            + "; ".join(
                f"{data.shown(s.path)}: {', '.join(p.column_names)}"
                for s, p in zip(sources, picked, strict=True)
            )
            + "); map them with `columns:` or set each one's `format:`"
        )
    features = picked[0].select_columns(common).features
    parts = []
    for i, (s, rows) in enumerate(zip(sources, picked, strict=True)):
        rows = rows.select_columns(common)
        if rows.features != features:
            try:
                rows = rows.cast(features)
            except Exception as err:
                raise UserError(
                    f"{s.key}: its rows do not fit those of {data.shown(sources[0].path)} "
                    f"({data.first_line(err)}); give the sources one format"
                ) from None
        with data.quiet(len(rows) < data.QUIET_ROWS):
            parts.append(rows.add_column("__source", [i] * len(rows)))
    return datasets.concatenate_datasets(parts), notes


def _stream(sources: list[Source], *, key: str, seed: int, kind: str, shape: Shape | None) -> Read:
    """Streamed sources mixed by share. The first PEEK rows of each are checked with `shape` (errors name
    the source's file and row); the first PEEK rows of the mix are `Read.sample`, for the stage to measure."""
    if kind == "counts":
        raise UserError(
            f"{key}: a streamed mixture is mixed by shares (each ≤ 1, adding up to 1), not row counts"
        )
    streams, parts, columns = [], [], []
    for s in sources:
        rows = data.stream_rows(s.path, key=s.key, split=s.split, config=s.config)
        head = data.peek(rows, PEEK, key=s.key, source=s.path)
        rows, shown = _prepare(rows, list(head[0]), s, s.key)
        sample, _ = _prepare(Dataset.from_list(head), list(head[0]), s, s.key)
        columns.append(sample.column_names)  # as converted, before the stage's shape
        if shape is not None:
            shape(sample, s.key, s.path)
        streams.append(rows)
        parts.append(data.SourcePart(data.shown(s.path), shown, weight=s.weight))
    notes = [f"streamed: rows are read as training goes; checked and measured on the first {PEEK}"]
    if len(streams) == 1:
        mixed = streams[0]
    else:
        common = [c for c in columns[0] if all(c in names for names in columns[1:])]
        dropped = sorted({c for names in columns for c in names} - set(common))
        if dropped:
            notes.append(f"columns not in every source left out: {', '.join(dropped)}")
        shares = None if kind == "none" else [float(s.weight) for s in sources if s.weight is not None]
        mixed = datasets.interleave_datasets(
            [x.select_columns(common) for x in streams],
            probabilities=shares,
            seed=seed,
            stopping_strategy="first_exhausted",
        )
    mixed = mixed.shuffle(seed=seed, buffer_size=STREAM_BUFFER)
    sample = Dataset.from_list(data.peek(mixed, PEEK, key=key, source=sources[0].path))
    if shape is not None:
        sample = shape(sample, key, "")
    return Read(mixed, parts, notes=notes, sample=sample)
