"""Code reward: the completion's Python code block run against the row's tests in a separate process.

`run_tests` is the sandboxed runner, also meant for the eval harness (pass@k over sampled programs). It is
a best-effort guard against accidents (endless loops, fork and memory bombs, stray files, writes outside
its folder, network calls), not a security sandbox: see docs/rewards.md for what it does not stop.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rewards._text import final_answer, reply

_CHILD = Path(__file__).with_name("_child.py")
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON = {"python", "py", "python3"}
_FILE_MB = 64  # the largest file the code may write
_RESULT_BYTES = 1 << 20  # read at most this much of the result pipe


def extract_code(text: str) -> str | None:
    """The last ```python block of the text (after any `</think>`), else its last ``` block, else None.

    >>> extract_code("Draft:\\n```python\\nx = 1\\n```\\nFinal:\\n```python\\nx = 2\\n```")
    'x = 2\\n'
    >>> extract_code("```\\nprint(1)\\n```")
    'print(1)\\n'
    >>> extract_code("<think>```python\\nx = 1\\n```</think> no code") is None
    True
    """
    blocks = _FENCE.findall(final_answer(text))
    python = [body for lang, body in blocks if lang.lower() in _PYTHON]
    if python:
        return python[-1]
    return blocks[-1][1] if blocks else None


def split_tests(tests: Sequence[str] | str) -> list[tuple[str, bool]]:
    """Tests as (source, counted) pairs: each list item is one test; in a string, each top-level assert is.

    A string's other top-level statements (imports, helpers) run in order but are not counted; a string
    without a top-level assert (HumanEval's `def check(...)` then `check(fn)`) is one test.

    >>> split_tests("import math\\nassert math.pi > 3\\nassert f(1) == 2")
    [('import math', False), ('assert math.pi > 3', True), ('assert f(1) == 2', True)]
    >>> split_tests(["assert f(1) == 2", "assert f(2) == 3"])
    [('assert f(1) == 2', True), ('assert f(2) == 3', True)]
    """
    if not isinstance(tests, str):
        return [(str(test), True) for test in tests]
    try:
        statements = ast.parse(tests).body
    except SyntaxError:
        return [(tests, True)]  # fails in the child, as one test
    if not any(isinstance(s, ast.Assert) for s in statements):
        return [(tests, True)]
    return [(ast.unparse(s), isinstance(s, ast.Assert)) for s in statements]


def _environment(home: str) -> dict[str, str]:
    # Nothing of the parent's environment (tokens, credentials) reaches the code.
    threads = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home, **threads}


def _read_passes(fd: int, nonce: str, counted: set[int]) -> int:
    os.set_blocking(fd, False)
    data = b""
    while len(data) < _RESULT_BYTES:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    passed = set()
    for line in data.decode(errors="replace").splitlines():
        tag, _, index = line.partition(" pass ")
        if tag == nonce and index.isdigit() and int(index) in counted:
            passed.add(int(index))
    return len(passed)


def run_tests(code: str, tests: Sequence[str] | str, *, timeout: float = 5.0, memory_mb: int = 512) -> float:
    """The fraction of `tests` that pass after running `code`, both in a fresh `python -I -B` process.

    The child gets a temporary working directory (removed afterwards), /dev/null as stdin, stdout and
    stderr, a minimal environment, `memory_mb` of address space, files of at most 64 MB, and no network, no
    new processes and no file changes outside its directory (refused by an audit hook). After `timeout`
    seconds of wall-clock time its process group is killed; tests that passed before a timeout or a crash
    still count. The code runs as module `__solution__`, so an `if __name__ == "__main__":` block is
    skipped. Code that raises passes no test.

    >>> run_tests("def f(x):\\n    return x + 1", ["assert f(1) == 2", "assert f(2) == 4"])
    0.5
    """
    items = split_tests(tests)
    counted = {index for index, (_, is_test) in enumerate(items) if is_test}
    if not counted:
        raise ValueError("run_tests: no tests")
    nonce = secrets.token_hex(16)
    read_fd, write_fd = os.pipe()
    try:
        with tempfile.TemporaryDirectory(prefix="reward-code-", ignore_cleanup_errors=True) as workdir:
            job = {
                "code": code,
                "tests": items,
                "nonce": nonce,
                "result_fd": write_fd,
                "memory_mb": memory_mb,
                "cpu_s": math.ceil(timeout) + 1,
                "file_mb": _FILE_MB,
            }
            job_file = Path(workdir, "job.json")
            job_file.write_text(json.dumps(job))
            process = subprocess.Popen(
                [sys.executable, "-I", "-B", str(_CHILD), str(job_file)],
                cwd=workdir,
                env=_environment(workdir),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(write_fd,),
                start_new_session=True,  # its own process group, killed as a whole
            )
            os.close(write_fd)
            write_fd = -1
            # The pipe holds ~1,500 result lines before the child blocks on it; more tests than that
            # would time out, so it is read once the child is gone.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=timeout)
            # Also after a normal exit: anything the code left running in its group goes too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return _read_passes(read_fd, nonce, counted) / len(counted)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def validate(
    *,
    column: str = "tests",
    timeout: float = 5.0,
    memory_mb: int = 512,
    workers: int | None = None,
    **arguments,
) -> None:
    """Checks the arguments (also when `rewards.build` reads a recipe).

    >>> validate(timeout=0)
    Traceback (most recent call last):
    ...
    ValueError: code_execution: timeout must be a positive number of seconds, got 0
    """
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"code_execution: timeout must be a positive number of seconds, got {timeout!r}")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 64:
        raise ValueError(f"code_execution: memory_mb must be an integer of at least 64, got {memory_mb!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"code_execution: workers must be a positive integer, got {workers!r}")


def code_execution(
    completions: list,
    *,
    column: str = "tests",
    timeout: float = 5.0,
    memory_mb: int = 512,
    workers: int | None = None,
    **kwargs,
) -> list[float]:
    """The fraction of the row's tests (column `column`) that the completion's code passes (see `run_tests`).

    A completion without a fenced code block scores 0.0. Rows run in parallel, `workers` processes at a
    time (default: the number of CPUs, at most 8).

    >>> code_execution(["```python\\ndef f(x):\\n    return 2 * x\\n```", "no code"], tests=["assert f(2) == 4"] * 2)
    [1.0, 0.0]
    """
    validate(column=column, timeout=timeout, memory_mb=memory_mb, workers=workers)
    if column not in kwargs:
        raise ValueError(f"code_execution: no tests column {column!r} (columns: {', '.join(sorted(kwargs))})")
    rows = list(zip(completions, kwargs[column], strict=True))

    def score(row: tuple) -> float:
        code = extract_code(reply(row[0]))
        return 0.0 if code is None else run_tests(code, row[1], timeout=timeout, memory_mb=memory_mb)

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(rows)))) as pool:
        return list(pool.map(score, rows))


code_execution.validate = validate  # type: ignore[attr-defined]
