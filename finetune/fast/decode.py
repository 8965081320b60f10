"""Routed experts for a few tokens at a time (decoding), with no data-dependent shapes.

`NF4Experts.forward` dequantizes all of a layer's experts per call: right for training, where every
expert gets rows, wasteful for a decode step of one token that reads 6 of 64. Here each (token, expert)
pair dequantizes just its expert's weight, from a gather of the packed bytes, and runs a batched
matmul; every shape follows from the number of pairs alone, so `torch.compile` fuses the dequantization
into one kernel and CUDA graphs can replay the step. bitsandbytes has no kernel for a gathered subset of
a quantized tensor, hence the NF4 decoding in plain torch (checked bit-exact against `dequantize_4bit`).
"""

from __future__ import annotations

import torch

from finetune.kernels.nf4_torch import expert_block_scales, gathered_weights


def nested_state(
    module: torch.nn.Module, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """`block_scales`' `nested` for weight `name` of an `NF4Experts`: None without double quantization."""
    if name not in module._nested_blocksize:
        return None
    parts = (getattr(module, f"{name}_{part}") for part in ("absmax2", "code2", "offset"))
    return (*parts, module._nested_blocksize[name])


def pair_products(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x [P, K], weights [P, N, K] -> [P, N]: row p times its own matrix."""
    if torch.compiler.is_compiling():
        # In a compiled decode step, a product and a sum: inductor fuses the weights' NF4 decoding into
        # the reduction and reads the packed bytes once. As a batched matmul it wrote every pair's bf16
        # weights first and read them back (profiled on the H200: 4 of ~10 ms a token at batch 1).
        return (weights.float() * x.float().unsqueeze(1)).sum(dim=-1).to(x.dtype)
    return torch.bmm(weights, x.unsqueeze(-1)).squeeze(-1)


def lora_pairs(
    x: torch.Tensor,
    ids: torch.Tensor,
    slot: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """`scale * (x_p @ A.T) @ B.T` with each pair's expert factors; zero for experts without LoRA."""
    slots = slot[ids]
    has = (slots >= 0).to(x.dtype).unsqueeze(-1)
    slots = slots.clamp(min=0)
    low = pair_products(x, a[slots].to(x.dtype)) * (scale * has)
    return pair_products(low, b[slots].to(x.dtype))


def expert_weights(module: torch.nn.Module, name: str, ids: torch.Tensor) -> torch.Tensor:
    """[len(ids), N, K] weights `name` ("gate_up" or "down") of experts `ids` of an `NF4Experts`."""
    dtype = module.compute_dtype
    plain = getattr(module, f"{name}_proj", None)
    if isinstance(plain, torch.Tensor):  # PlainExperts: the 16-bit tensors themselves
        return plain[ids].to(dtype)
    shape = module._shapes[name]
    if (shape[1] * shape[2]) % module.blocksize:  # blocks straddle experts: no per-expert slices
        return module.dequantize(name)[ids]
    return gathered_weights(
        getattr(module, f"{name}_packed"),
        getattr(module, f"{name}_absmax"),
        nested_state(module, name),
        getattr(module, f"{name}_code"),
        shape,
        ids,
        module.blocksize,
        dtype,
    )


def few_token_forward(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """`NF4Experts.forward` computed pair by pair: each token times the weights of the experts it picked.

    Tokens go in chunks of at most `num_experts` pairs, so no chunk gathers more weights than the layer
    holds; a compiled step takes this path also for larger batches where the grouped path would cut the
    graph (a host sync or a data-dependent shape, see `NF4Experts.forward`). Rows are independent, so
    chunking changes no value.
    """
    per_chunk = max(1, module.num_experts // top_k_index.shape[1])
    if top_k_index.shape[0] <= per_chunk:
        return _pairs_forward(module, hidden_states, top_k_index, top_k_weights)
    splits = (t.split(per_chunk) for t in (hidden_states, top_k_index, top_k_weights))
    chunks = zip(*splits, strict=True)
    return torch.cat([_pairs_forward(module, *chunk) for chunk in chunks])


def _pairs_forward(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    num_tokens, top_k = top_k_index.shape
    ids = top_k_index.reshape(-1)
    x = hidden_states.to(module.compute_dtype).repeat_interleave(top_k, dim=0)

    def project(name: str, inputs: torch.Tensor) -> torch.Tensor:
        if kernel_applies(module, inputs):
            out = kernel_pair_products(module, name, inputs, ids)
        else:
            out = pair_products(inputs, expert_weights(module, name, ids))
        if getattr(module, "has_full", False) and module.lora_enabled:  # ESFT's trained 16-bit experts
            slots = module.full_slot[ids]
            w = getattr(module, f"full_{name}")[slots.clamp(min=0)].to(inputs.dtype)
            out = torch.where((slots >= 0).unsqueeze(1), pair_products(inputs, w).to(out.dtype), out)
        if module.has_lora and module.lora_enabled:
            a, b = getattr(module, f"lora_{name}_A"), getattr(module, f"lora_{name}_B")
            out = out + lora_pairs(
                module.lora_dropout(inputs), ids, module.lora_slot, a, b, module.lora_scale
            )
        return out

    gate, up = project("gate_up", x).chunk(2, dim=-1)
    y = project("down", module.act_fn(gate) * up)
    y = y.float() * top_k_weights.reshape(-1, 1).float()
    return y.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def kernel_applies(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether `kernel_pair_products` serves this call: on CUDA, without autograd (the kernel has no
    backward), for a `kernel_layout` module."""
    return x.is_cuda and not torch.is_grad_enabled() and kernel_layout(module)


def kernel_layout(module: torch.nn.Module) -> bool:
    """NF4 weights (not 16-bit ones) whose rows each start a quantization block."""
    if not hasattr(module, "gate_up_packed"):
        return False
    return all(module._shapes[name][2] % module.blocksize == 0 for name in ("gate_up", "down"))


def kernel_pair_products(
    module: torch.nn.Module, name: str, x: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """`pair_products(x, expert_weights(module, name, ids))` by the NF4 pair GEMV
    (`finetune.kernels.nf4_pairs`): the packed bytes streamed once, no 16-bit weight written."""
    from finetune.kernels.nf4_pairs import nf4_pair_gemv  # triton: imported where it is used

    shape = module._shapes[name]
    per_expert = shape[1] * shape[2] // module.blocksize
    scales = expert_block_scales(
        getattr(module, f"{name}_absmax"), nested_state(module, name), ids, per_expert
    )
    code = getattr(module, f"{name}_code").float()
    return nf4_pair_gemv(x, ids, getattr(module, f"{name}_packed"), scales, code, shape, module.blocksize)
