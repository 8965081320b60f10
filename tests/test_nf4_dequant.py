"""The NF4 dequantization kernel (finetune/kernels/nf4_dequant.py) against bitsandbytes' `dequantize_4bit`.

The kernel must equal bitsandbytes bit for bit (`torch.equal`), which also catches a swapped nibble
order or a scale index off by one (checked below: both break equality). The Triton kernel runs on a CPU
only under its interpreter, chosen by `TRITON_INTERPRET=1` when kernels are decorated (at import), so
those cases run in one child process (this file as a script) that prints one JSON object; the tests
read it. The bitsandbytes fallback (CPU tensors, no interpreter), the fake (meta) output, the compiled
graph and the input errors run in this process; the `gpu` cases compare with bitsandbytes' CUDA kernel.

Weights are quantized by bitsandbytes (`quantize_4bit` of the whole [E, N, K] tensor, or
`NF4Experts.from_weights`); the reference is bitsandbytes' CPU `dequantize_4bit` with the project's
plain-torch CPU ops installed (`compat.bitsandbytes.install_cpu_kernels`: the same numbers on every CPU). Shapes are tiny
and the launch block small (64..256 bytes, 128..512 values a program) so every case spans several
programs; cases cover double quantization on and off, blocksizes 32/64/128/256, fp32/bf16/fp16
output, a numel that is not a multiple of the program's values (masked tail), an odd numel, one that
is not a multiple of the blocksize, K that is not a multiple of a program's values, and a program
smaller than a quantization block. Weights of `NF4Experts` are read as `NF4Weight`s, and an odd numel's
masked tail must write nothing past the last value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import traceback

import pytest
import torch

from tests import interpreter

# name: (shape, blocksize, double quant, output dtype, block: bytes a program, None = the default)
CASES = {
    "dq64_bf16": ((3, 40, 96), 64, True, "bfloat16", 256),
    "dq64_bf16_even": ((4, 32, 64), 64, True, "bfloat16", 256),
    "no_dq64_fp32": ((3, 40, 96), 64, False, "float32", 128),
    "dq32_fp16": ((2, 24, 84), 32, True, "float16", 128),
    "no_dq32_bf16": ((2, 24, 84), 32, False, "bfloat16", 64),
    "no_dq64_fp16_even": ((2, 16, 128), 64, False, "float16", 128),
    "dq128_fp32_odd_numel": ((3, 7, 33), 128, True, "float32", 64),
    "dq256_bf16_program_inside_a_block": ((5, 30, 70), 256, True, "bfloat16", 64),
    "dq64_bf16_default_block": ((3, 40, 96), 64, True, "bfloat16", None),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def quantized(case: str, seed: int):  # type: ignore[no-untyped-def]
    """(packed, QuantState with the case's output dtype, bitsandbytes' dequantization) for one case."""
    import bitsandbytes.functional as bnbf

    from finetune.compat.bitsandbytes import (
        install_cpu_kernels,  # exact plain-torch CPU 4-bit ops: the reference
    )

    install_cpu_kernels()

    shape, qb, dq, dtype_name, _ = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen) * torch.rand(shape[-1], generator=gen)  # scales vary by block
    packed, state = bnbf.quantize_4bit(w, blocksize=qb, compress_statistics=dq, quant_type="nf4")
    state.dtype = DTYPES[dtype_name]
    return packed, state, bnbf.dequantize_4bit(packed, state)


def dequantize(case: str, packed: torch.Tensor, state, **kw) -> torch.Tensor:  # type: ignore[no-untyped-def]
    from finetune.kernels.nf4_dequant import nf4_dequantize

    block = CASES[case][4]
    return nf4_dequantize(packed, state, **kw, **({} if block is None else {"block": block}))


def program_values(case: str) -> int:
    from finetune.kernels.nf4_dequant import BLOCK

    return 2 * (CASES[case][4] or BLOCK)


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict:
    return {
        "equal": torch.equal(got, ref),
        "shape": list(got.shape),
        "dtype": str(got.dtype).removeprefix("torch."),
        "max_abs": (got.float() - ref.float()).abs().max().item(),
        "nonzero": bool(ref.abs().sum() > 0),
    }


def experts_module(double_quant: bool):  # type: ignore[no-untyped-def]
    """NF4Experts with down rows (I = 40 values) straddling the 64-value blocks."""
    from finetune.model.experts import NF4Experts

    gen = torch.Generator().manual_seed(11)
    gate_up, down = torch.randn(3, 80, 64, generator=gen), torch.randn(3, 64, 40, generator=gen)
    return NF4Experts.from_weights(gate_up, down, torch.nn.SiLU(), double_quant=double_quant)


def module_weight(module, name: str):  # type: ignore[no-untyped-def]
    """The `NF4Weight` of weight `name` of an NF4Experts, as the module stores it."""
    from finetune.kernels.nf4_grouped import NF4Weight

    parts = {
        p: getattr(module, f"{name}_{p}", None)
        for p in ("packed", "absmax", "code", "absmax2", "code2", "offset")
    }
    nested = name in module._nested_blocksize
    assert nested == (parts["absmax2"] is not None)
    return NF4Weight(
        **parts,
        shape=tuple(module._shapes[name]),
        blocksize=module.blocksize,
        nested_blocksize=module._nested_blocksize.get(name, 256),
    )


# ----------------------------------------------------------------------------- interpreted kernel

needs_interpreter = pytest.mark.skipif(interpreter.unusable() is not None, reason=str(interpreter.unusable()))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    proc = interpreter.run([__file__], timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_interpreter
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_is_bitsandbytes_bit_for_bit(interpreted, case):
    got = interpreted[case]
    assert "error" not in got, got.get("error")
    assert got["shape"] == list(CASES[case][0]) and got["dtype"] == CASES[case][3]
    assert got["nonzero"]
    assert got["equal"], f"{case}: max |diff| {got['max_abs']:.3g}"


@needs_interpreter
def test_kernel_from_nf4experts(interpreted):
    for key in ("experts_gate_up", "experts_down", "experts_no_dq_down", "experts_fp16_down"):
        got = interpreted[key]
        assert "error" not in got, got.get("error")
        assert got["equal"] and got["nonzero"], f"{key}: max |diff| {got['max_abs']:.3g}"


@needs_interpreter
def test_kernel_writes_nothing_past_an_odd_tail(interpreted):
    for key in ("odd_tail", "odd_tail_program_inside_a_block"):
        got = interpreted[key]
        assert "error" not in got, got.get("error")
        assert got["equal"] and got["nonzero"] and got["tail_kept"], key


@needs_interpreter
def test_kernel_comparison_can_fail(interpreted):
    # The same bytes with the two nibbles of each byte swapped, or every block read with its
    # neighbour's scale, are not bitsandbytes' values: bit equality sees either mistake.
    for key in ("swapped_nibbles", "shifted_scales", "shifted_nested_scales"):
        assert "error" not in interpreted[key], interpreted[key].get("error")
        assert not interpreted[key]["equal"] and interpreted[key]["max_abs"] > 0.01, key


def test_cases_cover_the_edges():
    numels = {case: math.prod(CASES[case][0]) for case in CASES}
    tails = [case for case in CASES if numels[case] % program_values(case)]
    assert tails and len(tails) < len(CASES)  # masked tails and unmasked (EVEN) launches
    assert any(n % 2 for n in numels.values())  # an odd numel: the last low nibble is padding
    assert any(numels[c] % CASES[c][1] for c in CASES)  # a short last quantization block
    assert any(CASES[c][0][-1] % program_values(c) for c in CASES)  # rows cut by programs
    assert any(CASES[c][4] and 2 * CASES[c][4] < CASES[c][1] for c in CASES)  # program inside a block
    for dq in (True, False):
        assert {CASES[c][3] for c in CASES if CASES[c][2] == dq} == set(DTYPES)
    assert {32, 64, 128, 256} <= {CASES[c][1] for c in CASES}
    for case in CASES:
        assert numels[case] > program_values(case)  # several programs


# ----------------------------------------------------------------------------- this process


@pytest.mark.parametrize("case", ["dq64_bf16", "no_dq32_bf16", "dq128_fp32_odd_numel"])
def test_cpu_fallback_is_bitsandbytes(case):
    import bitsandbytes.functional as bnbf

    from finetune.kernels.nf4_dequant import nf4_dequantize

    assert os.environ.get("TRITON_INTERPRET") != "1"
    packed, state, ref = quantized(case, seed=list(CASES).index(case))
    assert torch.equal(nf4_dequantize(packed, state), ref)
    # `dtype` overrides the state's.
    fp16 = nf4_dequantize(packed, state, torch.float16)
    state.dtype = torch.float16
    assert torch.equal(fp16, bnbf.dequantize_4bit(packed, state))


def test_cpu_fallback_reads_an_nf4_weight():
    from finetune.kernels.nf4_dequant import nf4_dequantize

    module = experts_module(double_quant=True)
    for name in ("gate_up", "down"):
        got = nf4_dequantize(None, module_weight(module, name), torch.float32)
        assert torch.equal(got, module.dequantize(name, torch.float32))


def test_fake_output_and_compiled_graph():
    from finetune.kernels.nf4_dequant import nf4_dequantize

    packed, state, ref = quantized("dq64_bf16", seed=0)
    weight = module_weight(experts_module(double_quant=True), "down")
    tensors = {f.name: getattr(weight, f.name) for f in dataclasses.fields(weight)}
    meta = dataclasses.replace(
        weight, **{k: v.to("meta") for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    )
    fake = nf4_dequantize(None, meta, torch.float16)
    assert fake.device.type == "meta" and tuple(fake.shape) == weight.shape and fake.dtype == torch.float16
    # One opaque op: dynamo traces the wrapper with no graph break and the fake gives the shape.
    compiled = torch.compile(lambda p: nf4_dequantize(p, state) * 1, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(packed), ref)


def test_input_errors():
    from finetune.kernels.nf4_dequant import nf4_dequantize

    packed, state, _ = quantized("dq64_bf16", seed=0)
    weight = module_weight(experts_module(double_quant=True), "down")
    bad = {
        "dtype": lambda: nf4_dequantize(packed, state, torch.int8),
        "few_bytes": lambda: nf4_dequantize(packed[:-1], state),
        "block": lambda: nf4_dequantize(packed, state, block=1000),
        "warps": lambda: nf4_dequantize(packed, state, num_warps=3),
        "nested_parts": lambda: nf4_dequantize(None, dataclasses.replace(weight, code2=None)),
        "blocksize": lambda: nf4_dequantize(None, dataclasses.replace(weight, blocksize=48)),
        "no_packed": lambda: nf4_dequantize(None, state),
    }
    for name, call in bad.items():
        with pytest.raises(ValueError):
            call()
        assert name  # (the name shows in the traceback of a failing case)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block,num_warps", [(2048, 4), (256, 2)])
@pytest.mark.parametrize("shape", [(64, 2048, 1408), (3, 7, 33)])  # V2-Lite down; odd numel, short tail
def test_cuda_kernel_is_bitsandbytes_bit_for_bit(shape, double_quant, blocksize, dtype, block, num_warps):
    import bitsandbytes.functional as bnbf

    from finetune.kernels.nf4_dequant import nf4_dequantize

    gen = torch.Generator("cuda").manual_seed(0)
    w = torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, state = bnbf.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
    )
    state.dtype = dtype
    ref = bnbf.dequantize_4bit(packed, state)
    got = nf4_dequantize(packed, state, block=block, num_warps=num_warps)
    assert torch.equal(got, ref), (got.float() - ref.float()).abs().max().item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_reads_new_bytes():
    import bitsandbytes.functional as bnbf

    from finetune.kernels.nf4_dequant import nf4_dequantize

    w = torch.randn(4, 256, 512, device="cuda")
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    state.dtype = torch.bfloat16
    first = nf4_dequantize(packed, state)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # fails on any host sync (e.g. offset.item())
        y = nf4_dequantize(packed, state)  # allocated from the graph's pool, rewritten by each replay
    packed.copy_(bnbf.quantize_4bit(-w, blocksize=64, compress_statistics=False, quant_type="nf4")[0])
    graph.replay()
    torch.cuda.synchronize()
    ref = bnbf.dequantize_4bit(packed, state)
    assert torch.equal(y, ref) and not torch.equal(ref, first)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_past_int32_offsets():
    # 2**31 + 2**20 values (bitsandbytes' own kernel takes at most 2**31 - 1): random bytes and scales,
    # compared with bitsandbytes on slices of whole blocks at the start and past the int32 range.
    import bitsandbytes.functional as bnbf

    from finetune.kernels.nf4_dequant import nf4_dequantize

    qb, numel = 64, 2**31 + 2**20
    gen = torch.Generator("cuda").manual_seed(0)
    packed = torch.randint(0, 256, (numel // 2, 1), dtype=torch.uint8, device="cuda", generator=gen)
    absmax = torch.rand(numel // qb, device="cuda", generator=gen) + 0.5
    code = bnbf.get_4bit_type("nf4", device="cuda")
    state = bnbf.QuantState(
        absmax=absmax,
        shape=torch.Size([numel]),
        code=code,
        blocksize=qb,
        quant_type="nf4",
        dtype=torch.bfloat16,
    )
    got = nf4_dequantize(packed, state)
    for start in (0, 2**31 - 2**16, numel - 2**16):
        end = start + 2**16
        part = bnbf.QuantState(
            absmax=absmax[start // qb : end // qb],
            shape=torch.Size([end - start]),
            code=code,
            blocksize=qb,
            quant_type="nf4",
            dtype=torch.bfloat16,
        )
        assert torch.equal(got[start:end], bnbf.dequantize_4bit(packed[start // 2 : end // 2], part)), start


# ----------------------------------------------------------------------------- wiring


def test_compiled_decoding_switches_the_experts_dequantization(monkeypatch):
    """Compiled decoding (`model.kernels: auto` in generation) turns the kernel on and puts back what it
    found; training's fusion leaves it off; `NF4Experts.dequantize` calls it only on CUDA (here:
    bitsandbytes)."""
    from finetune.fast import fusion, generation
    from finetune.model.experts import NF4Experts
    from finetune.model.load import load_model, resolve_source

    model = load_model(resolve_source("tiny", None), dtype="float32")
    experts = [m for m in model.modules() if isinstance(m, NF4Experts)]
    assert experts and not any(m.mode.dequant_kernel for m in experts)
    assert not generation.enabled("auto", model) and not generation.enabled("off", model)  # the CPU
    assert not any(m.mode.dequant_kernel for m in experts)  # asking changes nothing
    with fusion.fused(model, True, regions=False):
        assert not any(m.mode.dequant_kernel for m in experts)
        with generation.compiled_decoding(model, True, graphs=False):  # GRPO's rollouts in a fit
            assert all(m.mode.dequant_kernel for m in experts)
        assert not any(m.mode.dequant_kernel for m in experts)
    experts[1].mode.dequant_kernel = True
    with generation.compiled_decoding(model, True, graphs=False):
        assert all(m.mode.dequant_kernel for m in experts)
    assert [m.mode.dequant_kernel for m in experts] == [False, True] + [False] * (len(experts) - 2)
    experts[1].mode.dequant_kernel = False
    with generation.compiled_decoding(model, False):
        assert not any(m.mode.dequant_kernel for m in experts)

    import finetune.kernels.nf4_dequant as kernel

    monkeypatch.setattr(kernel, "nf4_dequantize", lambda *a, **k: pytest.fail("the kernel ran on the CPU"))
    experts[0].mode.dequant_kernel = True
    assert torch.equal(experts[0].dequantize("down"), bnbf_dequantize(experts[0], "down"))


def bnbf_dequantize(module, name: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(getattr(module, f"{name}_packed"), module.quant_state(name))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("double_quant", [True, False])
def test_cuda_experts_dequantize_through_the_kernel(monkeypatch, double_quant):
    import finetune.kernels.nf4_dequant as kernel

    module = experts_module(double_quant).cuda()
    module.compute_dtype = torch.bfloat16
    calls = []
    launch = kernel._launch
    monkeypatch.setattr(kernel, "_launch", lambda *a: calls.append(1) or launch(*a))
    module.mode.dequant_kernel = True
    for name in ("gate_up", "down"):
        assert torch.equal(module.dequantize(name), bnbf_dequantize(module, name)), name
    assert len(calls) == 2


# ----------------------------------------------------------------------------- the child process


def _run_cases() -> dict:
    from finetune.kernels import nf4_dequant
    from finetune.kernels.nf4_dequant import nf4_dequantize

    out: dict = {}
    for seed, case in enumerate(CASES):
        try:
            packed, state, ref = quantized(case, seed)
            out[case] = compare(dequantize(case, packed, state), ref)
        except Exception:
            out[case] = {"error": traceback.format_exc()}

    def record(key: str, fn) -> None:  # type: ignore[no-untyped-def]
        try:
            out[key] = fn()
        except Exception:
            out[key] = {"error": traceback.format_exc()}

    def experts(name: str, dq: bool, dtype: torch.dtype) -> dict:
        module = experts_module(dq)
        got = nf4_dequantize(None, module_weight(module, name), dtype, block=128, num_warps=2)
        return compare(got, module.dequantize(name, dtype))

    def odd_tail(block: int) -> dict:
        # An odd numel, launched as `nf4_dequantize` does but into the front of a larger buffer: the
        # masked stores may write nothing past the last value (not the padding nibble's value either).
        packed, state, ref = quantized("dq128_fp32_odd_numel", seed=0)
        packed, absmax, code, (absmax2, code2, offset), shape, qb, qb2, _ = nf4_dequant._parts(packed, state)
        assert math.prod(shape) % 2 and math.prod(shape) % (2 * block)
        buf = torch.full((ref.numel() + 4,), 7.0, dtype=ref.dtype)
        nf4_dequant._launch(
            packed, absmax, code, absmax2, code2, offset, qb, qb2, buf[: ref.numel()], [block, 2]
        )
        return {
            **compare(buf[: ref.numel()], ref.reshape(-1)),
            "tail_kept": bool((buf[ref.numel() :] == 7).all()),
        }

    record("odd_tail", lambda: odd_tail(64))
    record("odd_tail_program_inside_a_block", lambda: odd_tail(32))  # 64 values a program, QB 128
    record("experts_gate_up", lambda: experts("gate_up", True, torch.bfloat16))
    record("experts_down", lambda: experts("down", True, torch.bfloat16))
    record("experts_no_dq_down", lambda: experts("down", False, torch.bfloat16))
    record("experts_fp16_down", lambda: experts("down", True, torch.float16))

    packed, state, ref = quantized("dq64_bf16", seed=0)
    swapped = (packed >> 4) | (packed << 4)
    record("swapped_nibbles", lambda: compare(dequantize("dq64_bf16", swapped, state), ref))

    def shifted(nested: bool) -> dict:
        case = "dq64_bf16" if nested else "no_dq64_fp32"
        packed, state, ref = quantized(case, seed=0)
        state.absmax = torch.roll(state.absmax, 1)  # uint8 codes with double quantization
        return compare(dequantize(case, packed, state), ref)

    record("shifted_scales", lambda: shifted(False))
    record("shifted_nested_scales", lambda: shifted(True))
    return out


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run through pytest, or with TRITON_INTERPRET=1")
    print(json.dumps(_run_cases()))
