"""The fast path's leaf pieces: one compiled function per name, and the routed experts' fused SwiGLU,
permute and weighted combine (autograd Functions whose backwards are gathers). Used by the
orchestrator (`fusion`), the layer regions (`blocks`), the loss head (`lm_head`) and the experts."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_compiled: dict[str, Any] = {}


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


def is_silu(act: nn.Module) -> bool:
    """Whether `act` is SiLU (torch's or transformers' module): the SwiGLU the fused pieces compute."""
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
