"""Model shapes known by name: the embedded tiny models (random, seeded) and the real shapes for benchmarks."""

from __future__ import annotations

from typing import Any

from finetune import family

# Both MLA variants are covered: `tiny` has no query compression (like V2-Lite), `tiny-v2` has
# q_lora_rank set (like V2), so q_a_proj / q_a_layernorm / q_b_proj exist.
_TINY: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    # Eight narrow heads rather than four wide ones: with more heads, LoRA reliably finds the
    # position-copying heads of the toy task (4 heads stalled on a plateau for about half the seeds).
    num_attention_heads=8,
    num_key_value_heads=8,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    kv_lora_rank=32,
    q_lora_rank=None,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    max_position_embeddings=512,
    # Tied embeddings and a wider init give a random model logits large enough that LoRA alone
    # visibly learns a toy task within a CPU minute; the default 0.02 leaves the softmax near uniform.
    tie_word_embeddings=True,
    initializer_range=0.1,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# DeepSeek-V2-Lite and DeepSeek-V2 shapes (from the deepseek-ai configs), for random-weight benchmarks.
_V2_LITE: dict[str, Any] = dict(
    vocab_size=102400,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=27,
    first_k_dense_replace=1,
    num_attention_heads=16,
    num_key_value_heads=16,
    n_routed_experts=64,
    n_shared_experts=2,
    num_experts_per_tok=6,
    kv_lora_rank=512,
    q_lora_rank=None,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    max_position_embeddings=163840,
    bos_token_id=100000,
    eos_token_id=100001,
)
_V2: dict[str, Any] = {
    **_V2_LITE,
    "hidden_size": 5120,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 60,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 160,
    "num_experts_per_tok": 6,
    "q_lora_rank": 1536,
    "topk_method": "group_limited_greedy",
    "n_group": 8,
    "topk_group": 3,
    "routed_scaling_factor": 16.0,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _TINY,
    "tiny-v2": {**_TINY, "q_lora_rank": 24},
    "v2-lite": _V2_LITE,
    "v2": _V2,
}

# Presets small enough to build on the fly; the large ones exist for benchmarks with random weights.
EMBEDDED = ("tiny", "tiny-v2")


def preset_config(name: str) -> family.Config:
    """The family's config of a named preset."""
    return family.Config(**PRESETS[name])
