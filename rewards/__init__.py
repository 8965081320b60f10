"""Reward functions with TRL's signature, `fn(completions, **columns) -> list[float | None]`, found by name.

`resolve("exact_match")` looks in REGISTRY; `resolve("my_pkg.my_module:fn")` (or a dotted path) imports a
user's function.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from rewards.code import code_execution
from rewards.exact import exact_match
from rewards.format import format as format_reward
from rewards.length import length as length_reward
from rewards.math import math_accuracy

Reward = Callable[..., list[float | None]]

# format and length are imported under other names: binding those names here would hide the submodules
# rewards.format and rewards.length.
REGISTRY: dict[str, Reward] = {
    "exact_match": exact_match,
    "math_accuracy": math_accuracy,
    "format": format_reward,
    "length": length_reward,
    "code_execution": code_execution,
}


def resolve(name: str) -> Reward:
    """A registered reward by name, or a function by import path (`pkg.module:fn` or `pkg.module.fn`)."""
    if name in REGISTRY:
        return REGISTRY[name]
    module_name, sep, attr = name.partition(":") if ":" in name else name.rpartition(".")
    if sep:
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            fn = None
        if callable(fn):
            return fn
    raise ValueError(
        f"cannot load reward function {name!r}: expected one of {sorted(REGISTRY)} or an import path "
        "like my_package.my_rewards:fn"
    )
