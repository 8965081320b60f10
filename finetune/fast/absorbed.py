"""MLA decode steps in latent space ("weight absorption"), for `compiled_decoding`.

transformers' DeepseekV2 caches MLA's latent (512 + 64 values a token) but expands it at every step:
`kv_b_proj` (an NF4 layer with LoRA, here) runs over every cached position, and the per-head keys and
values of all of them ([batch, 16 heads, length, 192 + 128]) are written and read again for one new
token's attention. The batch-128 decode profile counts those GEMMs, the fp32 LoRA products on them and
the copies among the ~28 ms of non-expert work a step (docs/benchmarks.md).

A query needs no expanded key: with W_uk / W_uv the key / value rows of `kv_b_proj`'s weight for head h,
  q_nope·(c W_uk)ᵀ = (q_nope W_uk)·cᵀ   and   softmax·(c W_uvᵀ) = (softmax·c) W_uvᵀ,
so each head's query is taken into the latent space once, attention runs against the cached latent
itself (one shared key/value "head"), and its result is taken out to the head's value space. Exact in
real arithmetic; in bf16 it rounds in another order, as any fused kernel does.

The weight is `kv_b_proj`'s effective one, rebuilt inside every step (dequantized base plus each active
LoRA's delta, through PEFT), so updated or disabled adapters are always the ones used; a step that is not
a one-token decode with a mask, or a layer this does not cover (dropout in training mode, DoRA), runs
transformers' own forward.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import bitsandbytes.functional as bnbf
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from finetune import family


def effective_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    """[out, in] weight `linear` applies, in `dtype`: a plain or bitsandbytes 4-bit linear layer, or a
    PEFT LoRA layer over one (base plus the active adapters' deltas); None where that is not all it does."""
    if isinstance(linear, LoraLayer):
        # Refusals first: they are decided without touching the weight, which is dequantized after.
        if linear.merged:
            return None
        adapters = (
            [] if linear.disable_adapters else [a for a in linear.active_adapters if a in linear.lora_A]
        )
        for adapter in adapters:
            dropout = linear.lora_dropout[adapter]
            if linear.use_dora.get(adapter) or linear.lora_bias.get(adapter):
                return None
            if linear.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
                return None
        base = _base_weight(linear.get_base_layer())
        if base is None:
            return None
        weight = base.to(dtype)
        for adapter in adapters:
            weight = weight + linear.get_delta_weight(adapter).to(dtype)
        return weight
    base = _base_weight(linear)
    return None if base is None else base.to(dtype)


def _base_weight(linear: nn.Module) -> torch.Tensor | None:
    """The weight of a bias-free `nn.Linear` or bitsandbytes `Linear4bit`, dequantized; else None."""
    if not isinstance(linear, nn.Linear) or linear.bias is not None:
        return None
    weight = linear.weight
    if type(weight).__name__ == "Params4bit":
        return bnbf.dequantize_4bit(weight.data, weight.quant_state)
    return weight


def _forward(
    self: family.Attention,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cache: Any = None,
    position_embeddings: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if cache is None:  # transformers' deprecated name, still what some callers pass
        cache = kwargs.pop("past_key_values", None)
    else:
        kwargs.pop("past_key_values", None)
    batch, length = hidden_states.shape[:-1]
    weight = None
    if length == 1 and cache is not None and attention_mask is not None:
        weight = effective_weight(self.kv_b_proj, hidden_states.dtype)
    if weight is None:
        return type(self).forward(
            self,
            hidden_states,
            attention_mask,
            cache=cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
    heads, nope, rope, rank = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
    if self.q_lora_rank is None:
        q = self.q_proj(hidden_states)
    else:
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
    q = q.view(batch, length, heads, nope + rope).transpose(1, 2)
    q_nope, q_pe = torch.split(q, [nope, rope], dim=-1)
    compressed = self.kv_a_proj_with_mqa(hidden_states)
    kv_nope, k_pe = torch.split(compressed, [rank, rope], dim=-1)
    latent = self.kv_a_layernorm(kv_nope).view(batch, 1, length, rank)
    k_pe = k_pe.view(batch, 1, length, rope)
    q_pe, k_pe = family.apply_rotary_emb(q_pe, k_pe, position_embeddings.to(q_pe.device))
    latent, k_pe = cache.update(
        latent, k_pe, self.layer_idx, kwargs=kwargs
    )  # [b, 1, T, rank], [b, 1, T, rope]

    per_head = weight.view(heads, nope + self.v_head_dim, rank)
    w_uk, w_uv = per_head[:, :nope], per_head[:, nope:]  # [H, nope, rank], [H, v, rank]
    # Heads are a batch dimension of the weight products (einsum: no copy of the weight per sequence)
    # and rows of one attention against the single latent "head" (bmm: no copy of the cache per head).
    q_latent = torch.einsum("bhsd,hdc->bhsc", q_nope, w_uk)
    rows, cached = heads * length, latent.shape[2]
    scores = torch.bmm(q_latent.reshape(batch, rows, rank), latent[:, 0].transpose(1, 2))
    scores = scores + torch.bmm(q_pe.reshape(batch, rows, rope), k_pe[:, 0].transpose(1, 2))
    scores = scores.view(batch, heads, length, cached).float() * self.scaling
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    else:
        scores = scores + attention_mask.float()
    probs = scores.softmax(dim=-1).to(latent.dtype).view(batch, rows, cached)
    out_latent = torch.bmm(probs, latent[:, 0]).view(batch, heads, length, rank)
    out = torch.einsum("bhsc,hvc->bhsv", out_latent, w_uv)
    out = out.transpose(1, 2).reshape(batch, length, heads * self.v_head_dim)
    return self.o_proj(out), None


@contextlib.contextmanager
def absorbed(model: nn.Module, on: bool) -> Iterator[int]:
    """Every MLA layer of `model` decodes in latent space while inside; yields how many were patched."""
    layers = [m for m in model.modules() if isinstance(m, family.Attention)] if on else []
    for layer in layers:
        layer.forward = types.MethodType(_forward, layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
