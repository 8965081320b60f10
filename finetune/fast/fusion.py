"""The training step under `model.kernels: auto`: compiled regions and fused pieces, per model instance.

Profiled on the H200 (docs/benchmarks.md), the stock step spends half its GPU time in eager
elementwise and cast kernels, and the eager NF4 step was host-bound (Python and launches of PEFT's
LoRA, bitsandbytes' dequantize and the routing: 375 ms of kernels in a 627 ms step). So each
decoder layer runs as two inductor graphs around its router (`finetune.fast.blocks`; a module outside
such a layer as one graph of its own), the norms as a compiled RMSNorm, the experts' permute /
weighted combine as autograd Functions whose backwards are gathers, and the 4-bit linears through
`finetune.fast.linear4bit` (bitsandbytes' host-heavy `matmul_4bit` replaced); all patched into the
modules of one model, and removed after.

Why not liger-kernel's `apply_liger_kernel_to_deepseek_v2`: its `swiglu` swaps the routed-experts module
(it would replace `NF4Experts`), and its RMSNorm swap is class-wide (it would leak into a model loaded
later with `kernels: off`). The SFT loss head is `finetune.fast.lm_head`.
"""

from __future__ import annotations

import contextlib
import types
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from finetune import family
from finetune.compat import torch as compat_torch
from finetune.fast import blocks, linear4bit, lm_head, mode
from finetune.fast.pieces import compiled, is_silu

