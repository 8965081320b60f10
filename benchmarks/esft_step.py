"""ESFT on DeepSeek-V2-Lite shapes (random weights built on the GPU): the scoring pass, and one SFT step
of ESFT-token against NF4 + LoRA on every routed expert.

Measured in one process:
  scoring        `finetune.model.esft.score` over `--rows` rows of `--score-seq` tokens (default 32 × 4,096),
                 one row per forward, every token counted: seconds, tokens/s, peak memory
Then per variant, each on a freshly built model (linears NF4 through bitsandbytes, routed experts in NF4,
gradient checkpointing, AdamW over the trainable tensors, trainable tensors in bf16 as TRL casts them):
  all-expert-lora   expert LoRA r=16 on every routed expert of every MoE layer (today's `routed_experts`)
  esft-token        ESFT `train: full`: the experts the token selection ratio chooses (p 0.2, on the
                    scoring rows) as trainable 16-bit copies, every other expert NF4 and frozen
  esft-token-lora   ESFT `train: lora`: expert LoRA r=16 on the same experts only
Each: the median step time over `--steps` steps after one warm-up, tokens/s, peak memory (allocated, and
reserved) and the trainable parameters. Random routers route about uniformly, so the selection is about
p × E experts a layer (13 of 64 for V2-Lite at p 0.2), more than a real task's skewed routing picks.

    PYTHONUNBUFFERED=1 python benchmarks/esft_step.py --out esft.json [--layers 27] [--steps 3]

`--device cpu --preset tiny` is a dry run of the same code on the CPU (no memory figures). The JSON goes to
`--out`, or to `$OUT/esft_step.json` when `$OUT` is set and `--out` is not given.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
import traceback

import torch
from moe_qlora import quantize_linears
from transformers import DeepseekV2ForCausalLM

from finetune.compat import bitsandbytes as compat_bnb
from finetune.model import adapters
from finetune.model import esft as scoring
from finetune.model.experts import NF4Experts, quantize_experts
from finetune.model.presets import preset_config

VARIANTS = ("all-expert-lora", "esft-token", "esft-token-lora")


def build(layers: int, preset: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    compat_bnb.install_cpu_kernels()  # as the toolkit's loader does: bitsandbytes' CPU path, its numbers
    cfg = preset_config(preset)
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekV2ForCausalLM._from_config(cfg, dtype=dtype)
    quantize_linears(model, dtype, device)
    quantize_experts(model, compute_dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, NF4Experts) and device != "cuda":
            module.use_grouped_mm = True  # the CUDA path's structure (torch's kernel runs on the CPU)
    return model


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak(device: str) -> dict:
    if device != "cuda":
        return {}
    return {
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 3),
    }


def _reset(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure_scoring(
    model: torch.nn.Module, rows: int, seq: int, vocab: int, device: str
) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(rows):
        ids = torch.randint(3, vocab, (1, seq), generator=generator)
        batches.append((ids, None, torch.ones_like(ids, dtype=torch.bool)))
    _reset(device)
    _sync(device)
    start = time.perf_counter()
    scores = scoring.score(model, batches)
    _sync(device)
    seconds = time.perf_counter() - start
    result = {
        "rows": rows,
        "seq": seq,
        "tokens": scores["tokens"],
        "seconds": round(seconds, 3),
        "tokens_per_s": round(scores["tokens"] / seconds, 1),
        **_peak(device),
    }
    return result, scores


def prepare(
    model: torch.nn.Module, variant: str, selection: dict[int, list[int]], dtype: torch.dtype
) -> None:
    layers = adapters.expert_layers(model)
    for index, layer in layers.items():
        if variant == "all-expert-lora":
            layer.add_lora(r=16, alpha=32)
        elif variant == "esft-token":
            layer.add_full(selection[index])
        else:
            layer.add_lora(r=16, alpha=32, experts=selection[index])
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()


def measure_step(
    variant: str, args: argparse.Namespace, selection: dict[int, list[int]], dtype: torch.dtype
) -> dict:
    _reset(args.device)
    model = build(args.layers, args.preset, args.device, dtype)
    prepare(model, variant, selection, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), generator=generator).to(
        args.device
    )
    times = []
    for step in range(args.steps + 1):
        _sync(args.device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(args.device)
        if step:  # the first step warms up (allocator, kernels)
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    result = {
        "variant": variant,
        "trainable_params": sum(p.numel() for p in trainable),
        "experts_trained": sum(len(ids) for ids in selection.values())
        if variant != "all-expert-lora"
        else None,
        "step_s": round(median, 4),
        "tokens_per_s": round(args.batch * args.seq / median, 1),
        "loss": float(loss.detach()),
        **_peak(args.device),
    }
    del model, optimizer, trainable
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=32, help="scoring rows")
    parser.add_argument("--score-seq", type=int, default=4096, help="tokens per scoring row")
    parser.add_argument("--p", type=float, default=0.2, help="token-ratio threshold of the selection")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--preset", default="v2-lite")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    out = args.out or os.path.join(os.environ.get("OUT", "."), "esft_step.json")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    model = build(args.layers, args.preset, args.device, dtype)
    score_result, scores = measure_scoring(
        model, args.rows, args.score_seq, model.config.vocab_size, args.device
    )
    selection = scoring.select(scores["token"], args.p)
    first = next(iter(adapters.expert_layers(model).values()))
    per_expert = 3 * first.hidden_dim * first.intermediate_dim
    score_result["selection"] = scoring.summary(selection, per_expert, first.num_experts)
    del model
    print(json.dumps({"scoring": score_result}), flush=True)

    runs = []
    for variant in args.variants.split(","):
        try:
            runs.append(measure_step(variant, args, selection, dtype))
        except Exception as err:  # one variant's failure (out of memory) must not lose the others
            traceback.print_exc()
            runs.append({"variant": variant, "error": f"{type(err).__name__}: {err}"[:500]})
        print(json.dumps(runs[-1]), flush=True)
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "layers": args.layers,
        "batch": args.batch,
        "seq": args.seq,
        "p": args.p,
        "scoring": score_result,
        "runs": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
