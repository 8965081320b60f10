"""Code under Triton's interpreter: a child process with `TRITON_INTERPRET=1` (read when triton is
imported, so not switchable inside the test process)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
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


def unusable() -> str | None:
    """Why Triton's interpreter cannot run our kernels here, or None."""
    if importlib.util.find_spec("triton") is None:  # CPU-only torch wheels do not bring triton
        return "triton is not installed"
    version = importlib.metadata.version("triton")
    if tuple(int(part) for part in version.split(".")[:2]) < (3, 8):
        # Triton 3.6's interpreter fails on any `range` loop over a scalar kernel argument under numpy 2
        # ("only 0-dimensional arrays can be converted"; a 3-line kernel shows it, as did the H200 host).
        return f"triton {version}'s interpreter cannot run these kernels (3.8 or later)"
    return None
