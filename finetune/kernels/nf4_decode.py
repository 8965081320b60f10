"""Routed experts for decoding: a grouped GEMV that reads bitsandbytes NF4 weights directly (Triton).

A decode step of 1..128 tokens routes top-6 over 64 experts, so each expert sees ~0..40 (token, expert)
rows and the product is a stream of the NF4 bytes (gate_up of DeepSeek-V2-Lite: 184 MB a layer). Today's
paths either dequantize the whole layer to bf16 first (`NF4Experts.forward`: write and read back 4x the
NF4 bytes) or gather one bf16 copy per pair (`nf4_torch.gathered_weights`). This kernel decodes each weight
element once per 16-row chunk of its expert, in registers, and never writes a 16-bit weight.

Layout (see `nf4_torch.gathered_weights`): W [E, N, K] is quantized flattened; element i sits in byte i // 2
(even i in the high nibble) and is `code[nibble] * scale[i // blocksize]`, the scale fp32 absmax or, with
double quantization, `code2[absmax_u8[b]] * absmax2[b // QB2] + offset`. With K % blocksize == 0 every row
starts a block; a K step of BLOCK_K values (a divisor of K: unmasked loads) reads a [BLOCK_N, BLOCK_K / 2]
tile of packed bytes and one scale per (row, block), broadcast over the block's bytes. High nibbles are
the even columns and low nibbles the odd ones; x's even and odd columns (de-interleaved by the launcher)
multiply them in two `tl.dot`s. NF4 values come from a select tree over the 16 code values held in registers (`SELECT`):
a table load per nibble is a 4-byte gather, and in the pipelined dot loop the compiler turns each into an
asynchronous copy to shared memory (60 of the 74 copies a step in the sm_90 PTX; 16 with the tree).
The first version (BLOCK_K 64, table loads, offsets from the flat element index) streamed at 30-40 GB/s
on the H200; the select tree at ~200 GB/s of NF4 bytes at batch 128, still 0.77-0.81x dequantize +
grouped_mm. `SELECT = 2` (the default on CUDA with bf16) looks the values up by byte permutes, one scale
block a K step: ~390-450 GB/s, 1.6-1.75x dequantize + grouped_mm at batch 128 (docs/benchmarks.md).

Grid (E, cdiv(N, BLOCK_N)): program (g, nb) owns expert g's rows offsets[g-1]..offsets[g] (int32
cumulative row ends on the device) and returns at once if there are none; nothing is read on the host,
so the op can be captured in a CUDA graph. `nf4_expert_gemv` is the entry point; it calls the custom op
`finetune::nf4_expert_gemv`, opaque to `torch.compile`. Forward only (the weight is frozen; no autograd).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from finetune.kernels.nf4_grouped import _mm  # acc + a @ b, fp32 under the interpreter
from finetune.kernels.nf4_torch import gathered_weights

Nested = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]

# ------------------------------------------------------------------------------------------ kernel


@triton.jit
def _rne(v, ROUND_BITS: tl.constexpr):
    """fp32 v, with ROUND_BITS rounded to bf16's precision (nearest even) on the bits. The interpreter
    truncates fp32 -> bf16 casts (its "rtne" mode is wrong too); after this the cast is exact there.
    Compiled casts round to nearest even already: ROUND_BITS is off."""
    if ROUND_BITS:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v


@triton.jit
def _pick(nib, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15):
    """code[nib] from 16 scalars by a tree of selects on nib's bits: no memory access. (A table load
    per nibble is a 4-byte gather; in a pipelined dot loop each becomes an async copy to shared memory.)"""
    b0 = (nib & 1) != 0
    b1 = (nib & 2) != 0
    b2 = (nib & 4) != 0
    lo = tl.where(
        b2,
        tl.where(b1, tl.where(b0, c7, c6), tl.where(b0, c5, c4)),
        tl.where(b1, tl.where(b0, c3, c2), tl.where(b0, c1, c0)),
    )
    hi = tl.where(
        b2,
        tl.where(b1, tl.where(b0, c15, c14), tl.where(b0, c13, c12)),
        tl.where(b1, tl.where(b0, c11, c10), tl.where(b0, c9, c8)),
    )
    return tl.where((nib & 8) != 0, hi, lo)


# Byte permutes (`prmt`) look up four NF4 values at once in a table of the 16 codes as bf16, held as
# byte tables in registers: H (high bytes) and L (low bytes), four words each (entries 4j..4j+3 in word
# j). One asm block turns the 4 packed bytes of one register ($4) into the 4 high-nibble values ($0, $1)
# and the 4 low-nibble values ($2, $3). For each nibble set: selectors = the nibbles' low 3 bits packed
# into 4 selector nibbles; a permute of words 0-1 and one of words 2-3 per byte table; bit 3 of the
# nibble picks between them (a byte mask from `prmt`'s sign-replicate mode, merged by `lop3`); then two
# permutes interleave low and high bytes into bf16 pairs. ~3.5 instructions a value where the select
# tree takes ~20 in the sm_90 SASS. Each 32-bit table input arrives as 4 registers (pack=4): $5, $9, ...


def _nibble_set(nibbles: str, mask: str, out: tuple[str, str]) -> str:
    """PTX of one nibble set: `nibbles` leaves them (one a byte) in u, `mask` leaves bit 3's byte mask
    in m; then selectors, the two permutes a byte table, the merge, and the interleave into `out`."""
    return f"""{nibbles}
