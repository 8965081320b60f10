"""How a routed-experts module computes: one object per module, set by the fast path for a block
(training under `fusion.apply`, decoding under `generation.compiled_decoding`) and read by its forward.

The fast path sits below the model code, so it finds the experts by this object (`of`) rather than by
their class, and asks them only what `RoutedExperts` declares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn


def _never() -> bool:
    return False


@dataclass
class ExpertsMode:
    # SwiGLU, the permute and the weighted combine as compiled kernels (`fusion.apply`).
    fused: bool = False
    # Whether the module runs inside a gradient-checkpointed layer, asked per forward (`fusion.apply`
    # sets it from the layer): the dequantized weights are then kept for the recomputation's backward.
    checkpointed: Callable[[], bool] = field(default=_never)
    # Whole-weight dequantization through the Triton kernel on CUDA, bit for bit bitsandbytes' result
    # (`compiled_decoding`; in training it measured no faster: docs/benchmarks.md).
    dequant_kernel: bool = False
    # Steps without gradients multiply the NF4 bytes directly (kernels/nf4_decode.py: no 16-bit copy of
    # the layer's experts); `compiled_decoding`, by default on CUDA in bf16.
    grouped_kernel: bool = False

    def reset_training(self) -> None:
        self.fused, self.checkpointed = False, _never


class RoutedExperts(Protocol):
    """What the fast path asks of a routed-experts module."""

    mode: ExpertsMode
    act_fn: nn.Module
    compute_dtype: torch.dtype

    def compiles_whole(self, x: torch.Tensor) -> bool: ...


def of(module: nn.Module) -> ExpertsMode | None:
    """The module's mode: None for anything but routed experts of ours."""
    mode = getattr(module, "mode", None)
    return mode if isinstance(mode, ExpertsMode) else None


def experts(model: nn.Module) -> list[nn.Module]:
    """The model's routed-experts modules of ours, in module order."""
    return [m for m in model.modules() if of(m) is not None]
