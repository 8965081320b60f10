"""Embedded presets, checkpoint checks, 4-bit loading and LoRA targets on the native DeepseekV2 classes."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch

from finetune.errors import UserError
from finetune.model import adapters
from finetune.model.load import embedded_checkpoint, load_model, load_tokenizer, resolve_source
from finetune.model.tokenizer import build_tokenizer


def test_embedded_weights_are_deterministic_in_the_seed():
    a = load_model(resolve_source("tiny", None), quantization="none", dtype="float32", seed=3)
    b = load_model(resolve_source("tiny", None), quantization="none", dtype="float32", seed=3)
    c = load_model(resolve_source("tiny", None), quantization="none", dtype="float32", seed=4)
    w = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


@pytest.mark.parametrize(
    ("preset", "query"),
    [("tiny", ["q_proj"]), ("tiny-v2", ["q_a_proj", "q_b_proj"])],
)
def test_both_mla_variants_load_in_nf4_with_fp32_router(preset, query):
    model = load_model(resolve_source(preset, None), quantization="nf4", dtype="float32")
    cfg = model.config
    assert cfg.model_type == "deepseek_v2" and cfg.first_k_dense_replace == 1
    attn = model.model.layers[1].self_attn
    for name in [*query, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]:
        assert isinstance(getattr(attn, name), bnb.nn.Linear4bit), name
    moe = model.model.layers[1].mlp
    assert moe.gate.weight.dtype == torch.float32 and not isinstance(moe.gate, torch.nn.Linear)
    assert isinstance(moe.shared_experts.up_proj, bnb.nn.Linear4bit)
    logits = model(torch.tensor([[5, 10, 20, 30]])).logits
    assert logits.shape == (1, 4, cfg.vocab_size) and torch.isfinite(logits).all()
    # transformers 5.25 kernelizes from_pretrained models with Hub kernels by default: ours are not
    assert model.use_kernels is False


def test_nf4_logits_close_to_unquantized():
    source = resolve_source("tiny", None)
    full = load_model(source, quantization="none", dtype="float32")
    quant = load_model(source, quantization="nf4", dtype="float32")
    ids = torch.randint(7, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    a, b = full(ids).logits, quant(ids).logits
    # NF4 perturbs each weight by a few percent and can flip top-k routing; unrelated logits give ~0.
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.9


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("tiny", {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}),
        ("tiny-v2", {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}),
    ],
)
def test_mla_preset_resolves_per_variant_and_never_the_router(preset, expected):
    model = load_model(resolve_source(preset, None), quantization="nf4", dtype="float32")
    names = adapters.resolve_targets(model, ["mla"])
    assert {n.rsplit(".", 1)[-1] for n in names} == expected
    assert len(names) == len(expected) * model.config.num_hidden_layers
    peft_model = adapters.attach(
        model, r=4, alpha=8, dropout=0.0, targets=["mla", "shared_experts", "dense_mlp"]
    )
    wrapped = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert not any(".gate" in n.replace("gate_proj", "") for n in wrapped)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_targets_errors_name_what_exists():
    model = load_model(resolve_source("tiny", None), quantization="none", dtype="float32")
    with pytest.raises(UserError, match="router; it is never wrapped"):
        adapters.resolve_targets(model, ["gate"])
    with pytest.raises(UserError, match=r"`nonexistent` matches no linear module; use a preset \(mla, "):
        adapters.resolve_targets(model, ["nonexistent"])


def test_not_a_deepseek_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    with pytest.raises(UserError, match=r"not a DeepSeek-V2 checkpoint: config\.json has model_type 'llama'"):
        resolve_source(None, str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "weights.bin").write_text("")
    with pytest.raises(UserError, match=r"no config.json \(found: weights.bin\)"):
        resolve_source(None, str(empty))


def test_local_folder_and_hub_id_sources(tmp_path):
    folder = embedded_checkpoint("tiny", 0)
    assert resolve_source(None, str(folder)).kind == "local"
    assert resolve_source(None, "deepseek-ai/DeepSeek-V2-Lite").kind == "hub"  # no network touched
    with pytest.raises(UserError, match="folder not found"):
        resolve_source(None, str(tmp_path / "missing"))


def test_tokenizer_roundtrip_and_chat_template():
    tok = build_tokenizer()
    text = "reverse: abcd"
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(chat, tokenize=False) == "<|user|>hi<|assistant|>yo</s>"
    assert load_tokenizer(resolve_source("tiny", None)).chat_template == tok.chat_template
