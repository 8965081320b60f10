"""Routing replay for RL on a MoE model: the experts chosen for every token while generating a rollout
are recorded, and the training passes over that rollout (old, reference and policy log-probs, and the
gradient-checkpointing recomputation) route each token to the same experts.

Without it, the importance ratio pi_new / pi_old of GRPO compares two different sub-networks whenever a
token's top-k set flips between rollout and training, which destabilises MoE RL (Megatron-LM #4168: 3 of
3 Qwen3-30B-A3B GRPO runs collapsed without replay, none with it). TRL has no such mechanism; we add it
with hooks, so its trainer runs unchanged:

- recording: `generate` of the model is wrapped; router outputs of the prefill and of every decode step
  are collected per row, and stored under the row's real tokens (prompt without padding + completion up
  to its first EOS), which is exactly what TRL later feeds to the training passes as unmasked tokens;
- replay: before every forward of the whole model, each row's real tokens are looked up; its recorded
  expert ids replace the router's top-k (gating weights recomputed from the current router logits, so a
  trainable router still gets gradients). Rows or positions without a record (the last sampled token,
  which generation never feeds back) keep their own routing.

Either way the share of tokens whose experts differ from the rollout's is counted: `routing/mismatch`
(experts actually used in the training passes; 0 with replay) and `routing/router_mismatch` (what the
router itself would pick, replay or not).
"""

from __future__ import annotations

from typing import Any

import torch

from finetune import family
from finetune.distributed import all_reduce_sum
from finetune.fast import graphed
from finetune.model import routing


def _top(model: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in model.modules() if isinstance(m, family.PreTrainedModel))


class RoutingReplay:
    def __init__(self, model: torch.nn.Module, *, replay: bool, eos_token_ids: list[int]):
        self.replay = replay
        self.eos = torch.tensor(sorted(set(eos_token_ids)))
        self.top = _top(model)
        self.layers = sorted(routing.routers(model))
        self.records: dict[tuple[int, ...], torch.Tensor] = {}  # real tokens → [n, layers, k] expert ids
        self._recording: list[dict[int, torch.Tensor]] | None = None  # per forward: layer → [B, t, k]
        self._step: dict[int, torch.Tensor] = {}
        self._shape: tuple[int, int] | None = None  # (B, t) of the forward in progress
        self._plan: torch.Tensor | None = None  # [B*T, layers, k] rollout ids of this batch, -1: none
        self._counting = False
        self.tokens = self.mismatch = self.router_mismatch = 0
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

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.top.generate = self._generate

    # ------------------------------------------------------------------------------ recording
    def _recorded_generate(self, *args: Any, **kwargs: Any) -> Any:
        self.records = {}  # a new rollout: the previous one's records are done with
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

    def _store(
        self, sequences: torch.Tensor, prompt_len: int, prompt_mask: torch.Tensor, steps: list
    ) -> None:
        # [B, positions fed to the model, layers, k]: the prefill, then one position per decode step.
        recorded = torch.cat([torch.stack([s[i] for i in self.layers], dim=2) for s in steps], dim=1)
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
        if self._recording is not None:
            self._step = {}
            return
        self._counting = True
        mask = kwargs.get("attention_mask")
        self._plan = self._plan_for(ids, mask) if self.records else None

    def _end(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._recording is not None and self._step:
            self._recording.append(self._step)
            self._step = {}
        self._counting = False  # the plan stays for the checkpoint recomputation in backward

    def _plan_for(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        batch, length = ids.shape
        plan = torch.full(
            (batch, length, len(self.layers), self._k()), -1, dtype=torch.long, device=ids.device
        )
        found = False
        for b in range(batch):
            positions = (
                mask[b].bool() if mask is not None else torch.ones_like(ids[b], dtype=torch.bool)
            ).nonzero()
            positions = positions.flatten()
            record = self.records.get(tuple(ids[b, positions].tolist()))
            if record is None:
                continue
            found = True
            plan[b, positions[: record.shape[0]]] = record.to(plan.device, torch.long)
        return plan.view(batch * length, len(self.layers), -1) if found else None

    def _k(self) -> int:
        return next(iter(self.records.values())).shape[-1]

    def _router_hook(self, j: int):
        def hook(module: torch.nn.Module, args: tuple, output: tuple) -> tuple | None:
            logits, weights, indices = output
            if self._recording is not None:
                if self._shape is not None and indices.shape[0] == self._shape[0] * self._shape[1]:
                    self._step[self.layers[j]] = indices.detach().view(*self._shape, -1)
                return None
            plan = self._plan
            if plan is None or plan.shape[0] != indices.shape[0]:
                return None
            rollout = plan[:, j]
            known = rollout[:, 0] >= 0
            used = torch.where(known[:, None], rollout, indices) if self.replay else indices
            if self._counting:
                with torch.no_grad():
                    same_router = (indices.sort(-1).values == rollout.sort(-1).values).all(-1)
                    same_used = (used.sort(-1).values == rollout.sort(-1).values).all(-1)
                    self.tokens += int(known.sum())
                    self.router_mismatch += int((known & ~same_router).sum())
                    self.mismatch += int((known & ~same_used).sum())
            if not self.replay:
                return None
            scores = logits.softmax(dim=-1, dtype=torch.float32)
            replayed = scores.gather(1, used) * module.routed_scaling_factor
            return logits, replayed.to(weights.dtype), used

        return hook

    def report(self) -> dict[str, float]:
        """Shares of recorded tokens since the last report whose experts differ from the rollout's (summed
        over processes)."""
        counts = all_reduce_sum(
            torch.tensor([self.tokens, self.mismatch, self.router_mismatch], dtype=torch.float64)
        )
        self.tokens, self.mismatch, self.router_mismatch = (int(v) for v in counts.tolist())
        if not self.tokens:
            return {}
        out = {
            "routing/mismatch": self.mismatch / self.tokens,
            "routing/router_mismatch": self.router_mismatch / self.tokens,
            "routing/replayed_tokens" if self.replay else "routing/compared_tokens": float(self.tokens),
        }
        self.tokens = self.mismatch = self.router_mismatch = 0
        return out
