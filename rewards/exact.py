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


def similarity(completions: list, answer: list[str], **kwargs) -> list[float]:
    """Partial credit: difflib's similarity ratio of completion and answer, 2·matches / total length
    (1.0 identical, 0.0 nothing in common). A dense signal where exact match is still rare.

    >>> similarity(["dcba", "dcxx", "zz"], answer=["dcba", "dcba", "dcba"])
    [1.0, 0.5, 0.0]
    """
    from difflib import SequenceMatcher

    return [
        SequenceMatcher(None, reply(c).strip(), str(a).strip()).ratio()
        for c, a in zip(completions, answer, strict=True)
    ]
