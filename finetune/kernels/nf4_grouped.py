"""Grouped expert matmuls that read bitsandbytes NF4 weights directly (Triton).

A MoE layer's routed experts W [E, N, K] are stored as bitsandbytes quantizes the *flattened* 3D tensor
(`quantize_4bit(W, blocksize=QB, quant_type="nf4")`): element i = e*N*K + n*K + k sits in byte i // 2
(even i in the high nibble, odd i in the low one) and is `code[nibble] * absmax[i // QB]`; with double
quantization absmax is uint8 and reads `code2[absmax_u8[b]] * absmax2[b // QB2] + offset` (fp32).

Token rows arrive sorted by expert, `offsets` holding the int32 cumulative row ends per expert (on the
device). Each kernel program owns one (group, row tile, column tile): the schedule is computed inside the
kernel from `offsets`, over a launch sized for the worst case (`cdiv(M, BLOCK_M) + E` row tiles), and
programs past the last real tile return at once, so nothing waits on the host. Weight tiles are
dequantized in registers (fp32 scale, then the compute dtype) and fed to `tl.dot`; no 16-bit copy of the
weights exists at any time.

* forward (`transpose=False`): y_g = x_g @ W_g.T                      (x [M, K] -> y [M, N])
* backward dX (`transpose=True`): dx_g = dy_g @ W_g                   (dy [M, N] -> dx [M, K])

Expert LoRA (A [E_lora, r, K], B [E_lora, N, r], an optional slot map expert -> LoRA slot or -1) is fused:
the small product x_g @ A_g.T (dy_g @ B_g for dX) accumulates in the same K loop from the x tile already
in registers, and its scaled result is added through one more `tl.dot` in the epilogue; the program of
the first column tile also writes that [M, r] intermediate, which the backward pass needs for dB (dA).
The LoRA weight gradients are plain grouped products over rows (`torch.nn.functional.grouped_mm` 2D x 2D
on CUDA, a per-group loop elsewhere).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _group_tile(offsets_ptr, pid_m, E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """(group, first row, end row) of the pid_m-th row tile over all groups; group >= E past the last."""
    g = tl.arange(0, E_PAD)
    ends = tl.load(offsets_ptr + g, mask=g < E, other=0)
    starts = tl.load(offsets_ptr + g - 1, mask=(g > 0) & (g < E), other=0)
    counts = tl.where(g < E, tl.maximum(ends - starts, 0), 0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    last = tl.cumsum(tiles, 0)  # inclusive: tiles of groups 0..g
    group = tl.sum((last <= pid_m).to(tl.int32), 0)
    sel = g == group
    first_tile = tl.sum(tl.where(sel, last - tiles, 0), 0)
    row0 = tl.sum(tl.where(sel, starts, 0), 0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(sel, ends, 0), 0)
    return group, row0, row_end


@triton.jit
def _scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, mask, QB2: tl.constexpr, DQ: tl.constexpr):
    """fp32 absmax of the quantization blocks `blk` (int64 block indices)."""
    if DQ:
        qa = tl.load(absmax_ptr + blk, mask=mask, other=0)
        s2 = tl.load(absmax2_ptr + blk // QB2, mask=mask, other=0.0)
        s = tl.load(code2_ptr + qa) * s2 + tl.load(offset_ptr)
    else:
        s = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return s


@triton.jit
def _dequant(
    packed_ptr,
    absmax_ptr,
    absmax2_ptr,
    code_ptr,
    code2_ptr,
    offset_ptr,
    w_base,
    n_idx,
    n_mask,
    k0,
    K,
    TN: tl.constexpr,
    TK: tl.constexpr,
    QB: tl.constexpr,
    QB2: tl.constexpr,
    DQ: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """W_g[n_idx, k0:k0+TK] as fp32 [TN, TK]; w_base = g*N*K (int64). Masked entries are finite garbage."""
    row = w_base + n_idx.to(tl.int64) * K  # flat index of W_g[n, 0]
    if ALIGNED:
        # K % QB == 0, QB | TK and k0 % TK == 0: whole blocks per row, one scale per (row, block), and
        # each byte holds two neighbouring columns (K is even), so load bytes once and split them.
        kb = k0 // 2 + tl.arange(0, TK // 2)
        bmask = n_mask[:, None] & (kb * 2 < K)[None, :]
        byte = tl.load(packed_ptr + (row // 2)[:, None] + kb[None, :], mask=bmask, other=0)
        q = tl.join(byte >> 4, byte & 0xF).reshape(TN, TK)
        v = tl.load(code_ptr + q)
        kq = k0 // QB + tl.arange(0, TK // QB)
        smask = n_mask[:, None] & (kq * QB < K)[None, :]
        s = _scales(
            absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, (row // QB)[:, None] + kq[None, :], smask, QB2, DQ
        )
        w = (v.reshape(TN, TK // QB, QB) * s[:, :, None]).reshape(TN, TK)
    else:
        # Any layout: blocks may straddle rows, nibble parity follows the flat index.
        k = k0 + tl.arange(0, TK)
        idx = row[:, None] + k[None, :]
        mask = n_mask[:, None] & (k < K)[None, :]
        byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
        q = (byte >> (4 - 4 * (idx % 2)).to(tl.int32)) & 0xF
        v = tl.load(code_ptr + q)
        w = v * _scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, idx // QB, mask, QB2, DQ)
    return w


@triton.jit
def _mm(a, b, acc, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc + a @ b; DOT_FP32 multiplies in fp32 (the interpreter's bf16 dot is wrong), inputs already rounded."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _fwd_kernel(
    x_ptr,
    y_ptr,
    offsets_ptr,
    packed_ptr,
    absmax_ptr,
    absmax2_ptr,
    code_ptr,
    code2_ptr,
    offset_ptr,
    a_ptr,
    b_ptr,
    slot_ptr,
    hid_ptr,
    lora_scale,
    M,
    N,
    K,
    R,
    stride_xm,
    stride_ym,
    ROWS_HINT,
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    QB: tl.constexpr,
    QB2: tl.constexpr,
    DQ: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_SLOT: tl.constexpr,
    R_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[rows of g, n-tile] = x_g @ W_g.T (+ LoRA); hid = scale * x_g @ A_g.T written by n-tile 0."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    g, row0, row_end = _group_tile(offsets_ptr, pid_m, E, E_PAD, BLOCK_M)
    if g >= E:
        return
    dt = x_ptr.dtype.element_ty
    rows = row0 + tl.arange(0, BLOCK_M)
    m_mask = rows < row_end
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = cols < N
    w_base = g.to(tl.int64) * N * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        r_idx = tl.arange(0, R_PAD)
        r_mask = r_idx < R
        slot = g
        if HAS_SLOT:
            slot = tl.load(slot_ptr + g).to(tl.int32)
        lora_on = slot >= 0
        slot64 = tl.maximum(slot, 0).to(tl.int64)
        hid = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(
            x_ptr + rows64[:, None] * stride_xm + ks[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = _dequant(
            packed_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr,
            w_base, cols, n_mask, k0, K, BLOCK_N, BLOCK_K, QB, QB2, DQ, ALIGNED,
        )  # fmt: skip
        acc = _mm(x, tl.trans(w.to(dt)), acc, PRECISION, DOT_FP32)
        if HAS_LORA:
            a = tl.load(
                a_ptr + slot64 * R * K + r_idx[:, None] * K + ks[None, :],
                mask=lora_on & r_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            hid = _mm(x, tl.trans(a.to(dt)), hid, PRECISION, DOT_FP32)
    if HAS_LORA:
        hid_s = (hid * lora_scale).to(dt)
        if pid_n == 0:
            tl.store(
                hid_ptr + rows64[:, None] * R + r_idx[None, :], hid_s, mask=m_mask[:, None] & r_mask[None, :]
            )
        b = tl.load(
            b_ptr + slot64 * N * R + cols[:, None] * R + r_idx[None, :],
            mask=lora_on & n_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        acc = _mm(hid_s, tl.trans(b.to(dt)), acc, PRECISION, DOT_FP32)
    tl.store(
        y_ptr + rows64[:, None] * stride_ym + cols[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


@triton.jit
def _dx_kernel(
    dy_ptr,
    dx_ptr,
    offsets_ptr,
    packed_ptr,
    absmax_ptr,
    absmax2_ptr,
    code_ptr,
    code2_ptr,
    offset_ptr,
    a_ptr,
    b_ptr,
    slot_ptr,
    hid_ptr,
    lora_scale,
    M,
    N,
    K,
    R,
    stride_dym,
    stride_dxm,
    ROWS_HINT,
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    QB: tl.constexpr,
    QB2: tl.constexpr,
    DQ: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_SLOT: tl.constexpr,
    R_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dx[rows of g, k-tile] = dy_g @ W_g (+ LoRA); hid = scale * dy_g @ B_g written by k-tile 0."""
    pid = tl.program_id(0)
    k_tiles = tl.cdiv(K, BLOCK_K)
    pid_m = pid // k_tiles
    pid_k = pid % k_tiles
    g, row0, row_end = _group_tile(offsets_ptr, pid_m, E, E_PAD, BLOCK_M)
    if g >= E:
        return
    dt = dy_ptr.dtype.element_ty
    rows = row0 + tl.arange(0, BLOCK_M)
    m_mask = rows < row_end
    rows64 = rows.to(tl.int64)
    k0 = pid_k * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)
    k_mask = ks < K
    w_base = g.to(tl.int64) * N * K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if HAS_LORA:
        r_idx = tl.arange(0, R_PAD)
        r_mask = r_idx < R
        slot = g
        if HAS_SLOT:
            slot = tl.load(slot_ptr + g).to(tl.int32)
        lora_on = slot >= 0
        slot64 = tl.maximum(slot, 0).to(tl.int64)
        hid = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_mask = ns < N
        dy = tl.load(
            dy_ptr + rows64[:, None] * stride_dym + ns[None, :],
            mask=m_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        w = _dequant(
            packed_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr,
            w_base, ns, n_mask, k0, K, BLOCK_N, BLOCK_K, QB, QB2, DQ, ALIGNED,
        )  # fmt: skip
        acc = _mm(dy, w.to(dt), acc, PRECISION, DOT_FP32)
        if HAS_LORA:
            b = tl.load(
                b_ptr + slot64 * N * R + ns[:, None] * R + r_idx[None, :],
                mask=lora_on & n_mask[:, None] & r_mask[None, :],
                other=0.0,
            )
            hid = _mm(dy, b.to(dt), hid, PRECISION, DOT_FP32)
    if HAS_LORA:
        hid_s = (hid * lora_scale).to(dt)
        if pid_k == 0:
            tl.store(
                hid_ptr + rows64[:, None] * R + r_idx[None, :], hid_s, mask=m_mask[:, None] & r_mask[None, :]
            )
        a = tl.load(
            a_ptr + slot64 * R * K + r_idx[:, None] * K + ks[None, :],
            mask=lora_on & r_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        acc = _mm(hid_s, a.to(dt), acc, PRECISION, DOT_FP32)
    tl.store(
        dx_ptr + rows64[:, None] * stride_dxm + ks[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=m_mask[:, None] & k_mask[None, :],
    )


# ------------------------------------------------------------------------------------- tile configs


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# BLOCK_K stays a multiple of 64 so a tile holds whole NF4 blocks (blocksize 64) on the aligned path.
# Few rows per group (decode, small batches): thin row tiles, wide weight tiles; many rows: the usual
# Hopper bf16 tiles. ROWS_HINT (mean rows per group, a power of two) picks the set and keys the cache.
_SMALL = [
    _config(16, 64, 128, 4, 3),
    _config(16, 128, 64, 4, 3),
    _config(16, 64, 64, 4, 4),
    _config(16, 32, 128, 4, 4),
]
_MEDIUM = [
    _config(32, 64, 64, 4, 3),
    _config(32, 128, 64, 4, 3),
    _config(64, 64, 64, 4, 3),
    _config(64, 128, 64, 4, 3),
]
_LARGE = [
    _config(64, 128, 64, 4, 3),
    _config(128, 128, 64, 8, 3),
    _config(128, 64, 64, 4, 4),
    _config(128, 128, 128, 8, 3),
    _config(128, 256, 64, 8, 3),
]


def _prune(configs, named_args, **kwargs):  # type: ignore[no-untyped-def]
    rows = named_args["ROWS_HINT"]
    pool = _SMALL if rows <= 16 else _MEDIUM if rows <= 128 else _LARGE
    keep = [c for c in configs if any(c.kwargs == p.kwargs and c.num_warps == p.num_warps for p in pool)]
    return keep or configs[:1]


_ALL_CONFIGS = list(
    {(tuple(c.kwargs.items()), c.num_warps, c.num_stages): c for c in _SMALL + _MEDIUM + _LARGE}.values()
)
_KEY = ["ROWS_HINT", "N", "K", "R", "E", "HAS_LORA", "DQ", "ALIGNED"]
_fwd_tuned = triton.autotune(_ALL_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(
    _fwd_kernel
)
_dx_tuned = triton.autotune(_ALL_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(
    _dx_kernel
)

# Under the interpreter (CPU tests) there is nothing to tune: one small fixed tile.
_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}

# ------------------------------------------------------------------------------------------ python


@dataclass(frozen=True)
class NF4Weight:
    """One fused expert weight W [E, N, K] as bitsandbytes stores it, plain tensors on one device.

    `packed` is the uint8 (or any storage dtype, read as bytes) output of `quantize_4bit` over the whole
    flattened tensor; `absmax` is fp32 per block, or uint8 with double quantization, in which case
    `absmax2`, `code2`, `offset` (a 0-d fp32 tensor, read on the device) and `nested_blocksize` are set.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: tuple[int, int, int]
    blocksize: int = 64
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = 256

    @classmethod
    def from_quant_state(cls, packed: torch.Tensor, state) -> NF4Weight:  # type: ignore[no-untyped-def]
        """From a bitsandbytes `QuantState` (quant_type nf4, 3D shape)."""
        if getattr(state, "quant_type", "nf4") != "nf4":
            raise ValueError(f"only nf4 is supported, got {state.quant_type}")
        nested = getattr(state, "nested", False)
        return cls(
            packed=packed,
            absmax=state.absmax,
            code=state.code,
            shape=tuple(state.shape),
            blocksize=state.blocksize,
            absmax2=state.state2.absmax if nested else None,
            code2=state.state2.code if nested else None,
            offset=state.offset if nested else None,
            nested_blocksize=state.state2.blocksize if nested else 256,
        )

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    def check(self) -> None:
        e, n, k = self.shape
        if len(self.shape) != 3:
            raise ValueError(f"NF4Weight.shape must be [E, N, K], got {self.shape}")
        if self.packed.numel() * self.packed.element_size() * 2 < e * n * k:
            raise ValueError(
                f"packed holds {self.packed.numel() * self.packed.element_size()} bytes, too few for {self.shape}"
            )
        if self.code.numel() != 16 or self.code.dtype != torch.float32:
            raise ValueError("code must be the 16 fp32 NF4 levels")
        if self.double_quant:
            if self.absmax.dtype != torch.uint8 or self.code2 is None or self.offset is None:
                raise ValueError("double quantization needs uint8 absmax, absmax2, code2 and offset")
            if self.absmax2.dtype != torch.float32 or self.code2.dtype != torch.float32:
                raise ValueError("absmax2 and code2 must be fp32")
        elif self.absmax.dtype != torch.float32:
            raise ValueError(
                f"absmax is {self.absmax.dtype} without absmax2/code2/offset: pass the nested state, or fp32 absmax"
            )


def _rows_hint(m: int, groups: int) -> int:
    mean = max(1, m // max(1, groups))
    return min(1 << (mean - 1).bit_length(), 4096)


def nf4_grouped_mm(
    x: torch.Tensor,
    offsets: torch.Tensor,
    weight: NF4Weight,
    *,
    transpose: bool = False,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    lora_slot: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Grouped product of expert-sorted rows with NF4 weights; no autograd (see `nf4_grouped_linear`).

    transpose=False: x [M, K] -> y [M, N], y_g = x_g @ W_g.T + scale * (x_g @ A_g.T) @ B_g.T
    transpose=True:  x [M, N] -> y [M, K], y_g = x_g @ W_g   + scale * (x_g @ B_g) @ A_g
    Group g is rows offsets[g-1]..offsets[g] (int32 cumulative ends, len E, on x's device; rows past
    offsets[-1] are left unwritten). LoRA: A [E_lora, r, K], B [E_lora, N, r] (any float dtype, cast to
    x's dtype in registers); `lora_slot` (int, len E: the LoRA slot of each expert or -1) is needed when
    E_lora < E, else slot = expert. Returns (y, hidden) where hidden is the scaled LoRA intermediate
    [M, r] in x's dtype (scale * x_g @ A_g.T, or scale * x_g @ B_g when transposed; zero rows for
    experts without LoRA), None without LoRA.
    """
    weight.check()
    e, n, k = weight.shape
    if x.dim() != 2 or x.shape[1] != (n if transpose else k):
        raise ValueError(f"x {tuple(x.shape)} does not match W {weight.shape} (transpose={transpose})")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    if offsets.numel() != e or offsets.dtype != torch.int32:
        raise ValueError(
            f"offsets must be int32 with {e} entries, got {offsets.dtype} {tuple(offsets.shape)}"
        )
    has_lora = lora_a is not None or lora_b is not None
    r = 0
    if has_lora:
        if lora_a is None or lora_b is None:
            raise ValueError("LoRA needs both A and B")
        n_lora, r, k_a = lora_a.shape
        if k_a != k or lora_b.shape != (n_lora, n, r):
            raise ValueError(
                f"LoRA A {tuple(lora_a.shape)} / B {tuple(lora_b.shape)} do not match W {weight.shape}"
            )
        if lora_slot is None and n_lora != e:
            raise ValueError(f"LoRA on {n_lora} of {e} experts needs lora_slot")
        lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()
    x = x.contiguous() if x.stride(-1) != 1 else x
    m = x.shape[0]
    out_cols = k if transpose else n
    y = torch.empty(m, out_cols, dtype=out_dtype or x.dtype, device=x.device)
    hidden = torch.zeros(m, r, dtype=x.dtype, device=x.device) if has_lora else None
    if m == 0:
        return y, hidden
    qb, qb2 = weight.blocksize, weight.nested_blocksize
    dq = weight.double_quant
    packed = weight.packed.reshape(-1).view(torch.uint8)
    dummy = weight.code
    args = (
        x,
        y,
        offsets,
        packed,
        weight.absmax,
        weight.absmax2 if dq else dummy,
        weight.code,
        weight.code2 if dq else dummy,
        weight.offset.reshape(1).float() if dq else dummy,
        lora_a if has_lora else dummy,
        lora_b if has_lora else dummy,
        lora_slot if lora_slot is not None else offsets,
        hidden if has_lora else dummy,
        float(lora_scale),
        m,
        n,
        k,
        r,
        x.stride(0),
        y.stride(0),
        _rows_hint(m, e),
    )
    meta = dict(
        E=e,
        E_PAD=triton.next_power_of_2(e),
        QB=qb,
        QB2=qb2,
        DQ=dq,
        ALIGNED=bool(k % qb == 0 and 64 % qb == 0 and qb % 2 == 0),
        HAS_LORA=has_lora,
        HAS_SLOT=lora_slot is not None,
        R_PAD=max(16, triton.next_power_of_2(max(r, 1))),
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )
    interpret = x.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    out_tile = "BLOCK_K" if transpose else "BLOCK_N"

    def grid(cfg):  # type: ignore[no-untyped-def]
        return ((triton.cdiv(m, cfg["BLOCK_M"]) + e) * triton.cdiv(out_cols, cfg[out_tile]),)

    if not interpret:
        kernel = _dx_tuned if transpose else _fwd_tuned
        kernel[grid](*args, **meta, DOT_FP32=False)
    else:
        kernel = _dx_kernel if transpose else _fwd_kernel
        kernel[grid(_INTERPRET_CONFIG)](*args, **meta, DOT_FP32=x.dtype != torch.float32, **_INTERPRET_CONFIG)
    return y, hidden


# ----------------------------------------------------------------------------------------- autograd

_warned_fallback = False


def _group_outer(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[G, P, Q]: a_g.T @ b_g for the row groups of a [M, P] and b [M, Q] (fp32 accumulation)."""
    global _warned_fallback
    op = getattr(torch.nn.functional, "grouped_mm", None)
    if (
        op is not None
        and a.is_cuda
        and a.dtype == b.dtype == torch.bfloat16
        and a.shape[1] % 8 == 0
        and b.shape[1] % 8 == 0
    ):
        try:
            return op(a.t(), b, offs=offsets)
        except RuntimeError as err:  # an unsupported layout on this torch build: correct, slower
            if not _warned_fallback:
                warnings.warn(
                    f"grouped_mm for LoRA gradients failed ({err}); per-expert loop instead", stacklevel=2
                )
                _warned_fallback = True
    ends = offsets.tolist()
    out = a.new_zeros(len(ends), a.shape[1], b.shape[1], dtype=torch.float32)
    start = 0
    for g, end in enumerate(ends):
        if end > start:
            out[g] = a[start:end].float().t() @ b[start:end].float()
        start = max(start, end)
    return out


def _to_slots(full: torch.Tensor, slot: torch.Tensor | None, n_lora: int) -> torch.Tensor:
    """Per-expert gradients [E, ...] -> per-slot [n_lora, ...] without a host sync."""
    if slot is None:
        return full
    valid = (slot >= 0).to(full.dtype).view(-1, *([1] * (full.dim() - 1)))
    out = full.new_zeros(n_lora, *full.shape[1:])
    return out.index_add_(0, slot.clamp(min=0).long(), full * valid)


class _NF4GroupedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, offsets, weight, lora_a, lora_b, lora_scale, lora_slot):  # type: ignore[override]
        y, hidden = nf4_grouped_mm(
            x, offsets, weight, lora_a=lora_a, lora_b=lora_b, lora_scale=lora_scale, lora_slot=lora_slot
        )
        ctx.weight, ctx.lora_scale = weight, lora_scale
        ctx.has_lora = lora_a is not None
        if ctx.has_lora:
            ctx.save_for_backward(offsets, x, hidden, lora_a, lora_b, lora_slot)
        else:
            ctx.save_for_backward(offsets)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        dy = dy.contiguous()
        if not ctx.has_lora:
            (offsets,) = ctx.saved_tensors
            dx = (
                nf4_grouped_mm(dy, offsets, ctx.weight, transpose=True)[0]
                if ctx.needs_input_grad[0]
                else None
            )
            return dx, None, None, None, None, None, None
        offsets, x, hidden, a, b, slot = ctx.saved_tensors
        dx, dy_b = nf4_grouped_mm(
            dy,
            offsets,
            ctx.weight,
            transpose=True,
            lora_a=a,
            lora_b=b,
            lora_scale=ctx.lora_scale,
            lora_slot=slot,
        )
        da = db = None
        if ctx.needs_input_grad[3]:  # dA_g = scale * (dy_g @ B_g).T @ x_g
            da = _to_slots(_group_outer(dy_b, x, offsets), slot, a.shape[0]).to(a.dtype)
        if ctx.needs_input_grad[4]:  # dB_g = dy_g.T @ (scale * x_g @ A_g.T), built transposed: [E, r, N]
            db = _to_slots(_group_outer(hidden, dy, offsets), slot, b.shape[0]).transpose(1, 2).to(b.dtype)
        return (dx if ctx.needs_input_grad[0] else None), None, None, da, db, None, None


def nf4_grouped_linear(
    x: torch.Tensor,
    offsets: torch.Tensor,
    weight: NF4Weight,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    lora_slot: torch.Tensor | None = None,
) -> torch.Tensor:
    """y_g = x_g @ W_g.T (+ scale * (x_g @ A_g.T) @ B_g.T) with autograd to x, A and B (W is frozen).

    Backward runs the dX kernel (LoRA fused, as in forward) and gets dA, dB from grouped products of the
    saved [M, r] intermediates. No LoRA dropout here: with dropout, use the reference path.
    """
    return _NF4GroupedLinearFn.apply(x, offsets, weight, lora_a, lora_b, lora_scale, lora_slot)
