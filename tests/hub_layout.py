"""A tiny DeepSeek-V2 written the way the deepseek-ai Hub repos (DeepSeek-V2-Lite, DeepSeek-V2) store theirs.

What transformers' own `save_pretrained` writes differs from those repos in ways loading has to undo:

- config.json is the remote-code one: `auto_map` into configuration_deepseek.py / modeling_deepseek.py,
  `rope_scaling` (with the legacy key `type`) instead of `rope_parameters`, `torch_dtype`, and fields the
  native `DeepseekV2Config` has no field for (`aux_loss_alpha`, `seq_aux`, `scoring_func`, `moe_layer_freq`,
  `ep_size`, ...);
- routed experts are one tensor per expert and projection (`mlp.experts.{j}.gate_proj.weight`, ...), where
  transformers 5 keeps two fused 3D parameters per layer (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]);
- the weights are bfloat16 safetensors shards with a `model.safetensors.index.json`, and a shard boundary
  may fall in the middle of a layer's experts;
- the Python files of the remote code sit beside the weights. Here they raise when imported, so a load
  that executes them (trust_remote_code) fails loudly instead of passing by accident.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

from finetune.model.presets import PRESETS
from finetune.model.tokenizer import build_tokenizer

REMOTE_CODE_FILES = ("configuration_deepseek.py", "modeling_deepseek.py")
SHARD_NAMES = ("model-00001-of-000002.safetensors", "model-00002-of-000002.safetensors")

# YaRN as in the Hub configs (factor 40 over 4096 → 163840 positions), scaled to the tiny context:
# factor 4 over 128 → 512, so `max_position_embeddings / original_max_position_embeddings == factor`.
YARN = {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 4,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "original_max_position_embeddings": 128,
}
ROPE_THETA = 10000

# Fields the remote-code config has and the native DeepseekV2Config does not declare.
REMOTE_ONLY = {
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "scoring_func": "softmax",
    "moe_layer_freq": 1,
    "ep_size": 1,
}


def _shape(q_lora_rank: int | None) -> dict:
    """The tiny presets' shapes, with the model-level settings of the Hub repo of that MLA variant."""
    preset = dict(PRESETS["tiny" if q_lora_rank is None else "tiny-v2"])
    for key in ("tie_word_embeddings", "pad_token_id", "q_lora_rank"):
        preset.pop(key)
    shape = {
        **preset,
        # 12 experts, not the presets' 8: with 10 or more, sorting expert keys as text ("10" < "2") and
        # sorting them as numbers disagree, so fusing them in the wrong order cannot pass unnoticed.
        "n_routed_experts": 12,
        "q_lora_rank": q_lora_rank,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": False,
    }
    if q_lora_rank is None:  # DeepSeek-V2-Lite routes greedily over all experts
        shape.update(topk_method="greedy", n_group=1, topk_group=1)
    else:  # DeepSeek-V2 picks the best groups first (8 groups, 3 chosen, over 160 experts)
        shape.update(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.0)
    return shape


def reference_config(q_lora_rank: int | None) -> DeepseekV2Config:
    """The native config that the Hub config.json stands for, with `rope_parameters` and no legacy keys."""
    rope = {"rope_type": "yarn", "rope_theta": float(ROPE_THETA), **YARN}
    return DeepseekV2Config(**_shape(q_lora_rank), rope_parameters=rope)


def hub_config(q_lora_rank: int | None) -> dict:
    """config.json as the deepseek-ai repos ship it (keys sorted, as there)."""
    config = {
        **_shape(q_lora_rank),
        **REMOTE_ONLY,
        "architectures": ["DeepseekV2ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekV2Config",
            "AutoModel": "modeling_deepseek.DeepseekV2Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
        },
        "hidden_act": "silu",
        "model_type": "deepseek_v2",
        "pretraining_tp": 1,
        "rope_scaling": {**YARN, "type": "yarn"},
        "rope_theta": ROPE_THETA,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.39.3",
        "use_cache": True,
    }
    return dict(sorted(config.items()))


def hub_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the Hub's names: one gate/up/down tensor per routed expert, bfloat16."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to(torch.bfloat16)
        fused = re.fullmatch(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)", name)
        if fused is None:
            out[name] = tensor.contiguous()
            continue
        prefix, which = fused.groups()
        for j, weight in enumerate(tensor):  # [E, 2I, H]: gate rows first, then up rows
            if which == "gate_up_proj":
                gate, up = weight.chunk(2, dim=0)
                out[f"{prefix}.{j}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}.{j}.up_proj.weight"] = up.contiguous()
            else:
                out[f"{prefix}.{j}.down_proj.weight"] = weight.contiguous()
    return out


def _natural(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in key.split(".")]


def write_hub_checkpoint(folder: str | Path, *, q_lora_rank: int | None, seed: int = 0) -> torch.nn.Module:
    """Write a seeded random tiny DeepSeek-V2 in the Hub layout to `folder`; return the fp32 reference model.

    The reference holds exactly the checkpoint's values (rounded through bfloat16, as stored), in the
    fused layout of transformers 5, so a correct load gives the same logits.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = DeepseekV2ForCausalLM(reference_config(q_lora_rank)).eval()
    finally:
        torch.random.set_rng_state(state)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16))

    tensors = hub_state_dict(model)
    keys = sorted(tensors, key=_natural)
    # The first shard ends in the middle of layer 1's routed experts, as real shard boundaries may.
    cut = keys.index("model.layers.1.mlp.experts.6.down_proj.weight")
    shards = {SHARD_NAMES[0]: keys[:cut], SHARD_NAMES[1]: keys[cut:]}
    weight_map = {}
    for shard, names in shards.items():
        save_file({k: tensors[k] for k in names}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    (folder / "config.json").write_text(json.dumps(hub_config(q_lora_rank), indent=2) + "\n")
    generation = {
        "_from_model_config": True,
        "bos_token_id": model.config.bos_token_id,
        "eos_token_id": model.config.eos_token_id,
        "do_sample": True,
        "temperature": 0.3,
        "top_p": 0.95,
        "transformers_version": "4.39.3",
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name in REMOTE_CODE_FILES:
        (folder / name).write_text(
            f'raise RuntimeError("{name} was imported: remote code must never run (trust_remote_code)")\n'
        )
    _write_tokenizer(folder)
    return model


def _write_tokenizer(folder: Path) -> None:
    """The embedded tokenizer, with its chat template inside tokenizer_config.json as in the Hub repos.

    transformers 5 writes the template to chat_template.jinja instead. The Hub repos also name
    `LlamaTokenizerFast` there, over a ByteLevel tokenizer.json; the embedded character-level tokenizer is
    not ByteLevel, so it keeps the class it was saved with (see test_hub_layout for the ByteLevel case).
    """
    build_tokenizer().save_pretrained(folder)
    template = folder / "chat_template.jinja"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template.read_text()
    template.unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
