"""PEFT internals: its transformers-4 MoE target shim kept off our module names, and its adapter-key
pattern matching reused to read an adapter folder. Checked on PEFT 0.21 (`CHECKED`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from finetune.compat import Target, applying, declare, resolve

CHECKED = "0.21"
_CONVERSION = "peft.utils.transformers_weight_conversion"

EXACT_TARGETS = declare(
    "peft.exact_targets",
    "peft",
    CHECKED,
    "hides the model type from PEFT's table of transformers-4 MoE conversions while it wraps or loads: "
    "the shim rewrites targets ending in gate/up/down_proj into LoRA on the fused routed experts, and our "
    "targets are already this model's module names (shared experts, dense MLP)",
    Target(_CONVERSION, "_MODEL_TO_CONVERSION_PATTERN"),
)
PATTERN_KEY = declare(
    "peft.pattern_key",
    "peft",
    CHECKED,
    "matches a module name to the adapter config's rank/alpha patterns as PEFT does (`get_pattern_key`)",
    Target("peft.utils.other", "get_pattern_key"),
)


@contextlib.contextmanager
def exact_targets(model_types: tuple[str, ...]) -> Iterator[None]:
    """PEFT takes target names literally for models of `model_types` while inside."""
    applying(EXACT_TARGETS)
    table = resolve(EXACT_TARGETS, EXACT_TARGETS.targets[0])
    saved = {t: table.pop(t) for t in model_types if t in table}
    try:
        yield
    finally:
        table.update(saved)


def pattern_key(patterns: Any, key: str) -> str:
    """The pattern of `patterns` (rank or alpha pattern keys) that PEFT would apply to module `key`."""
    applying(PATTERN_KEY)
    return resolve(PATTERN_KEY, PATTERN_KEY.targets[0])(patterns, key)
