"""Format reward: does the whole completion match a regular expression."""

from __future__ import annotations

import functools
import re

from rewards._text import reply

# Reasoning in <think> tags, then a non-empty answer.
DEFAULT_PATTERN = r"<think>.*?</think>\s*\S.*"


@functools.lru_cache(maxsize=64)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """`pattern` compiled with re.DOTALL (`.` also matches newlines); a bad one is a ValueError naming it.

    >>> compile_pattern("(")
    Traceback (most recent call last):
    ...
    ValueError: invalid format pattern '(': missing ), unterminated subpattern at position 0
    """
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ValueError(f"invalid format pattern {pattern!r}: {e}") from None


# Named after its recipe entry; it shadows the builtin only inside this module.
def format(completions: list, *, pattern: str = DEFAULT_PATTERN, **kwargs) -> list[float]:
    """1.0 where the completion (stripped of surrounding whitespace) fully matches `pattern`, else 0.0.

    >>> format(["<think>\\n2 + 2 = 4\\n</think>\\nThe answer is 4.", "The answer is 4.", "<think>hm</think>"])
    [1.0, 0.0, 0.0]
    >>> format([[{"role": "assistant", "content": "Answer: 4"}]], pattern=r"Answer: \\d+")
    [1.0]
    """
    regex = compile_pattern(pattern)
    return [float(regex.fullmatch(reply(c).strip()) is not None) for c in completions]


def validate(*, pattern: str = DEFAULT_PATTERN, **arguments) -> None:
    """Called by `rewards.build`: a bad pattern fails when the recipe is read, not at the first batch."""
    compile_pattern(pattern)


format.validate = validate  # type: ignore[attr-defined]
