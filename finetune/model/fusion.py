"""The training step under `model.kernels: auto`: compiled regions and fused pieces, per model instance.

Profiled on the H200 (docs/benchmarks.md), the stock step spends half its GPU time in eager
elementwise and cast kernels, and the eager NF4 step was host-bound (Python and launches of PEFT's
LoRA, bitsandbytes' dequantize and the routing: 375 ms of kernels in a 627 ms step). So each
decoder layer runs as two inductor graphs around its router (`finetune.model.blocks`; a module outside
such a layer as one graph of its own), the norms as a compiled RMSNorm, the experts' permute /
weighted combine as autograd Functions whose backwards are gathers, and the 4-bit linears through
`finetune.model.linear4bit` (bitsandbytes' host-heavy `matmul_4bit` replaced); all patched into the
modules of one model, and removed after.

Why not liger-kernel's `apply_liger_kernel_to_deepseek_v2`: its `swiglu` swaps the routed-experts module
(it would replace `NF4Experts`), and its RMSNorm swap is class-wide (it would leak into a model loaded
later with `kernels: off`). The SFT loss head is `finetune.model.lm_head`.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
    DeepseekV2Attention,
    DeepseekV2MLP,
    DeepseekV2Moe,
    DeepseekV2RMSNorm,
)

_compiled: dict[str, Any] = {}
_RECOMPILE_LIMIT = 64


def compile_once(name: str, fn: Any) -> Any:
    """`fn` compiled on first use, one per process and `name`, shared by every layer (and lm_head)."""
    if torch.compiler.is_compiling():
        return fn  # inside a compiled region (a compiled layer or decode step) inductor fuses it there
    if name not in _compiled:
        # Dynamic from the first call: row counts change every batch and in generation, widths
        # differ between norms; static shapes would recompile past dynamo's limit (GRPO did).
        _compiled[name] = torch.compile(fn, fullgraph=True, dynamic=True)
    return _compiled[name]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # The eager module's arithmetic (fp32 statistics, the weight applied in the input dtype).
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu_fused(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` of a fused [rows, 2I] projection, as the routed experts compute it."""
    return swiglu(*gate_up.chunk(2, dim=-1))


