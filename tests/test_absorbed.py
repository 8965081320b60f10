"""MLA decode steps in latent space (`finetune.fast.absorbed`) against transformers' expanded attention:
the same logits step by step on the tiny NF4 model with LoRA on MLA (fp32: to rounding), both MLA
variants, adapters on and off; `effective_weight` is the weight each kind of layer applies."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from finetune.fast import absorbed
from finetune.model import adapters
from finetune.model.load import load_model, resolve_source


def _lora_model(preset: str, dropout: float = 0.0, attn: str | None = None):
    base = load_model(resolve_source(preset, None), dtype="float32", attn_implementation=attn)
    model = adapters.attach(base, r=8, alpha=16, dropout=dropout, targets=["mla"])
    with torch.no_grad():  # B starts at zero: give every LoRA a value
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model.eval()


def _inputs(model, batch=3, length=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "do_sample": False,
        "pad_token_id": 0,
        "max_new_tokens": 6,
        "cache_implementation": "static",
        "disable_compile": True,
        "return_dict_in_generate": True,
        "output_logits": True,
    }


def _steps(model, on: bool):
    with absorbed.absorbed(model, on) as patched:
        out = model.generate(**_inputs(model))
    return patched, out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize(
    "preset,attn",  # q_proj / q_a_proj + q_b_proj (V2); sdpa's boolean mask / eager's additive one
    [("tiny", None), ("tiny-v2", None), ("tiny", "eager")],
)
def test_latent_decode_gives_the_expanded_logits(preset, attn, monkeypatch):
    model = _lora_model(preset, attn=attn)
    count, plain, plain_logits = _steps(model, False)
    latent_steps = []
    weight = absorbed.effective_weight
    monkeypatch.setattr(absorbed, "effective_weight", lambda *a: latent_steps.append(1) or weight(*a))
    patched, fast, fast_logits = _steps(model, True)
    layers = model.config.num_hidden_layers
    assert count == 0 and patched == layers
    assert len(latent_steps) == layers * 5  # every decode step of every layer (6 new tokens, 5 fed back)
    assert torch.equal(fast, plain)
    err = (fast_logits - plain_logits).abs().max() / plain_logits.abs().max()
    assert err < 1e-5, err
    # ... and with the adapter off, the base weights only (GRPO's reference model, say)
    with model.disable_adapter():
        _, base, base_logits = _steps(model, False)
        _, fast_base, fast_base_logits = _steps(model, True)
    assert not torch.allclose(base_logits, plain_logits)  # the adapter mattered
    assert torch.equal(fast_base, base)
    assert (fast_base_logits - base_logits).abs().max() / base_logits.abs().max() < 1e-5
    assert not any("forward" in vars(m) for m in model.modules() if type(m).__name__ == "DeepseekV2Attention")


def test_effective_weight_is_what_each_layer_applies():
    model = _lora_model("tiny", dropout=0.1)
    layer = model.base_model.model.model.layers[0].self_attn.kv_b_proj
    x = torch.randn(4, layer.in_features)
    for on in (True, False):  # adapters on, then disabled
        with torch.no_grad(), contextlib.nullcontext() if on else model.disable_adapter():
            weight = absorbed.effective_weight(layer, torch.float32)
            torch.testing.assert_close(x @ weight.T, layer(x), rtol=1e-5, atol=1e-5)
    base = layer.get_base_layer()
    assert type(base).__name__ == "Linear4bit"
    torch.testing.assert_close(
        x @ absorbed.effective_weight(base, torch.float32).T, base(x), rtol=1e-5, atol=1e-5
    )
    plain = nn.Linear(8, 4, bias=False)
    assert torch.equal(absorbed.effective_weight(plain, torch.float32), plain.weight)
    # What it cannot reproduce it refuses: LoRA dropout while training, a bias, a merged adapter.
    model.train()
    assert absorbed.effective_weight(layer, torch.float32) is None
    model.eval()
    assert absorbed.effective_weight(nn.Linear(8, 4), torch.float32) is None
    with pytest.warns(UserWarning, match="rounding"):  # PEFT's note on merging into 4 bits
        layer.merge()
    assert absorbed.effective_weight(layer, torch.float32) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_decode_in_latent_space():
    """On CUDA in bf16 through our graphs: the first decode step's logits as the expanded attention's,
    to bf16 rounding (later steps may follow other tokens where two logits nearly tie)."""
    from finetune.fast import generation

    base = load_model(resolve_source("tiny", None), dtype="bfloat16").cuda()
    model = adapters.attach(base, r=8, alpha=16, dropout=0.0, targets=["mla"]).eval()
    kwargs = {k: v for k, v in _inputs(model).items() if k not in ("cache_implementation", "disable_compile")}
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    logits = []
    for absorb in (False, True):
        with generation.compiled_decoding(model, True, absorb=absorb) as extra:
            assert "get_compiled_call" in vars(generation._top(model))
            logits.append(model.generate(**kwargs, **extra).logits[1].float())  # the first decode step
    err = (logits[1] - logits[0]).abs().max() / logits[0].abs().max()
    assert err < 2e-2, err
