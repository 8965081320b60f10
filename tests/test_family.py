"""The family seam declares what the rest of the code asks of DeepSeek-V2, and it is true of the model."""

from __future__ import annotations

import torch

from finetune import family
from finetune.model.load import load_model, resolve_source
from finetune.model.presets import EMBEDDED, preset_config


def test_every_config_field_named_is_a_field_of_the_family_config():
    for preset in EMBEDDED:
        config = preset_config(preset).to_dict()
        assert [f for f in family.CONFIG_FIELDS if f not in config] == [], preset
        assert config["model_type"] in family.MODEL_TYPES


def test_the_classes_are_the_loaded_model_s():
    model = load_model(resolve_source("tiny", None), quantization="none", dtype="float32")
    kinds = {type(m) for m in model.modules()}
    assert isinstance(model, family.CausalLM) and isinstance(model, family.PreTrainedModel)
    for cls in (family.DecoderLayer, family.Attention, family.MLP, family.Moe, family.Experts, family.Router):
        assert cls in kinds, cls
    assert family.RMSNorm in kinds
    assert family.MODELING.DeepseekV2Experts is family.Experts


def test_presets_select_the_modules_they_name():
    model = load_model(resolve_source("tiny-v2", None), quantization="none", dtype="float32")
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    mla = family.preset_modules("mla", linears)
    assert {n.rsplit(".", 1)[1] for n in mla} == {
        "q_a_proj",
        "q_b_proj",
        "kv_a_proj_with_mqa",
        "kv_b_proj",
        "o_proj",
    }
    shared = family.preset_modules("shared_experts", linears)
    assert shared and all(".mlp.shared_experts." in n for n in shared)
    dense = family.preset_modules("dense_mlp", linears)
    assert dense and not set(dense) & set(shared) and all(".layers.0.mlp." in n for n in dense)
    assert family.preset_modules("routed_experts", linears) == []
    assert set(family.TARGET_PRESETS) == {"mla", "shared_experts", "dense_mlp", "routed_experts"}
