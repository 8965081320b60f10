"""Peak host memory while loading a DeepSeek-V2 checkpoint in 4-bit: streamed NF4 experts vs quantize-after-load.

Writes a random bf16 checkpoint with large routed experts (default: 8 MoE layers x 64 experts, hidden
1024, expert width 1024: 1.6 GB of bf16 experts), then loads it in a fresh process per variant and
reports the peak resident set size (ru_maxrss):
  after-load   from_pretrained(load_in_4bit) materialises all 16-bit experts, then quantize_experts
  streamed     finetune.model.load.load_model: experts read and quantized one layer at a time

    python benchmarks/load_peak.py [--layers 8] [--experts 64] [--hidden 1024] [--width 1024]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def write_checkpoint(folder: Path, layers: int, experts: int, hidden: int, width: int) -> float:
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    config = DeepseekV2Config(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=width,
        num_hidden_layers=layers + 1,
        first_k_dense_replace=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        n_routed_experts=experts,
        n_shared_experts=1,
        num_experts_per_tok=6,
        kv_lora_rank=128,
        q_lora_rank=None,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
    )
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return layers * experts * 3 * hidden * width * 2 / 1e9


def load(variant: str, folder: str) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from finetune.model.experts import quantize_experts
    from finetune.model.inspect import report
    from finetune.model.load import Source, load_model

    if variant == "streamed":
        model = load_model(Source("local", folder), dtype="bfloat16")
    else:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=bnb)
        quantize_experts(model, compute_dtype=torch.bfloat16)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(
        json.dumps(
            {
                "variant": variant,
                "peak_rss_gb": round(peak, 3),
                "weights_gb": round(report(model)["total"]["bytes"] / 1e9, 3),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        load(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        experts_gb = write_checkpoint(Path(tmp), args.layers, args.experts, args.hidden, args.width)
        print(json.dumps({"bf16_experts_gb": round(experts_gb, 3)}))
        baseline = "import torch, transformers, bitsandbytes, resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss*1024/1e9)"
        libs = float(subprocess.run([sys.executable, "-c", baseline], capture_output=True, text=True).stdout)
        print(json.dumps({"libraries_only_rss_gb": round(libs, 3)}))
        for variant in ("after-load", "streamed"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", variant, tmp], capture_output=True, text=True
            )
            print(out.stdout.strip() or out.stderr[-2000:])


if __name__ == "__main__":
    main()
