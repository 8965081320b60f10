"""bitsandbytes `Linear4bit` layers (the MLA projections, the dense MLP) in training, through our NF4
dequantize kernel.

Why: profiled on the H200 (docs/benchmarks.md), `bnb.matmul_4bit` on a training batch costs ~0.2 ms of
host time a call (bitsandbytes' op dispatch and QuantState handling, two kernel launches: the nested
absmax, then the weight), 378 calls a V2-Lite step whose GPU often waits for the host, plus ~40 ms a
step of GPU time in bitsandbytes' dequantize kernels. Here: one launch of `finetune.kernels.nf4_dequant`
(nested scales inside, the same bits), then `F.linear`. The backward dequantizes again rather than keep
a 16-bit copy of the weight, as bitsandbytes' `MatMul4Bit` does. A single row without gradients (a
decode step) keeps bitsandbytes' GEMV.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from bitsandbytes.nn import Linear4bit
from torch import nn

from finetune.compat import bitsandbytes as compat_bnb


def _dequantized(tensors: tuple, statics: tuple, dtype: torch.dtype) -> torch.Tensor:
    from finetune.kernels.nf4_dequant import _nf4_dequantize_op  # triton: imported where used

    # Rounded to the state's dtype first, then cast, as bitsandbytes' dequantize_4bit + .to() does.
    return _nf4_dequantize_op(*tensors, *statics).to(dtype)


class _NF4Linear(torch.autograd.Function):
    """y = x @ W.T (+ bias) with W dequantized from NF4 in the forward and again in the backward."""

    @staticmethod
    def forward(ctx, x, bias, packed, absmax, code, absmax2, code2, offset, statics):  # type: ignore[override]
        tensors = (packed, absmax, code, absmax2, code2, offset)
        ctx.save_for_backward(*tensors)
        ctx.statics = statics
        ctx.has_bias = bias is not None
        return F.linear(x, _dequantized(tensors, statics, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ _dequantized(tuple(ctx.saved_tensors), ctx.statics, grad.dtype)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None, None, None, None, None, None


def _forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.numel() == x.shape[-1] and not x.requires_grad:  # one row, no gradient: bitsandbytes' GEMV
        return type(self).forward(self, x)
    compat_bnb.repair_quant_state(self)
    if not self.compute_type_is_set:
        self.set_compute_type(x)
        self.compute_type_is_set = True
    inp_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    from finetune.kernels.nf4_dequant import op_args

    tensors, statics = op_args(self.weight.data, self.weight.quant_state)
    return _NF4Linear.apply(x, bias, *tensors, statics).to(inp_dtype)


def supported(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit with an NF4 weight: what `patch` takes over."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return isinstance(module, Linear4bit) and state is not None and state.quant_type == "nf4"


def patch(module: nn.Module) -> None:
    """`module.forward` through the dequantize kernel (undone by `unpatch`)."""
    # The compat check runs here, eagerly: its first run inside a compiled region would break the graph.
    compat_bnb.repair_quant_state(module)
    module.forward = types.MethodType(_forward, module)


def unpatch(module: nn.Module) -> None:
    module.__dict__.pop("forward", None)
