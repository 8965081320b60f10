"""Generation speed on DeepSeek-V2-Lite shapes (random weights built on the GPU): stock stack vs NF4
experts, as the evaluation harness and GRPO generate (transformers `generate`, greedy, EOS ignored).

Variants as in benchmarks/moe_qlora.py (`stock`: bf16 experts through grouped_mm; `nf4-experts`), both
with the NF4 linear layers and LoRA r=16 on MLA, in eval mode. For each batch size: new tokens per second
(prompt 64, 64 new tokens, after one warm-up call), peak GPU memory, and the KV-cache bytes per token
read from the cache `generate` returns.

    PYTHONUNBUFFERED=1 python benchmarks/generate.py --out generate.json [--batches 1,32,128] [--layers 27]
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from moe_qlora import build  # benchmarks/ is on sys.path when this script runs


def static_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """NF4Experts.forward with no data-dependent shape, so the decode step compiles into one graph."""
    from finetune.model import decode
    from finetune.model.experts import _grouped_linear

    num_tokens, top_k = top_k_index.shape
    if num_tokens * top_k <= self.num_experts:
        return decode.few_token_forward(self, hidden_states, top_k_index, top_k_weights)
    ids = top_k_index.reshape(-1)
    sorted_ids, perm = torch.sort(ids, stable=True)
    ends = torch.arange(1, self.num_experts + 1, device=ids.device)
    offsets = torch.searchsorted(sorted_ids, ends).to(torch.int32)
    x = hidden_states.to(self.compute_dtype)[perm // top_k]
    every = torch.arange(self.num_experts, device=ids.device)
    gate_up = _grouped_linear(x, decode.expert_weights(self, "gate_up", every), offsets, None)
    gate, up = gate_up.chunk(2, dim=-1)
    y = _grouped_linear(self.act_fn(gate) * up, decode.expert_weights(self, "down", every), offsets, None)
    y = y.float() * top_k_weights.reshape(-1)[perm].float().unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return y[inverse].view(num_tokens, top_k, self.hidden_dim).sum(dim=1).to(hidden_states.dtype)


def cache_bytes_per_token(cache, tokens: int, batch: int) -> float:
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors) / (tokens * batch)


@torch.no_grad()
def measure(variant: str, layers: int, batches: list[int], prompt: int, new: int) -> list[dict]:
    static = variant.endswith("+static")
    model = build(variant.removesuffix("+static"), layers, torch.bfloat16)
    if static:
        from finetune.model.experts import NF4Experts

        NF4Experts.forward = static_experts_forward
    model.gradient_checkpointing_disable()
    model.eval()
    rows = []
    for batch in batches:
        ids = torch.randint(0, 100_000, (batch, prompt), device="cuda")

        def run(model=model, ids=ids):
            return model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,  # EOS ignored: every sequence generates `new` tokens
                do_sample=False,
                return_dict_in_generate=True,
                pad_token_id=0,
                **({"cache_implementation": "static"} if static else {}),
            )

        torch.cuda.synchronize()
        start = time.perf_counter()
        run()  # warm-up: kernels, allocator, compilation with a static cache
        torch.cuda.synchronize()
        warmup = time.perf_counter() - start
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = run()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append(
            {
                "variant": variant,
                "batch": batch,
                "new_tokens_per_s": round(batch * new / seconds, 1),
                "seconds": round(seconds, 3),
                "warmup_s": round(warmup, 1),
                "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
                "kv_bytes_per_token": cache_bytes_per_token(out.past_key_values, prompt + new - 1, batch),
            }
        )
        print(json.dumps(rows[-1]))
        del out
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="generate.json")
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--variants", default="stock,nf4-experts")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    for variant in args.variants.split(","):
        results["runs"] += measure(variant, args.layers, batches, args.prompt, args.new)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
