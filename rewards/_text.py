"""The text of a completion, as every reward reads it."""

from __future__ import annotations


def reply(completion) -> str:
    """The completion's text: a string as it is, or the last message's content of a conversational one.

    >>> reply("42")
    '42'
    >>> reply([{"role": "assistant", "content": "42"}])
    '42'
    >>> reply([])
    ''
    """
    if isinstance(completion, list):
        return (completion[-1].get("content") or "") if completion else ""
    return completion


def final_answer(text: str) -> str:
    """The part of a reply after its reasoning: the text after the last `</think>`, or all of it.

    Answers and code inside the reasoning are drafts; only what follows it is graded.

    >>> final_answer("<think>maybe 3</think> It is 4.")
    ' It is 4.'
    >>> final_answer("It is 4.")
    'It is 4.'
    """
    return text.rpartition("</think>")[2]
