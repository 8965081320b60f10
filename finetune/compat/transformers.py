"""transformers internals: generation's compiled decode step, the loaders' key lists, the Trainer's
hooks for a self-sharded model and for checkpoint loading, the bnb quantizer's module rule.
Checked on transformers 5.24-5.25 (`CHECKED`)."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from finetune.compat import Target, applying, declare, fail, resolve

CHECKED = "5.24-5.25"
_GENERATION = "transformers.generation.utils"

AUTO_COMPILE = declare(
    "transformers.auto_compile",
    "transformers",
    CHECKED,
    "lets `generate` compile its decode step for a bitsandbytes model, which its auto-compile criteria "
    "refuse (`_valid_auto_compile_criteria`), per model instance while decoding",
    Target(_GENERATION, "GenerationMixin._valid_auto_compile_criteria"),
)
SERVED_STEP = declare(
    "transformers.served_decode_step",
    "transformers",
    CHECKED,
    "serves `generate`'s compiled decode step ourselves (`get_compiled_call`: a CUDA-graphed step) and "
    "hands a call of the same batch and length its earlier static cache back (`_prepare_static_cache`), "
    "per model instance while decoding",
    Target("transformers.modeling_utils", "PreTrainedModel.get_compiled_call"),
    Target(_GENERATION, "GenerationMixin._prepare_static_cache"),
)
DEFERRED_STOP = declare(
    "transformers.deferred_stop_check",
    "transformers",
    CHECKED,
    "lets `generate` read its stopping flag one step late on CUDA too (`DeferredStopCheck.is_supported`, "
    "mps only upstream), so the host prepares the next step while the GPU runs this one",
    Target(_GENERATION, "DeferredStopCheck.is_supported"),
)
EXPERTS_CLASS = declare(
    "transformers.deferred_experts_class",
    "transformers",
    CHECKED,
    "builds a model with a stand-in for the routed-experts class (looked up in its modeling module when "
    "the MoE block is built) and the experts' checkpoint keys ignored, so `from_pretrained` never "
    "allocates or reads the 16-bit experts that we quantize layer by layer",
    Target("transformers.modeling_utils", "PreTrainedModel._keys_to_ignore_on_load_unexpected"),
)
LOAD_KEYS = declare(
    "transformers.ignored_load_keys",
    "transformers",
    CHECKED,
    "silences the load report of a classifier built from a causal-LM checkpoint (its missing `score`, "
    "its unused `lm_head`) through the class's `_keys_to_ignore_on_load_*` lists, while loading",
    Target("transformers.modeling_utils", "PreTrainedModel._keys_to_ignore_on_load_missing"),
    Target("transformers.modeling_utils", "PreTrainedModel._keys_to_ignore_on_load_unexpected"),
)
SELF_SHARDED = declare(
    "transformers.self_sharded_model",
    "transformers",
    CHECKED,
    "tells the Trainer a model shards itself (FSDP2, ours): the flag it reads for a model sharded at "
    "load time (no DDP wrap, no second sharding), and its no-sync over an accumulation window "
    "(`_defer_fsdp_gradient_reduction`) replaced by FSDP2's over every unit",
    Target("transformers.trainer", "Trainer._defer_fsdp_gradient_reduction"),
)
CHECKPOINT_LOADER = declare(
    "transformers.checkpoint_loader",
    "transformers",
    CHECKED,
    "resumes through our checkpoint loader (`Trainer._load_from_checkpoint`, per trainer instance): "
    "the Trainer's restores PEFT's weights only, ours the routed-expert LoRA and the router too",
    Target("transformers.trainer", "Trainer._load_from_checkpoint"),
)
FIRST_CALLBACK = declare(
    "transformers.first_callback",
    "transformers",
    CHECKED,
    "puts a callback first in the Trainer's `CallbackHandler.callbacks` list (the Trainer only appends): "
    "the routing statistics it adds to `logs` in `on_log` then reach the `report_to` integrations, "
    "which the Trainer registers before any callback of ours",
    Target("transformers.trainer_callback", "CallbackHandler.call_event"),
)
REPORTERS = declare(
    "transformers.reporters",
    "transformers",
    CHECKED,
    "reads the Trainer's table of `report_to` integrations to refuse an unknown one before training",
    Target("transformers.integrations.integration_utils", "INTEGRATION_TO_CALLBACK"),
)
QUANTIZED_MODULES = declare(
    "transformers.bnb_module_rule",
    "transformers",
    CHECKED,
    "applies the bnb quantizer's own rule for which linear layers become 4-bit (`get_modules_to_not_convert`, "
    "`should_convert_module`, the model's `_keep_in_fp32_modules`) to a meta skeleton, for export",
    Target("transformers.quantizers.base", "HfQuantizer.get_modules_to_not_convert"),
    Target("transformers.quantizers.quantizers_utils", "should_convert_module"),
    Target("transformers.modeling_utils", "PreTrainedModel._keep_in_fp32_modules"),
)


@contextlib.contextmanager
def auto_compile(model: torch.nn.Module) -> Iterator[None]:
    """`generate` compiles `model`'s decode step while inside."""
    applying(AUTO_COMPILE)
    model._valid_auto_compile_criteria = lambda *args, **kwargs: True
    try:
        yield
    finally:
        del model._valid_auto_compile_criteria


