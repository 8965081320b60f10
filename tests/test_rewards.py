"""The reward package: lookup by name or import path, arguments, guarding, and each reward's behaviour."""

from __future__ import annotations

import doctest
import os
import pickle
import re
import secrets
import stat
import tempfile
import textwrap
import time
from pathlib import Path

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
    assert sorted(rewards.REGISTRY) == [
        "code_execution",
        "exact_match",
        "format",
        "length",
        "math_accuracy",
        "reward_model",
        "similarity",
    ]


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


# Real gold answers. GSM8K: openai/gsm8k, config main, test split, rows 0-7, the `answer` field as it is
# (calculator annotations, `#### N` line). Each with a completion that states the answer and one that
# gets a number wrong.
GSM8K = [
    (
        "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
        "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.\n#### 18",
        "She sells 16 - 3 - 4 = 9 eggs and makes 9 * 2 = $18 every day.\n#### 18",
        "She sells 16 - 3 = 13 eggs, so she makes 13 * 2 = $26 every day.\n#### 26",
    ),
    (
        "It takes 2/2=<<2/2=1>>1 bolt of white fiber\n"
        "So the total amount of fabric is 2+1=<<2+1=3>>3 bolts of fabric\n#### 3",
        "Half of 2 is 1, so the robe takes 2 + 1 = 3 bolts in total.",
        "The robe takes 2 + 2 = 4 bolts in total.",
    ),
    (
        "The cost of the house and repairs came out to 80,000+50,000=$<<80000+50000=130000>>130,000\n"
        "He increased the value of the house by 80,000*1.5=<<80000*1.5=120000>>120,000\n"
        "So the new value of the house is 120,000+80,000=$<<120000+80000=200000>>200,000\n"
        "So he made a profit of 200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000",
        "The house is now worth $200,000, so his profit is $200,000 - $130,000 = $70,000.",
        "The house is now worth $120,000, so his profit is $120,000 - $130,000 = -$10,000.",
    ),
    (
        "He sprints 3*3=<<3*3=9>>9 times\nSo he runs 9*60=<<9*60=540>>540 meters\n#### 540",
        "<think>3 sprints, 3 times, 60 m each: 9 * 60.</think>\nJames runs \\boxed{540} meters a week.",
        "<think>3 sprints, 3 times, 60 m each.</think>\nJames runs \\boxed{180} meters a week.",
    ),
    (
        "If each chicken eats 3 cups of feed per day, then for 20 chickens they would need "
        "3*20=<<3*20=60>>60 cups of feed per day.\n"
        "If she feeds the flock 15 cups of feed in the morning, and 25 cups in the afternoon, "
        "then the final meal would require 60-15-25=<<60-15-25=20>>20 cups of chicken feed.\n#### 20",
        "20 chickens eat 60 cups a day; 60 - 15 - 25 = 20. The answer is 20 cups.",
        "20 chickens eat 60 cups a day; 60 - 15 = 45. The answer is 45 cups.",
    ),
    (
        "The discount price of one glass is 60/100 * 5 = $<<60/100*5=3>>3.\n"
        "If every second glass is cheaper, that means Kylar is going to buy 16 / 2 = <<16/2=8>>8 cheaper "
        "glasses.\nSo for the cheaper glasses, Kylar is going to pay 8 * 3 = $<<8*3=24>>24.\n"
        "And for the regular-priced glasses, Kylar will pay 8 * 5 = $<<8*5=40>>40.\n"
        "So in total Kylar needs to pay 24 + 40 = $<<24+40=64>>64 for the glasses he wants to buy.\n#### 64",
        "8 glasses at $5 and 8 at $3: Kylar pays $64.",
        "16 glasses at $5: Kylar pays $80.",
    ),
    (
        "If Seattle has 20 sheep, Charleston has 4 * 20 sheep = <<20*4=80>>80 sheep\n"
        "Toulouse has twice as many sheep as Charleston, which is 2 * 80 sheep = <<2*80=160>>160 sheep\n"
        "Together, the three has 20 sheep + 160 sheep + 80 sheep = <<20+160+80=260>>260 sheep\n#### 260",
        "Together they have 20 + 80 + 160 = 260 sheep.",
        "Together they have 20 + 80 + 40 = 140 sheep.",
    ),
    (
        "First find how many gigabytes are in 40% of the file: 200 GB * 40% = <<200*40*.01=80>>80 GB\n"
        "Then divide that number by the download rate to find the time until Windows restarts: "
        "80 GB / 2 GB/minute = <<80/2=40>>40 minutes\n"
        "Then find the time to download the whole file after the restart: "
        "200 GB / 2 GB/minute = <<200/2=100>>100 minutes\n"
        "Then add the time to download 40% of the file, to download the whole file, and to wait for Windows "
        "to update: 40 minutes + 100 minutes + 20 minutes = <<40+100+20=160>>160 minutes\n#### 160",
        "40 + 20 + 100 = 160, so the download takes $160$ minutes.",
        "40 + 100 = 140, so the download takes $140$ minutes.",
    ),
]

