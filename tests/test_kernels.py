"""The Triton NF4 grouped-matmul kernels (finetune/kernels) against bitsandbytes' dequantize + matmul.

Triton kernels only run on a CPU under its interpreter, which `TRITON_INTERPRET=1` selects when the
kernels are *decorated* (at import). So that setting never leaks into other test modules (nor meets a
copy of the module imported without it), every case runs in one child process: this file executed as
a script with the variable set, printing one JSON object of relative errors per case; the tests below
only read that object. Shapes are tiny (E <= 4, N <= 96, K <= 128) and the fixed interpreter tile is
16 x 32 x 64, so groups span several row tiles, N and K several column tiles, and decode-like groups
of 0 and 1 rows occur.

Errors are max |kernel - reference| / max |reference|, the reference in fp32 from
`bitsandbytes.functional.dequantize_4bit` and a per-group matmul (autograd for dX, dA, dB).
Tolerances: fp32 inputs 1e-5 (the interpreter multiplies in fp32; only summation order differs),
bf16 inputs 2e-2 (bf16 rounding of inputs, weight and LoRA intermediate).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import pytest

from tests import interpreter

if why := interpreter.unusable():
    pytest.skip(why, allow_module_level=True)
TOL = {"float32": 1e-5, "bfloat16": 2e-2}

# name: (E, N, K, rows per expert, double quant, LoRA experts (None: no LoRA, "all", or a list), r, dtype)
CASES = {
    "dq": (4, 64, 128, [0, 1, 17, 5], True, None, 0, "float32"),
    "no_dq": (4, 64, 128, [3, 0, 20, 1], False, None, 0, "float32"),
    "dq_lora_all": (4, 64, 128, [0, 1, 17, 5], True, "all", 8, "float32"),
    "no_dq_lora_subset_partial_tiles": (4, 96, 64, [2, 18, 0, 1], False, [1, 3], 16, "float32"),
    "unaligned_layout_lora": (3, 24, 40, [5, 0, 17], True, "all", 4, "float32"),
    "decode_rows_0_1_bf16_lora": (4, 64, 128, [1, 0, 1, 1], True, "all", 16, "bfloat16"),
    "bf16_lora_subset": (4, 64, 128, [0, 1, 17, 5], True, [0, 2], 8, "bfloat16"),
}


@pytest.fixture(scope="module")
def results() -> dict:
    proc = interpreter.run([__file__])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(results, case):
    got = results[case]
    assert "error" not in got, got.get("error")
    tol = TOL[CASES[case][7]]
    expected = {"y", "dx", "dx_mm"} | ({"da", "db", "hidden"} if CASES[case][5] else set())
    assert set(got) == expected
    for name, err in got.items():
        assert err <= tol, f"{case}: {name} relative error {err:.3g} > {tol}"


def test_wrong_nibble_order_is_caught(results):
    # The comparison is sensitive: the same weight with the two nibbles of every byte swapped is far off.
    assert results["swapped_nibbles"] > 0.1


def test_input_errors(results):
    assert results["input_errors"] == ["absmax", "offsets", "lora_slot", "x"]


def test_no_rows(results):
    assert results["no_rows"] == [0, 64]


# ----------------------------------------------------------------------------- the child process


def _run_cases() -> dict:
    import bitsandbytes.functional as bnbf
    import torch

    from finetune.compat.bitsandbytes import (
        install_cpu_kernels,  # exact plain-torch CPU 4-bit ops: the reference
    )

    install_cpu_kernels()
    from finetune.kernels.nf4_grouped import NF4Weight, nf4_grouped_linear, nf4_grouped_mm

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()

    def quantized(e: int, n: int, k: int, dq: bool, seed: int):
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(e, n, k, generator=gen)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
        assert state.nested == dq
        return packed, state, bnbf.dequantize_4bit(packed, state).float()

    out: dict = {}
    for seed, (case, (e, n, k, counts, dq, lora, r, dtype_name)) in enumerate(CASES.items()):
        try:
            dtype = getattr(torch, dtype_name)
            packed, state, w_ref = quantized(e, n, k, dq, seed)
            weight = NF4Weight.from_quant_state(packed, state)
            gen = torch.Generator().manual_seed(100 + seed)
            m = sum(counts)
            offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
            ends = offsets.tolist()
            starts = [0, *ends[:-1]]
            x = torch.randn(m, k, generator=gen).to(dtype)
            grad = torch.randn(m, n, generator=gen).to(dtype)
            experts = list(range(e)) if lora == "all" else (lora or [])
            slot = None
            a = b = None
            if lora:
                a = (torch.randn(len(experts), r, k, generator=gen) / k**0.5).requires_grad_()
                b = (torch.randn(len(experts), n, r, generator=gen) / r**0.5).requires_grad_()
                if lora != "all":
                    slot = torch.full((e,), -1, dtype=torch.long)
                    slot[experts] = torch.arange(len(experts))
            scale = 2.0

            # Reference in fp32, from the inputs as the kernel sees them (bf16 weights for a bf16 run).
            xr = x.detach().float().clone().requires_grad_()
            w_cmp = w_ref.to(dtype).float()
            ar = br = None
            if lora:
                ar = a.detach().to(dtype).float().requires_grad_()
                br = b.detach().to(dtype).float().requires_grad_()
            parts, hid_parts = [], []
            for g in range(e):
                xs = xr[starts[g] : ends[g]]
                yg = xs @ w_cmp[g].t()
                hg = torch.zeros(xs.shape[0], r)
                if g in experts:
                    s = experts.index(g)
                    hg = (xs @ ar[s].t()) * scale
                    yg = yg + hg @ br[s].t()
                parts.append(yg)
                hid_parts.append(hg)
            y_ref = torch.cat(parts)
            (y_ref * grad.float()).sum().backward()

            xk = x.detach().clone().requires_grad_()
            y = nf4_grouped_linear(xk, offsets, weight, a, b, scale, slot)
            (y.float() * grad.float()).sum().backward()
            res = {"y": rel(y, y_ref), "dx": rel(xk.grad, xr.grad)}
            # The dX kernel alone (no LoRA): grad @ W per group.
            dx_mm, _ = nf4_grouped_mm(grad, offsets, weight, transpose=True)
            dx_ref = torch.cat([grad[starts[g] : ends[g]].float() @ w_cmp[g] for g in range(e)])
            res["dx_mm"] = rel(dx_mm, dx_ref)
            if lora:
                res["da"] = rel(a.grad, ar.grad)
                res["db"] = rel(b.grad, br.grad)
                _, hidden = nf4_grouped_mm(
                    x, offsets, weight, lora_a=a, lora_b=b, lora_scale=scale, lora_slot=slot
                )
                res["hidden"] = rel(hidden, torch.cat(hid_parts).detach())
            out[case] = res
        except Exception:
            out[case] = {"error": traceback.format_exc()}

    # Sensitivity: swap the nibbles of every byte and the forward result must move far away.
    packed, state, w_ref = quantized(4, 64, 128, True, 0)
    swapped = (packed >> 4) | (packed << 4)
    offsets = torch.tensor([2, 4, 6, 8], dtype=torch.int32)
    x = torch.randn(8, 128)
    y, _ = nf4_grouped_mm(x, offsets, NF4Weight.from_quant_state(swapped, state))
    y_ref = torch.cat([x[2 * g : 2 * g + 2] @ w_ref[g].t() for g in range(4)])
    out["swapped_nibbles"] = rel(y, y_ref)

    # Clear errors for inputs the kernels cannot read.
    weight = NF4Weight.from_quant_state(packed, state)
    errors = []
    bad = [
        ("absmax", lambda: nf4_grouped_mm(x, offsets, NF4Weight(packed, state.absmax, state.code, (4, 64, 128)))),
        ("offsets", lambda: nf4_grouped_mm(x, offsets.long(), weight)),
        ("lora_slot", lambda: nf4_grouped_mm(x, offsets, weight, lora_a=torch.zeros(2, 4, 128), lora_b=torch.zeros(2, 64, 4))),
        ("x", lambda: nf4_grouped_mm(x[:, :64], offsets, weight)),
    ]  # fmt: skip
    for name, call in bad:
        try:
            call()
        except ValueError:
            errors.append(name)
    out["input_errors"] = errors

    # No rows at all: nothing is launched, shapes still right.
    y, _ = nf4_grouped_mm(x[:0], torch.zeros(4, dtype=torch.int32), weight)
    out["no_rows"] = list(y.shape)
    return out


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run through pytest, or with TRITON_INTERPRET=1")
    print(json.dumps(_run_cases()))