@contextlib.contextmanager
def served_decode_step(
    model: torch.nn.Module, step: Callable[..., Any], prepare_cache: Callable[..., Any]
) -> Iterator[None]:
    """`generate` of `model` runs `step` as its compiled decode step and gets its static caches from
    `prepare_cache` (the arguments of `_prepare_static_cache` after self) while inside."""
    applying(SERVED_STEP)
    model.get_compiled_call = lambda *args, **kwargs: step
    model._prepare_static_cache = prepare_cache
    try:
        yield
    finally:
        del model.get_compiled_call, model._prepare_static_cache


def static_cache_maker(model: torch.nn.Module) -> Callable[..., Any]:
    """The class's own `_prepare_static_cache` of `model` (unbound: called with the model first)."""
    applying(SERVED_STEP)
    return type(model)._prepare_static_cache


@contextlib.contextmanager
def deferred_stop_check(on: bool) -> Iterator[None]:
    """`generate` checks its stopping criteria one step late on any device while inside (as on mps)."""
    if not on:
        yield
        return
    applying(DEFERRED_STOP)
    check = resolve(DEFERRED_STOP, Target(_GENERATION, "DeferredStopCheck"))
    asked = check.__dict__["is_supported"]

    def is_supported(device: torch.device, *args: Any, **kwargs: Any) -> bool:
        return asked.__func__(torch.device("mps"), *args, **kwargs)  # its checks as for mps

    check.is_supported = staticmethod(is_supported)
    try:
        yield
    finally:
        check.is_supported = asked


@contextlib.contextmanager
def experts_class(modeling: types.ModuleType, name: str, stand_in: type, base: type) -> Iterator[None]:
    """Models built while inside get `stand_in` for the class `name` of their `modeling` module, and
    `base` (their pretrained base class) ignores the experts' checkpoint keys."""
    applying(EXPERTS_CLASS)
    if not isinstance(getattr(modeling, name, None), type):
        raise fail(EXPERTS_CLASS, f"{modeling.__name__}.{name} not found")
    original = getattr(modeling, name)
    ignored = base._keys_to_ignore_on_load_unexpected
    setattr(modeling, name, stand_in)
    base._keys_to_ignore_on_load_unexpected = [r"\.mlp\.experts\."]
    try:
        yield
    finally:
        setattr(modeling, name, original)
        base._keys_to_ignore_on_load_unexpected = ignored


@contextlib.contextmanager
def ignored_load_keys(cls: type, missing: list[str], unexpected: list[str]) -> Iterator[None]:
    """`cls.from_pretrained` reports neither these missing nor these unexpected keys while inside."""
    applying(LOAD_KEYS)
    saved = cls._keys_to_ignore_on_load_missing, cls._keys_to_ignore_on_load_unexpected
    cls._keys_to_ignore_on_load_missing = [*(saved[0] or []), *missing]
    cls._keys_to_ignore_on_load_unexpected = [*(saved[1] or []), *unexpected]
    try:
        yield
    finally:
        cls._keys_to_ignore_on_load_missing, cls._keys_to_ignore_on_load_unexpected = saved


def mark_self_sharded(model: torch.nn.Module) -> None:
    """The Trainer built on `model` treats it as distributed by itself (before the Trainer is built)."""
    applying(SELF_SHARDED)
    model.is_distributed_loading_by_transformers = True


def use_gradient_sync(trainer: Any, no_sync: Callable[[], Any]) -> None:
    """The trainer's no-sync context over an accumulation window is `no_sync()`."""
    applying(SELF_SHARDED)
    trainer._defer_fsdp_gradient_reduction = no_sync


def use_checkpoint_loader(trainer: Any, load: Callable[[str], None]) -> None:
    """The trainer restores weights from a checkpoint folder with `load(folder)`."""
    applying(CHECKPOINT_LOADER)
    trainer._load_from_checkpoint = lambda checkpoint, model=None: load(checkpoint)


def first_callback(trainer: Any, callback: Any) -> None:
    """`callback`'s events run before every other callback of `trainer` (its integrations included)."""
    applying(FIRST_CALLBACK)
    callbacks = getattr(trainer.callback_handler, "callbacks", None)
    if not isinstance(callbacks, list):
        raise fail(FIRST_CALLBACK, "CallbackHandler.callbacks is not a list")
    callbacks.insert(0, callback)


def reporters() -> list[str]:
    """The `report_to` integrations the installed transformers knows."""
    applying(REPORTERS)
    return sorted(resolve(REPORTERS, REPORTERS.targets[0]))


def reporter_installed(check: str) -> bool | None:
    """transformers' own `integration_utils.<check>()` (e.g. `is_wandb_available`); None where it has none."""
    applying(REPORTERS)
    found = getattr(resolve(REPORTERS, Target("transformers.integrations.integration_utils")), check, None)
    return None if found is None else bool(found())


def quantized_linear_names(model: torch.nn.Module) -> set[str]:
    """Names of the modules of a (meta) causal-LM skeleton that bnb 4-bit loading turns into Linear4bit:
    every plain `nn.Linear` but the ones the quantizer skips (output embeddings, tied and fp32-kept)."""
    applying(QUANTIZED_MODULES)
    quantizer = resolve(QUANTIZED_MODULES, Target("transformers.quantizers.base", "HfQuantizer"))
    convert = resolve(QUANTIZED_MODULES, QUANTIZED_MODULES.targets[1])
    skip = quantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    return {
        name
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and convert(name, skip)
    }
