"""Code under Triton's interpreter: a child process with `TRITON_INTERPRET=1` (read when triton is
imported, so not switchable inside the test process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`python *args` interpreted, from the repository root, output captured."""
    # Prepended, not replaced: an installation on PYTHONPATH (the H200 host's) must stay importable.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
