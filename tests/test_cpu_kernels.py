"""CPU 4-bit numerics equal the NF4 definition on every CPU, whatever SIMD extensions it has.

bitsandbytes picks native CPU kernels by the machine's extensions; on AVX-512 hosts they dequantize
some shapes wrongly and an AVX512-BF16 eval path asserts on shapes. These tests pin our CPU kernels
against a reference written from the definition, and force the AVX512-BF16 path on machines without it.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch

from finetune.compat import bitsandbytes as cpu_kernels
from finetune.model.experts import NF4Experts
from finetune.model.load import load_model, resolve_source

pytestmark = pytest.mark.compat

# NF4 levels (QLoRA paper, appendix E): quantiles of N(0, 1) normalised to [-1, 1], with an exact zero.
NF4 = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0]
)  # fmt: skip


def reference_nf4(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Quantize then dequantize by the definition: blocks of the flattened tensor, absmax-scaled, nearest level."""
    flat = weight.reshape(-1).float()
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    nearest = (blocks / absmax).unsqueeze(-1).sub(NF4).abs().argmin(dim=-1)
    return (NF4[nearest] * absmax).reshape(-1)[:n].reshape(weight.shape)


SHAPES = [((8, 64, 32), 64), ((64, 32), 64), ((64, 32), 128), ((40, 64), 128), ((4096,), 64), ((40, 64), 64)]


@pytest.mark.parametrize(("shape", "blocksize"), SHAPES)
def test_round_trip_matches_the_definition(shape, blocksize):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    expected = reference_nf4(weight, blocksize)
    packed, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    torch.testing.assert_close(F.dequantize_4bit(packed, state), expected, rtol=0, atol=1e-6)
    # Double quantization stores the block scales in 8 bits: the error stays at the NF4 level (~0.09).
    packed, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    error = (F.dequantize_4bit(packed, state) - weight).norm() / weight.norm()
    reference_error = (expected - weight).norm() / weight.norm()
    assert error < reference_error * 1.02, (error, reference_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_storage_format_is_bitsandbytes(dtype):
    """Packed nibbles, first element high: what bitsandbytes' CUDA kernels and saved checkpoints expect."""
    weight = torch.tensor([[-1.0, 1.0, 0.0, 0.5]] * 16, dtype=dtype)  # 64 values, one block
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert packed.dtype == torch.uint8 and packed.shape == (32, 1)
    assert packed[:2, 0].tolist() == [0x0F, 0x7C]  # levels (0, 15), (7, 12): 0.5 is nearest 0.4407
    assert state.absmax.tolist() == [1.0]


def test_model_weights_dequantize_to_the_definition():
    """Every quantized weight of a loaded model — bitsandbytes' Linear4bit and our NF4 experts."""
    source = resolve_source("tiny", None)
    full = load_model(source, quantization="none", dtype="float32")
    model = load_model(source, quantization="nf4", dtype="float32", double_quant=False)
    originals = full.state_dict()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    experts = [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Experts)]
    assert len(linears) > 20 and len(experts) == 2
    for name, module in linears:
        got = F.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        torch.testing.assert_close(got, reference_nf4(originals[f"{name}.weight"], 64), rtol=0, atol=1e-6)
    for name, module in experts:
        for w in ("gate_up", "down"):
            expected = reference_nf4(originals[f"{name}.{w}_proj"], module.blocksize)
            torch.testing.assert_close(module.dequantize(w, torch.float32), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("claims_avx512_bf16", [False, True])
def test_eval_forward_never_takes_the_repacked_path(monkeypatch, claims_avx512_bf16):
    """Whether or not the CPU has AVX512-BF16, an eval forward of a 40-wide Linear4bit is x @ W_nf4.T."""
    from bitsandbytes.nn import modules

    # What bitsandbytes would see on an AVX512-BF16 machine (or not); our install must override both.
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: claims_avx512_bf16)
    cpu_kernels.install_cpu_kernels.cache_clear()
    cpu_kernels.install_cpu_kernels()
    weight = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    layer = bnb.nn.Linear4bit(64, 40, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=False)
    layer = layer.to("cpu")  # bitsandbytes quantizes on the first move to a device
    layer.support_avx512bf16_for_cpu = claims_avx512_bf16  # as bitsandbytes' __init__ would have set it
    model = torch.nn.Sequential(layer)
    cpu_kernels.no_cpu_repacking(model)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    layer.eval()
    with torch.no_grad():
        out = layer(x)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    torch.testing.assert_close(out, x @ reference_nf4(weight, 64).T, rtol=1e-5, atol=1e-5)


def test_linear4bit_built_after_install_has_no_repacking():
    cpu_kernels.install_cpu_kernels()
    layer = bnb.nn.Linear4bit(64, 40, bias=False)
    assert layer.support_avx512bf16_for_cpu is False


_ROUND_TRIPS = """
import sys, torch
import bitsandbytes.functional as F
from finetune.compat.bitsandbytes import install_cpu_kernels
install_cpu_kernels()
out = {"capability": torch.backends.cpu.get_cpu_capability()}
for i, (shape, blocksize) in enumerate(SHAPES):
    # Integer arithmetic, not torch.randn: its vectorised sampler differs by capability (the input would).
    n = torch.Size(shape).numel()
    ints = (torch.arange(n, dtype=torch.int64) * 1103515245 + 12345) % 2**31
    scale = 1 + (torch.arange(n) // 23) % 11  # block maxima that differ, as in real weights
    weight = ((ints.double() / 2**30 - 1.0) * scale).float().reshape(shape)
    for nested in (False, True):
        packed, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
        out[f"{i}-{nested}"] = (packed, state.absmax, F.dequantize_4bit(packed, state))
torch.save(out, sys.argv[1])
"""


def test_same_numbers_under_every_cpu_capability(tmp_path):
    """Our kernels are plain torch, whose CPU kernels follow ATEN_CPU_CAPABILITY: packed weights, scales
    and dequantized values are bit-identical under DEFAULT (no SIMD), AVX2 and this machine's level. With
    double quantization bitsandbytes' offset is a mean, whose summation order follows the vector width:
    it may move by one ulp, so those dequantized values are compared to 1e-6."""
    import os
    import subprocess
    import sys

    runs = []
    for capability in ("default", "avx2", None):  # None: what this machine has
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        path = tmp_path / f"{capability}.pt"
        script = f"SHAPES = {SHAPES!r}\n{_ROUND_TRIPS}"
        result = subprocess.run(
            [sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append(torch.load(path))
    assert [r["capability"] for r in runs[:2]] == ["DEFAULT", "AVX2"]
    first = runs[0]
    for other in runs[1:]:
        for key in first.keys() - {"capability"}:
            (packed, absmax, values), (o_packed, o_absmax, o_values) = first[key], other[key]
            assert torch.equal(packed, o_packed), (other["capability"], key)
            if key.endswith("False"):
                assert torch.equal(absmax, o_absmax) and torch.equal(values, o_values), (
                    other["capability"],
                    key,
                )
            else:
                torch.testing.assert_close(o_values, values, rtol=1e-6, atol=0)