# MATH. Rows of HuggingFaceH4/MATH-500 (test split), named by their unique_id: the `answer` field, or the
# `solution` field (text with \boxed{}) where marked. The last ones are answers in the format of MATH
# (hendrycks competition_math), written for this test: a letter choice, an interval, a dollar amount.
MATH = [
    (  # test/precalculus/807.json
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        "So $r = 3$ and $\\theta = \\frac{\\pi}{2}$: the point is "
        "$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$.",
        "So the point is $\\boxed{\\left( 3, \\frac{\\pi}{3} \\right)}$.",
    ),
    (  # test/algebra/2584.json, solution
        "$f(-2)+f(-1)+f(0)=\\frac{3(-2)-2}{-2-2}+\\frac{3(-1)-2}{-1-2}+\\frac{3(0)-2}{0-2}=\\frac{-8}{-4}"
        "+\\frac{-5}{-3}+\\frac{-2}{-2}=2+\\frac{5}{3}+1=\\boxed{\\frac{14}{3}}$",
        "Adding $2 + \\frac{5}{3} + 1$, the answer is $\\boxed{\\frac{14}{3}}$.",
        "Adding $2 + \\frac{4}{3} + 1$, the answer is $\\boxed{\\frac{13}{3}}$.",
    ),
    (  # test/number_theory/572.json, solution
        "First prime factorize $196=2^2\\cdot7^2$. The prime factorization of any divisor of 196 cannot "
        "include any primes other than 2 and 7. We are free to choose either 0, 1, or 2 as the exponent of 2 "
        "in the prime factorization of a divisor of 196. Similarly, we may choose 0, 1, or 2 as the exponent "
        "of 7. In total, there are $3\\times 3=9$ possibilities for the prime factorization of a divisor of "
        "196. Distinct prime factorizations correspond to distinct integers, so there are $\\boxed{9}$ "
        "divisors of 196.",
        "$196 = 2^2 \\cdot 7^2$ has $(2+1)(2+1) = 9$ divisors.",
        "$196 = 2^2 \\cdot 7^2$ has $2 \\cdot 2 = 4$ divisors.",
    ),
    (  # test/algebra/1349.json, solution
        "Evelyn covered more distance in less time than Briana, Debra and Angela, so her average speed is "
        "greater than any of their average speeds. Evelyn went almost as far as Carla in less than half the "
        "time that it took Carla, so Evelyn's average speed is also greater than Carla's. Therefore, "
        "$\\boxed{\\text{Evelyn}}$ is our answer.",
        "Evelyn's speed is the greatest, so the answer is $\\boxed{\\text{Evelyn}}$.",
        "Carla went the farthest, so the answer is $\\boxed{\\text{Carla}}$.",
    ),
    (  # test/precalculus/927.json
        "90^\\circ",
        "The direction vectors are orthogonal, so the angle is $\\boxed{90^\\circ}$.",
        "The angle between the lines is $\\boxed{60^\\circ}$.",
    ),
    (  # the distance between (2, -6) and (-4, 3)
        "3\\sqrt{13}",
        "The distance is $\\sqrt{6^2 + 9^2} = \\sqrt{117} = \\boxed{3\\sqrt{13}}$.",
        "The distance is $\\boxed{3\\sqrt{11}}$.",
    ),
    (
        "\\text{(C)}",
        "The curve is a parabola, so the answer is $\\boxed{\\text{(C)}}$.",
        "$\\boxed{\\text{(B)}}$",
    ),
    ("[-2,7]", "The domain of the function is $\\boxed{[-2,7]}$.", "The domain is $\\boxed{[-2,8]}$."),
    ("\\$18.90", "In total she pays \\$18.90.", "In total she pays $\\boxed{\\$19.90}$."),
    ("10\\%", "The price went up by $10\\%$.", "The price went up by $\\boxed{12\\%}$."),
]


@pytest.mark.parametrize(
    ("gold", "right", "wrong"),
    GSM8K + MATH,
    ids=[f"gsm8k-{i}" for i in range(len(GSM8K))] + [f"math-{i}" for i in range(len(MATH))],
)
def test_math_real_gold_answers(gold, right, wrong):
    assert math_accuracy([right, wrong], answer=[gold, gold]) == [1.0, 0.0]


