"""The reward package: lookup by name or import path, arguments, guarding, and each reward's behaviour."""

from __future__ import annotations

import doctest

import pytest

import rewards
import rewards._text
import rewards.exact
import rewards.format
import rewards.length
import rewards.math
from rewards.format import format as format_reward
from rewards.length import length
from rewards.math import math_accuracy


def test_registry_and_import_path():
    assert rewards.resolve("exact_match") is rewards.exact.exact_match
    assert rewards.resolve("rewards.exact:exact_match") is rewards.exact.exact_match
    assert rewards.resolve("rewards.exact.exact_match") is rewards.exact.exact_match
    assert sorted(rewards.REGISTRY) == ["exact_match", "format", "length", "math_accuracy"]


def test_unknown_reward_names_the_choices():
    with pytest.raises(ValueError, match=r"cannot load reward function 'nope'.*'exact_match', 'format'"):
        rewards.resolve("nope")


@pytest.mark.parametrize(
    "module",
    [rewards._text, rewards.exact, rewards.math, rewards.format, rewards.length],
)
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.failed == 0
    assert result.attempted >= 2


# math_accuracy


def test_math_gold_formats():
    completions = ["So she has \\boxed{72} clips.", "The answer is 72.", "It is 71."]
    gsm8k = ["48 + 24 = <<48+24=72>>72\n#### 72"] * 3
    assert math_accuracy(completions, answer=gsm8k) == [1.0, 1.0, 0.0]
    assert math_accuracy(completions, answer=["so $\\boxed{72}$"] * 3) == [1.0, 1.0, 0.0]
    assert math_accuracy(completions, answer=["72"] * 3) == [1.0, 1.0, 0.0]
    assert math_accuracy(["total: 1000"], answer=["#### 1,000"]) == [1.0]


def test_math_answer_choice():
    # \boxed{} wins over a later number; the reasoning before </think> is not graded.
    assert math_accuracy(["\\boxed{3}, checked with 4 apples"], answer=["3"]) == [1.0]
    assert math_accuracy(["<think>it is 3</think> The answer is 4."], answer=["3"]) == [0.0]


def test_math_conversational_and_column():
    completions = [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is $4$."}]]
    assert math_accuracy(completions, solution=["4"], column="solution", prompts=["2+2?"]) == [1.0]
    with pytest.raises(ValueError, match="no gold column 'answer'"):
        math_accuracy(["4"], solution=["4"])


def test_math_no_answer_and_unparseable_gold():
    assert math_accuracy(["I don't know.", ""], answer=["4", "4"]) == [0.0, 0.0]
    assert math_accuracy(["4"], answer=["####"]) == [None]


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        ("0.5", "\\frac{1}{2}"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{\\sqrt{2}}", "\\sqrt 2"),
        ("x = 1/2", "0.5"),
    ],
)
def test_math_equivalent_forms(completion, gold):
    assert math_accuracy([completion], answer=[gold]) == [1.0]


# format


def test_format_default_pattern():
    completions = [
        "<think>\n2 + 2 = 4\n</think>\n\nThe answer is 4.\n",
        "<think>no answer</think>",
        "The answer is 4.",
        "<think>unclosed\nThe answer is 4.",
        [{"role": "assistant", "content": "<think>x</think> 4"}],
    ]
    assert format_reward(completions) == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_format_custom_pattern_matches_fully():
    assert format_reward(["Answer: 42", "Answer: 42 or so"], pattern=r"Answer: \d+") == [1.0, 0.0]


# length


def test_length_edges():
    # target 100, buffer 20: free up to 80, -1/20 per character after it, -1 from 100 on.
    sizes = [0, 80, 81, 90, 99, 100, 101, 10_000]
    assert length(["a" * n for n in sizes], target=100, buffer=20) == [
        0.0,
        0.0,
        -0.05,
        -0.5,
        -0.95,
        -1.0,
        -1.0,
        -1.0,
    ]
    # The default buffer is target // 4.
    assert length(["a" * 75, "a" * 76], target=100) == [0.0, -0.04]
    # buffer 0: a hard limit.
    assert length(["a" * 100, "a" * 101], target=100, buffer=0) == [0.0, -1.0]


def test_length_units():
    assert length(["one two  three\nfour"], target=4, buffer=1, unit="words") == [-1.0]
    assert length(["x"], target=8, buffer=4, unit="tokens", completion_ids=[list(range(6))]) == [-0.5]
    with pytest.raises(ValueError, match="completion_ids"):
        length(["x"], target=8, unit="tokens")


# TRL's call


def test_math_outside_the_main_thread():
    # math-verify's own timeouts use signals, which only work in the main thread.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(math_accuracy, ["\\boxed{4}"], answer=["4"]).result() == [1.0]
