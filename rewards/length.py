"""Soft over-length penalty, shaped like DAPO's overlong reward shaping."""

from __future__ import annotations

from rewards._text import reply

UNITS = ("chars", "words", "tokens")


def penalty(n: int, target: int, buffer: int) -> float:
    """0.0 up to `target - buffer`, then linearly down to -1.0 at `target`, and -1.0 beyond it.

    >>> [penalty(n, target=100, buffer=20) for n in (0, 80, 90, 95, 100, 101)]
    [0.0, 0.0, -0.5, -0.75, -1.0, -1.0]
    >>> [penalty(n, target=100, buffer=0) for n in (100, 101)]
    [0.0, -1.0]
    """
    if n > target:
        return -1.0
    start = target - buffer
    return 0.0 if n <= start else (start - n) / buffer


def validate(*, target: int, buffer: int | None = None, unit: str = "chars", **arguments) -> None:
    """Checks the arguments (also when `rewards.build` reads a recipe): 0 <= buffer <= target, a known unit.

    >>> validate(target=10, buffer=20)
    Traceback (most recent call last):
    ...
    ValueError: length: buffer must be between 0 and target (10), got 20
    """
    if isinstance(target, bool) or not isinstance(target, int) or target <= 0:
        raise ValueError(f"length: target must be a positive integer, got {target!r}")
    if buffer is not None and (
        isinstance(buffer, bool) or not isinstance(buffer, int) or not 0 <= buffer <= target
    ):
        raise ValueError(f"length: buffer must be between 0 and target ({target}), got {buffer!r}")
    if unit not in UNITS:
        raise ValueError(f"length: unit must be one of {', '.join(UNITS)}, got {unit!r}")


def length(
    completions: list, *, target: int, buffer: int | None = None, unit: str = "chars", **kwargs
) -> list[float]:
    """Penalty for completions longer than `target - buffer` units, -1.0 past `target` (see `penalty`).

    `target` is the longest completion allowed; `buffer` (default target // 4) the width of the soft zone
    below it. `unit`: "chars", "words" (whitespace-separated) or "tokens" (TRL's `completion_ids`).

    >>> length(["a" * 6, "a" * 7, "a" * 8, "a" * 9], target=8, buffer=2)
    [0.0, -0.5, -1.0, -1.0]
    >>> length(["one two three", "one two three four five"], target=4, unit="words")
    [0.0, -1.0]
    >>> length(["ignored"], target=4, buffer=1, unit="tokens", completion_ids=[[1, 2, 3, 4]])
    [-1.0]
    """
    validate(target=target, buffer=buffer, unit=unit)
    buffer = target // 4 if buffer is None else buffer
    if unit == "tokens":
        if "completion_ids" not in kwargs:
            raise ValueError("length: unit 'tokens' needs TRL's completion_ids column")
        sizes = [len(ids) for ids in kwargs["completion_ids"]]
    elif unit == "words":
        sizes = [len(reply(c).split()) for c in completions]
    else:
        sizes = [len(reply(c)) for c in completions]
    return [penalty(n, target, buffer) for n in sizes]


length.validate = validate  # type: ignore[attr-defined]
