"""Whole-layer NF4 dequantization on DeepSeek-V2-Lite shapes: bitsandbytes vs the Triton kernel.

One MoE layer's routed experts (E=64, H=2048, I=1408: gate_up [64, 2816, 2048], down [64, 2048, 1408]),
random bf16 weights quantized on the device as `NF4Experts` stores them (bitsandbytes NF4 of the
flattened tensor, blocksize 64, double quantization: uint8 absmax, fp32 absmax2 per 256 blocks). Each
weight is dequantized to --dtype (bf16) as:

  bnb_dequantize_4bit       bitsandbytes.functional.dequantize_4bit (what NF4Experts runs today)
  nf4_dequant               finetune.kernels.nf4_dequant.nf4_dequantize, default (block, num_warps)
  nf4_dequant[block=B,warps=W]  one row per swept launch config (--configs): bytes a program, warps

Times are CUDA events around one call, median of --iters after --warmup, each call queued behind a GPU
sleep so the host's launch cost is not counted. `gb_s` is (bytes read + bytes written) over the median
time, the same logical bytes for every variant: packed nibbles, uint8 absmax, fp32 absmax2 read, the
output written (bitsandbytes' extra pass over its decoded fp32 absmax is not counted). `equal` says
whether the output is bitsandbytes' bit for bit. Each row is printed and the JSON (--out) rewritten
after every measurement.

    PYTHONUNBUFFERED=1 python benchmarks/nf4_dequant.py --out nf4_dequant.json

A smoke run on a CPU (tiny shapes, the kernel under Triton's interpreter, one call each):

    TRITON_INTERPRET=1 python benchmarks/nf4_dequant.py --smoke --out /tmp/nf4_dequant_smoke.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable

import bitsandbytes.functional as bnbf
import torch
from timing import record_error, results_head, time_fn  # benchmarks/ is on sys.path when this script runs

from finetune.kernels import nf4_dequant

# block (bytes a program) x num_warps
CONFIGS = "1024x4,2048x4,2048x8,4096x8,8192x8"
SMOKE_SHAPES = "4x80x64,4x64x40"  # gate_up-like, and down-like rows that straddle 64-value blocks


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in s.split("x")) for s in text.split(",") if s.strip()]


def parse_configs(text: str) -> list[tuple[int, int]]:
    """--configs as (block, num_warps): "2048x4,4096x8" -> [(2048, 4), (4096, 8)]."""
    configs = []
    for item in (c.strip() for c in text.split(",") if c.strip()):
        block, warps = item.split("x")
        configs.append((int(block), int(warps)))
    return configs


def moved_bytes(state: bnbf.QuantState, dtype: torch.dtype) -> int:
    """Bytes read (nibbles, absmax, absmax2) plus bytes written (the output) by one dequantization."""
    numel = math.prod(state.shape)
    read = (numel + 1) // 2 + state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        read += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return read + numel * dtype.itemsize


def variants(
    packed: torch.Tensor, state: bnbf.QuantState, dtype: torch.dtype, configs: list[tuple[int, int]]
) -> dict[str, Callable[[], torch.Tensor]]:
    """variant -> a call returning the dequantized tensor (the reference first)."""
    fns: dict[str, Callable[[], torch.Tensor]] = {
        "bnb_dequantize_4bit": lambda: bnbf.dequantize_4bit(packed, state),
        "nf4_dequant": lambda: nf4_dequant.nf4_dequantize(packed, state, dtype),
    }
    for block, warps in configs:
        label = f"nf4_dequant[block={block},warps={warps}]"
        fns[label] = lambda b=block, w=warps: nf4_dequant.nf4_dequantize(
            packed, state, dtype, block=b, num_warps=w
        )
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="nf4_dequant.json")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (needs TRITON_INTERPRET=1)")
    parser.add_argument("--smoke", action="store_true", help="--device cpu, tiny shapes, one call each")
    parser.add_argument("--shapes", default="64x2816x2048,64x2048x1408", help="gate_up,down of V2-Lite")
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--configs", default=CONFIGS, help="swept launch configs, BLOCKxWARPS,...")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--sleep-cycles", type=int, default=2_000_000, help="GPU sleep queued before each call"
    )
    args = parser.parse_args()
    if args.smoke:
        args.device, args.iters, args.warmup = "cpu", 1, 0
        if args.shapes == parser.get_default("shapes"):
            args.shapes = SMOKE_SHAPES
        if args.configs == CONFIGS:
            args.configs = "64x2,128x4"
    cuda = args.device.startswith("cuda")
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--device cpu runs the kernel under Triton's interpreter: set TRITON_INTERPRET=1")
    if not cuda:
        from finetune.compat.bitsandbytes import (
            install_cpu_kernels,  # exact plain-torch CPU 4-bit ops: the reference
        )

        install_cpu_kernels()

    dtype = getattr(torch, args.dtype)
    results = results_head(args, torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET=1)")
    results["default_config"] = {"block": nf4_dequant.BLOCK, "num_warps": nf4_dequant.NUM_WARPS}

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)

    gen = torch.Generator(args.device).manual_seed(0)
    for shape in parse_shapes(args.shapes):
        w = torch.randn(*shape, generator=gen, device=args.device, dtype=torch.bfloat16) * 0.02
        packed, state = bnbf.quantize_4bit(
            w, blocksize=args.blocksize, compress_statistics=not args.no_double_quant, quant_type="nf4"
        )
        del w
        state.dtype = dtype
        nbytes = moved_bytes(state, dtype)
        log(
            f"== {list(shape)} blocksize {args.blocksize} nested {state.nested} -> {args.dtype}: {nbytes / 1e6:.1f} MB moved"
        )
        ref = None
        for variant, fn in variants(packed, state, dtype, parse_configs(args.configs)).items():
            row = {"shape": list(shape), "variant": variant}
            try:
                row.update(time_fn(fn, cuda, args.iters, args.warmup, args.sleep_cycles if cuda else 0))
                row["gb_s"] = round(nbytes / (row["median_ms"] * 1e-3) / 1e9, 1)
                y = fn()
                if variant == "bnb_dequantize_4bit":  # the reference, timed first
                    ref = y.clone()
                if ref is not None:
                    row["equal"] = torch.equal(y, ref)
            except Exception as err:
                record_error(results, row, err, cuda)
            results["runs"].append(row)
            save()
            log(json.dumps(row))
        del packed, state, ref
        if cuda:
            torch.cuda.empty_cache()
    results["speedup_vs_bnb"] = summarize(results["runs"])
    save()
    log(json.dumps({"speedup_vs_bnb": results["speedup_vs_bnb"]}, indent=1))
    log(f"wrote {args.out}")


def summarize(runs: list[dict]) -> dict:
    """Per shape: bitsandbytes' median_ms over the default kernel's and over the best swept config's."""
    table: dict = {}
    for shape in dict.fromkeys(tuple(r["shape"]) for r in runs):
        mine = {
            r["variant"]: r["median_ms"] for r in runs if tuple(r["shape"]) == shape and r.get("median_ms")
        }
        base = mine.pop("bnb_dequantize_4bit", None)
        if not base or not mine:
            continue
        best = min(mine, key=mine.get)
        entry = {"best": best, "best_ms": mine[best], f"vs {best}": round(base / mine[best], 2)}
        if "nf4_dequant" in mine:
            entry["vs nf4_dequant"] = round(base / mine["nf4_dequant"], 2)
        table["x".join(map(str, shape))] = entry
    return table


if __name__ == "__main__":
    main()
