"""NF4 in plain torch: bitsandbytes' storage format read without its kernels (the CPU paths, the
references the Triton kernels are checked against), and its `QuantState` built from raw tensors.

bitsandbytes packs two values a byte, the first in the high nibble, and scales blocks of `blocksize`
consecutive values of the flattened tensor; with double quantization the block scales are themselves
8-bit (`nested` = (absmax2, code2, offset, nested blocksize))."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import torch


def block_scales(
    absmax: torch.Tensor,
    nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None,
    blocks: torch.Tensor,
) -> torch.Tensor:
    """fp32 scales of the 64-value blocks `blocks` (indices into the flattened tensor's blocks):
    `absmax` itself, or decoded from its double quantization.

    `nested` = (absmax2, code2, offset, nested blocksize) when the absmax is itself 8-bit quantized.
    """
    if nested is None:
        return absmax[blocks].float()
    absmax2, code2, offset, nested_blocksize = nested
    return code2[absmax[blocks].long()] * absmax2[blocks // nested_blocksize] + offset


def gathered_weights(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None,
    code: torch.Tensor,
    shape: tuple[int, int, int],
    ids: torch.Tensor,
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The [len(ids), N, K] weights of experts `ids` from an NF4 tensor of `shape` [E, N, K].

    bitsandbytes packs two values a byte, the first in the high nibble, and scales blocks of
    `blocksize` consecutive values of the flattened tensor; N*K must be a multiple of `blocksize`.
    Only the picked experts' block scales are decoded (`absmax`, `nested`: see `block_scales`).
    """
    num_experts, n, k = shape
    per_expert = n * k
    nibbles = packed.view(num_experts, per_expert // 2)[ids]
    values = torch.stack((nibbles >> 4, nibbles & 15), dim=-1).view(
        len(ids), per_expert // blocksize, blocksize
    )
    block = expert_block_scales(absmax, nested, ids, per_expert // blocksize)
    weights = code[values.long()] * block.unsqueeze(-1)
    return weights.view(len(ids), n, k).to(dtype)


def expert_block_scales(
    absmax: torch.Tensor,
    nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None,
    ids: torch.Tensor,
    per_expert: int,
) -> torch.Tensor:
    """fp32 [len(ids), per_expert]: the block scales of experts `ids`, each `per_expert` blocks long."""
    blocks = ids.unsqueeze(-1) * per_expert + torch.arange(per_expert, device=ids.device)
    return block_scales(absmax, nested, blocks)


def nf4_quant_state(
    absmax: torch.Tensor,
    code: torch.Tensor,
    shape: tuple[int, ...] | list[int],
    blocksize: int,
    dtype: torch.dtype,
    nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
) -> bnbf.QuantState:
    """bitsandbytes' NF4 QuantState from its tensors; `nested` = (absmax2, code2, offset, nested
    blocksize) under double quantization (`decode.nested_state`'s form), else None."""
    state2 = offset = None
    if nested is not None:
        absmax2, code2, offset, nested_blocksize = nested
        state2 = bnbf.QuantState(absmax=absmax2, code=code2, blocksize=nested_blocksize, dtype=torch.float32)
    return bnbf.QuantState(
        absmax=absmax,
        shape=torch.Size(shape),
        code=code,
        blocksize=blocksize,
        quant_type="nf4",
        dtype=dtype,
        offset=offset,
        state2=state2,
    )
