"""What a TRL trainer needs around it to train our DeepSeek MoE with a loss of its own (GRPO today; the
preference trainers, DPO / KTO, next): `MoETrainerMixin`, put before the TRL trainer class.

- The expert-balance loss of a trainable router. `RouterMonitor` adds it to the model output's `loss`,
  which a trainer computing its loss from the logits never reads; here it is taken from the monitor and
  added to the trainer's loss (training passes only).
- No copied "ref" adapter. With `ref_copy_field` (a config field, e.g. GRPO's `beta`) nonzero at
  construction, TRL copies a PEFT adapter into a frozen "ref" adapter. That copy misses the routed-expert
  LoRA (not PEFT's), doubles the LoRA memory and fails on some adapters. Built with the field at 0 there
  is none, and TRL's reference pass disables the adapter instead, which `adapters.attach` extends to the
  expert LoRA: the reference is the base model. The field's value is put back on the config and the
  trainer after construction.
- A samples log: the rows `_sample_rows` returns (by default none), read before each `log` call of the
  trainer, appended to `samples` (JSON lines, with the step) on the main process at logging steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.compat import trl as compat_trl
from finetune.model import routing


class MoETrainerMixin:
    """See the module. Keyword arguments: `router_monitor` (the model's `RouterMonitor`), `samples` (the
    samples.jsonl path, or None), `samples_per_log` (how many rows per logging step `_sample_rows` keeps)."""

    ref_copy_field: str | None = None  # the config field whose nonzero value makes TRL copy a "ref" adapter

    def __init__(
        self,
        *args: Any,
        router_monitor: routing.RouterMonitor,
        samples: Path | None = None,
        samples_per_log: int = 0,
        **kwargs: Any,
    ):
        field = self.ref_copy_field
        if field is None:
            super().__init__(*args, **kwargs)
        else:
            with compat_trl.no_reference_copy(kwargs["args"], field) as restore:
                super().__init__(*args, **kwargs)
            restore(self)
        self._monitor, self._samples, self._samples_per_log = router_monitor, samples, samples_per_log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        aux = self._monitor.take_pending()
        if aux is not None and model.training:
            # The trainer's loss is already scaled for gradient accumulation (TRL's trainers do so
            # themselves, GRPO's included); so is this.
            loss = loss + aux.to(loss.dtype) / self.current_gradient_accumulation_steps
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
