"""Exact match of a completion against the reference answer column."""

from __future__ import annotations

from rewards._text import reply


def exact_match(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 where the completion equals the answer (surrounding whitespace ignored), else 0.0.

    >>> exact_match(["cba", " xyz ", "no"], answer=["cba", "xyz", "yes"])
    [1.0, 1.0, 0.0]
    >>> exact_match([[{"role": "assistant", "content": "42"}]], answer=["42"])
    [1.0]
    """
    return [float(reply(c).strip() == str(a).strip()) for c, a in zip(completions, answer, strict=True)]
