"""Fast decoding (`model.kernels`): a static KV cache and a compiled decode step replayed as a CUDA graph.

Plain `generate` runs a V2-Lite decode step in 80-100 ms whatever the batch: launches and Python, not
the GPU (docs/benchmarks.md). transformers compiles the step itself when the cache is static, but it
refuses for bitsandbytes models (`hf_quantizer.is_compileable` is False) and TRL sets
`disable_compile`. bitsandbytes' 4-bit ops are torch custom ops that compile, and `NF4Experts` has no
data-dependent shape on this path (`decode.few_token_forward` for small steps), so inside
`compiled_decoding` the check is answered yes. On CUDA the compiled step is then replayed as our own
CUDA graphs (`graphed.py`: no guard evaluation per token) and `generate` reads its stopping flag a
step late, so the host prepares the next step while the GPU runs this one.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import CompileConfig

from finetune import family
from finetune.compat import torch as compat_torch
from finetune.compat import transformers as compat_transformers
from finetune.distributed import is_sharded
from finetune.fast import absorbed, graphed, mode

KERNELS = ("auto", "off")
_RECOMPILE_LIMIT = 64


def enabled(kernels: str, model: torch.nn.Module) -> bool:
    """`model.kernels` resolved: auto is on where the model runs on CUDA, off elsewhere and for an
    FSDP-sharded model (its all-gather hooks run in every step, untested under compilation)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    on_cuda = next(model.parameters()).device.type == "cuda"
    return kernels == "auto" and on_cuda and not is_sharded(model)


def _top(model: torch.nn.Module) -> family.PreTrainedModel:
    return next(m for m in model.modules() if isinstance(m, family.PreTrainedModel))


@contextlib.contextmanager
def compiled_decoding(
    model: torch.nn.Module,
    on: bool,
    *,
    compile_config: CompileConfig | None = None,
    graphs: bool | Callable[[], Any] | None = None,
    defer_stop: bool | None = None,
    absorb: bool = True,
    grouped: bool | None = None,
) -> Iterator[dict[str, Any]]:
    """Yields extra `generate` keyword arguments; while on, generate compiles its decode step.

    `compile_config` defaults to transformers' (inductor, CUDA graphs); tests pass a cheaper backend.
    `graphs`: replay the compiled step as our own CUDA graphs (`graphed.GraphedStep`, no guards per
    token); None = where the model is on CUDA and has no forward hooks but `graphed.observer`s,
    False = transformers' compiled call, or a graph factory (tests). `defer_stop`: let `generate` check
    its stopping criteria one step late (`compat.transformers.deferred_stop_check`); None = with our graphs on CUDA.
    `absorb`: MLA decode steps in latent space (`absorbed.py`; batch 128 on the H200: 1.5x the new
    tokens/s of transformers' expansion, docs/benchmarks.md). `grouped`: NF4 experts multiply their
    packed bytes directly in steps of more tokens than experts (`kernels/nf4_decode.py`) instead of
    dequantizing the layer's experts and calling `grouped_mm`; None = on CUDA for experts computing in
    bf16, where the kernel's byte-permute lookup runs (batch 128 on the H200: 1.57x the new tokens/s; in
    fp16 / fp32 its select tree is 0.8x, and on a CPU the op's plain-torch path has nothing to win).
    """
    if not on:
        yield {}
        return
    top = _top(model)
    previous = top.generation_config.compile_config
    if compile_config is not None:
        top.generation_config.compile_config = compile_config
    patches = contextlib.ExitStack()
    patches.enter_context(compat_transformers.auto_compile(top))
    # Every batch size and cache length is a recompilation of the step's frames (transformers' kwarg
    # deprecation wrapper is one frame shared by four module classes); past torch's default of 8 the
    # step silently runs uncompiled, as batch 128 did after 1 and 32 on the H200.
    patches.enter_context(compat_torch.recompile_limit(_RECOMPILE_LIMIT))
    # By default dynamo ignores module hooks in its guards: a step compiled without hooks (an
    # evaluation) would be reused silently by one with them (GRPO's observers, graphed.py's probe).
    patches.enter_context(compat_torch.hook_guards())
    # The input-grads hooks on the embeddings (transformers' and PEFT's, for gradient checkpointing)
    # call requires_grad_, which dynamo cannot trace: each cut the decode step in two graphs. Taken
    # off the module itself, however many were registered (transformers keeps only its last list).
    patches.enter_context(compat_torch.lifted_forward_hooks(top.get_input_embeddings(), _input_grads_hook))
    on_cuda = next(model.parameters()).device.type == "cuda"
    # NF4 experts dequantize whole weights (steps of more tokens than experts) through our kernel.
    dequant = {m: (m.mode.dequant_kernel, m.mode.grouped_kernel) for m in mode.experts(model)}
    for m in dequant:
        permutes = on_cuda and m.compute_dtype == torch.bfloat16
        m.mode.dequant_kernel, m.mode.grouped_kernel = True, permutes if grouped is None else grouped
    if graphs is None:  # checked with the input-grads hooks lifted: they are no obstacle
        graphs = on_cuda and not graphed.blocks_graphs(model)
    if graphs:
        factory = graphs if callable(graphs) else None
        compiled = _compiled_step(top, top.generation_config.compile_config)
        step = graphed.GraphedStep(compiled, factory, model=top)
        patches.enter_context(compat_transformers.served_decode_step(top, step, _reused_caches(top, step)))
    if defer_stop is None:
        defer_stop = bool(graphs) and on_cuda
    try:
        with compat_transformers.deferred_stop_check(defer_stop), absorbed.absorbed(model, absorb):
            yield {"cache_implementation": "static"}
    finally:
        patches.close()
        if graphs:
            step.clear()
        top.generation_config.compile_config = previous
        for m, (previous_dequant, previous_grouped) in dequant.items():
            m.mode.dequant_kernel, m.mode.grouped_kernel = previous_dequant, previous_grouped


