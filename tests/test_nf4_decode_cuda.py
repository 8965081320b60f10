"""The NF4 decode GEMV's lookups on CUDA (finetune/kernels/nf4_decode.py), against dequantize + matmul.

The byte-permute lookup (`SELECT = 2`, inline PTX) has no interpreter path, so it is tested here, on a
GPU, next to the select tree. It rounds the NF4 code to bf16 and applies the block's scale to the
partial product, where the reference rounds code * scale: both are bf16-rounded weights, so the bound is
bf16's (max |got - ref| / max |ref| < 1e-2), not bit equality.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _case(n: int, k: int, experts: int, rows: int, double_quant: bool, seed: int):  # type: ignore[no-untyped-def]
    from finetune.compat.bitsandbytes import (
        install_cpu_kernels,  # exact plain-torch CPU 4-bit ops: the reference
    )

    install_cpu_kernels()
    from finetune.fast import decode
    from finetune.model.experts import NF4Experts

    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(experts, n, k, generator=gen) * 0.02
    down = torch.randn(experts, k, n // 2, generator=gen) * 0.02
    module = NF4Experts.from_weights(
        gate_up, down, torch.nn.SiLU(), blocksize=64, double_quant=double_quant, compute_dtype=torch.bfloat16
    ).cuda()
    probs = torch.ones(experts)
    probs[0], probs[1] = 8.0, 0.0  # expert 1 never routed, expert 0 > 16 rows (several row chunks)
    ids = torch.multinomial(probs, rows, replacement=True, generator=gen).sort().values
    offsets = torch.bincount(ids, minlength=experts).cumsum(0).to(torch.int32).cuda()
    x = (torch.randn(rows, k, generator=gen) * 0.5).to(torch.bfloat16).cuda()
    w = module.dequantize("gate_up").float()
    ref = torch.einsum("pk,pnk->pn", x.float(), w[ids.cuda()])
    kwargs = dict(
        x=x,
        offsets=offsets,
        packed=module.gate_up_packed,
        absmax=module.gate_up_absmax,
        nested=decode.nested_state(module, "gate_up"),
        code=module.gate_up_code,
        shape=module._shapes["gate_up"],
        blocksize=64,
    )
    return kwargs, ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("select", [1, 2])
@pytest.mark.parametrize(("n", "k", "double_quant"), [(2816, 2048, True), (208, 192, False), (80, 128, True)])
def test_lookup_matches_dequantize_and_matmul(monkeypatch, select, n, k, double_quant):
    from finetune.kernels import nf4_decode

    kwargs, ref = _case(n, k, experts=8, rows=60, double_quant=double_quant, seed=n)
    monkeypatch.setattr(nf4_decode, "SELECT", select)
    y = nf4_decode.nf4_expert_gemv(**kwargs)
    assert _rel(y, ref) < 1e-2
    # The same check fails on a wrong lookup: nibbles swapped within each byte.
    packed = kwargs["packed"]
    swapped = nf4_decode.nf4_expert_gemv(**{**kwargs, "packed": (packed >> 4) | (packed << 4)})
    assert _rel(swapped, ref) > 0.1
