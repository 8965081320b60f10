"""Generation speed on DeepSeek-V2-Lite shapes (random weights built on the GPU): stock stack vs NF4
experts, as the evaluation harness and GRPO generate (transformers `generate`, greedy, EOS ignored).

Variants as in benchmarks/moe_qlora.py (`stock`: bf16 experts through grouped_mm; `nf4-experts`; a `+kernels`
suffix generates as `model.kernels: auto` does: static cache, compiled decode step replayed as our CUDA
graphs, the stopping check read a step late; `+graphs` is that without the late stopping check,
`+compiled` the compiled step through transformers' call, dynamo guards every token; `+expanded` is
`+kernels` with transformers' MLA decode, which expands the cached latent every step, instead of
finetune.fast.absorbed's latent-space one; `+kernels` multiplies the NF4 bytes directly in steps of
more tokens than experts (kernels/nf4_decode.py; `+grouped` a former name), `+dequant` is `+kernels`
dequantizing the layer's experts and calling grouped_mm instead (`compiled_decoding(grouped=False)`, the
default before 2026-11-29); `+absorbed` is a former name of `+kernels`), all
with the NF4 linear layers and LoRA r=16 on MLA, in eval mode. For each batch size: new tokens per second
(prompt 64, 64 new tokens, after one warm-up call, in a decoding block of its own, as a GRPO rollout or
an evaluation starts one: its graph captured anew, `capture_s`), peak GPU memory, and the KV-cache
bytes per token read from the cache `generate` returns. `--repeats N`: N more calls in that block,
which reuse its cache and graph (`new_tokens_per_s_again`: their median).

    PYTHONUNBUFFERED=1 python benchmarks/generate.py --out generate.json [--batches 1,32,128] [--layers 27]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import time

import torch
from moe_qlora import build  # benchmarks/ is on sys.path when this script runs

from finetune.fast import generation


def cache_bytes_per_token(cache, tokens: int, batch: int) -> float:
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors) / (tokens * batch)


@torch.no_grad()
def measure(
    variant: str, layers: int, batches: list[int], prompt: int, new: int, repeats: int = 0
) -> list[dict]:
    base, _, mode = variant.rpartition("+")
    # model.kernels: auto on CUDA, or a twin
    auto = mode in ("kernels", "absorbed", "expanded", "grouped", "dequant")
    fast = auto or mode in ("graphs", "compiled")
    graphs = None if auto or mode == "graphs" else False
    defer = None if auto else False
    absorb = mode != "expanded"
    grouped = False if mode == "dequant" else None  # None: the default, the GEMV on CUDA
    model = build(base if fast else variant, layers, torch.bfloat16)
    decoding = functools.partial(
        generation.compiled_decoding,
        model,
        fast,
        graphs=graphs,
        defer_stop=defer,
        absorb=absorb,
        grouped=grouped,
    )
    model.gradient_checkpointing_disable()
    model.eval()
    rows = []
    top = generation._top(model)
    for batch in batches:
        ids = torch.randint(0, 100_000, (batch, prompt), device="cuda")

        def generate(extra, model=model, ids=ids):
            return model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,  # EOS ignored: every sequence generates `new` tokens
                do_sample=False,
                return_dict_in_generate=True,
                pad_token_id=0,
                **extra,
            )

        def timed(extra):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = generate(extra)
            torch.cuda.synchronize()
            return out, time.perf_counter() - start

        with decoding() as extra:
            _, warmup = timed(extra)  # kernels, allocator, compilation with a static cache
        torch.cuda.reset_peak_memory_stats()
        # A new block, as every GRPO rollout and evaluation starts one: its first call captures the
        # step anew; later calls of the same shape reuse the cache and the graph (`--repeats`).
        with decoding() as extra:
            used = "get_compiled_call" in vars(top)  # whether our CUDA-graph step served the decode
            out, seconds = timed(extra)
            capture = sum(top.get_compiled_call().capture_seconds) if used else 0.0
            again = [timed(extra)[1] for _ in range(repeats)]
        rows.append(
            {
                "variant": variant,
                "batch": batch,
                "new_tokens_per_s": round(batch * new / seconds, 1),
                "seconds": round(seconds, 3),
                "capture_s": round(capture, 3),
                "new_tokens_per_s_again": round(batch * new / statistics.median(again), 1) if again else None,
                "seconds_again": [round(t, 3) for t in again],
                "warmup_s": round(warmup, 1),
                "cuda_graphs": used,
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
    parser.add_argument("--repeats", type=int, default=0, help="more calls in the timed block (cache reused)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    for variant in args.variants.split(","):
        results["runs"] += measure(variant, args.layers, batches, args.prompt, args.new, args.repeats)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
