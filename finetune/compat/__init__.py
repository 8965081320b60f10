"""Every patch and private use of another library's internals, in one place (one module per library).

Each is declared here as a `Patch`: its name, the library, the versions it was checked on, what it
changes and why, and the `Target`s (module + attribute path) it needs. A patch checks its targets before
it applies (`check`) and fails with one line naming the library and its installed version when one is
gone (`CompatError`): a patch that finds nothing to patch is an error, never a quiet no-op. Importing
this package, or any of its modules, patches nothing: the entry points call the functions they need.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Any

from finetune.errors import UserError


class CompatError(UserError):
    """A library's internals are not what a patch was written for (one line: library, version, fix)."""


@dataclass(frozen=True)
class Target:
    """An attribute a patch reads or replaces: `module` imported, then `path` walked from it."""

    module: str
    path: str = ""

    def __str__(self) -> str:
        return f"{self.module}.{self.path}" if self.path else self.module


@dataclass(frozen=True)
class Patch:
    name: str  # library.what, e.g. "trl.chunked_lm_head"
    library: str  # the distribution whose internals it touches
    checked: str  # the versions it was checked on
    what: str  # what it changes, and why
    targets: tuple[Target, ...]


PATCHES: dict[str, Patch] = {}
_checked: set[str] = set()
# Names of the patches applied at least once in this process (`import finetune` must leave it empty).
APPLIED: set[str] = set()


def declare(name: str, library: str, checked: str, what: str, *targets: Target) -> Patch:
    """Register a patch (at import: a declaration, nothing applied)."""
    patch = Patch(name, library, checked, what, targets)
    PATCHES[name] = patch
    return patch


def version(library: str) -> str:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def fail(patch: Patch, problem: str) -> CompatError:
    """The one-line error of a patch whose target is not as expected."""
    return CompatError(
        f"{patch.library} {version(patch.library)}: {problem}; finetune's compatibility patch "
        f"`{patch.name}` was written for {patch.library} {patch.checked} (install a version in that "
        "range, or report it)"
    )


def resolve(patch: Patch, target: Target) -> Any:
    """The object at `target`, or the patch's one-line error."""
    try:
        obj: Any = importlib.import_module(target.module)
    except ImportError as err:
        raise fail(patch, f"cannot import {target.module} ({err})") from None
    for part in target.path.split(".") if target.path else ():
        if part in getattr(obj, "__dict__", {}) or hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            raise fail(patch, f"{target} not found") from None
    return obj


def check(patch: Patch) -> None:
    """Every target of `patch` exists (once per process)."""
    if patch.name in _checked:
        return
    for target in patch.targets:
        resolve(patch, target)
    _checked.add(patch.name)


def applying(patch: Patch) -> None:
    """Check `patch`'s targets and record that it applies. Once recorded, a membership test and nothing
    else: hot paths call this inside compiled regions, where an import or a set mutation would break
    the graph (the first call must come before compiling; `finetune.fast` makes it eagerly)."""
    if patch.name in APPLIED:
        return
    check(patch)
    APPLIED.add(patch.name)


def forget_checks() -> None:
    """Check every target again on next use (tests simulating a missing target)."""
    _checked.clear()
