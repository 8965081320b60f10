"""bitsandbytes internals: its CPU 4-bit ops replaced by plain torch, its CPU repacking switched off, its
4-bit layer's quant-state repair called from our forward. Checked on bitsandbytes 0.50 (`CHECKED`).

bitsandbytes' 4-bit ops on the CPU, in plain torch, so every CPU computes the same numbers.

bitsandbytes (0.49–0.50) routes CPU 4-bit work to native kernels chosen by the CPU's SIMD extensions.
On AVX-512 machines (AMD EPYC, Intel Xeon) its NF4 dequantization treats each *row* as a run of blocks,
while the storage format blocks the *flattened* tensor: any weight whose last dimension is not a
multiple of the block size (the tiny model's 32-wide experts, 40-wide projections) comes back wrong
(relative error 0.16–0.40 instead of 0.09). Its AVX512-BF16 eval-mode path repacks `Linear4bit`
weights and asserts `out_features % 32 == 0`. AVX2 and ARM machines take bnb's pure-torch "default"
kernels, which are right. We register the same definition for the CPU here, so the result never
depends on the machine, keep bitsandbytes' storage format (packed nibbles, fp32 or 8-bit double-quant
absmax), and switch off the repacking. CUDA kernels are untouched.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Sequence
from math import prod

import bitsandbytes as bnb  # defines the ops and registers its own CPU kernels first
import bitsandbytes.functional as bnbf
import torch
from bitsandbytes.nn import modules as bnb_modules

from finetune.compat import Target, applying, declare, fail
from finetune.compat import torch as compat_torch

CHECKED = "0.50"
_OPS = ("quantize_4bit", "dequantize_4bit", "quantize_blockwise", "dequantize_blockwise", "gemv_4bit")

CPU_KERNELS = declare(
    "bitsandbytes.cpu_kernels",
    "bitsandbytes",
    CHECKED,
    "registers plain-torch CPU kernels for bitsandbytes' 4-bit ops (the same numbers on every CPU: its "
    "native AVX-512 kernels dequantize some shapes wrongly) and switches off the AVX512-BF16 repacking "
    "that `Linear4bit` decides in __init__ (`has_avx512bf16`); process-wide, installed by the loaders",
    Target("bitsandbytes.functional", "get_4bit_type"),
    Target("bitsandbytes.nn.modules", "has_avx512bf16"),
)
NO_REPACKING = declare(
    "bitsandbytes.no_cpu_repacking",
    "bitsandbytes",
    CHECKED,
    "keeps each loaded `Linear4bit` off the AVX512-BF16 repacked eval path (its shape asserts) through "
    "its `support_avx512bf16_for_cpu` flag",
    Target("bitsandbytes.nn", "Linear4bit"),
)
QUANT_STATE = declare(
    "bitsandbytes.quant_state_repair",
    "bitsandbytes",
    CHECKED,
    "calls `Linear4bit`'s own quant-state repair (`fix_4bit_weight_quant_state_from_module`) before our "
    "fused forward reads the state, as its forward does",
    Target("bitsandbytes.nn.modules", "fix_4bit_weight_quant_state_from_module"),
)


@functools.cache
def _code4(quant_type: str) -> torch.Tensor:
    return bnbf.get_4bit_type(quant_type, device="cpu")


def _blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each block of the flattened tensor by its absmax: (values in [-1, 1], absmax per block)."""
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    absmax = padded.abs().amax(dim=1)
    scaled = (padded / absmax.clamp(min=1e-38).unsqueeze(1)).clamp(-1, 1).reshape(-1)[:n]
    return scaled, absmax


def _nearest(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of `code` (any order) for each value."""
    order = torch.argsort(code)
    ordered = code[order]
    index = torch.bucketize(values, (ordered[:-1] + ordered[1:]) / 2)
    return order[index]


def _scale_back(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = values.numel()
    padded = torch.nn.functional.pad(values, (0, -n % blocksize)).view(-1, blocksize)
    return (padded * absmax.float().unsqueeze(1)).reshape(-1)[:n]


def quantize_4bit(
    A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    scaled, absmax = _blocks(A.reshape(-1).float(), blocksize)
    q = _nearest(scaled, _code4(quant_type)).to(torch.uint8)
    if q.numel() % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)  # first element in the high nibble
    if quant_storage != torch.uint8:
        packed = packed.squeeze(1).view(quant_storage).unsqueeze(1)
    return packed, absmax


def dequantize_4bit(
    A: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    packed = A.reshape(-1).view(torch.uint8)
    q = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: prod(shape)]
    values = _code4(quant_type)[q.long()]
    return _scale_back(values, absmax, blocksize).reshape(shape).to(dtype)


def quantize_blockwise(
    A: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    scaled, absmax = _blocks(A.reshape(-1).float(), blocksize)
    return _nearest(scaled, code.float()).to(torch.uint8).reshape(A.shape), absmax


def dequantize_blockwise(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    values = code.float()[A.reshape(-1).long()]
    return _scale_back(values, absmax, blocksize).reshape(A.shape).to(dtype)


def gemv_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    shapeB: Sequence[int],
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
) -> torch.Tensor:
    quant_type = "fp4" if code[1] > 0 else "nf4"  # bitsandbytes' own test: NF4's second level is negative
    return torch.nn.functional.linear(A, dequantize_4bit(B, absmax, blocksize, quant_type, shapeB, A.dtype))


_LIBRARIES: list[torch.library.Library] = []  # registrations last as long as their Library object


def _register(name: str, fn) -> None:
    library = torch.library.Library("bitsandbytes", "IMPL")
    _LIBRARIES.append(library)
    if "allow_override" not in inspect.signature(library.impl).parameters:
        # Older torch (2.11 on the H200 machines) refuses a second Python kernel for a key unless the key
        # is forgotten first; the dispatcher itself accepts the override.
        compat_torch.forget_library_impl(f"bitsandbytes/{name}/CPU")
        library.impl(name, fn, "CPU")
    else:
        library.impl(name, fn, "CPU", allow_override=True)


@functools.cache
def install_cpu_kernels() -> None:
    """Register the kernels above for bitsandbytes' CPU ops (idempotent): the loaders call it before a
    model is built or quantized, and the CLI at start."""
    applying(CPU_KERNELS)
    missing = [name for name in _OPS if not hasattr(torch.ops.bitsandbytes, name)]
    if missing:
        raise fail(CPU_KERNELS, f"no operator bitsandbytes::{missing[0]}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that an existing CPU kernel is being replaced
        for name in _OPS:
            _register(name, globals()[name])
    # Linear4bit asks this once, in __init__, whether to repack for the AVX512-BF16 path.
    bnb_modules.has_avx512bf16 = lambda: False


def no_cpu_repacking(model: torch.nn.Module) -> None:
    """Keep `Linear4bit` off bitsandbytes' AVX512-BF16 repacked format (eval path with shape asserts)."""
    applying(NO_REPACKING)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if not hasattr(module, "support_avx512bf16_for_cpu"):
                raise fail(NO_REPACKING, "Linear4bit has no support_avx512bf16_for_cpu flag")
            module.support_avx512bf16_for_cpu = False


def repair_quant_state(module: torch.nn.Module) -> None:
    """What `Linear4bit.forward` does first: its weight's quant state restored from the module."""
    applying(QUANT_STATE)
    bnb_modules.fix_4bit_weight_quant_state_from_module(module)
