"""The reference policy of a preference or RL stage (DPO, KTO, GRPO's KL), on the one 4-bit model.

TRL computes its reference log-probs with the policy's adapter switched off (`model.disable_adapter()`,
through `use_adapter(model, None)`). That is the base model, which is the right reference only when
the adapter starts fresh. A stage that continues an earlier stage's adapter (`init_from`) must be
measured against that starting adapter, routed-expert LoRA and trained router included.

`install(model, "init")` keeps a frozen copy of every trainable tensor as training starts (LoRA-sized:
no second copy of the 4-bit model) and makes `model.disable_adapter()` run the model with those values
in place. The values are copied in and back (not swapped by pointer) so compiled regions and CUDA
graphs keep the addresses they captured, and through `.data`, so the policy's autograd graph built
before the reference pass sees its own values again by the time it runs backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

Mode = Literal["init", "base"]


class Reference:
    """What `model.disable_adapter()` means for a stage's trainer: the base model (`base`), or the
    adapter as it was when `install` ran (`init`). `mode` may be changed later (an evaluation of the
    starting policy against the base)."""

    def __init__(
        self, model: torch.nn.Module, mode: Mode, disable_adapter: contextlib.AbstractContextManager
    ):
        self.mode: Mode = mode
        self.in_use = False  # inside `active`: the model computes the reference now
        self._disable = disable_adapter  # the model's own (PEFT's, covering the routed-expert LoRA)
        self._frozen: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        if mode == "init":
            self._frozen = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def include(self, params: list[torch.nn.Parameter]) -> None:
        """Trainable tensors added after `install` (ESFT's selected experts) start from the reference too."""
        if self.mode == "init":
            self._frozen += [(p, p.detach().clone()) for p in params]

    @property
    def frozen_bytes(self) -> int:
        """Memory held by the frozen copy."""
        return sum(t.numel() * t.element_size() for _, t in self._frozen)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The model computes the reference policy inside."""
        self.in_use = True
        try:
            with self._computing():
                yield
        finally:
            self.in_use = False

    @contextlib.contextmanager
    def _computing(self) -> Iterator[None]:
        if self.mode == "base":
            with self._disable():  # type: ignore[operator]
                yield
            return
        current = [p.detach().clone() for p, _ in self._frozen]
        with torch.no_grad():
            for p, frozen in self._frozen:
                p.data.copy_(frozen)
        try:
            yield
        finally:
            with torch.no_grad():
                for (p, _), value in zip(self._frozen, current, strict=True):
                    p.data.copy_(value)


def install(model: torch.nn.Module, mode: Mode) -> Reference:
    """Make `model.disable_adapter()` compute the `mode` reference (see the module); returns it."""
    reference = Reference(model, mode, model.disable_adapter)
    model.disable_adapter = reference.active  # type: ignore[method-assign]
    return reference
