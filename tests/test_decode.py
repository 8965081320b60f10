"""Few-token routed experts (decode.py): bit-exact NF4 decoding and parity with NF4Experts.forward."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch

from finetune.fast import decode
from finetune.kernels import nf4_torch
from finetune.model.experts import NF4Experts, PlainExperts
from tests.test_experts import tiny_model


@pytest.mark.parametrize("double_quant", [True, False])
def test_gathered_weights_equal_bitsandbytes_dequantization(double_quant):
    torch.manual_seed(0)
    weight = torch.randn(6, 64, 128)
    packed, state = bnbf.quantize_4bit(
        weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4"
    )
    nested = (
        (state.state2.absmax, state.state2.code, state.offset, state.state2.blocksize)
        if double_quant
        else None
    )
    ids = torch.tensor([5, 0, 3, 3])
    got = nf4_torch.gathered_weights(
        packed, state.absmax, nested, state.code, (6, 64, 128), ids, 64, torch.float32
    )
    assert torch.equal(got, bnbf.dequantize_4bit(packed, state)[ids])


def _routing(tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 64, generator=g)
    index = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(tokens)])
    return x, index, torch.rand(tokens, 2, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora", [None, [0, 2, 5], "all"])
@pytest.mark.parametrize("kind", [NF4Experts, PlainExperts])
def test_few_token_forward_matches_the_grouped_forward(dtype, lora, kind):
    experts = tiny_model().model.layers[1].mlp.experts
    module = (
        kind.from_experts(experts, compute_dtype=dtype) if kind is NF4Experts else kind.from_experts(experts)
    )
    if lora is not None:
        module.add_lora(4, 8, experts=None if lora == "all" else lora)
        with torch.no_grad():  # B starts at zero: give the delta a value to check
            for name, p in module.named_parameters():
                if name.startswith("lora_"):
                    p.normal_(std=0.5)
    for tokens in (1, 3):
        x, index, weights = _routing(tokens, seed=tokens)
        ref, got = module(x, index, weights), decode.few_token_forward(module, x, index, weights)
        assert ref.abs().max() > 0.05
        # The same products in another order: fp32 rounding, or one bf16 ulp of the result.
        scale = ref.abs().max().item()
        tol = (1e-5 if dtype == torch.float32 else 1e-2) * scale
        torch.testing.assert_close(got, ref, atol=tol, rtol=0)
    module.lora_enabled = False
    if lora is not None:
        torch.testing.assert_close(
            decode.few_token_forward(module, x, index, weights), module(x, index, weights), atol=tol, rtol=0
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_few_token_forward_matches_eager(dtype):
    """Compiled (as a decode step is), the pair products are a fused product-and-sum over the decoded
    bytes instead of a batched matmul: the same values up to summation order."""
    experts = tiny_model().model.layers[1].mlp.experts
    module = NF4Experts.from_experts(experts, compute_dtype=dtype)
    module.add_lora(4, 8, experts=[0, 2, 5])
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("lora_"):
                p.normal_(std=0.5)
    compiled = torch.compile(decode.few_token_forward, fullgraph=True)
    for tokens in (1, 3):
        x, index, weights = _routing(tokens, seed=tokens)
        ref, got = decode.few_token_forward(module, x, index, weights), compiled(module, x, index, weights)
        scale = ref.abs().max().item()
        tol = (1e-5 if dtype == torch.float32 else 1e-2) * scale
        torch.testing.assert_close(got, ref, atol=tol, rtol=0)
