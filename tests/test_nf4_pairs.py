"""The NF4 pair GEMV of the decode step (`finetune.kernels.nf4_pairs`) against the weights bitsandbytes
decodes: under Triton's interpreter on the CPU (a child process, as tests/test_kernels.py), and compiled
on CUDA under the `gpu` mark."""

from __future__ import annotations

import textwrap

import pytest
import torch

from tests import interpreter

CHECK = textwrap.dedent(
    """
    import torch
    from finetune.kernels.nf4_pairs import nf4_pair_gemv
    from finetune.fast import decode
    from finetune.kernels import nf4_torch
    from finetune.model.experts import NF4Experts
    from tests.test_experts import tiny_model

    experts = tiny_model().model.layers[1].mlp.experts
    for double_quant in (True, False):
        module = NF4Experts.from_experts(experts, blocksize=32, double_quant=double_quant,
                                         compute_dtype=torch.float32)
        assert decode.kernel_layout(module)
        g = torch.Generator().manual_seed(0)
        ids = torch.tensor([3, 0, 7, 3, 5])  # a repeated expert, any order
        for name, k in (("gate_up", 64), ("down", 32)):
            x = torch.randn(len(ids), k, generator=g)
            ref = decode.pair_products(x, decode.expert_weights(module, name, ids))
            got = decode.kernel_pair_products(module, name, x, ids)
            assert got.shape == ref.shape, (got.shape, ref.shape)
            err = (got - ref).abs().max().item() / ref.abs().max().item()
            assert err < 1e-5, (name, double_quant, err)
            # Other tiles, whole steps among them (K a multiple of BLOCK_K: one or two scales a row
            # and step, broadcast over their values; where K is not, the masked path).
            shape = module._shapes[name]
            scales = nf4_torch.expert_block_scales(getattr(module, f"{name}_absmax"),
                                                decode.nested_state(module, name), ids,
                                                shape[1] * shape[2] // module.blocksize)
            code = getattr(module, f"{name}_code").float()
            for tile in ((16, 32, 2, 1), (16, 64, 2, 1), (32, 64, 4, 1), (16, 64, 2, 0)):
                got = nf4_pair_gemv(x, ids, getattr(module, f"{name}_packed"), scales, code, shape,
                                    module.blocksize, tile)
                err = (got - ref).abs().max().item() / ref.abs().max().item()
                assert err < 1e-5, (name, double_quant, tile, err)
    print("ok")
    """
)


@pytest.mark.skipif(interpreter.unusable() is not None, reason=str(interpreter.unusable()))
def test_pair_gemv_matches_the_decoded_weights_under_the_interpreter():
    done = interpreter.run(["-c", CHECK])
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_the_kernel_is_taken_only_where_it_applies():
    from finetune.fast import decode
    from finetune.model.experts import NF4Experts, PlainExperts
    from tests.test_experts import tiny_model

    experts = tiny_model().model.layers[1].mlp.experts
    aligned = NF4Experts.from_experts(experts, blocksize=32, compute_dtype=torch.float32)
    assert decode.kernel_layout(aligned)
    # Down's rows (32 values) straddle 64-value blocks; 16-bit experts have no NF4 bytes.
    assert not decode.kernel_layout(NF4Experts.from_experts(experts, blocksize=64))
    assert not decode.kernel_layout(PlainExperts.from_experts(experts))
    with torch.no_grad():
        assert not decode.kernel_applies(aligned, torch.randn(2, 64))  # not on CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lora", [False, True])
def test_few_token_forward_through_the_kernel_on_v2_lite_shapes(lora):
    from transformers.activations import ACT2FN

    from finetune.fast import decode
    from finetune.model.experts import NF4Experts

    torch.manual_seed(0)
    e, h, i = 64, 2048, 1408
    gate_up = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16) * 0.02
    down = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16) * 0.02
    module = NF4Experts.from_weights(gate_up, down, ACT2FN["silu"], compute_dtype=torch.bfloat16)
    if lora:
        module.add_lora(16, 32)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.startswith("lora_"):
                    p.normal_(std=0.02)
    x = torch.randn(3, h, device="cuda", dtype=torch.bfloat16)
    index = torch.stack([torch.randperm(e, device="cuda")[:6] for _ in range(3)])
    weights = torch.rand(3, 6, device="cuda")
    with torch.no_grad():
        assert decode.kernel_applies(module, x)
        got = decode.few_token_forward(module, x, index, weights)
        ref = module(x, index, weights)  # eager grouped path: bnb dequantize + grouped products
    err = (got.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert err < 2e-2, err
