"""MoE routing during training: expert load per layer, and DeepSeek's expert-balance loss.

transformers' DeepseekV2 computes no auxiliary loss. When the router is trainable, nothing would stop
fine-tuning from collapsing routing onto a few experts; DeepSeek-V2 trains with an expert-level balance
loss  alpha * sum_i f_i * P_i  (f_i: fraction of routed slots taken by expert i, scaled by E/K; P_i: mean
router probability of expert i). We add the same term, per MoE layer, to the model's loss through hooks,
so TRL's trainers run unchanged. Statistics are taken over the whole batch (the paper's variant is per
sequence), padding included.

Routing health, per MoE layer over each logging window (`report`), from the routed slots counted there
(c_i: slots of expert i, E experts, k per token, T = sum(c) / k tokens):
  entropy    -sum p_i ln p_i / ln E with p_i = c_i / sum(c): 1 for an even load; its floor, where the
             same k experts take every token, is ln k / ln E (0.33 for 8 experts top-2, 0.43 for 64 top-6)
  max share  max_i c_i / T, the share of tokens that select the busiest expert: k / E for an even load,
             1.0 when every token selects one expert
  dead       experts that received no token in the last `dead_after` optimizer steps (`end_step`), summed
             over processes; none before that many steps have passed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from finetune import family
from finetune.distributed import all_reduce_sum
from finetune.fast import graphed

M = TypeVar("M", bound=torch.nn.Module)


def by_layer(model: torch.nn.Module, cls: type[M]) -> dict[int, M]:
    """Decoder layer index → the module of type `cls` inside that layer (router, routed experts)."""
    return {
        int(name.split(".layers.")[1].split(".")[0]): m
        for name, m in model.named_modules()
        if isinstance(m, cls) and ".layers." in name
    }


def routers(model: torch.nn.Module) -> dict[int, family.Router]:
    """Decoder layer index → its router."""
    return by_layer(model, family.Router)


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The model with a head (causal LM or sequence classifier) under any PEFT wrappers: its forward
    returns the loss. Module order puts it before the bare `DeepseekV2Model` inside it."""
    return next(m for m in model.modules() if isinstance(m, family.PreTrainedModel))


