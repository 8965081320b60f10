"""The reward package: lookup by name or import path, arguments, guarding, and each reward's behaviour."""

from __future__ import annotations

import doctest
import tempfile
import time

import pytest

import rewards
import rewards._text
import rewards.code
import rewards.exact
import rewards.format
import rewards.length
import rewards.math
from rewards.code import code_execution, run_tests
from rewards.format import format as format_reward
from rewards.length import length
from rewards.math import math_accuracy


def test_registry_and_import_path():
    assert rewards.resolve("exact_match") is rewards.exact.exact_match
    assert rewards.resolve("rewards.exact:exact_match") is rewards.exact.exact_match
    assert rewards.resolve("rewards.exact.exact_match") is rewards.exact.exact_match
    assert sorted(rewards.REGISTRY) == ["code_execution", "exact_match", "format", "length", "math_accuracy"]


def test_unknown_reward_names_the_choices():
    with pytest.raises(ValueError, match=r"cannot load reward function 'nope'.*'exact_match', 'format'"):
        rewards.resolve("nope")


@pytest.mark.parametrize(
    "module",
    [rewards._text, rewards.exact, rewards.math, rewards.format, rewards.length, rewards.code],
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


# code_execution


def fenced(code: str) -> str:
    return f"Here is my solution:\n```python\n{code}\n```\n"


ADD = "def add(a, b):\n    return a + b"


def test_code_passing_and_partial():
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
    half = ["assert add(1, 2) == 3", "assert add(1, 1) == 3"]
    completions = [fenced(ADD), fenced(ADD), "no code here", [{"role": "assistant", "content": fenced(ADD)}]]
    assert code_execution(completions, tests=[tests, half, tests, tests]) == [1.0, 0.5, 0.0, 1.0]


def test_code_tests_as_one_string():
    tests = (
        "import math\nassert add(1, 2) == 3\nassert math.isclose(add(0.1, 0.2), 0.3)\nassert add(1, 1) == 3"
    )
    assert run_tests(ADD, tests) == pytest.approx(2 / 3)


def test_code_infinite_loop_times_out():
    start = time.monotonic()
    assert run_tests("while True:\n    pass", ["assert True"], timeout=1) == 0.0
    assert time.monotonic() - start < 1 + 3


def test_code_tests_before_a_hang_still_count():
    code = "def hang():\n    while True:\n        pass"
    assert run_tests(code, ["assert True", "hang()", "assert True"], timeout=1) == pytest.approx(1 / 3)


def test_code_memory_bomb():
    assert run_tests("x = bytearray(2 * 1024**3)", ["assert True"]) == 0.0
    assert run_tests("x = bytearray(100 * 1024**2)", ["assert len(x) > 0"]) == 1.0  # below the limit
    assert run_tests("x = bytearray(100 * 1024**2)", ["assert True"], memory_mb=64) == 0.0


def test_code_network_is_blocked():
    connect = "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)"
    assert run_tests(connect, ["assert True"]) == 0.0
    # It fails because of the sandbox, not because nothing listens on port 9.
    blocked = (
        "import socket\ntry:\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
        "except PermissionError as e:\n    assert 'network access is blocked by the reward sandbox' in str(e)\n"
        "else:\n    raise AssertionError('connected')"
    )
    assert run_tests("", [blocked]) == 1.0


def test_code_processes_and_signals_are_blocked():
    assert run_tests("import subprocess", ["subprocess.run(['true'])"]) == 0.0
    assert run_tests("import os", ["os.system('true')"]) == 0.0
    # Its own pid may be signalled, the parent (the trainer) may not.
    assert run_tests("import os", ["os.kill(os.getpid(), 0)", "os.kill(os.getppid(), 0)"]) == 0.5


def test_code_files_stay_in_a_removed_temp_dir(tmp_path, monkeypatch):
    scratch, cwd = tmp_path / "scratch", tmp_path / "cwd"
    scratch.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.chdir(cwd)
    code = "import os\nopen('marker.txt', 'w').write('x')\nwhere = os.getcwd()"
    tests = [f"assert where.startswith({str(scratch)!r})", "assert open('marker.txt').read() == 'x'"]
    assert run_tests(code, tests) == 1.0
    assert list(scratch.iterdir()) == []
    assert list(cwd.iterdir()) == []


def test_code_environment_is_stripped(monkeypatch):
    monkeypatch.setenv("FINETUNE_TEST_SECRET", "hunter2")
    tests = ["assert 'FINETUNE_TEST_SECRET' not in os.environ", "assert 'hunter2' not in str(os.environ)"]
    assert run_tests("import os", tests) == 1.0


def test_code_output_cannot_forge_passes():
    code = "import os\nfor fd in range(1, 20):\n    try:\n        os.write(fd, b'x pass 0\\n')\n    except OSError:\n        pass"
    assert run_tests(code, ["assert False"]) == 0.0


def test_code_main_block_is_skipped():
    code = ADD + "\nif __name__ == '__main__':\n    print(add(*map(int, input().split())))"
    assert run_tests(code, ["assert add(2, 2) == 4"]) == 1.0


# TRL's call


def test_math_outside_the_main_thread():
    # math-verify's own timeouts use signals, which only work in the main thread.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(math_accuracy, ["\\boxed{4}"], answer=["4"]).result() == [1.0]
