"""finetune.fast.linear4bit: a bitsandbytes Linear4bit through our dequantize op, against bitsandbytes'
own forward (on the CPU both dequantize with bitsandbytes: the results must agree bit for bit)."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from finetune.fast import linear4bit


def _layer(dtype: torch.dtype, *, bias: bool, nested: bool) -> bnb.nn.Linear4bit:
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    layer = bnb.nn.Linear4bit(64, 48, bias=bias, compute_dtype=dtype, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, quant_type="nf4", compress_statistics=nested
    )
    if bias:
        layer.bias = nn.Parameter(torch.randn(48, generator=torch.Generator().manual_seed(1)))
    return layer.to("cpu")  # bitsandbytes quantizes on the first move to a device


def _lora(dtype: torch.dtype, *, bias: bool, nested: bool) -> nn.Module:
    model = get_peft_model(
        nn.Sequential(_layer(dtype, bias=bias, nested=nested)),
        LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.0),
    )
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero: give A a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model.to(dtype)


def _run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = model(x)
    out.float().square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("bias", "nested"), [(False, True), (True, False)])
def test_patched_layer_matches_bitsandbytes_bit_for_bit(dtype, bias, nested):
    model = _lora(dtype, bias=bias, nested=nested)
    base = model.base_model.model[0].base_layer
    assert linear4bit.supported(base)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    want = _run(model, x)
    linear4bit.patch(base)
    got = _run(model, x)
    linear4bit.unpatch(base)
    assert "forward" not in base.__dict__
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert set(got[2]) == set(want[2]) and len(got[2]) == 2  # the LoRA factors, nothing of the base
    assert all(torch.equal(got[2][n], g) for n, g in want[2].items())


def test_backward_keeps_no_16_bit_copy_of_the_weight():
    layer = _layer(torch.bfloat16, bias=False, nested=True)
    linear4bit.patch(layer)
    saved: list[torch.Size] = []
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = layer(x)
    assert torch.Size([48, 64]) not in saved  # only the packed bytes and scales
    out.sum().backward()
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    torch.testing.assert_close(out.detach(), x.detach() @ weight.T, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, torch.ones_like(out) @ weight, rtol=0, atol=0)


def test_one_row_without_gradient_keeps_bitsandbytes_path(monkeypatch):
    layer = _layer(torch.bfloat16, bias=False, nested=True)
    linear4bit.patch(layer)
    calls = []
    original = linear4bit._NF4Linear.apply
    monkeypatch.setattr(linear4bit._NF4Linear, "apply", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        layer(torch.randn(1, 64, dtype=torch.bfloat16))
        assert calls == []  # a decode step: bitsandbytes' GEMV
        layer(torch.randn(2, 64, dtype=torch.bfloat16))
    assert calls == [1]


def test_only_nf4_linear4bit_is_supported():
    fp4 = bnb.nn.Linear4bit(64, 48, bias=False, quant_type="fp4")
    fp4.weight = bnb.nn.Params4bit(torch.randn(48, 64), requires_grad=False, quant_type="fp4")
    assert not linear4bit.supported(fp4.to("cpu"))
    assert not linear4bit.supported(nn.Linear(4, 4))
    assert not linear4bit.supported(bnb.nn.Linear4bit(64, 48, quant_type="nf4"))  # not quantized yet


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("nested", [False, True])
def test_patched_layer_on_cuda_matches_bitsandbytes_bit_for_bit(nested):
    """On CUDA the Triton dequantize kernel runs: same bits as bitsandbytes' kernel, so the same outputs."""
    model = _lora(torch.bfloat16, bias=True, nested=nested).cuda()
    base = model.base_model.model[0].base_layer
    x = torch.randn(4, 300, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).cuda()
    want = _run(model, x)
    linear4bit.patch(base)
    got = _run(model, x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(torch.equal(got[2][n], g) for n, g in want[2].items())
