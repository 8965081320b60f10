"""Where a QLoRA step's GPU time goes with NF4 experts, with and without routed-expert LoRA.

Same setup as moe_qlora.py on fewer layers (default 6), one profiled step after two warm-ups; prints the
top CUDA ops by self time for each variant and writes them as JSON.

    PYTHONUNBUFFERED=1 python benchmarks/profile_expert_lora.py --out profile.json
"""

from __future__ import annotations

import argparse
import json

import torch
from moe_qlora import build
from torch.profiler import ProfilerActivity, profile


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def top_ops(variant: str, layers: int, batch: int, seq: int, rows: int) -> dict:
    model = build(variant, layers, torch.bfloat16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 100_000, (batch, seq), device="cuda")

    for _ in range(2):
        _step(model, opt, ids)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _step(model, opt, ids)
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events)
    out = {
        "variant": variant,
        "cuda_ms_total": round(total / 1e3, 2),
        "top": [
            {"op": e.key[:80], "ms": round(e.self_device_time_total / 1e3, 2), "calls": e.count}
            for e in events[:rows]
        ],
    }
    del model, opt
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="profile.json")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    results = [top_ops(v, args.layers, 4, 2048, args.rows) for v in ("nf4-experts", "nf4-experts+lora")]
    for r in results:
        print(f"== {r['variant']}: {r['cuda_ms_total']} ms CUDA")
        for row in r["top"]:
            print(f"  {row['ms']:8.2f} ms {row['calls']:6d}  {row['op']}")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
