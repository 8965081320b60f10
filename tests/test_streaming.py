"""Streamed NF4 experts: the same packed weights as quantize-after-load, without the 16-bit experts."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from finetune.family import MODELING as modeling
from finetune.model.experts import NF4Experts, quantize_experts
from finetune.model.load import embedded_checkpoint, load_model, resolve_source
from finetune.model.streaming import PendingExperts


def test_streamed_experts_equal_quantize_after_load(monkeypatch):
    embedded_checkpoint("tiny-v2", 0)  # writing the embedded checkpoint builds a full model once
    built = []
    original_init = modeling.DeepseekV2Experts.__init__

    def spy(self, config):
        built.append(self)
        original_init(self, config)

    monkeypatch.setattr(modeling.DeepseekV2Experts, "__init__", spy)
    streamed = load_model(resolve_source("tiny-v2", None), dtype="float32")
    assert built == [], "the 16-bit experts must never be constructed when loading in NF4"
    monkeypatch.undo()
    assert modeling.DeepseekV2Experts.__name__ == "DeepseekV2Experts"  # the swap is undone
    assert not any(isinstance(m, PendingExperts) for m in streamed.modules())

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    reference = AutoModelForCausalLM.from_pretrained(
        embedded_checkpoint("tiny-v2", 0), dtype=torch.float32, quantization_config=bnb
    )
    assert quantize_experts(reference, compute_dtype=torch.float32) == 2
    for layer in (1, 2):
        a, b = streamed.model.layers[layer].mlp.experts, reference.model.layers[layer].mlp.experts
        assert isinstance(a, NF4Experts)
        theirs = b.state_dict()
        for name, tensor in a.state_dict().items():
            assert torch.equal(tensor, theirs[name]), name
    ids = torch.tensor([[5, 20, 30, 40, 50, 60]])
    torch.testing.assert_close(streamed(ids).logits, reference(ids).logits, rtol=0, atol=0)
