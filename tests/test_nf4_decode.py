"""The NF4 decode GEMV (finetune/kernels/nf4_decode.py) against bitsandbytes' dequantize + matmul.

The Triton kernel runs on a CPU only under its interpreter, chosen by `TRITON_INTERPRET=1` when kernels
are decorated (at import); as in test_kernels.py, those cases run in one child process (this file as a
script) that prints one JSON object, and the tests read it. The plain-torch fallback (a CPU tensor, no
interpreter), the fake (meta) output and the input errors run in this process.

Weights are quantized by bitsandbytes itself (`NF4Experts` or `quantize_4bit` of the flattened [E, N, K]
tensor) and the reference is `x_g @ W_g.T` with W from `dequantize_4bit`. Routing is top-k over skewed
random probabilities with one expert never picked and one picked by most tokens (> 16 rows: the kernel's
row loop runs several chunks); N is never a multiple of the interpreter's 32-column tile but in one case.
Errors are max |got - ref| / max |ref|: fp32 1e-5 (only summation order differs), bf16 5e-3 (the output
rounded to bf16). The bf16 weight rounding itself is checked exactly: rows of the identity read the
weight back, which must equal bitsandbytes' bf16 `dequantize_4bit` bit for bit.
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

TOL = {"float32": 1e-5, "bfloat16": 5e-3}
# name: (E, N, K, blocksize, double quant, tokens, top-k, dtype, via NF4Experts)
CASES = {
    "experts_dq": (4, 80, 128, 64, True, 20, 2, "float32", True),
    "no_dq": (5, 72, 192, 64, False, 24, 2, "float32", False),
    "one_row": (4, 40, 64, 64, True, 1, 1, "float32", False),
    "blocksize_128": (3, 48, 256, 128, True, 22, 2, "float32", False),
    "n_multiple_of_tile": (4, 64, 128, 64, False, 20, 2, "float32", False),
    "experts_bf16": (4, 80, 128, 64, True, 20, 2, "bfloat16", True),
}


def build(case: str, seed: int):  # type: ignore[no-untyped-def]
    """(kwargs of nf4_expert_gemv, fp32 reference y, per-expert row counts) for one case."""
    import bitsandbytes.functional as bnbf
    import torch

    from finetune.compat.bitsandbytes import (
        install_cpu_kernels,  # exact plain-torch CPU 4-bit ops: the reference
    )

    install_cpu_kernels()
    from finetune.model.experts import NF4Experts

    e, n, k, qb, dq, tokens, top_k, dtype_name, via_module = CASES[case]
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seed)
    if via_module:  # gate_up [E, 2I, H] of a real NF4Experts; down [E, H, I] would have K = I
        gate_up, down = torch.randn(e, n, k, generator=gen), torch.randn(e, k, n // 2, generator=gen)
        module = NF4Experts.from_weights(
            gate_up, down, torch.nn.SiLU(), blocksize=qb, double_quant=dq, compute_dtype=dtype
        )
        packed, absmax, code = (getattr(module, f"gate_up_{p}") for p in ("packed", "absmax", "code"))
        nested = None
        if dq:
            parts = (getattr(module, f"gate_up_{p}") for p in ("absmax2", "code2", "offset"))
            nested = (*parts, module._nested_blocksize["gate_up"])
        w = module.dequantize("gate_up", dtype).float()
    else:
        packed, state = bnbf.quantize_4bit(
            torch.randn(e, n, k, generator=gen), blocksize=qb, compress_statistics=dq, quant_type="nf4"
        )
        absmax, code = state.absmax, state.code
        nested = (
            (state.state2.absmax, state.state2.code, state.offset, state.state2.blocksize) if dq else None
        )
        state.dtype = dtype
        w = bnbf.dequantize_4bit(packed, state).float()
    # Top-k routing over skewed probabilities: expert 1 never, expert 0 by most tokens.
    probs = torch.ones(e)
    probs[0], probs[1] = 8.0, 0.0
    ids = torch.stack([torch.multinomial(probs, top_k, generator=gen) for _ in range(tokens)]).reshape(-1)
    counts = torch.bincount(ids, minlength=e)
    offsets = counts.cumsum(0).to(torch.int32)
    x = torch.randn(len(ids), k, generator=gen).to(dtype)  # the rows, sorted by expert
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    ref = torch.cat([x[starts[g] : ends[g]].float() @ w[g].t() for g in range(e)])
    kwargs = dict(
        x=x, offsets=offsets, packed=packed, absmax=absmax, nested=nested, code=code, shape=(e, n, k), blocksize=qb
    )  # fmt: skip
    return kwargs, ref, counts.tolist()


def identity_case():  # type: ignore[no-untyped-def]
    """(kwargs, expected y): one-hot bf16 rows, so y[p] is column c_p of the bf16 weight of p's expert."""
    import bitsandbytes.functional as bnbf
    import torch

    from finetune.compat.bitsandbytes import (
        install_cpu_kernels,  # exact plain-torch CPU 4-bit ops: the reference
    )

    install_cpu_kernels()

    e, n, k = 3, 40, 128
    gen = torch.Generator().manual_seed(7)
    packed, state = bnbf.quantize_4bit(
        torch.randn(e, n, k, generator=gen), blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    state.dtype = torch.bfloat16
    w = bnbf.dequantize_4bit(packed, state)
    counts = [20, 0, 5]
    experts = torch.repeat_interleave(torch.arange(e), torch.tensor(counts))
    cols = torch.randint(0, k, (len(experts),), generator=gen)
    x = torch.nn.functional.one_hot(cols, k).to(torch.bfloat16)
    nested = (state.state2.absmax, state.state2.code, state.offset, state.state2.blocksize)
    kwargs = dict(
        x=x,
        offsets=torch.tensor(counts).cumsum(0).to(torch.int32),
        packed=packed,
        absmax=state.absmax,
        nested=nested,
        code=state.code,
        shape=(e, n, k),
        blocksize=64,
    )
    return kwargs, w[experts, :, cols]


def rel(a, b) -> float:  # type: ignore[no-untyped-def]
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


@pytest.fixture(scope="module")
def interpreted() -> dict:
    proc = interpreter.run([__file__])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("lookup", ["", "/table"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_bitsandbytes(interpreted, case, lookup):
    got = interpreted[case + lookup]
    assert "error" not in got, got.get("error")
    assert got["dtype"] == CASES[case][7]
    assert got["rel"] <= TOL[got["dtype"]], f"{case}: relative error {got['rel']:.3g}"


def test_routing_covers_the_edge_cases(interpreted):
    counts = interpreted["experts_dq"]["counts"]
    assert 0 in counts and max(counts) > 16  # an empty expert, an expert over several 16-row chunks
    assert sum(interpreted["one_row"]["counts"]) == 1
    assert CASES["experts_dq"][1] % 32 and not CASES["n_multiple_of_tile"][1] % 32


@pytest.mark.parametrize("lookup", ["", "/table"])
def test_kernel_bf16_weight_is_bitsandbytes_bit_for_bit(interpreted, lookup):
    assert interpreted["identity_bf16" + lookup] == {"equal": True, "nonzero": True}


def test_kernel_comparison_can_fail(interpreted):
    # The same weights with the two nibbles of each byte swapped, or every block's scale shifted by one
    # block, are far off: the comparison sees a wrong nibble order or scale indexing.
    assert interpreted["swapped_nibbles"] > 0.1
    assert interpreted["shifted_scales"] > 0.1


@pytest.mark.parametrize("case", list(CASES))
def test_torch_fallback_matches_bitsandbytes(case):
    import torch

    from finetune.kernels.nf4_decode import nf4_expert_gemv

    assert os.environ.get("TRITON_INTERPRET") != "1"
    kwargs, ref, _ = build(case, seed=list(CASES).index(case))
    y = nf4_expert_gemv(**kwargs)
    assert y.shape == ref.shape and y.dtype == kwargs["x"].dtype
    assert rel(y, ref) <= TOL[CASES[case][7]]
    assert not torch.equal(y, torch.zeros_like(y))


def test_torch_fallback_bf16_weight_is_bitsandbytes_bit_for_bit():
    import torch

    from finetune.kernels.nf4_decode import nf4_expert_gemv

    kwargs, expected = identity_case()
    assert torch.equal(nf4_expert_gemv(**kwargs), expected)


def test_fake_output_and_compiled_graph():
    import torch

    from finetune.kernels.nf4_decode import nf4_expert_gemv

    def to_meta(value):  # type: ignore[no-untyped-def]
        if isinstance(value, tuple):  # nested, shape
            return tuple(to_meta(v) for v in value)
        return value.to("meta") if isinstance(value, torch.Tensor) else value

    kwargs, ref, _ = build("experts_dq", seed=0)
    meta = {key: to_meta(value) for key, value in kwargs.items()}
    y = nf4_expert_gemv(**meta)
    assert y.device.type == "meta" and tuple(y.shape) == tuple(ref.shape)
    # One opaque op: dynamo traces the wrapper with no graph break (fullgraph) and the fake gives shapes.
    fixed = {k: v for k, v in kwargs.items() if k not in ("x", "offsets")}
    compiled = torch.compile(
        lambda x, offsets: nf4_expert_gemv(x, offsets, **fixed), fullgraph=True, backend="aot_eager"
    )
    assert rel(compiled(kwargs["x"], kwargs["offsets"]), ref) <= 1e-5


def test_input_errors():
    import torch

    from finetune.kernels.nf4_decode import nf4_expert_gemv
    from finetune.model.experts import NF4Experts

    kwargs, _, _ = build("no_dq", seed=1)
    # down [E, H, I] with I = 40: K not a multiple of the blocksize, so the caller must fall back.
    module = NF4Experts.from_weights(torch.randn(2, 80, 64), torch.randn(2, 64, 40), torch.nn.SiLU())
    bad = {
        "K": dict(
            x=torch.randn(3, 40),
            offsets=torch.tensor([1, 3], dtype=torch.int32),
            packed=module.down_packed,
            absmax=module.down_absmax,
            nested=(module.down_absmax2, module.down_code2, module.down_offset, 256),
            code=module.down_code,
            shape=(2, 64, 40),
            blocksize=64,
        ),
        "offsets_dtype": {**kwargs, "offsets": kwargs["offsets"].long()},
        "x_width": {**kwargs, "x": kwargs["x"][:, :64]},
        "blocksize": {**kwargs, "blocksize": 48},
    }
    for name, args in bad.items():
        try:
            nf4_expert_gemv(**args)
        except ValueError:
            continue
        pytest.fail(f"{name}: no ValueError")


# ----------------------------------------------------------------------------- wiring


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("i", [64, 32])  # 32: down's rows are not whole blocks, so it keeps the old path
def test_experts_without_gradients_multiply_the_nf4_bytes_when_asked(monkeypatch, lora, i):
    """`NF4Experts.grouped_kernel` (compiled decoding's `grouped=True`): steps without gradients go
    through `nf4_expert_gemv` (here its plain-torch CPU path) with the same outputs as dequantize +
    grouped product, expert LoRA added on top; with gradients the flag changes nothing."""
    import torch

    from finetune.kernels import nf4_decode
    from finetune.model.experts import NF4Experts

    gen = torch.Generator().manual_seed(3)
    e, h = 6, 64
    module = NF4Experts.from_weights(
        torch.randn(e, 2 * i, h, generator=gen), torch.randn(e, h, i, generator=gen), torch.nn.SiLU()
    )
    if lora:
        module.add_lora(4, 8.0)
        for name, p in module.named_parameters():
            if name.endswith("_B"):
                p.data.normal_(generator=gen)
    x = torch.randn(10, h, generator=gen)
    ids = torch.stack([torch.randperm(e, generator=gen)[:2] for _ in range(10)])
    weights = torch.rand(10, 2, generator=gen)
    calls = []
    kernel = nf4_decode.nf4_expert_gemv
    monkeypatch.setattr(nf4_decode, "nf4_expert_gemv", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    with torch.no_grad():
        plain = module(x, ids, weights)
        module.mode.grouped_kernel = True
        fast = module(x, ids, weights)
    assert len(calls) == (2 if i == 64 else 1)  # gate_up and down, or gate_up only
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert fast.abs().max() > 0.1
    x.requires_grad_(True)
    module(x, ids, weights).sum().backward()  # with gradients: the autograd path
    assert len(calls) == (2 if i == 64 else 1) and x.grad is not None
    many = torch.randn(32 * e // 2 + 1, h, generator=gen)  # over 32 rows an expert: a prefill's rows
    with torch.no_grad():
        module(many, torch.randint(0, e, (len(many), 2), generator=gen), torch.rand(len(many), 2))
    assert len(calls) == (2 if i == 64 else 1)


def test_compiled_decoding_asks_for_the_grouped_kernel_on_cuda_or_when_told():
    from finetune.fast import generation
    from finetune.model.experts import NF4Experts
    from finetune.model.load import load_model, resolve_source

    model = load_model(resolve_source("tiny", None), dtype="float32")
    experts = [m for m in model.modules() if isinstance(m, NF4Experts)]
    with generation.compiled_decoding(model, True, graphs=False):
        assert experts and not any(m.mode.grouped_kernel for m in experts)  # default: on CUDA only
    with generation.compiled_decoding(model, True, graphs=False, grouped=True):
        assert all(m.mode.grouped_kernel for m in experts)
    with generation.compiled_decoding(model, True, graphs=False, grouped=False):
        assert not any(m.mode.grouped_kernel for m in experts)
    assert not any(m.mode.grouped_kernel for m in experts)


# ----------------------------------------------------------------------------- the child process


def _run_cases() -> dict:
    import torch

    from finetune.kernels import nf4_decode
    from finetune.kernels.nf4_decode import nf4_expert_gemv

    out: dict = {}
    default = nf4_decode.SELECT  # byte permutes have no interpreter path: the launcher takes the tree
    for select in (True, False):  # NF4 values by the select tree, then by table loads
        nf4_decode.SELECT = select
        suffix = "" if select else "/table"
        for seed, case in enumerate(CASES):
            try:
                kwargs, ref, counts = build(case, seed)
                y = nf4_expert_gemv(**kwargs)
                dtype = str(y.dtype).removeprefix("torch.")
                out[case + suffix] = {"rel": rel(y, ref), "counts": counts, "dtype": dtype}
            except Exception:
                out[case + suffix] = {"error": traceback.format_exc()}

        kwargs, expected = identity_case()
        y = nf4_expert_gemv(**kwargs)
        equal = torch.equal(y, expected)
        out["identity_bf16" + suffix] = {"equal": equal, "nonzero": bool(expected.abs().sum() > 0)}
    nf4_decode.SELECT = default

    kwargs, ref, _ = build("no_dq", seed=1)
    packed = kwargs["packed"]
    out["swapped_nibbles"] = rel(nf4_expert_gemv(**{**kwargs, "packed": (packed >> 4) | (packed << 4)}), ref)
    out["shifted_scales"] = rel(nf4_expert_gemv(**{**kwargs, "absmax": torch.roll(kwargs["absmax"], 1)}), ref)
    return out


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run through pytest, or with TRITON_INTERPRET=1")
    print(json.dumps(_run_cases()))
