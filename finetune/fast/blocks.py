"""A decoder layer in training as two compiled regions around its eager router (`model.kernels: auto`).

Compiled per module (`fusion._region`), a MoE layer entered five regions a pass: two norms, attention,
routed experts, shared experts, and ten with the checkpoint's recomputation. Every entry costs the host
dynamo's guard evaluation (~1,100 guards in attention alone: each parameter, each PEFT and bitsandbytes
attribute) and AOTAutograd's wrappers; on the H200 the step is partly host-bound (docs/benchmarks.md).
Here a layer is
  [input norm, attention, residual add, post-attention norm] -> router -> [routed + shared experts,
  residual add]          (a dense layer: [MLP, residual add])
two entries a pass, the residual adds fused into the regions' kernels. The router stays eager between
them: its hooks (expert load, balance loss, routing replay) mutate Python state.

transformers 5 checkpoints a layer by wrapping its class's `forward`; an instance's `forward` replaces
that wrapper, so `_forward` checkpoints itself under the same conditions (training, gradients on).

`recompute_in_graph`: where checkpointing is asked for and both parts of every layer are regions, the
regions are compiled with AOTAutograd's activation memory budget at 0 instead, which saves their inputs
and recomputes the rest inside their backward graphs: the same recomputation without a second forward
pass through Python, dynamo's entries and the checkpoint's hooks for every saved tensor (on the CPU
proxy, `benchmarks/host_step.py`, a quarter of the step's host time; on the H200 at V2-Lite shapes
1.06-1.16x the tokens/s of torch's checkpoint, docs/benchmarks.md). The default: it saves the layer's
two [tokens, hidden] region inputs and its routing, not one input (peak +0.7-1.1 GB at V2-Lite).
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from torch import nn

from finetune import family
from finetune.compat import torch as compat_torch
from finetune.fast.pieces import is_silu

_compiled: dict[tuple[str, bool], Any] = {}


def _region(name: str, fn: Any, in_graph: bool = False) -> Any:
    # One compiled function per block kind, shared by every layer: with nn.Module inputs inlined,
    # dynamo guards on the modules' structure, not their identity, so all layers reuse one graph.
    key = (name, in_graph)
    if key not in _compiled:
        if in_graph:
            # Dynamo keeps compiled graphs on the function's code object, whichever wrapper compiled
            # them, and the budget is no guard: a code object of its own keeps these graphs apart.
            code = fn.__code__.replace(co_name=f"{fn.__name__}_in_graph")
            fn = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        compiled = torch.compile(fn)
        if in_graph:  # the partitioner reads the budget when it compiles (first call, recompiles)
            compiled = compat_torch.zero_activation_budget(compiled)
        _compiled[key] = compiled
    return _compiled[key]


def _attention(
    layer: family.DecoderLayer, hidden_states: torch.Tensor, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the residual stream after attention, its post-attention norm)."""
    attended, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
    hidden = hidden_states + attended
    return hidden, layer.post_attention_layernorm(hidden)


def _moe(
    moe: family.Moe,
    normed: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    residual: torch.Tensor,
) -> torch.Tensor:
    # family.Moe.forward after its router, then the layer's residual add, in their order.
    routed = moe.experts(normed.view(-1, normed.shape[-1]), indices, weights).view(normed.shape)
    return residual + (routed + moe.shared_experts(normed))


def _mlp(mlp: family.MLP, normed: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return residual + mlp(normed)


def _body(
    layer: family.DecoderLayer, hidden_states: torch.Tensor, in_graph: bool = False, **kwargs: Any
) -> torch.Tensor:
    hidden, normed = _region("attention", _attention, in_graph)(layer, hidden_states, **kwargs)
    mlp = layer.mlp
    if isinstance(mlp, family.Moe):
        if not layer.moe_region:
            return hidden + mlp(normed)  # its modules' own regions and kernels (fusion.apply)
        _, weights, indices = mlp.gate(normed)
        return _region("moe", _moe, in_graph)(mlp, normed, indices, weights, hidden)
    return _region("mlp", _mlp, in_graph)(mlp, normed, hidden)


def _recomputed(layer: nn.Module) -> bool:
    """Checkpointing asked for, in training with gradients: the layer's activations are recomputed
    (by torch's checkpoint, or inside its regions' graphs)."""
    return bool(layer.gradient_checkpointing and layer.training and torch.is_grad_enabled())


def checkpointed(layer: nn.Module) -> bool:
    """Whether `layer` runs under torch's checkpoint now (recomputed, and not inside its graphs)."""
    return _recomputed(layer) and not layer.__dict__.get("recompute_in_graph", False)


def _forward(self: family.DecoderLayer, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    asked = _recomputed(self)
    if asked:  # as transformers' wrapper: no cache is written twice by a recomputation
        kwargs.update(use_cache=False, cache=None)
    if asked and not self.recompute_in_graph:
        return self._gradient_checkpointing_func(functools.partial(_body, self, **kwargs), hidden_states)
    return _body(self, hidden_states, in_graph=asked, **kwargs)


def supported(layer: nn.Module) -> bool:
    """A DeepSeek-V2 decoder layer of the modules `_body` knows (RMSNorms, MLA, a SiLU MLP or a MoE)."""

    if not isinstance(layer, family.DecoderLayer) or not isinstance(layer.self_attn, family.Attention):
        return False
    if not all(
        isinstance(n, family.RMSNorm) for n in (layer.input_layernorm, layer.post_attention_layernorm)
    ):
        return False
    mlp = layer.mlp
    if isinstance(mlp, family.Moe):
        mlp = mlp.shared_experts
    return isinstance(mlp, family.MLP) and is_silu(mlp.act_fn)


def patch(layers: dict[family.DecoderLayer, bool], *, recompute_in_graph: bool = True) -> None:
    """Patch a model's `layers`, each mapped to its `moe_region`: the routed and shared experts as one
    region (the experts' module traces whole). `recompute_in_graph` (see the module docstring) applies
    only where every layer is all regions: an eager MoE would keep all its activations without torch's
    checkpoint, and layers of both schemes would compile attention twice, with and without the budget."""
    for layer, moe_region in layers.items():
        layer.moe_region = moe_region
        layer.forward = types.MethodType(_forward, layer)
    in_graph = recompute_in_graph and all(map(all_regions, layers))
    for layer in layers:
        layer.recompute_in_graph = in_graph


def all_regions(layer: family.DecoderLayer) -> bool:
    """Whether both parts of a patched `layer` are compiled regions (no eager MoE between them)."""
    return layer.moe_region or not isinstance(layer.mlp, family.Moe)


def unpatch(layer: nn.Module) -> None:
    """The class's forward again, where `patch` set this one (other modules are left alone)."""
    if layer.__dict__.pop("moe_region", None) is not None:
        layer.__dict__.pop("forward", None)
        layer.__dict__.pop("recompute_in_graph", None)