class RouterMonitor:
    """Counts routed tokens per expert for every MoE layer and optionally adds the balance loss.

    Only forwards of the whole model count: a gradient-checkpointing recomputation runs the routers
    again during backward, outside the model's forward, and must not count twice.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        aux_loss_coef: float = 0.0,
        also: list[Callable[[], dict[str, Any]]] | None = None,
    ):
        """`also`: more per-log reports (routing replay's) merged into `report`."""
        self.aux_loss_coef = aux_loss_coef
        self.also = also or []
        self.routers = routers(model)
        self.counts: dict[int, torch.Tensor] = {}
        self._since_step: dict[int, torch.Tensor] = {}  # counts since the last `end_step`
        self._last_used: dict[int, torch.Tensor] = {}  # per expert: the last step it received tokens
        self._step = 0  # the last optimizer step ended (`end_step`); where dead-expert windows start
        self._aux: list[torch.Tensor] = []
        self._pending: list[torch.Tensor] = []
        self._aux_logged: list[float] = []
        self._active = False
        top = _causal_lm(model)
        # Observers for decode graphs: without a loss (generation) they only count (`graphed.observer`).
        observe = graphed.observer
        self._handles = [
            top.register_forward_pre_hook(observe(self._begin)),
            top.register_forward_hook(observe(self._end)),
            *(r.register_forward_hook(observe(self._router_hook(i))) for i, r in self.routers.items()),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _begin(self, module, args):
        self._active = True
        self._aux = []

    def _end(self, module, args, output):
        self._active = False
        if self._aux and getattr(output, "loss", None) is not None:
            aux = self.aux_loss_coef * torch.stack(self._aux).sum()
            output.loss = output.loss + aux.to(output.loss.dtype)
            self._aux_logged.append(float(aux.detach()))
        elif self._aux:  # a forward without labels (GRPO's log-probs): its trainer adds the term
            self._pending += self._aux
        self._aux = []
        return output

    def take_pending(self) -> torch.Tensor | None:
        """The balance loss of the forwards that computed no loss themselves since the last call."""
        if not self._pending:
            return None
        aux = self.aux_loss_coef * torch.stack(self._pending).sum()
        self._pending = []
        self._aux_logged.append(float(aux.detach()))
        return aux

    def _router_hook(self, index: int):
        def hook(module: family.Router, args, output):
            aux = bool(self.aux_loss_coef) and module.training and torch.is_grad_enabled()
            if not (self._active or aux):  # a checkpoint's recomputation without the balance loss
                return
            logits, _, top_k = output
            experts = logits.shape[-1]
            with torch.no_grad():
                # Not bincount: on CUDA it reads the largest id on the host, a sync per layer and step.
                flat = top_k.flatten()
                counts = torch.zeros(experts, dtype=torch.long, device=flat.device)
                counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.long))
            if aux:
                # Computed in the checkpoint recomputation too (then discarded): non-reentrant
                # checkpointing requires the recomputed graph to save the same tensors as the forward.
                f = counts.float() * experts / max(top_k.numel(), 1)
                term = (f * logits.softmax(dim=-1, dtype=torch.float32).mean(dim=0)).sum()
                if self._active:
                    self._aux.append(term)
            if self._active:
                self.counts[index] = self.counts.get(index, 0) + counts
                self._since_step[index] = self._since_step.get(index, 0) + counts

        return hook

    def start(self, step: int) -> None:
        """Dead-expert windows start at optimizer step `step` (0, or the step a resumed run starts from)."""
        self._step = step
        self._last_used = {}
        self._since_step = {}

    def end_step(self, step: int) -> None:
        """Optimizer step `step` is done: the experts that received tokens since the last call were used."""
        for index, counts in self._since_step.items():
            last = self._last_used.get(index)
            if last is None:
                last = torch.full_like(counts, self._step)
            self._last_used[index] = torch.where(counts > 0, step, last)
        self._since_step = {}
        self._step = step

    def report(self, dead_after: int | None = None) -> dict[str, Any]:
        """Per layer: fraction of routed slots per expert and max/mean, and the routing health (entropy,
        max share, with `dead_after` the experts unused for that many steps), each also as a mean over
        layers; resets the counters."""
        out: dict[str, Any] = {}
        health: dict[str, dict[int, float]] = {"entropy": {}, "max_share": {}, "dead_experts": {}}
        for index, counts in sorted(self.counts.items()):
            counts = all_reduce_sum(counts.clone())  # every process's tokens
            fractions = (counts.float() / counts.sum().clamp(min=1)).tolist()
            mean = 1.0 / len(fractions)
            out[f"expert_load/layer{index}"] = [round(f, 5) for f in fractions]
            out[f"expert_load/layer{index}/max_over_mean"] = round(max(fractions) / mean, 4)
            entropy, share = load_health(counts, self.routers[index].top_k)
            health["entropy"][index], health["max_share"][index] = entropy, share
            if dead_after is not None:
                health["dead_experts"][index] = self._dead(index, len(fractions), dead_after)
        for name, layers in health.items():
            for index, value in layers.items():
                out[f"routing/{name}/layer{index}"] = round(value, 5)
            if layers:
                out[f"routing/{name}"] = round(sum(layers.values()) / len(layers), 5)
        if self._aux_logged:
            out["router_aux_loss"] = sum(self._aux_logged) / len(self._aux_logged)
        self.counts = {}
        self._aux_logged = []
        for extra in self.also:
            out.update(extra())
        return out

    def _dead(self, index: int, experts: int, after: int) -> float:
        """Experts of layer `index` that no process routed a token to in the last `after` steps."""
        last = self._last_used.get(index)
        if last is None:  # no token seen in any ended step of this process
            last = torch.full((experts,), self._step, dtype=torch.long, device=self.counts[index].device)
        used = all_reduce_sum((self._step - last < after).long())
        return float((used == 0).sum())


def load_health(counts: torch.Tensor, top_k: int) -> tuple[float, float]:
    """(entropy normalized by ln E, max share of tokens) of one layer's per-expert slot counts."""
    total = float(counts.sum())
    if total == 0:
        return 1.0, 0.0
    p = counts.double() / total
    entropy = float(-(p * p.clamp(min=1e-300).log()).sum() / math.log(len(p)))
    return entropy, float(counts.max()) * top_k / total