def weighted_sum(y: torch.Tensor, weights: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k w[t, k] * y[inverse[t*K + k]] in fp32: expert-sorted rows back to their tokens
    (gathers and a sum over K: deterministic, unlike index_add_ with repeated token indices)."""
    tokens, top_k = weights.shape
    rows = y[inverse].view(tokens, top_k, -1).float()
    return (rows * weights.float().unsqueeze(-1)).sum(dim=1)


def _combine_bwd(
    grad: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    top_k = weights.shape[1]
    grad = grad.float()
    # Row i of y is (token perm[i] // K, slot perm[i] % K): both gradients are gathers, no scatter.
    grad_y = grad[perm // top_k] * weights.reshape(-1)[perm].float().unsqueeze(-1)
    rows = y[inverse].view(weights.shape[0], top_k, -1).float()
    grad_w = (rows * grad.unsqueeze(1)).sum(dim=-1)
    return grad_y.to(y.dtype), grad_w.to(weights.dtype)


class _Combine(torch.autograd.Function):
    """out[t] = sum_k w[t, k] * y[row of (t, k)] in fp32, from expert-sorted rows `y`."""

    @staticmethod
    def forward(ctx, y, weights, perm, inverse):  # type: ignore[override]
        ctx.save_for_backward(y, weights, perm, inverse)
        return compile_once("combine_fwd", weighted_sum)(y, weights, inverse)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        y, weights, perm, inverse = ctx.saved_tensors
        grad_y, grad_w = compile_once("combine_bwd", _combine_bwd)(
            grad.contiguous(), y, weights, perm, inverse
        )
        return grad_y, grad_w, None, None


def combine(
    y: torch.Tensor, weights: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor
) -> torch.Tensor:
    """Weighted sum over each token's K expert rows: y [T*K, H] sorted by expert, weights [T, K] → [T, H] fp32."""
    return _Combine.apply(y, weights, perm, inverse)


def _permute_bwd(grad: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
    tokens = inverse.numel() // top_k
    return grad[inverse].view(tokens, top_k, -1).float().sum(dim=1).to(grad.dtype)


class _Permute(torch.autograd.Function):
    """x[perm // K]: each token's row once per expert it is routed to, in expert order.

    Autograd's backward of that gather is a sorting, atomics-based index_put; this one gathers each
    token's K rows back through the inverse permutation and sums them."""

    @staticmethod
    def forward(ctx, x, perm, inverse, top_k):  # type: ignore[override]
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x[perm // top_k]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        return (
            compile_once("permute_bwd", _permute_bwd)(grad.contiguous(), inverse, ctx.top_k),
            None,
            None,
            None,
        )


def permute(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows of `x` [T, H] for the expert-sorted (token, slot) pairs `perm` (inverse: its inverse) → [T*K, H]."""
    return _Permute.apply(x, perm, inverse, top_k)


_PIECES = {"swiglu": swiglu, "swiglu_fused": swiglu_fused, "rms_norm": _rms_norm}


def compiled(name: str) -> Any:
    """The compiled form of `swiglu`, `swiglu_fused` or `rms_norm` (for the modules patched below)."""
    return compile_once(name, _PIECES[name])


def _rms_norm_forward(self: DeepseekV2RMSNorm, hidden_states: torch.Tensor) -> torch.Tensor:
    return compiled("rms_norm")(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: DeepseekV2MLP, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(compiled("swiglu")(self.gate_proj(x), self.up_proj(x)))


def is_silu(act: nn.Module) -> bool:
    """Whether `act` is SiLU (torch's or transformers' module): the SwiGLU the fused pieces compute."""
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


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
    from finetune.model.experts import NF4Experts

    if not (isinstance(experts, NF4Experts) and is_silu(experts.act_fn)):
        return False
    probe = torch.empty(0, dtype=experts.compute_dtype, device=next(experts.parameters()).device)
    return experts.compiles_whole(probe)


def apply(
    model: nn.Module, *, regions: bool = True, layer_regions: bool = True, recompute_in_graph: bool = True
) -> dict[str, int]:
    """Patch the fused kernels into `model`'s modules; returns how many of each kind were patched.

    `regions`: also compile each decoder layer as two regions (`finetune.model.blocks`; attention,
    MLP and routed-experts modules outside such a layer each as one), and put `finetune.model.lm_head`
    in place of TRL's fused LM head (not where generation runs inside training, GRPO: its decode
    steps change shape every token). The routers stay eager: their hooks (expert load, aux loss,
    routing replay) mutate Python state. `layer_regions=False`: every module its own region (the scheme
    before `blocks`, kept for benchmarks to compare). `recompute_in_graph`: `blocks`' in-graph
    recomputation instead of torch's checkpoint where every layer is all regions (False: torch's, for
    benchmarks to compare). Idempotent."""
    from finetune.model import blocks, linear4bit, lm_head
    from finetune.model.experts import NF4Experts

    remove(model)
    counts = {"rms_norm": 0, "mlp": 0, "experts": 0, "compiled_regions": 0, "linear4bit": 0, "layers": 0}
    counts["lm_head"] = int(regions and lm_head.patch(model))
    inside: set[int] = set()  # modules traced inside a layer's regions: not compiled on their own
    layers = {  # each layer's MoE region: where its experts trace whole
        m: isinstance(m.mlp, DeepseekV2Moe) and _compiles_whole(m.mlp.experts)
        for m in model.modules()
        if regions and layer_regions and blocks.supported(m)
    }
    blocks.patch(layers, recompute_in_graph=recompute_in_graph)
    for layer in layers:
        mlp = layer.mlp
        inside.add(id(layer.self_attn))
        if blocks.all_regions(layer):
            inside.update(
                map(id, [mlp.experts, mlp.shared_experts] if isinstance(mlp, DeepseekV2Moe) else [mlp])
            )
    counts["layers"] = len(layers)
    for module in model.modules():
        own_region = regions and id(module) not in inside
        if isinstance(module, DeepseekV2RMSNorm):
            module.forward = types.MethodType(_rms_norm_forward, module)
            counts["rms_norm"] += 1
        elif isinstance(module, DeepseekV2MLP) and is_silu(module.act_fn):
            if own_region:
                _region(module, _mlp_forward)
                counts["compiled_regions"] += 1
            else:
                module.forward = types.MethodType(_mlp_forward, module)
            counts["mlp"] += 1
        elif isinstance(module, NF4Experts) and is_silu(module.act_fn):
            module.fused = True
            counts["experts"] += 1
            if own_region and _compiles_whole(module):
                _region(module, type(module).forward)
                counts["compiled_regions"] += 1
        elif isinstance(module, DeepseekV2Attention) and own_region:
            _region(module, type(module).forward)
            counts["compiled_regions"] += 1
        elif linear4bit.supported(module):
            linear4bit.patch(module)
            counts["linear4bit"] += 1
    for layer in model.modules():  # transformers' GradientCheckpointingLayer: the decoder layers
        if hasattr(layer, "gradient_checkpointing"):
            for module in layer.modules():
                if isinstance(module, NF4Experts):
                    module.checkpointed = lambda layer=layer: blocks.checkpointed(layer)
    return counts


def remove(model: nn.Module) -> None:
    """Back to the eager forwards."""
    from finetune.model import blocks, linear4bit, lm_head
    from finetune.model.experts import NF4Experts

    lm_head.unpatch(model)
    for module in model.modules():
        blocks.unpatch(module)
        if linear4bit.supported(module):
            linear4bit.unpatch(module)
        if isinstance(module, (DeepseekV2RMSNorm, DeepseekV2MLP, DeepseekV2Attention, NF4Experts)):
            module.__dict__.pop("forward", None)  # the class's forward again
        if isinstance(module, NF4Experts):
            module.fused = False
            module.checkpointed = lambda: False


@contextlib.contextmanager
def fused(model: nn.Module, on: bool, *, regions: bool = True) -> Iterator[None]:
    """The fused kernels patched into `model` while inside (a training run), the eager forwards after."""
    if not on:
        yield
        return
    apply(model, regions=regions)
    # Grad and no-grad calls (evaluation, GRPO's generation), inputs with and without requires_grad,
    # single-token steps: each a graph of its own, more than dynamo's default of 8 per function.
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, _RECOMPILE_LIMIT)
    try:
        yield
    finally:
        torch._dynamo.config.recompile_limit = limit
        remove(model)
