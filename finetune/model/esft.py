"""Expert-Specialized Fine-Tuning (ESFT, Wang et al. 2024, arXiv 2407.01906): how relevant each routed
expert is to a task, measured on its tokens, and the experts chosen for training from it.

Per MoE layer l and expert i, over the N tokens the loss counts (`mask`):
- gate score: (1/N) sum_t g_{i,t}, with g_{i,t} the router's softmax probability of expert i for token t
  where i is among the token's top-k, else 0 (the routing weight before `routed_scaling_factor`);
- token selection ratio: (1/(N K)) sum_t 1[i in topk(t)], so a layer's ratios sum to 1.
Both per layer, as the paper defines them; the paper's public scripts normalize over all layers instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from finetune.model import routing

SCORES = ("gate", "token")
DEFAULT_P = {"gate": 0.1, "token": 0.2}
# The cumulative score counts as reaching p within this much (float sums of ratios that add to 1).
_TOLERANCE = 1e-9


class NoLossTokens(ValueError):
    """The scoring sample held no token the loss counts."""


class _Recorder:
    def __init__(self, model: torch.nn.Module):
        self.routers = routing.routers(model)
        self.mask: torch.Tensor | None = None
        self.gate: dict[int, torch.Tensor] = {}
        self.picks: dict[int, torch.Tensor] = {}
        self.top_k = 0
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in self.routers.items()]

    def _hook(self, index: int):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if self.mask is None:
                return
            logits, _, top_k = output
            keep = self.mask.reshape(-1).to(logits.device)
            probs = logits[keep].float().softmax(dim=-1)
            picked = top_k[keep].long()
            self.top_k = picked.shape[-1]
            gate = torch.zeros_like(probs, dtype=torch.float64)
            gate.scatter_(1, picked, probs.gather(1, picked).double())
            counts = torch.zeros(probs.shape[-1], dtype=torch.float64, device=probs.device)
            counts.scatter_add_(
                0, picked.reshape(-1), torch.ones(picked.numel(), dtype=torch.float64, device=probs.device)
            )
            self.gate[index] = self.gate.get(index, 0) + gate.sum(dim=0)
            self.picks[index] = self.picks.get(index, 0) + counts

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def score(
    model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]
) -> dict[str, Any]:
    """Gate scores and token selection ratios of every MoE layer's experts over the masked tokens of
    `batches` ((input_ids, attention_mask or None, mask), each [B, T]); a forward without gradients.

    Returns {"tokens": N, "top_k": K, "gate": {layer: [E floats]}, "token": {layer: [E floats]}}."""
    recorder = _Recorder(model)
    device = next(p for p in model.parameters()).device
    training = model.training
    model.eval()
    tokens = 0
    try:
        with torch.no_grad():
            for input_ids, attention_mask, mask in batches:
                mask = mask.bool()
                if not mask.any():
                    continue
                recorder.mask = mask.to(device)
                tokens += int(mask.sum())
                kwargs = {} if attention_mask is None else {"attention_mask": attention_mask.to(device)}
                model(input_ids=input_ids.to(device), **kwargs)
                recorder.mask = None
    finally:
        recorder.remove()
        model.train(training)
    if tokens == 0:
        raise NoLossTokens("the scoring sample has no token the loss counts")
    k = recorder.top_k
    return {
        "tokens": tokens,
        "top_k": k,
        "gate": {i: (g / tokens).tolist() for i, g in sorted(recorder.gate.items())},
        "token": {i: (c / (tokens * k)).tolist() for i, c in sorted(recorder.picks.items())},
    }


def select_layer(
    scores: list[float], p: float, min_experts: int | None = None, max_experts: int | None = None
) -> list[int]:
    """Experts by descending score (ties: lower id first), taken until their cumulative score reaches
    `p`, then bounded to [min_experts, max_experts]; every expert when the scores never reach `p`.
    Returned sorted by id."""
    order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
    taken, total = [], 0.0
    for e in order:
        if total >= p - _TOLERANCE:
            break
        taken.append(e)
        total += scores[e]
    low = min(min_experts or 0, len(scores))
    if len(taken) < low:
        taken = order[:low]
    if max_experts is not None and len(taken) > max_experts:
        taken = taken[:max_experts]
    return sorted(taken)


def select(
    scores: dict[int, list[float]],
    p: float,
    min_experts: int | None = None,
    max_experts: int | None = None,
) -> dict[int, list[int]]:
    """`select_layer` for every MoE layer."""
    return {i: select_layer(s, p, min_experts, max_experts) for i, s in scores.items()}


def summary(selection: dict[int, list[int]], per_expert: int, num_experts: int) -> dict[str, Any]:
    """What validate / inspect print and the adapter keeps: experts per layer and their parameters."""
    chosen = sum(len(ids) for ids in selection.values())
    return {
        "experts_per_layer": {str(i): len(ids) for i, ids in selection.items()},
        "experts": chosen,
        "of": num_experts * len(selection),
        "share": round(chosen / max(num_experts * len(selection), 1), 4),
        "expert_parameters": chosen * per_expert,
        "parameters_per_expert": per_expert,
    }
