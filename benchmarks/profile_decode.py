"""Where a decode step's GPU time goes with `model.kernels: auto` (static cache, compiled decode step).

V2-Lite shapes as generate.py (NF4 experts, LoRA r=16 on MLA, eval mode). One `generate` call compiles,
a second one (prompt 64, `--new` tokens) is profiled: kernels by name with their count and time per
decode step, the step's wall time, and whether the time is on the GPU at all (kernel ms vs wall ms).

    PYTHONUNBUFFERED=1 python benchmarks/profile_decode.py --out decode.json [--batch 1] [--layers 27]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from moe_qlora import build  # benchmarks/ is on sys.path when this script runs
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from finetune.fast import generation


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="decode.json")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    model = build("nf4-experts", args.layers, torch.bfloat16)
    model.gradient_checkpointing_disable()
    model.eval()
    ids = torch.randint(0, 100_000, (args.batch, 64), device="cuda")

    @torch.no_grad()
    def run() -> None:
        with generation.compiled_decoding(model, True) as extra:
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new,
                min_new_tokens=args.new,
                do_sample=False,
                pad_token_id=0,
                **extra,
            )
        torch.cuda.synchronize()

    start = time.perf_counter()
    run()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    run()
    wall_ms = (time.perf_counter() - start) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
    kernels = [
        e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0
    ]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    cpu_ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    out = {
        "batch": args.batch,
        "new_tokens": args.new,
        "compile_s": round(compile_s, 1),
        "wall_ms_per_token": round(wall_ms / args.new, 2),
        "gpu_ms_per_token": round(gpu_ms / args.new, 2),
        "kernels_per_token": round(sum(e.count for e in kernels) / args.new, 1),
        "top_kernels": [
            {
                "kernel": e.key[:110],
                "ms_per_token": round(e.self_device_time_total / 1e3 / args.new, 3),
                "calls_per_token": round(e.count / args.new, 1),
            }
            for e in kernels[: args.rows]
        ],
        "top_cpu": [
            {"op": e.key[:90], "ms_per_token": round(e.self_cpu_time_total / 1e3 / args.new, 3)}
            for e in cpu_ops[:15]
        ],
    }
    print(json.dumps(out, indent=1))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
