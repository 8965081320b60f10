"""torch internals: dynamo's and the partitioner's settings, nn.Module's hook storage, FSDP2's and
torch.library's private names. Checked on torch 2.11 (the GPU machines) to 2.14."""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from finetune.compat import Target, applying, declare, fail, resolve

CHECKED = "2.11-2.14"

RECOMPILE_LIMIT = declare(
    "torch.recompile_limit",
    "torch",
    CHECKED,
    "raises dynamo's recompile limit while compiled regions or decode steps run: every batch size, "
    "cache length and grad mode is a graph of its own, and past the default of 8 a frame silently runs "
    "uncompiled",
    Target("torch._dynamo.config", "recompile_limit"),
)
HOOK_GUARDS = declare(
    "torch.hook_guards",
    "torch",
    CHECKED,
    "makes dynamo guard on module hooks while decoding: by default it ignores them, and a step compiled "
    "without hooks (an evaluation) would be reused silently by one with them (GRPO's observers)",
    Target("torch._dynamo.config", "skip_nnmodule_hook_guards"),
)
MEMORY_BUDGET = declare(
    "torch.activation_memory_budget",
    "torch",
    CHECKED,
    "compiles a checkpointed layer's regions with the partitioner's activation memory budget at 0, so "
    "their backward graphs recompute the forward inside them (in-graph recomputation)",
    Target("torch._functorch.config", "activation_memory_budget"),
    Target("torch._functorch.config", "patch"),
)
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
MODULE_HOOKS = declare(
    "torch.module_hooks",
    "torch",
    CHECKED,
    "reads and swaps nn.Module's forward-hook dicts (`_forward_hooks` and its siblings) and the global "
    "hook dicts: decode-step graphs call observer hooks after each replay, and generation lifts the "
    "input-grads hooks that dynamo cannot trace",
    Target("torch.nn.modules.module", "_global_forward_hooks"),
    Target("torch.nn.modules.module", "_global_forward_pre_hooks"),
)
FSDP_PARAMETERS = declare(
    "torch.fsdp_integer_parameters",
    "torch",
    CHECKED,
    "lets FSDP2 shard the NF4 experts' uint8 storage: torch 2.11 wraps each shard as a trainable "
    "nn.Parameter before copying requires_grad, which integer tensors refuse (2.14 passes it through)",
    Target("torch.distributed.fsdp._fully_shard._fsdp_param", "nn"),
)
LIBRARY_IMPLS = declare(
    "torch.library_impls",
    "torch",
    CHECKED,
    "forgets torch.library's record of an operator's CPU kernel before ours replaces bitsandbytes' "
    "(torch.library refuses a second registration otherwise)",
    Target("torch.library", "_impls"),
)


@contextlib.contextmanager
def recompile_limit(at_least: int) -> Iterator[None]:
    """dynamo's recompile limit at least `at_least` while inside."""
    applying(RECOMPILE_LIMIT)
    config = torch._dynamo.config
    saved = config.recompile_limit
    config.recompile_limit = max(saved, at_least)
    try:
        yield
    finally:
        config.recompile_limit = saved


@contextlib.contextmanager
def hook_guards() -> Iterator[None]:
    """dynamo guards on module hooks while inside."""
    applying(HOOK_GUARDS)
    config = torch._dynamo.config
    saved = config.skip_nnmodule_hook_guards
    config.skip_nnmodule_hook_guards = False
    try:
        yield
    finally:
        config.skip_nnmodule_hook_guards = saved


