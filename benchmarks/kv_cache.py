"""KV-cache bytes per generated token of transformers' DeepseekV2 on the real shapes, measured.

MLA can cache either each layer's expanded keys and values (num_heads × (qk_nope + qk_rope) and
num_heads × v_head_dim per token) or only its compressed latent (kv_lora_rank + qk_rope per token). This
builds the model with its real shapes but ONE decoder layer (random bf16 weights, CPU), generates,
measures the cache tensors transformers keeps, and scales by the layer count; the latent size is beside
it (ratio 1.0: the cache holds the latent).

    python benchmarks/kv_cache.py --out kv.json
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import DeepseekV2ForCausalLM

from finetune.model.presets import preset_config


def measure(shape: str, prompt: int = 32, new: int = 8) -> dict:
    cfg = preset_config(shape)
    layers = cfg.num_hidden_layers
    cfg.num_hidden_layers = 1
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, prompt))
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, return_dict_in_generate=True
        )
    cache = out.past_key_values
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None and t.numel()]
    tokens = tensors[0].shape[-2]
    per_layer = sum(t.numel() * t.element_size() for t in tensors) / tokens
    latent = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2  # bf16 bytes of MLA's cached latent
    return {
        "shape": shape,
        "layers": layers,
        "cached_tokens": tokens,
        "cache_tensor_shapes": [list(t.shape) for t in tensors],
        "bytes_per_token_per_layer": per_layer,
        "bytes_per_token": per_layer * layers,
        "mla_latent_bytes_per_token": latent * layers,
        "ratio": per_layer / latent,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", nargs="+", default=["v2-lite", "v2"])
    args = parser.parse_args()
    results = [measure(s) for s in args.shapes]
    print(json.dumps(results, indent=2))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
