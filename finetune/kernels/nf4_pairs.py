"""One GEMV per (token, expert) pair over bitsandbytes NF4 experts (Triton): the few-token decode step.

At batch 1 a MoE layer multiplies one token by 6 of 64 experts. Each program owns a pair p and a strip
of BLOCK_N weight rows of its expert, streams the rows' packed bytes once (64 contiguous bytes a row and
step), decodes both nibbles with the 16-entry code table, multiplies by fp32 block scales, rounds to
the compute dtype as `dequantize_4bit` would, and reduces against the pair's input in fp32: no tensor
cores (one row of input), no 16-bit weight in memory, nothing read on the host (CUDA-graph safe).
The block scales are decoded beforehand for the picked experts only (`nf4_torch.block_scales`), which keeps
double quantization's dependent loads out of the streaming loop.
(`nf4_decode.nf4_expert_gemv`, the grouped variant, streamed at ~40 GB/s on the H200.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Swept on the H200 (benchmarks/nf4_decode.py, V2-Lite experts, 6 pairs): 16 rows x 128 values with 2
# warps streams at 290-420 GB/s, 2.4-3x the 32-row, 4-warp tile (more programs in flight per SM).
BLOCK_N = 16
BLOCK_K = 128  # values a step: 64 bytes of each row
NUM_WARPS = 2
# Whole steps (K a multiple of BLOCK_K): unmasked byte loads and one scale per (row, block) broadcast
# over its values. The masked path's mask follows the even columns (stride 2), so the compiler loads
# the bytes one at a time (16 `ld.global.b8` a thread and step at the default tile, in the sm_90 PTX)
# and each value's scale separately. Timed on the H200 (benchmarks/nf4_decode.py, batch 1): 2.45x the
# masked path for gate_up (0.025 vs 0.061 ms a layer), 1.4x for down (0.014 vs 0.020 ms).
WHOLE_STEPS = 1


@triton.jit
def _pair_gemv_kernel(
    x_ptr,
    y_ptr,
    ids_ptr,
    packed_ptr,
    scale_ptr,
    code_ptr,
    N,
    K,
    QB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WHOLE: tl.constexpr,
):
    p = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = tl.minimum(rows, N - 1).to(tl.int64)
    expert = tl.load(ids_ptr + p).to(tl.int64)
    byte_row = expert * N * (K // 2) + rows64 * (K // 2)
    scale_row = p.to(tl.int64) * N * (K // QB) + rows64 * (K // QB)
    half = tl.arange(0, BLOCK_K // 2)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + 2 * half  # even columns; odd = cols + 1
        k_mask = cols < K
        if WHOLE:  # rows past N read row N-1 (clamped above), columns never run past K
            byte = tl.load(packed_ptr + byte_row[:, None] + (k0 // 2 + half)[None, :])
            blocks = tl.load(
                scale_ptr + scale_row[:, None] + (k0 // QB + tl.arange(0, BLOCK_K // QB))[None, :]
            )
            scale = tl.reshape(
                tl.broadcast_to(blocks[:, :, None], (BLOCK_N, BLOCK_K // QB, QB // 2)),
                (BLOCK_N, BLOCK_K // 2),
            )
        else:
            mask = row_mask[:, None] & k_mask[None, :]
            byte = tl.load(packed_ptr + byte_row[:, None] + (k0 // 2 + half)[None, :], mask=mask, other=0)
            scale = tl.load(scale_ptr + scale_row[:, None] + (cols // QB)[None, :], mask=mask, other=0.0)
        byte = byte.to(tl.int32)
        hi = (tl.load(code_ptr + (byte >> 4)) * scale).to(dt).to(tl.float32)
        lo = (tl.load(code_ptr + (byte & 0xF)) * scale).to(dt).to(tl.float32)
        x_even = tl.load(x_ptr + p * K + cols, mask=k_mask, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + p * K + cols + 1, mask=k_mask, other=0.0).to(tl.float32)
        acc += tl.sum(hi * x_even[None, :] + lo * x_odd[None, :], axis=1)
    tl.store(y_ptr + p * N + rows, acc.to(y_ptr.dtype.element_ty), mask=row_mask)


@torch.library.custom_op("finetune::nf4_pair_gemv", mutates_args=())
def _pair_gemv_op(
    x: torch.Tensor,
    ids: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    code: torch.Tensor,
    n: int,
    blocksize: int,
    tile: list[int],
) -> torch.Tensor:
    pairs, k = x.shape
    block_n, block_k, warps, whole = tile
    whole = bool(whole) and k % block_k == 0 and block_k % blocksize == 0
    y = torch.empty(pairs, n, dtype=x.dtype, device=x.device)
    if pairs:
        grid = (pairs, triton.cdiv(n, block_n))
        _pair_gemv_kernel[grid](
            x, y, ids, packed.reshape(-1), scales, code, n, k,
            QB=blocksize, BLOCK_N=block_n, BLOCK_K=block_k, WHOLE=whole, num_warps=warps,
        )  # fmt: skip
    return y


@_pair_gemv_op.register_fake
def _(x, ids, packed, scales, code, n, blocksize, tile):  # type: ignore[no-untyped-def]
    return x.new_empty(x.shape[0], n)


def nf4_pair_gemv(
    x: torch.Tensor,
    ids: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    code: torch.Tensor,
    shape: tuple[int, int, int],
    blocksize: int,
    tile: tuple[int, int, int, int] = (BLOCK_N, BLOCK_K, NUM_WARPS, WHOLE_STEPS),
) -> torch.Tensor:
    """y [P, N]: y[p] = W[ids[p]] @ x[p] for NF4 experts W of `shape` [E, N, K].

    `scales` [P, N*K/blocksize] fp32: the block scales of each pair's expert (`nf4_torch.block_scales`);
    K must be a multiple of `blocksize` (each weight row starts a block). `tile`: (BLOCK_N, BLOCK_K,
    warps, whole steps 0/1), powers of two (benchmarks/nf4_decode.py sweeps them); whole steps apply
    where K is a multiple of BLOCK_K and BLOCK_K of the blocksize.
    """
    _, n, k = shape
    if k % blocksize or x.shape[-1] != k:
        raise ValueError(f"x {tuple(x.shape)} and blocksize {blocksize} do not fit W {tuple(shape)}")
    return _pair_gemv_op(
        x.contiguous(), ids.contiguous(), packed, scales.contiguous(), code, n, blocksize, list(tile)
    )
