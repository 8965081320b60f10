"""The byte-permute NF4 lookup of finetune/kernels/nf4_decode.py (`_PRMT_ASM`), run by a small emulator
of the PTX it uses (prmt in its default mode, lop3, shifts, and/or), on the CPU.

The asm has no interpreter path; this checks the program itself — the 4 high-nibble and 4 low-nibble
bf16 codes of every packed word — against a table lookup. Operand packing by Triton (which register
holds which element) is checked only on a GPU (tests/test_nf4_decode_cuda.py).
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")  # CPU-only torch wheels do not bring it

from finetune.kernels import nf4_decode

MASK = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    """PTX prmt.b32, default mode: bytes {b, a}; per target byte a selector nibble, bit 3 = sign replicate."""
    source = (b << 32) | a
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (source >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    """PTX lop3.b32: bit i of the result is lut's bit (a_i * 4 + b_i * 2 + c_i)."""
    out = 0
    for bit in range(32):
        index = ((a >> bit) & 1) * 4 + ((b >> bit) & 1) * 2 + ((c >> bit) & 1)
        out |= ((lut >> index) & 1) << bit
    return out


OPS = {
    "mov.b32": lambda a: a,
    "shr.b32": lambda a, n: a >> n,
    "shl.b32": lambda a, n: a << n,
    "and.b32": lambda a, b: a & b,
    "or.b32": lambda a, b: a | b,
    "prmt.b32": _prmt,
    "lop3.b32": _lop3,
}


def emulate(asm: str, registers: dict[str, int]) -> dict[str, int]:
    regs = dict(registers)
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith((".reg", "{", "}")):
            continue
        op, rest = line.split(None, 1)
        dst, *args = (a.strip() for a in rest.split(","))
        regs[dst] = OPS[op](*(regs[a] if a in regs else int(a, 0) for a in args)) & MASK
    return regs


def _tables(code: torch.Tensor) -> tuple[list[int], dict[str, int]]:
    """The codes' bf16 bits and the asm's table operands: H0..H3 at $5, $9, ..., L0..L3 at $21, ..."""
    bits = [b & 0xFFFF for b in code.to(torch.bfloat16).view(torch.int16).tolist()]

    def word(values: list[int]) -> int:
        return values[0] | values[1] << 8 | values[2] << 16 | values[3] << 24

    regs = {}
    for j in range(4):
        high = word([bits[4 * j + i] >> 8 for i in range(4)])
        low = word([bits[4 * j + i] & 0xFF for i in range(4)])
        for q in range(4):  # pack=4: each 32-bit input arrives as 4 registers
            regs[f"${5 + 4 * j + q}"], regs[f"${21 + 4 * j + q}"] = high, low
    return bits, regs


def _mismatches(asm: str) -> int:
    import bitsandbytes.functional as bnbf

    bits, tables = _tables(bnbf.get_4bit_type("nf4", device="cpu"))
    rng = random.Random(0)
    words = [rng.getrandbits(32) for _ in range(500)] + [b * 0x01010101 for b in range(256)]
    bad = 0
    for w in words:
        r = emulate(asm, {**tables, "$4": w})
        packed = [(w >> (8 * i)) & 0xFF for i in range(4)]
        got = [r[reg] >> shift & 0xFFFF for reg in ("$0", "$1", "$2", "$3") for shift in (0, 16)]
        want = [bits[b >> 4] for b in packed] + [bits[b & 0xF] for b in packed]
        bad += got != want
    return bad


def _asm() -> str:
    return getattr(nf4_decode._PRMT_ASM, "value", nf4_decode._PRMT_ASM)


def test_byte_permutes_look_up_both_nibbles_of_every_byte():
    assert _mismatches(_asm()) == 0


@pytest.mark.parametrize(
    ("old", "new"),
    [("0x5140", "0x4150"), ("0xBA98", "0x3210"), ("0xD8", "0xE4"), ("shl.b32 t, $4, 4", "shl.b32 t, $4, 3")],
)
def test_the_emulated_check_catches_a_wrong_constant(old, new):
    asm = _asm()
    assert old in asm
    assert _mismatches(asm.replace(old, new)) > 0
