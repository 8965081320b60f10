"""Whole-tensor NF4 -> bf16/fp16/fp32 dequantization (Triton), bit for bit what bitsandbytes computes.

Layout (bitsandbytes' `quantize_4bit(W, blocksize=QB, quant_type="nf4")`, over the *flattened* tensor):
element i sits in byte i // 2, even i in the high nibble and odd i in the low one, and is
`code[nibble] * scale[i // QB]`. The scale is the fp32 absmax of the block or, with double quantization,
`code2[absmax_u8[b]] * absmax2[b // QB2] + offset` (fp32; offset a 0-d tensor read on the device). The
value is computed in fp32 and rounded once to the output dtype, as `dequantize_4bit` does, so the result
equals bitsandbytes' bit for bit. Rows of the original tensor play no part: the kernel works on the flat
index, so a row that does not start a block, a numel that is not a multiple of QB (the last block is
short) or an odd numel (the last low nibble is padding) are all read as bitsandbytes reads them.

Why: bitsandbytes' CUDA dequantization streams at ~2.3 TB/s on an H200 (half the HBM bandwidth) and
indexes with 32-bit integers (tensors over 2**31 values must be sliced). This kernel is one pass over the
bytes: each program owns BLOCK consecutive bytes (2 * BLOCK values), viewed as [ROWS, COLS] with a row
inside one quantization block, so it loads the bytes once (16-byte vectors), the ROWS scales as a small
vector broadcast over the row (no per-element scale loads), looks both nibbles up in the 16-entry code
table, rounds, and writes the two values of each byte interleaved as contiguous output (`tl.join` +
reshape). Storing each byte's pair as one word instead was measured no faster on the H200, so the join
stays. Offsets are int64 (DeepSeek-V2's gate_up has 2.5 B values). Nothing is read on the host, so the
call is CUDA-graph safe. fp contraction is switched off for the launch (`enable_fp_fusion=False`): the
double-quant scale is a product then a sum, which bitsandbytes rounds twice; an FMA would not.

`nf4_dequantize` is the entry point; it calls the custom op `finetune::nf4_dequantize`, opaque to
`torch.compile`. Tensors off CUDA go to bitsandbytes' own `dequantize_4bit`, except under Triton's
interpreter (`TRITON_INTERPRET=1`, the tests), where the kernel runs on the CPU.
"""

from __future__ import annotations

import math
import os
from typing import Any

import bitsandbytes.functional as bnbf
import torch
import triton
import triton.language as tl

from finetune.kernels.nf4_decode import _rne  # fp32 rounded to bf16 precision (the interpreter truncates)
from finetune.kernels.nf4_grouped import NF4Weight
from finetune.kernels.nf4_torch import nf4_quant_state