def _reused_caches(top: torch.nn.Module, step: graphed.GraphedStep) -> Callable[..., Any]:
    """`generate` builds a new static cache every call, and a graph holds its cache's addresses: each
    call would capture anew (a warm-up step and a capture). Within one `compiled_decoding` block a call
    of the same batch and cache length gets the previous call's cache back, reset in place, and so its
    graph. As many are kept as the step keeps graphs, least recently used out first, and a cache let go
    takes its graphs with it (else a graph would keep it alive). The cache a call returns is therefore
    only valid until the next call of the block."""
    make = compat_transformers.static_cache_maker(top)
    pool: OrderedDict[tuple, Any] = OrderedDict()

    def prepare(cache_implementation, batch_size, max_cache_len, prefill_chunk_size, model_kwargs):  # type: ignore[no-untyped-def]
        # The length transformers will use: never shorter than an earlier call's (its own rule).
        length = max(max_cache_len, getattr(top, "_previous_max_cache_length", -1))
        key = (cache_implementation, batch_size, length, prefill_chunk_size)
        cache = pool.pop(key, None)
        if cache is None:
            cache = make(
                top, cache_implementation, batch_size, max_cache_len, prefill_chunk_size, model_kwargs
            )
            while len(pool) >= step.max_graphs:
                step.forget(pool.popitem(last=False)[1])
        else:
            cache.reset()
        pool[key] = cache
        return cache

    return prepare


@contextlib.contextmanager
def fast_generate(model: torch.nn.Module, on: bool, **decoding: Any) -> Iterator[None]:
    """While active, every `generate` of the model runs inside `compiled_decoding` (GRPO: TRL calls
    `generate` itself). `decoding`: `compiled_decoding`'s keyword arguments."""
    if not on:
        yield
        return
    top = _top(model)
    own = "generate" in vars(top)  # routing replay's recording wrapper, say
    plain = top.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        with compiled_decoding(model, True, **decoding) as extra:
            return plain(*args, **kwargs, **extra)

    top.generate = generate
    try:
        yield
    finally:
        if own:
            top.generate = plain
        else:
            del top.generate


def _compiled_step(top: torch.nn.Module, config: CompileConfig | None) -> Callable[..., Any]:
    """`top.__call__` compiled once per model without CUDA graphs of inductor's own (ours capture it)."""
    options = (config or CompileConfig()).to_dict()
    options["mode"] = None
    key = repr(sorted(options.items()))
    cached = getattr(top, "_finetune_compiled_step", None)
    if cached is None or cached[0] != key:
        cached = (key, torch.compile(top.__call__, **options))
        top._finetune_compiled_step = cached
    return cached[1]


def _input_grads_hook(fn: Any) -> bool:
    return getattr(fn, "__name__", "") in ("make_inputs_require_grads", "make_inputs_require_grad")
