"""Math answers graded by math-verify: the completion's final answer against a gold answer column."""

from __future__ import annotations

import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from rewards._text import final_answer, reply

# A \boxed{} answer wins; otherwise math-verify takes the last expression or number of the text.
_EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
_TIMEOUT_S = 5


def _timeout() -> int | None:
    # math-verify's timeouts use signal.alarm, which only works in the main thread; elsewhere it would raise.
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _no_currency(text: str) -> str:
    # `\\$` is a dollar sign (MATH's `\\$18.90`), not a math delimiter: math-verify reads a text with one as
    # having no answer at all.
    return text.replace("\\$", "")


def parse_gold(gold) -> list:
    """A gold answer parsed by math-verify: GSM8K's `... #### 42`, text with `\\boxed{...}`, or a plain answer.

    An empty list means nothing could be parsed.

    >>> parse_gold("She has 3 + 4 = 7 apples.\\n#### 1,007")[0]
    1007
    >>> parse_gold("so the answer is $\\\\boxed{\\\\frac{1}{2}}$")[0]
    1/2
    >>> parse_gold("\\\\sqrt{2}")[0]
    sqrt(2)
    """
    text = _no_currency(str(gold).strip())
    if "####" in text:
        text = text.rpartition("####")[2].strip().replace(",", "")
    elif "\\boxed" in text or "$" in text:
        return parse(text, extraction_config=_EXTRACTION, parsing_timeout=_timeout())
    # A plain answer is read as LaTeX (\sqrt{2}, x^2 + 1), else as text.
    return parse(f"${text}$", parsing_timeout=_timeout()) or parse(
        text, extraction_config=_EXTRACTION, parsing_timeout=_timeout()
    )


def math_accuracy(completions: list, *, column: str = "answer", **kwargs) -> list[float | None]:
    """1.0 where the completion's final answer equals the gold answer in `column`, 0.0 where not.

    The answer is read after the last `</think>` (if any): a `\\boxed{}` answer, else the last number or
    expression. No answer: 0.0. A gold answer math-verify cannot parse: None (TRL leaves the row out).

    >>> math_accuracy(["<think>3 or 4?</think> It is 4.", "\\\\boxed{5}", "no idea"], answer=["#### 4"] * 3)
    [1.0, 0.0, 0.0]
    >>> math_accuracy([[{"role": "assistant", "content": "x = 0.5"}]], solution=["\\\\frac{1}{2}"], column="solution")
    [1.0]
    """
    if column not in kwargs:
        raise ValueError(f"math_accuracy: no gold column {column!r} (columns: {', '.join(sorted(kwargs))})")
    scores: list[float | None] = []
    for completion, gold in zip(completions, kwargs[column], strict=True):
        gold_parsed = parse_gold(gold)
        if not gold_parsed:
            scores.append(None)
            continue
        text = _no_currency(final_answer(reply(completion)))
        answer = parse(text, extraction_config=_EXTRACTION, parsing_timeout=_timeout())
        scores.append(float(bool(answer) and verify(gold_parsed, answer, timeout_seconds=_timeout())))
    return scores
