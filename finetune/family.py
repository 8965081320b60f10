"""The model family seam: the one module that imports transformers' `deepseek_v2` code.

Everything else asks this module for what it needs of the family: the model types a checkpoint may
declare, the causal-LM and sequence-classification classes, the module classes the model code and the
fast path look for (routed experts, router, MoE block, MLP, attention, RMSNorm, decoder layer), the
module names behind the LoRA target presets, and the config fields the toolkit reads. A second family
is a second module with the same names (docs/architecture.md, "Add a model family").
"""

from __future__ import annotations

from types import ModuleType

from transformers import DeepseekV2Config as Config
from transformers import DeepseekV2ForCausalLM as CausalLM
from transformers import DeepseekV2ForSequenceClassification as SequenceClassification
from transformers.models.deepseek_v2 import modeling_deepseek_v2
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention as Attention
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2DecoderLayer as DecoderLayer
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Experts as Experts
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2MLP as MLP
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe as Moe
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2PreTrainedModel as PreTrainedModel
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RMSNorm as RMSNorm
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter as Router
from transformers.models.deepseek_v2.modeling_deepseek_v2 import apply_rotary_emb

__all__ = [
    "CONFIG_FIELDS",
    "MLA_PROJECTIONS",
    "MLP",
    "MLP_PROJECTIONS",
    "MODELING",
    "MODEL_TYPES",
    "NAME",
    "TARGET_PRESETS",
    "Attention",
    "CausalLM",
    "Config",
    "DecoderLayer",
    "Experts",
    "Moe",
    "PreTrainedModel",
    "RMSNorm",
    "Router",
    "SequenceClassification",
    "apply_rotary_emb",
    "preset_modules",
]

NAME = "DeepSeek-V2"
MODEL_TYPES = ("deepseek_v2",)  # config.json `model_type` values this family loads
# transformers' modeling module: `model.streaming` builds models with the experts class swapped in it
# (through `finetune.compat`), so it is named here rather than imported elsewhere.
MODELING: ModuleType = modeling_deepseek_v2
# The class names a saved sequence classifier's config.json declares (`model.export`).
SEQUENCE_CLASSIFICATION_ARCHITECTURE = "DeepseekV2ForSequenceClassification"

# Multi-head latent attention: `q_proj` (q_lora_rank null, V2-Lite) or `q_a_proj`/`q_b_proj` (V2).
MLA_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # dense MLP and shared experts (SwiGLU)
TARGET_PRESETS = ("mla", "shared_experts", "dense_mlp", "routed_experts")

# The config fields the toolkit reads (shapes of the experts and router, the MLA ranks, the head).
CONFIG_FIELDS = (
    "model_type",
    "hidden_size",
    "hidden_act",
    "num_hidden_layers",
    "first_k_dense_replace",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "intermediate_size",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "num_attention_heads",
    "vocab_size",
    "tie_word_embeddings",
    "pad_token_id",
)


def preset_modules(preset: str, linears: list[str]) -> list[str]:
    """The full names, among the model's linear modules `linears`, that a target preset selects
    (`routed_experts` is not a linear module: the experts' own LoRA, none here)."""

    def tail(name: str) -> str:
        return name.rsplit(".", 1)[-1]

    if preset == "mla":
        return [n for n in linears if ".self_attn." in n and tail(n) in MLA_PROJECTIONS]
    if preset == "shared_experts":
        return [n for n in linears if ".mlp.shared_experts." in n and tail(n) in MLP_PROJECTIONS]
    if preset == "dense_mlp":
        return [n for n in linears if n.endswith(tuple(f".mlp.{p}" for p in MLP_PROJECTIONS))]
    return []