def test_math_dollar_signs():
    # `\$` is a dollar sign, not math: a gold `\$18.90` used to parse as nothing (None), and a completion
    # that writes `\$18.90` outside math mode as no answer.
    assert math_accuracy(["\\$18.90", "$\\$18.90$", "#### 18.90"], answer=["\\$18.90"] * 3) == [1.0] * 3


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


# code_execution: hostile programs


def refused(statement: str, message: str = "blocked by the reward sandbox") -> str:
    """A test that passes only if `statement` raises a PermissionError whose message has `message`."""
    return (
        f"try:\n{textwrap.indent(statement, '    ')}\nexcept PermissionError as error:\n"
        f"    assert {message!r} in str(error), error\nelse:\n    raise AssertionError('not refused')"
    )


@pytest.fixture
def sandboxes(tmp_path, monkeypatch) -> Path:
    """The folder the sandboxes are made in (a sandbox's processes have their working directory there)."""
    folder = tmp_path / "sandboxes"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def processes_left(folder: Path) -> list[int]:
    """Processes whose parent is this one, or whose working directory is in `folder`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue  # gone, or a zombie
        parent = re.search(r"^PPid:\s*(\d+)", status, re.MULTILINE)
        if (parent and int(parent.group(1)) == os.getpid()) or cwd.startswith(str(folder)):
            found.append(int(pid))
    return found


# (setup, bomb): the bomb must be refused by the sandbox.
FORK_BOMBS = {
    "os.fork": ("import os", "while True:\n    os.fork()"),
    "multiprocessing": (
        "import multiprocessing\n\ndef bomb():\n    while True:\n"
        "        multiprocessing.Process(target=bomb).start()",
        "bomb()",
    ),
    # spawn and forkserver start processes through _posixsubprocess, which raises no audit event.
    "multiprocessing spawn": (
        "import multiprocessing, os",
        "while True:\n    multiprocessing.get_context('spawn').Process(target=os.getpid).start()",
    ),
    "multiprocessing forkserver": (
        "import multiprocessing, os",
        "while True:\n    multiprocessing.get_context('forkserver').Process(target=os.getpid).start()",
    ),
}


@pytest.mark.parametrize(("setup", "bomb"), FORK_BOMBS.values(), ids=FORK_BOMBS.keys())
def test_code_fork_bomb(setup, bomb, sandboxes):
    before = processes_left(sandboxes)
    start = time.monotonic()
    assert run_tests(f"{setup}\n{bomb}", ["assert True"], timeout=2) == 0.0
    assert time.monotonic() - start < 2 + 3
    assert processes_left(sandboxes) == before
    assert run_tests(setup, [refused(bomb, "starting processes is blocked")]) == 1.0
    assert list(sandboxes.iterdir()) == []


def test_code_10_gb_allocation():
    start = time.monotonic()
    assert run_tests("x = bytearray(10 * 1024**3)", ["assert True"]) == 0.0
    assert run_tests("", ["try:\n    bytearray(10 * 1024**3)\nexcept MemoryError:\n    pass"]) == 1.0
    assert time.monotonic() - start < 5
    assert run_tests(ADD, ["assert add(1, 2) == 3"]) == 1.0  # and the runner still works


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside the sandbox: a file, an empty folder and a folder with a file."""
    folder = tmp_path / "outside"
    (folder / "empty").mkdir(parents=True)
    (folder / "sub").mkdir()
    (folder / "sub" / "keep.txt").write_text("keep")
    (folder / "victim.txt").write_text("precious")
    return folder


def snapshot(folder: Path) -> dict[str, tuple]:
    """Each path under `folder` with its content, mode and modification time."""
    return {
        str(path.relative_to(folder)): (
            path.is_file() and path.read_text(),
            path.stat().st_mode,
            path.stat().st_mtime_ns,
        )
        for path in sorted(folder.rglob("*"))
    }