def zero_activation_budget(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """`compiled` (a torch.compile'd function) partitioned with the activation memory budget at 0: the
    partitioner reads it when it compiles (first call, recompiles), so it wraps every call."""
    applying(MEMORY_BUDGET)
    return torch._functorch.config.patch(activation_memory_budget=0.0)(compiled)


@functools.cache
def _module_hooks_present() -> None:
    missing = [name for name in _HOOK_DICTS if not isinstance(getattr(nn.Module(), name, None), dict)]
    if missing:
        raise fail(MODULE_HOOKS, f"nn.Module has no hook dict {', '.join(missing)}")


def hook_dicts(module: nn.Module) -> dict[str, OrderedDict]:
    """The module's own forward-hook dicts by name (the dict objects themselves)."""
    applying(MODULE_HOOKS)
    _module_hooks_present()
    return {name: getattr(module, name) for name in _HOOK_DICTS}


def set_hook_dicts(module: nn.Module, dicts: dict[str, OrderedDict]) -> None:
    """Put hook dicts in place on the instance (`hook_dicts`' keys)."""
    applying(MODULE_HOOKS)
    module.__dict__.update(dicts)


def has_hooks(module: nn.Module) -> bool:
    """Whether the module has its own forward hooks or pre-hooks."""
    dicts = hook_dicts(module)
    return bool(dicts["_forward_hooks"] or dicts["_forward_pre_hooks"])


def global_forward_hooks() -> bool:
    """Whether any global forward hook or pre-hook is registered."""
    applying(MODULE_HOOKS)
    module = resolve(MODULE_HOOKS, Target("torch.nn.modules.module"))
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


@contextlib.contextmanager
def lifted_forward_hooks(module: nn.Module, which: Callable[[Any], bool]) -> Iterator[None]:
    """The module's forward hooks for which `which(hook)` holds taken off while inside, put back after
    (whoever registered them: transformers keeps only the handle of its last)."""
    hooks = hook_dicts(module)["_forward_hooks"]
    lifted = {k: f for k, f in hooks.items() if which(f)}
    for k in lifted:
        del hooks[k]
    try:
        yield
    finally:
        hooks.update(lifted)


class _FrozenIntegerParameters:
    """`nn` as FSDP2's parameter module sees it: integer shards wrapped without requires_grad."""

    def __getattr__(self, name: str) -> Any:
        return getattr(nn, name)

    @staticmethod
    def Parameter(data: torch.Tensor, requires_grad: bool = True) -> nn.Parameter:
        return nn.Parameter(
            data, requires_grad=requires_grad and (data.is_floating_point() or data.is_complex())
        )


@contextlib.contextmanager
def fsdp_integer_parameters() -> Iterator[None]:
    """FSDP2 may shard integer (packed NF4) parameters while inside."""
    applying(FSDP_PARAMETERS)
    module = resolve(FSDP_PARAMETERS, Target("torch.distributed.fsdp._fully_shard._fsdp_param"))
    saved = module.nn
    module.nn = _FrozenIntegerParameters()
    try:
        yield
    finally:
        module.nn = saved


def forget_library_impl(key: str) -> None:
    """Drop torch.library's record of the kernel registered under `key` ("namespace/op/dispatch key")."""
    applying(LIBRARY_IMPLS)
    torch.library._impls.discard(key)


GROUPED_MM = declare(
    "torch.grouped_mm",
    "torch",
    CHECKED,
    "the routed experts' grouped matmul: torch.nn.functional.grouped_mm, or on releases before it the "
    "private torch._grouped_mm (a Hopper kernel only); neither: the experts loop over their groups",
    Target("torch"),
)
MODULE_APPLY = declare(
    "torch.module_apply",
    "torch",
    CHECKED,
    "NF4Experts overrides nn.Module._apply(fn, recurse), through which .to() / .cuda() / .half() reach "
    "every tensor: its packed weights and quantization tables follow device moves but never dtype casts",
    Target("torch.nn", "Module._apply"),
)


def grouped_mm() -> Callable[..., torch.Tensor] | None:
    """torch's grouped matmul (public, else private), or None."""
    applying(GROUPED_MM)
    if hasattr(torch.nn.functional, "grouped_mm"):
        return torch.nn.functional.grouped_mm
    return getattr(torch, "_grouped_mm", None)


def grouped_mm_runs_on(capability: tuple[int, int]) -> bool:
    """Whether `grouped_mm()` has a kernel for a CUDA device of this compute capability."""
    return capability >= (8, 0) if hasattr(torch.nn.functional, "grouped_mm") else capability[0] == 9


def overrides_module_apply() -> None:
    """Check that nn.Module still routes .to() through `_apply` (NF4Experts' override)."""
    applying(MODULE_APPLY)
