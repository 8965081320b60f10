"""Where a QLoRA training step's GPU time goes, by op category, for the variants of moe_qlora.py.

One profiled step after two warm-ups per variant (same model, batch and shapes as moe_qlora.py). GPU time
is attributed to the innermost aten / custom op that launched each kernel (self device time), so the
categories add up to the step's kernel time without double counting.

    PYTHONUNBUFFERED=1 python benchmarks/profile_step.py --out profile_step.json \
        --variants stock,nf4-experts,nf4-experts+kernels [--layers 27]
"""

from __future__ import annotations

import argparse
import gc
import json

import torch
from moe_qlora import build, step_loss  # benchmarks/ is on sys.path when this script runs
from torch.profiler import ProfilerActivity, profile

# First match wins; patterns are substrings of the op name (aten::mm, bitsandbytes::dequantize_4bit, ...).
CATEGORIES = (
    ("grouped matmul", ("_grouped_mm",)),
    ("4-bit dequant / gemm", ("bitsandbytes::", "dequantize", "gemm_4bit")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("attention", ("attention", "flash", "_efficient")),
    ("fused (compiled / triton)", ("triton", "compiled", "CompiledFunction", "Torch-Compiled")),
    ("optimizer", ("adam", "_foreach", "multi_tensor")),
    (
        "cast / copy",
        ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous", "Memcpy"),
    ),
    ("gather / scatter / sort", ("index", "gather", "scatter", "sort", "searchsorted", "topk", "embedding")),
    ("loss / softmax", ("softmax", "nll", "cross_entropy", "logsumexp")),
    ("reduction", ("aten::sum", "aten::mean", "aten::max", "aten::norm", "aten::cumsum")),
    (
        "elementwise",
        (
            "aten::mul",
            "aten::add",
            "aten::sub",
            "aten::div",
            "aten::silu",
            "aten::pow",
            "aten::rsqrt",
            "aten::neg",
            "aten::where",
            "aten::fill_",
            "aten::zero",
            "aten::cat",
            "aten::exp",
            "aten::view_as",
            "aten::masked",
            "aten::threshold",
            "aten::sigmoid",
            "aten::_foreach",
        ),
    ),
)


def category(name: str) -> str:
    lowered = name.lower()
    for label, patterns in CATEGORIES:
        if any(p.lower() in lowered for p in patterns):
            return label
    return "other"


def profile_variant(variant: str, layers: int, batch: int, seq: int, rows: int) -> dict:
    model = build(variant, layers, torch.bfloat16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 100_000, (batch, seq), device="cuda")
    model.train()

    def step(model=model, opt=opt) -> None:
        step_loss(model, ids, variant).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    by_cat: dict[str, float] = {}
    for e in events:
        by_cat[category(e.key)] = by_cat.get(category(e.key), 0.0) + e.self_device_time_total / 1e3
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    out = {
        "variant": variant,
        "layers": layers,
        "gpu_ms": round(sum(by_cat.values()), 1),
        "by_category_ms": {k: round(v, 1) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_ops": [
            {"op": e.key[:90], "ms": round(e.self_device_time_total / 1e3, 2), "calls": e.count}
            for e in events[:rows]
        ],
    }
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="profile_step.json")
    parser.add_argument("--variants", default="stock,nf4-experts")
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    results = []
    for variant in args.variants.split(","):
        r = profile_variant(variant, args.layers, args.batch, args.seq, args.rows)
        results.append(r)
        print(f"== {variant}: {r['gpu_ms']} ms GPU  {json.dumps(r['by_category_ms'])}")
        for row in r["top_ops"]:
            print(f"   {row['ms']:8.2f} ms {row['calls']:6d}  {row['op']}")
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
