"""Scorers and the statistics of a benchmark's results. The math and code scorers are the GRPO rewards'
(`rewards.math`, `rewards.code`): a task's reward and its evaluation agree by construction."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

from rewards.code import run_tests
from rewards.math import math_accuracy


def normalize(text: str | None, steps: Sequence[str]) -> str | None:
    """`strip`, `lower`, `no_commas` (1,000 → 1000), `no_punctuation`, in that order."""
    if text is None:
        return None
    if "strip" in steps:
        text = text.strip()
    if "lower" in steps:
        text = text.lower()
    if "no_commas" in steps:
        text = re.sub(r"(?<=\d),(?=\d)", "", text)
    if "no_punctuation" in steps:
        text = text.translate(str.maketrans("", "", string.punctuation)).strip()
    return text


def exact_match(answer: str | None, target: str | None, steps: Sequence[str]) -> float:
    """1.0 when both normalise to the same non-empty string.

    >>> exact_match(" 1,000 ", "1000", ["strip", "no_commas"])
    1.0
    >>> exact_match(None, "4", ["strip"])
    0.0
    """
    a, t = normalize(answer, steps), normalize(target, steps)
    return float(a is not None and t is not None and a == t)


def math_verify(output: str, target: str) -> float | None:
    """math-verify's equivalence of the output's final answer and the target (None: target unparsable)."""
    return math_accuracy([output], answer=[target])[0]


def code_passes(program: str, tests: str, timeout: float) -> float:
    """1.0 when every test passes with the program (run in the rewards sandbox), else 0.0."""
    return float(run_tests(program, tests, timeout=timeout) == 1.0)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples of which c pass: 1 - C(n-c, k) / C(n, k).

    >>> round(pass_at_k(10, 3, 1), 6)
    0.3
    >>> round(pass_at_k(10, 3, 5), 6)
    0.916667
    """
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per item, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n)), as lm-evaluation-harness reports it."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