_RECOMPILE_LIMIT = 64
# The settings each fused model was patched with, for `suspended` to patch it again.
_applied: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def _rms_norm_forward(self: family.RMSNorm, hidden_states: torch.Tensor) -> torch.Tensor:
    return compiled("rms_norm")(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: family.MLP, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(compiled("swiglu")(self.gate_proj(x), self.up_proj(x)))


def _region(module: nn.Module, forward: Any) -> None:
    # DeepSeek-V2's RoPE multiplies complex tensors, which inductor leaves to eager kernels inside the
    # graph (counted in the profile: cheap); its warning on every compilation says nothing to act on.
    warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex")
    # The instance's forward compiled as one graph: a module's dozens of small kernels and their
    # Python (PEFT's LoRA, bitsandbytes' dequantize, routing) become one inductor graph forward and one
    # backward. Every instance of a class runs the same code, so they share one compiled entry.
    module.forward = torch.compile(types.MethodType(forward, module))


def _compiles_whole(experts: nn.Module) -> bool:
    """Whether a routed-experts module traces as one graph (else its host-side loop would break it)."""
    if not (mode.of(experts) is not None and is_silu(experts.act_fn)):
        return False
    probe = torch.empty(0, dtype=experts.compute_dtype, device=next(experts.parameters()).device)
    return experts.compiles_whole(probe)


def apply(
    model: nn.Module,
    *,
    regions: bool = True,
    layer_regions: bool = True,
    recompute_in_graph: bool = True,
    chunked_head: bool = False,
    head: bool = True,
    temperature: float = 1.0,
) -> dict[str, int]:
    """Patch the fused kernels into `model`'s modules; returns how many of each kind were patched.

    `regions`: also compile each decoder layer as two regions (`finetune.fast.blocks`; attention,
    MLP and routed-experts modules outside such a layer each as one), and put `finetune.fast.lm_head`
    in place of TRL's fused LM head (`head`; its logits divided by `temperature`, as GRPO's head
    computes them). The routers stay eager: their hooks (expert load, aux loss,
    routing replay) mutate Python state. `layer_regions=False`: every module its own region (the scheme
    before `blocks`, kept for benchmarks to compare). `recompute_in_graph`: `blocks`' in-graph
    recomputation instead of torch's checkpoint where every layer is all regions (False: torch's, for
    benchmarks to compare). `chunked_head`: the model carries TRL's chunked LM head (SFT), which `lm_head`
    must replace (an error if it is not found). Idempotent."""
    remove(model)
    _applied[model] = {
        "regions": regions,
        "layer_regions": layer_regions,
        "recompute_in_graph": recompute_in_graph,
        "chunked_head": chunked_head,
        "head": head,
        "temperature": temperature,
    }
    counts = {"rms_norm": 0, "mlp": 0, "experts": 0, "compiled_regions": 0, "linear4bit": 0, "layers": 0}
    counts["lm_head"] = int(
        regions and head and lm_head.patch(model, required=chunked_head, temperature=temperature)
    )
    inside: set[int] = set()  # modules traced inside a layer's regions: not compiled on their own
    layers = {  # each layer's MoE region: where its experts trace whole
        m: isinstance(m.mlp, family.Moe) and _compiles_whole(m.mlp.experts)
        for m in model.modules()
        if regions and layer_regions and blocks.supported(m)
    }
    blocks.patch(layers, recompute_in_graph=recompute_in_graph)
    for layer in layers:
        mlp = layer.mlp
        inside.add(id(layer.self_attn))
        if blocks.all_regions(layer):
            inside.update(
                map(id, [mlp.experts, mlp.shared_experts] if isinstance(mlp, family.Moe) else [mlp])
            )
    counts["layers"] = len(layers)
    for module in model.modules():
        own_region = regions and id(module) not in inside
        if isinstance(module, family.RMSNorm):
            module.forward = types.MethodType(_rms_norm_forward, module)
            counts["rms_norm"] += 1
        elif isinstance(module, family.MLP) and is_silu(module.act_fn):
            if own_region:
                _region(module, _mlp_forward)
                counts["compiled_regions"] += 1
            else:
                module.forward = types.MethodType(_mlp_forward, module)
            counts["mlp"] += 1
        elif mode.of(module) is not None and is_silu(module.act_fn):
            module.mode.fused = True
            counts["experts"] += 1
            if own_region and _compiles_whole(module):
                _region(module, type(module).forward)
                counts["compiled_regions"] += 1
        elif isinstance(module, family.Attention) and own_region:
            _region(module, type(module).forward)
            counts["compiled_regions"] += 1
        elif linear4bit.supported(module):
            linear4bit.patch(module)
            counts["linear4bit"] += 1
    for layer in model.modules():  # transformers' GradientCheckpointingLayer: the decoder layers
        if hasattr(layer, "gradient_checkpointing"):
            for module in mode.experts(layer):
                module.mode.checkpointed = lambda layer=layer: blocks.checkpointed(layer)
    return counts


def remove(model: nn.Module) -> None:
    """Back to the eager forwards."""
    _applied.pop(model, None)
    lm_head.unpatch(model)
    for module in model.modules():
        blocks.unpatch(module)
        if linear4bit.supported(module):
            linear4bit.unpatch(module)
        experts_mode = mode.of(module)
        if experts_mode is not None or isinstance(module, (family.RMSNorm, family.MLP, family.Attention)):
            module.__dict__.pop("forward", None)  # the class's forward again
        if experts_mode is not None:
            experts_mode.reset_training()


@contextlib.contextmanager
def fused(model: nn.Module, on: bool, **settings: Any) -> Iterator[None]:
    """The fused kernels patched into `model` while inside (a training run), the eager forwards after;
    `settings`: `apply`'s."""
    if not on:
        yield
        return
    apply(model, **settings)
    # Grad and no-grad calls (evaluation, GRPO's generation), inputs with and without requires_grad,
    # single-token steps: each a graph of its own, more than dynamo's default of 8 per function.
    try:
        with compat_torch.recompile_limit(_RECOMPILE_LIMIT):
            yield
    finally:
        remove(model)


@contextlib.contextmanager
def suspended(model: nn.Module) -> Iterator[None]:
    """`model` eager inside (GRPO's generation inside a fused training run: the compiled decode step
    traces the modules' own forwards), patched again as it was after; nothing where it is not fused.
    The regions' compiled code is kept per process (`blocks`, `pieces`): patching again compiles nothing."""
    settings = _applied.get(model)
    if settings is None:
        yield
        return
    remove(model)
    try:
        yield
    finally:
        apply(model, **settings)
