"""Answer extractors: the part of a model's output (or of a reference) that is scored."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in the text, without thousands separators or a dollar sign.

    >>> last_number("3 apples and 1,250.5 pears")
    '1250.5'
    >>> last_number("none") is None
    True
    """
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "").replace("$", "")
    return value[:-2] if value.endswith(".0") else value


def gsm8k(text: str) -> str | None:
    """GSM8K's `#### n` answer line; the last number when there is none.

    >>> gsm8k("48/2 = <<48/2=24>>24 clips.\\n#### 72")
    '72'
    >>> gsm8k("So she sold 72 clips.")
    '72'
    """
    match = re.search(r"####\s*(-?[\d,.$]+)", text)
    if match:
        return last_number(match.group(1))
    return last_number(text)


def boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (nested braces kept); None without one.

    >>> boxed("so $\\\\boxed{\\\\frac{1}{2}}$.")
    '\\\\frac{1}{2}'
    """
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth, j = 0, i
    while j < len(text):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
        j += 1
    return None


def choice_letter(text: str, n_choices: int) -> str | None:
    """The first standalone choice letter (A, B, ...) among the first `n_choices` letters.

    >>> choice_letter("The answer is (C).", 4)
    'C'
    >>> choice_letter("E", 4) is None
    True
    """
    letters = "ABCDEFGHIJ"[:n_choices]
    match = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)
    return match.group(1) if match else None


def regex(text: str, pattern: str) -> str | None:
    """The first group of the first match of `pattern` (the whole match without a group)."""
    match = re.search(pattern, text)
    if not match:
        return None
    return match.group(1) if match.groups() else match.group(0)


def extract(name: str, text: str, *, pattern: str | None = None, n_choices: int = 0) -> str | None:
    if name == "none":
        return text
    if name == "gsm8k":
        return gsm8k(text)
    if name == "boxed":
        return boxed(text)
    if name == "last_number":
        return last_number(text)
    if name == "choice_letter":
        return choice_letter(text, n_choices)
    if name == "regex":
        assert pattern is not None
        return regex(text, pattern)
    raise ValueError(f"unknown extractor {name!r}")
