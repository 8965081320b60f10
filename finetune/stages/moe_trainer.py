"""What a TRL trainer needs around it to train our DeepSeek MoE with a loss of its own (GRPO, DPO, KTO):
`MoETrainerMixin`, put before the TRL trainer class.

- The expert-balance loss of a trainable router. `RouterMonitor` adds it to the model output's `loss`,
  which a trainer computing its loss from the logits never reads; here it is taken from the monitor and
  added to the trainer's loss (training passes only).
- No copied "ref" adapter. With `ref_copy_field` (a config field, e.g. GRPO's `beta`) nonzero at
  construction, TRL copies a PEFT adapter into a frozen "ref" adapter. That copy misses the routed-expert
  LoRA (not PEFT's), doubles the LoRA memory and fails on some adapters. Built with the field at 0 there
  is none, and TRL's reference pass disables the adapter instead. The field's value is put back on the
  config and the trainer after construction. DPO and KTO copy one whatever their settings: it is
  deleted after construction, and their reference precompute (which would have read it) runs then.
- The reference policy (`reference`): what "adapter disabled" computes in TRL's reference pass, set by
  `finetune.model.reference` once TRL has cast the trainable tensors: `base` (the adapter off, routed-
  expert LoRA included), or `init` (the adapter as training starts, a LoRA-sized frozen copy).
- A samples log: the rows `_sample_rows` returns (by default none), read before each `log` call of the
  trainer, appended to `samples` (JSON lines, with the step) on the main process at logging steps.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from finetune.compat import trl as compat_trl
from finetune.model import adapters, routing
from finetune.model import reference as reference_policy


class MoETrainerMixin:
    """See the module. Keyword arguments: `router_monitor` (the model's `RouterMonitor`), `samples` (the
    samples.jsonl path, or None), `samples_per_log` (how many rows per logging step `_sample_rows` keeps),
    `reference` (`init` | `base`: what TRL's reference pass computes; None: the trainer runs none)."""

    ref_copy_field: str | None = None  # the config field whose nonzero value makes TRL copy a "ref" adapter
    copies_reference: bool = False  # the constructor copies a "ref" adapter and may precompute through it

    def __init__(
        self,
        *args: Any,
        router_monitor: routing.RouterMonitor,
        samples: Path | None = None,
        samples_per_log: int = 0,
        reference: reference_policy.Mode | None = None,
        **kwargs: Any,
    ):
        config, field = kwargs["args"], self.ref_copy_field
        with contextlib.ExitStack() as stack:
            restore = stack.enter_context(compat_trl.no_reference_copy(config, field)) if field else None
            precompute = None
            if self.copies_reference:
                precompute = stack.enter_context(compat_trl.deferred_precompute(config))
                # The copy must wrap the modules the adapter wraps (PEFT would re-target a loaded one's).
                stack.enter_context(adapters.exact_targets())
            super().__init__(*args, **kwargs)
            if restore is not None:
                restore(self)
            if self.copies_reference:
                compat_trl.drop_reference_copy(self.accelerator.unwrap_model(self.model))
            self.reference: reference_policy.Reference | None = None
            if reference is not None:
                model = self.accelerator.unwrap_model(self.model)
                # After TRL's casts of the trainable tensors: the frozen copy holds what training starts from.
                adapters.keep_router_fp32(model)
                adapters.keep_full_copies_dtype(model)
                self.reference = reference_policy.install(model, reference)
            if precompute is not None:
                precompute(self, reference or "base")
        self._monitor, self._samples, self._samples_per_log = router_monitor, samples, samples_per_log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        aux = self._monitor.take_pending()
        if aux is not None and model.training:
            # Scaled for gradient accumulation as the trainer's own loss is: GRPO's comes scaled
            # (`loss_is_scaled_for_ga`), so this is divided too; DPO's, KTO's, ORPO's and CPO's is a batch
            # mean that the Trainer divides after this (False), with the balance loss in it.
            scaled = getattr(self, "loss_is_scaled_for_ga", None) is not False
            loss = loss + aux.to(loss.dtype) / (self.current_gradient_accumulation_steps if scaled else 1)
        return loss

    def _sample_rows(self) -> list[dict[str, Any]]:
        """The latest completions to log, each a JSON-able row (the step is added); none by default."""
        return []

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        rows = self._sample_rows()  # before the trainer's log, which may clear what they are read from
        super().log(logs, start_time)
        if not rows or self._samples is None or not self.accelerator.is_main_process or "loss" not in logs:
            return
        with open(self._samples, "a") as f:
            for row in rows:
                f.write(json.dumps({"step": self.state.global_step, **row}, default=str) + "\n")
