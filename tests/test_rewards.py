"""The reward package: lookup by name or import path, arguments, guarding, and each reward's behaviour."""

from __future__ import annotations

import doctest
import pickle
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
from rewards import RewardError, build, guarded
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
    [rewards, rewards._text, rewards.exact, rewards.math, rewards.format, rewards.length, rewards.code],
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
    assert build("format", pattern=r"Answer: \d+")(["Answer: 7"]) == [1.0]


def test_format_bad_regex_fails_at_build():
    with pytest.raises(ValueError, match=r"reward 'format': invalid format pattern '<think>\(\.\*'"):
        build("format", pattern="<think>(.*")


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


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"target": 0}, "target must be a positive integer"),
        ({"target": 10, "buffer": 11}, r"buffer must be between 0 and target \(10\)"),
        ({"target": 10, "unit": "bytes"}, "unit must be one of chars, words, tokens"),
    ],
)
def test_length_bad_arguments_fail_at_build(arguments, message):
    with pytest.raises(ValueError, match=f"reward 'length': length: {message}"):
        build("length", **arguments)


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


def test_code_arguments():
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        build("code_execution", timeout=-1)
    reward = build("code_execution", column="checks", timeout=2, workers=2)
    assert reward([fenced(ADD)], checks=[["assert add(1, 2) == 3"]]) == [1.0]
    with pytest.raises(ValueError, match="no tests"):
        run_tests(ADD, [])


# build


def test_build_names_and_binds():
    reward = build("length", target=10, buffer=0)
    assert reward.__name__ == "length"
    assert reward(["a" * 10, "a" * 11], prompts=["p", "p"]) == [0.0, -1.0]
    assert build("rewards.exact:exact_match").__name__ == "rewards.exact:exact_match"
    assert pickle.loads(pickle.dumps(reward))(["a" * 11]) == [-1.0]


def test_build_argument_errors():
    with pytest.raises(
        ValueError, match=r"^reward 'length': unknown argument 'targt' \(arguments: buffer, target, unit\)$"
    ):
        build("length", targt=256)
    with pytest.raises(ValueError, match=r"^reward 'length': missing required argument 'target'$"):
        build("length")
    with pytest.raises(
        ValueError, match=r"^reward 'exact_match': unknown argument 'answer' \(arguments: none\)$"
    ):
        build("exact_match", answer="4")
    with pytest.raises(ValueError, match="cannot load reward function 'nope'"):
        build("nope")


def test_build_recipe_arguments_win_over_columns():
    assert build("length", target=3, buffer=0)(["abcd"], target=[100]) == [-1.0]


# guarded


def fragile(completions, **kwargs):
    return [1 / int(c) for c in completions]


def test_guarded_raise_names_the_row():
    reward = guarded(build("tests.test_rewards:fragile"), name="math_accuracy")
    assert reward.__name__ == "math_accuracy"
    with pytest.raises(
        RewardError, match=r"^reward 'math_accuracy' failed on row 3: ZeroDivisionError: division by zero$"
    ):
        reward(["1", "2", "4", "0", "0"], answer=list("abcde"), trainer_state=object())
    assert issubclass(RewardError, ValueError)


def test_guarded_zero_keeps_other_rows():
    assert guarded(fragile, on_error="zero")(["2", "x", "4", "0"]) == [0.5, 0.0, 0.25, 0.0]


def test_guarded_checks_the_scores():
    with pytest.raises(RewardError, match=r"reward 'short' returned 1 scores for 2 completions"):
        guarded(lambda completions, **kw: [1.0], name="short")(["a", "b"])
    with pytest.raises(RewardError, match=r"reward 'text' returned str '1' on row 1"):
        guarded(lambda completions, **kw: [1, "1"], name="text", on_error="zero")(["a", "b"])
    assert guarded(lambda completions, **kw: [1, None, 0.5], name="ok")(["a", "b", "c"]) == [1.0, None, 0.5]


def test_guarded_batch_only_failure():
    def needs_two(completions, **kwargs):
        if len(completions) < 2:
            return [0.0] * len(completions)
        raise RuntimeError("batch too big")

    with pytest.raises(RewardError, match=r"failed on a batch of 2 rows \(each row alone passes\)"):
        guarded(needs_two)(["a", "b"])


# TRL's call


def test_trl_call_convention():
    # GRPOTrainer calls reward(prompts=, completions=, completion_ids=, **columns, trainer_state=, log_extra=,
    # log_metric=) and logs it under __name__.
    state = {
        "prompts": ["2+2?", "3+3?"],
        "completion_ids": [[1, 2], [3]],
        "answer": ["#### 4", "#### 6"],
        "trainer_state": object(),
        "log_extra": print,
        "log_metric": print,
    }
    completions = ["<think>add</think> 4", "<think>add</think> 7"]
    specs = [
        ("math_accuracy", {}, [1.0, 0.0]),
        ("format", {}, [1.0, 1.0]),
        ("length", {"target": 24, "buffer": 8}, [-0.5, -0.5]),
    ]
    for name, arguments, expected in specs:
        reward = guarded(build(name, **arguments))
        assert reward.__name__ == name
        assert reward(completions=completions, **state) == expected


def test_math_outside_the_main_thread():
    # math-verify's own timeouts use signals, which only work in the main thread.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(math_accuracy, ["\\boxed{4}"], answer=["4"]).result() == [1.0]