# Each changes a file or folder outside the sandbox (P is the file, D its folder).
ESCAPES = {
    "remove": "os.remove(P)",
    "pathlib unlink": "pathlib.Path(P).unlink()",
    "rmtree": "shutil.rmtree(D)",
    "rmdir": "os.rmdir(D + '/empty')",
    "open w": "open(P, 'w')",
    "open a": "open(P, 'a').write('x')",
    "open r+": "open(P, 'r+').write('x')",
    "open bytes path": "open(P.encode(), 'w')",
    "open relative path": "open('../' * 40 + P, 'w')",
    "create": "open(D + '/new.txt', 'x')",
    "write_text": "pathlib.Path(P).write_text('pwned')",
    "os.open": "os.open(P, os.O_WRONLY | os.O_TRUNC)",
    "os.open dir_fd": "os.unlink('victim.txt', dir_fd=os.open(D, os.O_RDONLY))",
    "rename": "os.rename(P, P + '.moved')",
    "replace onto": "open('mine.txt', 'w').write('pwned')\nos.replace('mine.txt', P)",
    "move": "shutil.move(P, 'stolen.txt')",
    "copyfile onto": "open('mine.txt', 'w').write('pwned')\nshutil.copyfile('mine.txt', P)",
    "truncate": "os.truncate(P, 0)",
    "chmod": "os.chmod(P, 0)",
    "fchmod": "os.fchmod(os.open(P, os.O_RDONLY), 0)",
    "utime": "os.utime(P, (0, 0))",
    "mkdir": "os.mkdir(D + '/new')",
    "makedirs": "os.makedirs(D + '/a/b')",
    "hard link": "os.link(P, 'hard.txt')",
    "symlink": "os.symlink(P, 'soft.txt')\nopen('soft.txt', 'w').write('pwned')",
    "symlinked folder": "os.symlink(D, 'soft')\nopen('soft/victim.txt', 'w').write('pwned')",
    "chdir": "os.chdir(D)\nopen('victim.txt', 'w').write('pwned')",
    "mkstemp": "import tempfile\ntempfile.mkstemp(dir=D)",
    "sqlite3": "import sqlite3\nsqlite3.connect(D + '/x.db').execute('create table t (x)')",
}


@pytest.mark.parametrize("attempt", ESCAPES.values(), ids=ESCAPES.keys())
def test_code_cannot_change_files_outside(attempt, outside):
    before = snapshot(outside)
    code = f"import os, pathlib, shutil\nP = {str(outside / 'victim.txt')!r}\nD = {str(outside)!r}"
    assert run_tests(code, [refused(attempt, "outside the sandbox folder")]) == 1.0
    assert run_tests(code, [attempt]) == 0.0
    assert snapshot(outside) == before
    assert (outside / "victim.txt").read_text() == "precious"


def test_code_cannot_write_to_a_device_it_made(tmp_path):
    # mknod raises no audit event; as root it can make a disk's device node in the sandbox folder.
    try:
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except OSError:
        pytest.skip("mknod needs root here")
    (tmp_path / "null").unlink()
    code = "import os, stat\nos.mknod('null', stat.S_IFCHR | 0o600, os.makedev(1, 3))"
    assert run_tests(code, [refused("open('null', 'w')"), "assert open('null').read() == ''"]) == 1.0


def test_code_cannot_escape_by_changing_directory():
    name = f"reward-sandbox-escape-{secrets.token_hex(8)}.txt"
    code = "import os\nos.chdir('/tmp')"
    tests = [
        refused(f"open({name!r}, 'w')", "outside the sandbox folder"),
        "assert os.getcwd() == os.path.realpath('/tmp')",
    ]
    assert run_tests(code, tests) == 1.0
    assert not Path("/tmp", name).exists()


def test_code_files_inside_the_sandbox_still_work(outside):
    # Reading outside stays allowed; so does everything inside the sandbox folder, and writing to /dev/null.
    code = f"""
import os, pathlib, shutil, sqlite3, tempfile
os.makedirs('a/b')
pathlib.Path('a/b/f.txt').write_text('x')
os.rename('a/b/f.txt', 'a/g.txt')
shutil.copyfile('a/g.txt', 'a/h.txt')
os.symlink('g.txt', 'a/link')
os.chmod('a/h.txt', 0o600)
os.truncate('a/h.txt', 0)
with tempfile.TemporaryDirectory() as scratch:
    open(os.path.join(scratch, 'x'), 'w').write('y')
shutil.rmtree('a/b')
sqlite3.connect('db.sqlite').execute('create table t (x)')
open('/dev/null', 'w').write('discarded')
print('printed')
secret = open({str(outside / "victim.txt")!r}).read()
"""
    tests = [
        "assert open('a/link').read() == 'x'",
        "assert os.path.getsize('a/h.txt') == 0",
        "assert sorted(os.listdir('a')) == ['g.txt', 'h.txt', 'link']",
        "assert os.path.getsize('db.sqlite') > 0",
        "assert secret == 'precious'",
    ]
    assert run_tests(code, tests) == 1.0


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
