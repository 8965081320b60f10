"""Routing replay for RL on a MoE model: the training passes over a rollout (old, reference and policy
log-probs, and the gradient-checkpointing recomputation) route each token to recorded experts.

Without it, the importance ratio pi_new / pi_old of GRPO compares two different sub-networks whenever a
token's top-k set flips between passes, which destabilises MoE RL (Megatron-LM #4168: 3 of 3
Qwen3-30B-A3B GRPO runs collapsed without replay, none with it). TRL has no such mechanism; we add it
with hooks, so its trainer runs unchanged. Three modes (`routing_replay`):

- `rollout` (R3): the experts chosen while generating. `generate` of the model is wrapped; router outputs
  of the prefill and of every decode step are collected per row and stored under the row's real tokens
  (prompt without padding + completion up to its first EOS), which is exactly what TRL later feeds to
  the training passes as unmasked tokens.
- `old_policy` (R2): the experts of the first training pass over the rollout that is not a reference
  pass: TRL's old-policy log-prob pass where it runs one (importance-sampling correction on, or several
  iterations per generation), else the first policy pass (then the reference pass, which comes before
  it, routes itself).
- `off`: every pass routes itself (the counts below are still taken against the rollout).

Replaying: before every forward of the whole model each row's real tokens are looked up; its recorded
expert ids replace the router's top-k (gating weights recomputed from the current router logits, so a
trainable router still gets gradients). Rows or positions without a record (the last sampled token,
which generation never feeds back) keep their own routing.

Counted per MoE layer, over the recorded tokens of the training passes: `routing/mismatch` (experts used
differ from the replayed record's, the rollout's with `off`: 0 wherever replay covers a pass) and
`routing/router_mismatch` (what the router itself would pick differs from the rollout's: the
sampler/trainer routing gap, replay or not).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from finetune import family
from finetune.distributed import all_reduce_sum
from finetune.fast import graphed
from finetune.model import routing


def _top(model: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in model.modules() if isinstance(m, family.PreTrainedModel))


Mode = Literal["rollout", "old_policy", "off"]
MODES: tuple[str, ...] = ("rollout", "old_policy", "off")


class RoutingReplay:
    """See the module. `is_reference`: whether the model computes the reference policy now (its passes
    record nothing)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        mode: Mode,
        eos_token_ids: list[int],
        is_reference: Callable[[], bool] = lambda: False,
    ):
        if mode not in MODES:
            raise ValueError(f"routing replay mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.is_reference = is_reference
        self.eos = torch.tensor(sorted(set(eos_token_ids)))
        self.top = _top(model)
        self.layers = sorted(routing.routers(model))
        self.records: dict[tuple[int, ...], torch.Tensor] = {}  # real tokens → [n, layers, k] rollout ids
        self.old_records: dict[tuple[int, ...], torch.Tensor] = {}  # the same, of the old-policy pass
        self._recording: list[dict[int, torch.Tensor]] | None = None  # per forward: layer → [B, t, k]
        self._step: dict[int, torch.Tensor] = {}
        self._shape: tuple[int, int] | None = None  # (B, t) of the forward in progress
        self._rollout: torch.Tensor | None = None  # [B*T, layers, k] rollout ids of this batch, -1: none
        self._plan: torch.Tensor | None = None  # the same for the record replayed (or compared, `off`)
        self._recording_old: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (ids, mask)
        self._counting = False
        zeros = torch.zeros(len(self.layers), dtype=torch.float64)
        self.tokens, self.mismatch, self.router_mismatch = zeros.clone(), zeros.clone(), zeros.clone()
        routers = routing.routers(model)
        # Observers for decode graphs: while generating they only record (`graphed.observer`).
        observe = graphed.observer
        self._handles = [
            self.top.register_forward_pre_hook(observe(self._begin), with_kwargs=True),
            self.top.register_forward_hook(observe(self._end)),
            *(
                routers[i].register_forward_hook(observe(self._router_hook(j)))
                for j, i in enumerate(self.layers)
            ),
        ]
        self._generate = self.top.generate
        self.top.generate = self._recorded_generate

    @property
    def replaying(self) -> bool:
        return self.mode != "off"

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.top.generate = self._generate

    # ------------------------------------------------------------------------------ recording
    def _recorded_generate(self, *args: Any, **kwargs: Any) -> Any:
        self.records, self.old_records = {}, {}  # a new rollout: the previous one's records are done with
        self._recording = []
        try:
            out = self._generate(*args, **kwargs)
        finally:
            steps, self._recording = self._recording, None
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        prompt = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if prompt is None or not steps:
            return out
        mask = torch.ones_like(prompt) if mask is None else mask
        self._store(sequences, prompt.shape[1], mask, steps)
        return out

    def _stacked(self, step: dict[int, torch.Tensor]) -> torch.Tensor:
        return torch.stack([step[i] for i in self.layers], dim=2)  # [B, t, layers, k]

    def _store(
        self, sequences: torch.Tensor, prompt_len: int, prompt_mask: torch.Tensor, steps: list
    ) -> None:
        # [B, positions fed to the model, layers, k]: the prefill, then one position per decode step.
        recorded = torch.cat([self._stacked(s) for s in steps], dim=1)
        completion = sequences[:, prompt_len:]
        is_eos = torch.isin(completion, self.eos.to(completion.device))
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion.shape[1])
        keep = torch.arange(completion.shape[1], device=completion.device)[None] <= first[:, None]
        real = torch.cat([prompt_mask.bool(), keep], dim=1)
        for b in range(sequences.shape[0]):
            positions = real[b].nonzero().flatten()
            key = tuple(sequences[b, positions].tolist())
            fed = positions[positions < recorded.shape[1]]
            self.records[key] = recorded[b, fed].to(torch.int16)

    # ------------------------------------------------------------------------------ forwards
    def _begin(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        self._shape = tuple(ids.shape)
        self._step = {}
        if self._recording is not None:
            return
        self._counting = True
        mask = kwargs.get("attention_mask")
        self._rollout = self._plan_for(ids, mask, self.records) if self.records else None
        self._recording_old = None
        if self.mode == "old_policy":
            self._plan = self._plan_for(ids, mask, self.old_records) if self.old_records else None
            if self.records and not self.is_reference() and not self._all_known(ids, mask):
                self._recording_old = (ids, mask)
        else:
            self._plan = self._rollout

    def _end(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._recording is not None and self._step:
            self._recording.append(self._step)
        elif self._recording_old is not None and len(self._step) == len(self.layers):
            self._store_old(*self._recording_old, self._stacked(self._step))
        self._step, self._recording_old = {}, None
        self._counting = False  # the plans stay for the checkpoint recomputation in backward

    def _store_old(self, ids: torch.Tensor, mask: torch.Tensor | None, used: torch.Tensor) -> None:
        for b, positions in enumerate(self._real_positions(ids, mask)):
            key = tuple(ids[b, positions].tolist())
            if key in self.records and key not in self.old_records:
                self.old_records[key] = used[b, positions].to(torch.int16)

    @staticmethod
    def _real_positions(ids: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        return [real[b].nonzero().flatten() for b in range(ids.shape[0])]

    def _all_known(self, ids: torch.Tensor, mask: torch.Tensor | None) -> bool:
        return all(
            tuple(ids[b, p].tolist()) in self.old_records
            for b, p in enumerate(self._real_positions(ids, mask))
        )

    def _plan_for(
        self, ids: torch.Tensor, mask: torch.Tensor | None, records: dict[tuple[int, ...], torch.Tensor]
    ) -> torch.Tensor | None:
        batch, length = ids.shape
        k = next(iter(records.values())).shape[-1]
        plan = torch.full((batch, length, len(self.layers), k), -1, dtype=torch.long, device=ids.device)
        found = False
        for b, positions in enumerate(self._real_positions(ids, mask)):
            record = records.get(tuple(ids[b, positions].tolist()))
            if record is None:
                continue
            found = True
            plan[b, positions[: record.shape[0]]] = record.to(plan.device, torch.long)
        return plan.view(batch * length, len(self.layers), -1) if found else None

    def _router_hook(self, j: int):
        def hook(module: torch.nn.Module, args: tuple, output: tuple) -> tuple | None:
            logits, weights, indices = output
            if self._recording is not None:
                if self._shape is not None and indices.shape[0] == self._shape[0] * self._shape[1]:
                    self._step[self.layers[j]] = indices.detach().view(*self._shape, -1)
                return None
            rows = indices.shape[0]
            plan = self._plan if self._plan is not None and self._plan.shape[0] == rows else None
            known = plan[:, j, 0] >= 0 if plan is not None else None
            used = indices
            if plan is not None and self.replaying:
                used = torch.where(known[:, None], plan[:, j], indices)
            if self._counting:
                if self._recording_old is not None and self._shape is not None:
                    self._step[self.layers[j]] = used.detach().view(*self._shape, -1)
                self._count(j, indices, used, plan, known)
            if plan is None or not self.replaying:
                return None
            scores = logits.softmax(dim=-1, dtype=torch.float32)
            replayed = scores.gather(1, used) * module.routed_scaling_factor
            return logits, replayed.to(weights.dtype), used

        return hook

    def _count(
        self,
        j: int,
        indices: torch.Tensor,
        used: torch.Tensor,
        plan: torch.Tensor | None,
        known: torch.Tensor | None,
    ) -> None:
        rollout = self._rollout
        with torch.no_grad():
            if rollout is not None and rollout.shape[0] == indices.shape[0]:
                seen = rollout[:, j, 0] >= 0
                self.tokens[j] += int(seen.sum())
                self.router_mismatch[j] += int((seen & ~_same(indices, rollout[:, j])).sum())
            if plan is not None and known is not None:
                self.mismatch[j] += int((known & ~_same(used, plan[:, j])).sum())

    def report(self) -> dict[str, float]:
        """Per layer and their mean: shares of the rollout's tokens (summed over processes) since the
        last report whose experts used differ from the replayed record's, and whose router's pick
        differs from the rollout's."""
        counts = all_reduce_sum(torch.stack([self.tokens, self.mismatch, self.router_mismatch]))
        self.tokens, self.mismatch, self.router_mismatch = (c.zero_() for c in counts.clone().unbind())
        tokens, mismatch, router = counts.unbind()
        if not tokens.sum():
            return {}
        out = {
            "routing/mismatch": float(mismatch.sum() / tokens.sum()),
            "routing/router_mismatch": float(router.sum() / tokens.sum()),
            "routing/replayed_tokens" if self.replaying else "routing/compared_tokens": float(tokens.max()),
        }
        for j, layer in enumerate(self.layers):
            if tokens[j]:
                out[f"routing/mismatch/layer{layer}"] = float(mismatch[j] / tokens[j])
                out[f"routing/router_mismatch/layer{layer}"] = float(router[j] / tokens[j])
        return out


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows whose top-k expert sets are equal."""
    return (a.sort(-1).values == b.sort(-1).values).all(-1)
