"""The SFT loss head under `model.kernels: auto`: next-token log-probs over the 102,400-token vocabulary
in token chunks, never the whole [tokens x vocab] logits, with the gradient computed in the same pass.

TRL's SFTTrainer already swaps the model's forward for a chunked head (`add_fused_lm_head`), but on the
H200 it cost ~110 ms of a ~500 ms V2-Lite step (docs/benchmarks.md): it projects in [4096 x 32768]
tiles, folds each with a per-token kernel, and recomputes every tile in backward. Here a chunk of
tokens is projected once, a compiled kernel turns its logits into the log-prob, entropy, top-1 and
d log p / d logits in one pass, and one more matmul gives d log p / d hidden; backward only scales it.
The frozen LM head (LoRA never trains it) is what makes that possible: no weight gradient to keep.
Same outputs and contract as TRL's forward, which still runs whenever this one does not apply.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from finetune import compat
from finetune.compat import trl as compat_trl
from finetune.fast import pieces

CHUNK_TOKENS = 2048  # [2048 x 102,400] bf16 logits: 0.42 GB at a time


def _stats(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(label), entropy, label is the argmax, and d log p / d logits (= onehot - softmax)."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    p = torch.exp(z - lse)
    target = z.gather(1, labels.unsqueeze(1))
    log_prob = (target - lse).squeeze(1)
    entropy = lse.squeeze(1) - (p * z).sum(dim=-1)
    is_top1 = target.squeeze(1) >= z.max(dim=-1).values
    onehot = torch.arange(z.shape[1], device=z.device).unsqueeze(0) == labels.unsqueeze(1)
    return log_prob, entropy, is_top1, (onehot.float() - p).to(logits.dtype)


class _ChunkedLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        n = hidden.shape[0]
        log_prob = hidden.new_empty(n, dtype=torch.float32)
        entropy = torch.empty_like(log_prob)
        is_top1 = torch.empty(n, dtype=torch.bool, device=hidden.device)
        need_grad = ctx.needs_input_grad[0]  # not in evaluation (no_grad)
        grad_hidden = torch.empty_like(hidden) if need_grad else None  # d log p / d hidden, per token
        stats = pieces.compile_once("lm_head_stats", _stats)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            logits = hidden[start:end] @ weight.t()
            lp, ent, top, d_logits = stats(logits, labels[start:end])
            log_prob[start:end], entropy[start:end], is_top1[start:end] = lp, ent, top
            if grad_hidden is not None:
                grad_hidden[start:end] = d_logits @ weight
            del logits, d_logits
        ctx.save_for_backward(grad_hidden)
        ctx.mark_non_differentiable(entropy, is_top1)
        return log_prob, entropy, is_top1

    @staticmethod
    def backward(ctx, grad_log_prob, grad_entropy, _):  # type: ignore[override]
        if grad_entropy is not None:
            raise RuntimeError("the fused LM head gives no gradient through the entropy")
        (grad_hidden,) = ctx.saved_tensors
        if grad_log_prob is None:
            return None, None, None, None
        return grad_hidden * grad_log_prob.unsqueeze(1).to(grad_hidden.dtype), None, None, None


def chunked_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK_TOKENS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, H] @ weight [V, H].T → (log p(labels) [N] fp32 with gradient to `hidden`, entropy [N],
    is_top1 [N]). `weight` must be frozen; labels all valid (no -100)."""
    return _ChunkedLogProb.apply(hidden, weight, labels, chunk)


def _forward(
    self: nn.Module,
    *args: Any,
    fused_lm_head: bool = False,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: Any = None,
    **kwargs: Any,
) -> Any:
    trl_forward = self.__dict__["_trl_fused_forward"]
    weight = self.get_output_embeddings().weight
    unusual = shift_labels is not None or kwargs.get("output_router_logits") or weight.requires_grad
    if not fused_lm_head or unusual or getattr(self.config, "final_logit_softcapping", None):
        return trl_forward(
            *args,
            fused_lm_head=fused_lm_head,
            labels=labels,
            shift_labels=shift_labels,
            num_items_in_batch=num_items_in_batch,
            **kwargs,
        )
    kwargs["use_cache"] = False
    hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
    temperature = self.__dict__.get("_lm_head_temperature", 1.0)
    if temperature != 1.0:  # logits / T, as GRPO's head computes them (TRL's `temperature`)
        hidden = hidden / temperature
    labels = labels[:, 1:].to(hidden.device)
    mask = labels != -100
    log_prob, entropy, is_top1 = chunked_log_probs(hidden[mask], weight, labels[mask])
    # masked_scatter keeps an all-ignored batch connected to the graph (a zero loss, not a crash).
    log_probs, entropy, is_top1 = (
        x.new_zeros(mask.shape).masked_scatter(mask, x) for x in (log_prob, entropy, is_top1)
    )
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return compat_trl.chunked_head_output(
        loss=-log_probs.sum() / count,
        log_probs=log_probs,
        entropy=entropy,
        is_top1=is_top1,
        label_mask=mask,
    )


def patch(model: nn.Module, *, required: bool = False, temperature: float = 1.0) -> bool:
    """Put this head in place of TRL's chunked one (if `model` has it); returns whether it did.
    `required` (SFT, GRPO: their trainers always add TRL's head): not finding it is an error, as when
    TRL renames its head. `temperature`: the logits are divided by it (GRPO's sampling temperature)."""
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if forward is not None and compat_trl.is_chunked_head(forward):
            module._trl_fused_forward = forward
            module._lm_head_temperature = temperature
            module.forward = types.MethodType(_forward, module)
            return True
    if required:
        raise compat.fail(compat_trl.CHUNKED_HEAD, "the model carries no chunked LM head of TRL's")
    return False


def unpatch(model: nn.Module) -> None:
    for module in model.modules():
        if "_trl_fused_forward" in module.__dict__:
            module.forward = module.__dict__.pop("_trl_fused_forward")
            module.__dict__.pop("_lm_head_temperature", None)