and.b32 u, u, 0x07070707;
shr.b32 t, u, 4;
or.b32 t, t, u;
prmt.b32 s, t, z, 0x4420;
{mask}
prmt.b32 a, $5, $9, s;
prmt.b32 b, $13, $17, s;
lop3.b32 h, a, b, m, 0xD8;
prmt.b32 a, $21, $25, s;
prmt.b32 b, $29, $33, s;
lop3.b32 l, a, b, m, 0xD8;
prmt.b32 {out[0]}, l, h, 0x5140;
prmt.b32 {out[1]}, l, h, 0x7362;
"""


_PRMT_ASM = tl.constexpr(
    "{\n.reg .b32 u, t, s, m, a, b, h, l, z;\nmov.b32 z, 0;\n"
    + _nibble_set("shr.b32 u, $4, 4;", "prmt.b32 m, $4, z, 0xBA98;", ("$0", "$1"))
    + _nibble_set("mov.b32 u, $4;", "shl.b32 t, $4, 4;\nprmt.b32 m, t, z, 0xBA98;", ("$2", "$3"))
    + "}\n"
)


@triton.jit
def _bytes_word(b0, b1, b2, b3):
    return b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)


@triton.jit
def _bf16_bits(c):
    return c.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)


@triton.jit
def _nf4_gemv_kernel(
    x_ptr,
    y_ptr,
    offsets_ptr,
    packed_ptr,
    absmax_ptr,
    absmax2_ptr,
    code_ptr,
    code2_ptr,
    offset_ptr,
    N,
    K,
    stride_xm,
    stride_ym,
    ROWS_HINT,
    QB: tl.constexpr,
    QB2: tl.constexpr,
    DQ: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    ROUND_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SUB: tl.constexpr,  # scale blocks a K step covers: BLOCK_K // QB, at least 1
    SELECT: tl.constexpr,  # NF4 lookup: 0 table loads, 1 select tree (`_pick`), 2 byte permutes (CUDA)
):
    """y[rows of g, n-tile] = x_g @ W_g[n-tile].T, W decoded from NF4 step by step (K % BLOCK_K == 0)."""
    g = tl.program_id(0)
    nb = tl.program_id(1)
    row_end = tl.load(offsets_ptr + g)
    row_start = tl.load(offsets_ptr + g - 1, mask=g > 0, other=0)
    if row_end <= row_start:
        return
    dt = x_ptr.dtype.element_ty
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = cols < N
    # Columns past N read row N-1 (unmasked loads) and are never stored. Byte and block offsets are
    # built from K // 2 and K // QB (K is specialized as a multiple of 16), so the compiler can prove
    # each row's bytes aligned and load them in vectors; from the flat element index it could not.
    n64 = tl.minimum(cols, N - 1).to(tl.int64)
    row_byte = g.to(tl.int64) * N * (K // 2) + n64 * (K // 2)
    row_block = g.to(tl.int64) * N * (K // QB) + n64 * (K // QB)
    half = tl.arange(0, BLOCK_K // 2)
    sub = tl.arange(0, SUB) * QB
    if DQ:
        offset = tl.load(offset_ptr)
    # The code table in registers, for SELECT (16 scalar loads a program; unused otherwise).
    c0, c1, c2, c3 = tl.load(code_ptr), tl.load(code_ptr + 1), tl.load(code_ptr + 2), tl.load(code_ptr + 3)
    c4, c5, c6, c7 = (
        tl.load(code_ptr + 4),
        tl.load(code_ptr + 5),
        tl.load(code_ptr + 6),
        tl.load(code_ptr + 7),
    )
    c8, c9, c10, c11 = (
        tl.load(code_ptr + 8),
        tl.load(code_ptr + 9),
        tl.load(code_ptr + 10),
        tl.load(code_ptr + 11),
    )
    c12, c13, c14, c15 = (
        tl.load(code_ptr + 12),
        tl.load(code_ptr + 13),
        tl.load(code_ptr + 14),
        tl.load(code_ptr + 15),
    )
    if SELECT == 2:  # the codes' bf16 bytes as byte tables (see _PRMT_ASM)
        k0b, k1b, k2b, k3b = _bf16_bits(c0), _bf16_bits(c1), _bf16_bits(c2), _bf16_bits(c3)
        k4b, k5b, k6b, k7b = _bf16_bits(c4), _bf16_bits(c5), _bf16_bits(c6), _bf16_bits(c7)
        k8b, k9b, k10b, k11b = _bf16_bits(c8), _bf16_bits(c9), _bf16_bits(c10), _bf16_bits(c11)
        k12b, k13b, k14b, k15b = _bf16_bits(c12), _bf16_bits(c13), _bf16_bits(c14), _bf16_bits(c15)
        h0 = _bytes_word(k0b >> 8, k1b >> 8, k2b >> 8, k3b >> 8)
        h1 = _bytes_word(k4b >> 8, k5b >> 8, k6b >> 8, k7b >> 8)
        h2 = _bytes_word(k8b >> 8, k9b >> 8, k10b >> 8, k11b >> 8)
        h3 = _bytes_word(k12b >> 8, k13b >> 8, k14b >> 8, k15b >> 8)
        l0 = _bytes_word(k0b & 0xFF, k1b & 0xFF, k2b & 0xFF, k3b & 0xFF)
        l1 = _bytes_word(k4b & 0xFF, k5b & 0xFF, k6b & 0xFF, k7b & 0xFF)
        l2 = _bytes_word(k8b & 0xFF, k9b & 0xFF, k10b & 0xFF, k11b & 0xFF)
        l3 = _bytes_word(k12b & 0xFF, k13b & 0xFF, k14b & 0xFF, k15b & 0xFF)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        m_mask = rows < row_end
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            raw = tl.load(packed_ptr + row_byte[:, None] + (k0 // 2 + half)[None, :])
            block = row_block[:, None] + ((k0 + sub) // QB)[None, :]  # [BLOCK_N, SUB]
            if DQ:
                scale = tl.load(code2_ptr + tl.load(absmax_ptr + block).to(tl.int32)) * tl.load(
                    absmax2_ptr + block // QB2
                )
                scale = scale + offset
            else:
                scale = tl.load(absmax_ptr + block)
            x_even = tl.load(x_rows + (k0 // 2 + half)[None, :], mask=m_mask[:, None], other=0.0)
            x_odd = tl.load(x_rows + (K // 2 + k0 // 2 + half)[None, :], mask=m_mask[:, None], other=0.0)
            if SELECT == 2:
                # bf16 codes straight from the bytes; the step is one block (BLOCK_K == QB), so its
                # scale multiplies the [BLOCK_M, BLOCK_N] partial product, not each weight.
                v_hi, v_lo = tl.inline_asm_elementwise(
                    _PRMT_ASM,
                    "=r,=r,=r,=r,r" + ",r" * 32,
                    [raw, h0, h1, h2, h3, l0, l1, l2, l3],
                    dtype=(tl.bfloat16, tl.bfloat16),
                    is_pure=True,
                    pack=4,
                )
                part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                part = _mm(x_even, tl.trans(v_hi), part, PRECISION, DOT_FP32)  # x is bf16 here
                part = _mm(x_odd, tl.trans(v_lo), part, PRECISION, DOT_FP32)
                acc += part * tl.reshape(scale, (BLOCK_N,))[None, :]
            else:
                # One scale per (row, block), broadcast over the block's bytes.
                scale = tl.reshape(
                    tl.broadcast_to(scale[:, :, None], (BLOCK_N, SUB, BLOCK_K // 2 // SUB)),
                    (BLOCK_N, BLOCK_K // 2),
                )
                # code * scale in fp32, then rounded to the compute dtype: what bnb's dequantize_4bit returns.
                byte = raw.to(tl.int32)
                if SELECT:
                    v_hi = _pick(
                        byte >> 4, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15
                    )
                    v_lo = _pick(
                        byte & 0xF, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15
                    )
                else:
                    v_hi = tl.load(code_ptr + (byte >> 4))
                    v_lo = tl.load(code_ptr + (byte & 0xF))
                w_hi = _rne(v_hi * scale, ROUND_BITS).to(dt)
                w_lo = _rne(v_lo * scale, ROUND_BITS).to(dt)
                # x de-interleaved by the launcher: each row's even columns, then its odd ones (contiguous).
                acc = _mm(x_even, tl.trans(w_hi), acc, PRECISION, DOT_FP32)
                acc = _mm(x_odd, tl.trans(w_lo), acc, PRECISION, DOT_FP32)
        tl.store(
            y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :],
            _rne(acc, ROUND_BITS).to(y_ptr.dtype.element_ty),
            mask=m_mask[:, None] & n_mask[None, :],
        )


def _config(block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Few configs: the kernel is bandwidth bound and BLOCK_N trades parallelism (batch 1 reads 6 experts) for
# longer rows of bytes per program. ROWS_HINT (mean rows per expert, power of two <= 16) keys the choice.
CONFIGS = [
    _config(16, 2, 4),
    _config(32, 2, 4),
    _config(32, 4, 3),
    _config(64, 4, 3),
    _config(64, 4, 5),
    _config(128, 4, 3),
    _config(128, 8, 4),
    _config(256, 8, 3),
]
_tuned = triton.autotune(CONFIGS, key=["N", "K", "DQ", "ROWS_HINT"])(_nf4_gemv_kernel)
BLOCK_M = 16
# Values a K step decodes (a power of two; the launch takes its gcd with K, so every step is whole):
# 128 is 64 bytes of each row, the pair GEMV's fastest whole-step tile (kernels/nf4_pairs.py).
BLOCK_K = 128
# NF4 values by byte permutes (2; CUDA bf16, else the select tree, 1): on the H200 at batch 128 about half
# the select tree's time, and that 3-5x table loads' (benchmarks/nf4_decode.py sweeps all three).
SELECT = 2
_INTERPRET_CONFIG = _config(32, 4, 1)  # under the interpreter: one fixed tile, nothing to tune

# ------------------------------------------------------------------------------------------ python


def check_inputs(x: torch.Tensor, offsets: torch.Tensor, shape: tuple[int, int, int], blocksize: int) -> None:
    """Raise ValueError for inputs the kernel cannot read (shapes only: no device access)."""
    if len(shape) != 3:
        raise ValueError(f"shape must be [E, N, K], got {tuple(shape)}")
    e, n, k = shape
    if blocksize < 32 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two >= 32, got {blocksize}")
    if k % blocksize or (n * k) % blocksize:
        raise ValueError(f"K={k} (and N*K={n * k}) must be multiples of the blocksize {blocksize}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} does not match W {tuple(shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    if offsets.dtype != torch.int32 or offsets.shape != (e,):
        raise ValueError(f"offsets must be int32 [{e}], got {offsets.dtype} {tuple(offsets.shape)}")


def _rows_hint(rows: int, experts: int) -> int:
    return min(triton.next_power_of_2(max(1, -(-rows // experts))), 16)


def _launch(
    x: torch.Tensor,
    offsets: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested: Nested | None,
    shape: tuple[int, int, int],
    blocksize: int,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Run the kernel: autotuned on CUDA, or with `config` (a benchmark's sweep), fixed when interpreted."""
    e, n, k = shape
    # Even columns then odd ones per row (one small copy: 3 MB at batch 128), so the kernel's loads of x
    # are contiguous vectors; strided by 2 they compiled to one 2-byte load per value.
    x = torch.cat((x[:, 0::2], x[:, 1::2]), dim=1)
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return y
    absmax2, code2, offset, qb2 = nested if nested is not None else (code, code, code[:1], 256)
    args = (
        x,
        y,
        offsets,
        packed.reshape(-1).view(torch.uint8),
        absmax,
        absmax2,
        code,
        code2,
        offset.reshape(1).float(),
        n,
        k,
        x.stride(0),
        y.stride(0),
        _rows_hint(x.shape[0], e),
    )
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    meta = dict(
        QB=blocksize,
        QB2=qb2,
        DQ=nested is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        DOT_FP32=interpret and x.dtype != torch.float32,
        ROUND_BITS=interpret and x.dtype == torch.bfloat16,
        BLOCK_M=BLOCK_M,
        BLOCK_K=math.gcd(config.kwargs.get("BLOCK_K", BLOCK_K) if config else BLOCK_K, k),
    )
    if interpret and config is None:
        config = _INTERPRET_CONFIG
    meta["SELECT"] = int(config.kwargs.get("SELECT", SELECT) if config else SELECT)
    if meta["SELECT"] == 2:  # byte permutes: CUDA bf16 only, one scale block a K step
        if interpret or x.dtype != torch.bfloat16:
            meta["SELECT"] = 1
        else:
            meta["BLOCK_K"] = blocksize
    meta["SUB"] = max(meta["BLOCK_K"] // blocksize, 1)
    if config is None:
        _tuned[lambda c: (e, triton.cdiv(n, c["BLOCK_N"]))](*args, **meta)
    else:
        grid = (e, triton.cdiv(n, config.kwargs["BLOCK_N"]))
        tile = {"BLOCK_N": config.kwargs["BLOCK_N"]}
        _nf4_gemv_kernel[grid](
            *args, **meta, **tile, num_warps=config.num_warps, num_stages=config.num_stages
        )
    return y


def _reference(
    x: torch.Tensor,
    offsets: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested: Nested | None,
    shape: tuple[int, int, int],
    blocksize: int,
) -> torch.Tensor:
    """Plain torch (CPU callers, no Triton): decode the experts that have rows, one matmul per expert."""
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    y = x.new_empty(x.shape[0], shape[1])
    busy = [g for g in range(shape[0]) if ends[g] > starts[g]]
    if not busy:
        return y
    ids = torch.tensor(busy, device=x.device)
    weights = gathered_weights(packed, absmax, nested, code, shape, ids, blocksize, x.dtype)
    for w, g in zip(weights, busy, strict=True):
        y[starts[g] : ends[g]] = x[starts[g] : ends[g]] @ w.t()
    return y


@torch.library.custom_op("finetune::nf4_expert_gemv", mutates_args=())
def _nf4_expert_gemv_op(
    x: torch.Tensor,
    offsets: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    nested_blocksize: int,
) -> torch.Tensor:
    e, n, k = shape
    check_inputs(x, offsets, (e, n, k), blocksize)
    nested = None
    if absmax2 is not None and code2 is not None and offset is not None:
        nested = (absmax2, code2, offset, nested_blocksize)
    run = _launch if x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1" else _reference
    return run(x, offsets, packed, absmax, code, nested, (e, n, k), blocksize)


@_nf4_expert_gemv_op.register_fake
def _(x, offsets, packed, absmax, code, absmax2, code2, offset, shape, blocksize, nested_blocksize):  # type: ignore[no-untyped-def]
    return x.new_empty(x.shape[0], shape[1])


def nf4_expert_gemv(
    x: torch.Tensor,
    offsets: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested: Nested | None,
    code: torch.Tensor,
    shape: tuple[int, int, int],
    blocksize: int = 64,
) -> torch.Tensor:
    """y [P, N] = x_g @ W_g.T for the rows of each expert g, W [E, N, K] in bitsandbytes NF4.

    x [P, K] (bf16, fp16 or fp32) holds the (token, expert) rows sorted by expert; offsets (int32 [E], on
    x's device) their cumulative ends, offsets[-1] = P. packed/absmax/code and `nested` = (absmax2, code2,
    offset, nested blocksize) or None are as `NF4Experts` stores them (see `nf4_torch.block_scales`). The
    weight is decoded in x's dtype, as `dequantize_4bit` would, and products accumulate in fp32.
    Raises ValueError when K is not a multiple of the blocksize: the caller falls back to another path.
    """
    check_inputs(x, offsets, shape, blocksize)
    absmax2, code2, offset, qb2 = nested if nested is not None else (None, None, None, 256)
    return _nf4_expert_gemv_op(
        x, offsets, packed, absmax, code, absmax2, code2, offset, list(shape), blocksize, qb2
    )