# Default launch: 2048 bytes (4096 values) a program, 4 warps: each thread loads one 16-byte vector and
# writes 64 bytes of bf16; ~90 k programs for V2-Lite's gate_up keep every SM busy, and up to 16 resident
# programs an SM keep ~32 KB of loads in flight (Little's law asks ~5 KB an SM for the reads at 1 TB/s).
# The fastest of benchmarks/nf4_dequant.py's (block, num_warps) sweep on the H200.
BLOCK = 2048
NUM_WARPS = 4
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# ------------------------------------------------------------------------------------------ kernel


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr,
    absmax_ptr,
    absmax2_ptr,
    code_ptr,
    code2_ptr,
    offset_ptr,
    out_ptr,
    numel,
    n_bytes,
    QB: tl.constexpr,
    QB2: tl.constexpr,
    DQ: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    EVEN: tl.constexpr,
    ROUND_BITS: tl.constexpr,
):
    """out[2 * byte0 : 2 * (byte0 + ROWS * COLS)] from the bytes of program pid; a row of COLS bytes lies
    in one quantization block (COLS divides QB / 2, rows start at multiples of COLS)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * (ROWS * COLS) + tl.arange(0, ROWS).to(tl.int64) * COLS  # first byte of each row
    byte = rows[:, None] + tl.arange(0, COLS)[None, :]
    blk = rows * 2 // QB  # the row's quantization block
    if EVEN:  # numel is a multiple of 2 * ROWS * COLS: no masks, the loads and stores stay vectorized
        q = tl.load(packed_ptr + byte)
        if DQ:
            qa = tl.load(absmax_ptr + blk)
            s2 = tl.load(absmax2_ptr + blk // QB2)
            scale = tl.load(code2_ptr + qa) * s2 + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blk)
    else:
        row_mask = rows < n_bytes
        q = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0)
        if DQ:
            qa = tl.load(absmax_ptr + blk, mask=row_mask, other=0)
            s2 = tl.load(absmax2_ptr + blk // QB2, mask=row_mask, other=0.0)
            scale = tl.load(code2_ptr + qa) * s2 + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blk, mask=row_mask, other=0.0)
    # fp32 products, rounded once to the output dtype (bitsandbytes: float * float, then a cast).
    hi = tl.load(code_ptr + (q >> 4)) * scale[:, None]
    lo = tl.load(code_ptr + (q & 0xF)) * scale[:, None]
    dt = out_ptr.dtype.element_ty
    hi = _rne(hi, ROUND_BITS).to(dt)
    lo = _rne(lo, ROUND_BITS).to(dt)
    vals = tl.join(hi, lo).reshape(ROWS, 2 * COLS)  # [.., COLS, 2] -> high nibble first, then low
    idx = 2 * rows[:, None] + tl.arange(0, 2 * COLS)[None, :]
    if EVEN:
        tl.store(out_ptr + idx, vals)
    else:  # the mask also keeps an odd numel's padding nibble out of the output
        tl.store(out_ptr + idx, vals, mask=idx < numel)


# ------------------------------------------------------------------------------------------ python


def _tile(block: int, blocksize: int) -> tuple[int, int]:
    """(ROWS, COLS) of a program's `block` bytes: COLS bytes a row, never more than half a QB block."""
    cols = min(block, blocksize // 2)
    return block // cols, cols


def _check_config(block: int, num_warps: int) -> None:
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16 (bytes a program), got {block}")
    if num_warps < 1 or num_warps & (num_warps - 1):
        raise ValueError(f"num_warps must be a power of two, got {num_warps}")


def _check(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    numel: int,
    blocksize: int,
    dtype: torch.dtype,
) -> None:
    """Raise ValueError for inputs the kernel would misread (shapes, dtypes, devices: no device access)."""
    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize}")
    if dtype not in _DTYPES:
        raise ValueError(f"output dtype must be bf16, fp16 or fp32, got {dtype}")
    if packed.numel() * packed.element_size() < (numel + 1) // 2:
        raise ValueError(
            f"packed holds {packed.numel() * packed.element_size()} bytes, too few for {numel} values"
        )
    if absmax.numel() < -(-numel // blocksize):
        raise ValueError(f"absmax has {absmax.numel()} entries, {numel} values need {-(-numel // blocksize)}")
    if code.numel() != 16 or code.dtype != torch.float32:
        raise ValueError("code must be the 16 fp32 NF4 levels")
    absmax2, code2, offset = nested
    if any(t is not None for t in nested):
        if absmax2 is None or code2 is None or offset is None or absmax.dtype != torch.uint8:
            raise ValueError("double quantization needs uint8 absmax, absmax2, code2 and offset")
        if absmax2.dtype != torch.float32 or code2.dtype != torch.float32 or code2.numel() != 256:
            raise ValueError("absmax2 must be fp32 and code2 the 256 fp32 levels")
        if offset.numel() != 1:
            raise ValueError(f"offset must hold one value, got shape {tuple(offset.shape)}")
    elif absmax.dtype != torch.float32:
        raise ValueError(f"absmax is {absmax.dtype} without absmax2/code2/offset: pass the nested state")
    devices = {t.device for t in (packed, absmax, code, *nested) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _launch(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    out: torch.Tensor,
    config: list[int],
) -> None:
    """Run the kernel into the contiguous `out` (its numel is the tensor's); config [block, num_warps]."""
    block, num_warps = config
    numel = out.numel()
    if numel == 0:
        return
    dq = absmax2 is not None
    if not dq:  # unused pointers: any tensor on the device
        absmax2, code2, offset = code, code, code
    rows, cols = _tile(block, blocksize)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    grid = (triton.cdiv(numel, 2 * block),)
    _nf4_dequant_kernel[grid](
        packed.reshape(-1).view(torch.uint8),
        absmax.reshape(-1),
        absmax2.reshape(-1),
        code.reshape(-1),
        code2.reshape(-1),
        offset.reshape(-1),
        out.view(-1),
        numel,
        (numel + 1) // 2,
        QB=blocksize,
        QB2=nested_blocksize,
        DQ=dq,
        ROWS=rows,
        COLS=cols,
        EVEN=numel % (2 * block) == 0,
        ROUND_BITS=interpret and out.dtype == torch.bfloat16,
        num_warps=num_warps,
        enable_fp_fusion=False,  # code2 * absmax2 + offset rounded twice, as bitsandbytes does
    )


def _bitsandbytes(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    nested_blocksize: int,
    out: torch.Tensor,
) -> None:
    """bitsandbytes' `dequantize_4bit` into `out` (devices without the kernel: the CPU)."""
    nested = None
    if absmax2 is not None and code2 is not None and offset is not None:
        nested = (absmax2, code2, offset, nested_blocksize)
    state = nf4_quant_state(absmax, code, shape, blocksize, out.dtype, nested)
    out.view(-1).copy_(bnbf.dequantize_4bit(packed, state).reshape(-1))


@torch.library.custom_op("finetune::nf4_dequantize", mutates_args=())
def _nf4_dequantize_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    nested_blocksize: int,
    dtype: torch.dtype,
    config: list[int],
) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    if packed.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        _launch(packed, absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, out, config)
    else:
        _bitsandbytes(packed, absmax, code, absmax2, code2, offset, shape, blocksize, nested_blocksize, out)
    return out


@_nf4_dequantize_op.register_fake
def _(packed, absmax, code, absmax2, code2, offset, shape, blocksize, nested_blocksize, dtype, config):  # type: ignore[no-untyped-def]
    return packed.new_empty(shape, dtype=dtype)


def _parts(packed: torch.Tensor | None, state: Any) -> tuple:
    """(packed, absmax, code, (absmax2, code2, offset), shape, blocksize, nested blocksize, state dtype)."""
    if isinstance(state, NF4Weight):
        nested = (state.absmax2, state.code2, state.offset)
        packed = state.packed if packed is None else packed
        return (
            packed,
            state.absmax,
            state.code,
            nested,
            list(state.shape),
            state.blocksize,
            state.nested_blocksize,
            None,
        )
    if packed is None:
        raise ValueError("packed is required with a QuantState")
    if getattr(state, "quant_type", "nf4") != "nf4":
        raise ValueError(f"only nf4 is supported, got {state.quant_type}")
    nested, qb2 = (None, None, None), 256
    if getattr(state, "nested", False):
        nested, qb2 = (state.state2.absmax, state.state2.code, state.offset), state.state2.blocksize
    return packed, state.absmax, state.code, nested, list(state.shape), state.blocksize, qb2, state.dtype


def nf4_dequantize(
    packed: torch.Tensor | None,
    state_or_weight: Any,
    dtype: torch.dtype | None = None,
    *,
    block: int = BLOCK,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """The NF4 tensor `packed` as a `dtype` tensor of the state's shape; equals `dequantize_4bit` bit for bit.

    `state_or_weight`: a bitsandbytes `QuantState` (nf4, any shape, nested or not) or an `NF4Weight`
    (then `packed` may be None: the weight's own bytes). `dtype`: bf16, fp16 or fp32; default the
    QuantState's, else bf16 (an NF4Weight has none). `block` (bytes a program, a power of two) and
    `num_warps` are the launch config: benchmarks/nf4_dequant.py sweeps them. On CUDA (or under Triton's
    interpreter) the Triton kernel runs; elsewhere bitsandbytes' `dequantize_4bit`.
    """
    tensors, statics = op_args(packed, state_or_weight, dtype, block=block, num_warps=num_warps)
    packed, absmax, code, *nested = tensors
    shape, qb, _, dtype, _ = statics
    _check(packed, absmax, code, tuple(nested), math.prod(shape), qb, dtype)
    _check_config(block, num_warps)
    return _nf4_dequantize_op(*tensors, *statics)


def op_args(
    packed: torch.Tensor | None,
    state_or_weight: Any,
    dtype: torch.dtype | None = None,
    *,
    block: int = BLOCK,
    num_warps: int = NUM_WARPS,
) -> tuple[tuple, tuple]:
    """The custom op's arguments, unchecked: (packed, absmax, code, absmax2, code2, offset) and (shape,
    blocksize, nested blocksize, dtype, config), so `_nf4_dequantize_op(*tensors, *statics)` equals
    `nf4_dequantize(packed, state_or_weight, dtype)`. For callers that hold the tensors across autograd
    (finetune.fast.linear4bit), where a QuantState object cannot travel."""
    packed, absmax, code, nested, shape, qb, qb2, state_dtype = _parts(packed, state_or_weight)
    packed = packed if packed.is_contiguous() else packed.contiguous()
    absmax2, code2, offset = nested
    if offset is not None:
        offset = offset.reshape(1).float()  # a view of a 0-d fp32 tensor: nothing leaves the device
    tensors = (packed, absmax.contiguous(), code, absmax2, code2, offset)
    return tensors, (shape, qb, qb2, dtype or state_dtype or torch.bfloat16, [block, num_warps])
