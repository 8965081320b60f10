"""Exact match of a completion against the reference answer column."""

from __future__ import annotations


def _text(completion) -> str:
    # Conversational completions are message lists; the reply is the last message's content.
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion


def exact_match(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 where the completion equals the answer (surrounding whitespace ignored), else 0.0.

    >>> exact_match(["cba", " xyz ", "no"], answer=["cba", "xyz", "yes"])
    [1.0, 1.0, 0.0]
    >>> exact_match([[{"role": "assistant", "content": "42"}]], answer=["42"])
    [1.0]
    """
    return [float(_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer, strict=True)]
