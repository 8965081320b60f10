"""Where a QLoRA training step's GPU time goes, by op category, for the variants of moe_qlora.py.

One profiled step after two warm-ups per variant (same model, batch and shapes as moe_qlora.py). GPU time
is summed over the kernels, by kernel name; `step_ms` is the same step unprofiled, so step_ms - gpu_ms
is time the GPU waits for the host (launches, Python, synchronizations).

    PYTHONUNBUFFERED=1 python benchmarks/profile_step.py --out profile_step.json \
        --variants stock,nf4-experts,nf4-experts+kernels [--layers 27]
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from moe_qlora import build, step_loss  # benchmarks/ is on sys.path when this script runs
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# Kernel names, first match wins (case-insensitive substrings).
CATEGORIES = (
    ("grouped matmul", ("groupproblemshape", "grouped")),
    ("4-bit dequant / gemm", ("kdequantize", "gemm_4bit", "kgemm")),
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas")),
    ("fused: inductor", ("triton_",)),
    ("loss (cross-entropy / TRL head)", ("_forward_kernel", "_backward_kernel", "nll_loss", "softmax")),
    ("optimizer", ("multi_tensor", "adam")),
    ("cast / copy", ("copy_kernel", "memcpy", "memset", "catarraybatchedcopy")),
    ("gather / scatter / sort", ("index", "gather", "scatter", "sort", "radix", "cub::", "search")),
    ("reduction", ("reduce_kernel",)),
    ("elementwise", ("elementwise", "functor")),
)


def category(name: str) -> str:
    lowered = name.lower()
    for label, patterns in CATEGORIES:
        if any(p.lower() in lowered for p in patterns):
            return label
    return "other"


def host_profile(step, rows: int) -> list[dict]:
    """The host's time in one step by Python function (cProfile, own time): where a step whose GPU
    waits for the host (step_ms > gpu_ms) spends it."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    step()
    torch.cuda.synchronize()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, prim, own, cumulative, callers)
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:rows]
    return [
        {
            "function": f"{f.rsplit('/', 2)[-1]}:{line} {name}",
            "own_ms": round(v[2] * 1e3, 1),
            "calls": v[0],
            "cumulative_ms": round(v[3] * 1e3, 1),
        }
        for (f, line, name), v in top
    ]


def gpu_gaps(step, rows: int) -> dict:
    """Where the GPU idles inside one step: the gaps between its kernels, with the host calls that ran
    while it waited (CUDA runtime calls such as synchronizations, and aten ops, by time inside gaps), and
    the synchronizing calls `torch.cuda.set_sync_debug_mode` reports, with their callers."""
    import warnings

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    gaps, busy_end = [], kernels[0][0]
    for start, end in kernels:
        if start > busy_end:
            gaps.append((busy_end, start))
        busy_end = max(busy_end, end)
    span = busy_end - kernels[0][0]
    in_gaps: dict[str, float] = {}
    host = [e for e in events if e.device_type == DeviceType.CPU]
    wide = [(g0, g1) for g0, g1 in gaps if g1 - g0 >= 50]
    for e in host:
        # Time inside gaps of at least 50 us (inclusive: nested ops count in their parents too).
        for g0, g1 in wide:
            overlap = min(e.time_range.end, g1) - max(e.time_range.start, g0)
            if overlap > 0:
                in_gaps[e.name] = in_gaps.get(e.name, 0.0) + overlap
    syncs: dict[str, int] = {}
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
        torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" not in str(w.message):
            continue
        key = f"{str(w.message)[:60]} @ {w.filename.rsplit('/', 2)[-1]}:{w.lineno}"
        syncs[key] = syncs.get(key, 0) + 1
    big = sorted((g1 - g0 for g0, g1 in gaps), reverse=True)
    return {
        "kernel_span_ms": round(span / 1e3, 1),
        "idle_ms": round(sum(g1 - g0 for g0, g1 in gaps) / 1e3, 1),
        "gaps_over_1ms": sum(1 for g in big if g >= 1000),
        "largest_gaps_ms": [round(g / 1e3, 2) for g in big[:10]],
        "host_in_gaps_ms": {
            k: round(v / 1e3, 1) for k, v in sorted(in_gaps.items(), key=lambda kv: -kv[1])[:rows]
        },
        "syncs": syncs,
    }


def profile_variant(
    variant: str, layers: int, batch: int, seq: int, rows: int, python_rows: bool = False, gaps: bool = False
) -> dict:
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
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    host = host_profile(step, rows) if python_rows else None
    idle = gpu_gaps(step, rows) if gaps else None
    # Kernels only: the device events, each counted once.
    events = [
        e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0
    ]
    by_cat: dict[str, float] = {}
    for e in events:
        by_cat[category(e.key)] = by_cat.get(category(e.key), 0.0) + e.self_device_time_total / 1e3
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    out = {
        "variant": variant,
        "layers": layers,
        "step_ms": round(wall_ms, 1),
        "gpu_ms": round(sum(by_cat.values()), 1),
        "kernels": sum(e.count for e in events),
        "by_category_ms": {k: round(v, 1) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "host_functions": host,
        "gpu_gaps": idle,
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
    parser.add_argument("--host", action="store_true", help="also one step under cProfile (host time)")
    parser.add_argument("--gaps", action="store_true", help="also where the GPU idles in one step, and syncs")
    args = parser.parse_args()
    results = []
    for variant in args.variants.split(","):
        r = profile_variant(variant, args.layers, args.batch, args.seq, args.rows, args.host, args.gaps)
        results.append(r)
        print(
            f"== {variant}: step {r['step_ms']} ms, kernels {r['gpu_ms']} ms ({r['kernels']})  {json.dumps(r['by_category_ms'])}"
        )
        for row in r["top_ops"]:
            print(f"   {row['ms']:8.2f} ms {row['calls']:6d}  {row['op']}")
        for row in r["host_functions"] or []:
            print(
                f"   host {row['own_ms']:8.1f} ms own {row['cumulative_ms']:8.1f} cum {row['calls']:6d}  {row['function']}"
            )
        if r["gpu_gaps"]:
            print("   gaps", json.dumps(r["gpu_gaps"]))
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
