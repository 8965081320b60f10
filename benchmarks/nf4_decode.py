"""MoE decode products on DeepSeek-V2-Lite shapes: the NF4 GEMV kernel vs today's two paths.

One MoE layer's routed experts (E=64, H=2048, I=1408: gate_up [E, 2I, H], down [E, H, I]), random
weights built on the device and quantized by `NF4Experts.from_weights` (bitsandbytes NF4, blocksize 64,
double quantization). For 1, 32 and 128 decode tokens routed top-6 by a skewed random router (some experts
hot, some cold), the (token, expert) rows sorted by expert, each weight's product y_g = x_g @ W_g.T is
timed as:

  nf4_gemv            finetune.kernels.nf4_decode.nf4_expert_gemv (autotuned; first_call_s includes tuning)
  nf4_gemv_graph      the same call captured once in a CUDA graph and replayed (no host sync inside)
  dequant+grouped_mm  bnb dequantize_4bit of the whole layer, then torch grouped_mm with offs
  gathered+bmm        decode.expert_weights per (token, expert) pair + bmm, in chunks of E // top_k
                      tokens as decode.few_token_forward does (today's eager decode path)
  gathered_compiled   the same under torch.compile (today's compiled decode step); with --with-compiled
  nf4_gemv_compiled   the kernel inside torch.compile(fullgraph=True); with --with-compiled
  nf4_pair            decode.kernel_pair_products: the pair GEMV (finetune.kernels.nf4_pairs) the
                      few-token decode path runs, each pair streaming its own expert, block scales
                      decoded in the call

and the kernel once per tile config of `nf4_decode.CONFIGS` and `GEMV_STEPS` (K step, NF4 lookup by
select tree or table loads; a manual sweep next to the autotuner's pick, which is reported too), the pair GEMV once per tile of `PAIR_TILES` (scales decoded once, outside
the timing). A pair row's `gb_s` counts each pair's expert bytes. Times are CUDA events around one call, median of --iters after --warmup;
each call is queued behind a GPU sleep so the host's launch cost is not counted (nf4_gemv_graph shows
the host-free time of the kernel as a decode step would replay it). `gb_s` is the NF4 bytes of the
experts that have rows (packed nibbles, uint8 absmax, fp32 absmax2), each counted once, over the median
time; `max_rel` is max |y - ref| / max |ref| against dequant+grouped_mm (bf16 rounding: ~1e-2 or less).
Each row is printed and the JSON (--out) is rewritten after every measurement.

    PYTHONUNBUFFERED=1 python benchmarks/nf4_decode.py --out nf4_decode.json [--with-compiled]

A smoke run of the script on a CPU (tiny shapes, the kernel under Triton's interpreter):

    TRITON_INTERPRET=1 python benchmarks/nf4_decode.py --device cpu --experts 4 --hidden 128 \\
        --intermediate 64 --tokens 1,4 --top-k 2 --iters 1 --warmup 0 --out /tmp/nf4_decode_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable

import torch
import triton
from timing import (  # benchmarks/ is on sys.path when this script runs
    record_error,
    results_head,
    route,
    time_fn,
)

from finetune.fast import decode
from finetune.kernels import nf4_decode, nf4_torch
from finetune.kernels.nf4_pairs import nf4_pair_gemv
from finetune.model.experts import NF4Experts

grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm


def log(msg: str) -> None:
    print(msg, flush=True)


def max_rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-12))


def weight_args(module: NF4Experts, name: str) -> dict:
    """The plain arguments of nf4_expert_gemv for weight `name` of an NF4Experts."""
    return dict(
        packed=getattr(module, f"{name}_packed"),
        absmax=getattr(module, f"{name}_absmax"),
        nested=decode.nested_state(module, name),
        code=getattr(module, f"{name}_code"),
        shape=module._shapes[name],
        blocksize=module.blocksize,
    )


def streamed_bytes(module: NF4Experts, name: str, busy: int) -> int:
    """NF4 bytes of `busy` experts of weight `name`: nibbles, uint8 (or fp32) absmax, fp32 absmax2."""
    _, n, k = module._shapes[name]
    blocks = n * k // module.blocksize
    per_expert = n * k // 2 + blocks * getattr(module, f"{name}_absmax").element_size()
    if name in module._nested_blocksize:
        per_expert += blocks // module._nested_blocksize[name] * 4
    return busy * per_expert


def variants(
    module: NF4Experts, name: str, x: torch.Tensor, offsets: torch.Tensor, ids: torch.Tensor, args
) -> dict[str, Callable[[], torch.Tensor]]:
    """variant -> a call returning y [P, N] for the rows x (sorted by expert ids, ends `offsets`)."""
    kw = weight_args(module, name)
    chunk = max(1, module.num_experts // args.top_k) * args.top_k  # pairs per few_token_forward chunk

    def gathered(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        parts = zip(x.split(chunk), ids.split(chunk), strict=True)
        return torch.cat(
            [decode.pair_products(xc, decode.expert_weights(module, name, ic)) for xc, ic in parts]
        )

    out: dict[str, Callable[[], torch.Tensor]] = {
        "dequant+grouped_mm": lambda: grouped_mm(x, module.dequantize(name).transpose(-2, -1), offs=offsets),
        "nf4_gemv": lambda: nf4_decode.nf4_expert_gemv(x, offsets, **kw),
        "gathered+bmm": lambda: gathered(x, ids),
    }
    if args.device.startswith("cuda"):
        out["nf4_gemv_graph"] = graphed(lambda: nf4_decode.nf4_expert_gemv(x, offsets, **kw))
    if args.with_compiled:
        gathered_c = torch.compile(gathered, fullgraph=True, dynamic=False)
        kernel_c = torch.compile(
            lambda x, offsets: nf4_decode.nf4_expert_gemv(x, offsets, **kw), fullgraph=True, dynamic=False
        )
        out["gathered_compiled"] = lambda: gathered_c(x, ids)
        out["nf4_gemv_compiled"] = lambda: kernel_c(x, offsets)
    for cfg in [*nf4_decode.CONFIGS, *GEMV_STEPS]:
        label = "nf4_gemv[BLOCK_N={},warps={},stages={},BLOCK_K={},select={}]".format(
            cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages,
            cfg.kwargs.get("BLOCK_K", nf4_decode.BLOCK_K), int(cfg.kwargs.get("SELECT", nf4_decode.SELECT)),
        )  # fmt: skip
        out[label] = lambda cfg=cfg: nf4_decode._launch(x, offsets, **kw, config=cfg)
    # The pair GEMV the few-token decode path runs (each pair streams its own expert), scales included.
    out["nf4_pair"] = lambda: decode.kernel_pair_products(module, name, x, ids)
    # The tile sweep times the kernel alone: its block scales decoded once, here.
    _, n, k = module._shapes[name]
    scales = nf4_torch.expert_block_scales(kw["absmax"], kw["nested"], ids, n * k // module.blocksize)
    code = kw["code"].float()
    for tile in PAIR_TILES:
        label = "nf4_pair[BLOCK_N={},BLOCK_K={},warps={},whole={}]".format(*tile)
        out[label] = lambda tile=tile: nf4_pair_gemv(
            x, ids, kw["packed"], scales, code, kw["shape"], kw["blocksize"], tile
        )
    return out


# The grouped GEMV's K step and NF4 lookup (select tree or table loads) at two tiles.
GEMV_STEPS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SELECT": select}, num_warps=w, num_stages=st)
    for n, w, st in ((16, 2, 4), (64, 4, 3))
    for k in (64, 128, 256)
    for select in (True, False)
] + [  # byte permutes (SELECT=2): one scale block a K step, scale applied to the partial product
    triton.Config({"BLOCK_N": n, "BLOCK_K": 64, "SELECT": 2}, num_warps=w, num_stages=st)
    for n, w, st in ((16, 2, 4), (32, 2, 4), (32, 4, 4), (64, 4, 3), (64, 4, 5), (128, 4, 4), (128, 8, 4))
]
PAIR_TILES = [  # (BLOCK_N, BLOCK_K, warps, whole steps)
    (16, 128, 2, 0),
    (16, 128, 2, 1),
    (16, 256, 2, 1),
    (16, 512, 4, 0),
    (16, 512, 4, 1),
    (32, 128, 4, 0),
    (32, 128, 4, 1),
    (64, 256, 8, 0),
]


def graphed(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`fn` replayed from a CUDA graph, captured at the first call after a warm call (compile, autotune)."""
    held: dict = {}

    def replay() -> torch.Tensor:
        if not held:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            held["graph"] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(held["graph"]):
                held["out"] = fn()
        held["graph"].replay()
        return held["out"]

    return replay


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="nf4_decode.json")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (needs TRITON_INTERPRET=1)")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--tokens", default="1,32,128")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--sleep-cycles", type=int, default=2_000_000, help="GPU sleep queued before each call"
    )
    parser.add_argument("--with-compiled", action="store_true", help="also the torch.compile variants")
    parser.add_argument("--no-sweep", action="store_true", help="skip the per-config sweep")
    parser.add_argument(
        "--only",
        default="",
        help="run only variants containing one of these comma-separated strings (and the reference)",
    )
    args = parser.parse_args()
    args.only = tuple(p for p in args.only.split(",") if p)
    cuda = args.device.startswith("cuda")
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--device cpu runs the kernel under Triton's interpreter: set TRITON_INTERPRET=1")

    results = results_head(args, torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET=1)")

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)

    e, h, i = args.experts, args.hidden, args.intermediate
    log(f"building NF4 experts E={e} H={h} I={i} on {results['device']}")
    wgen = torch.Generator(args.device).manual_seed(0)
    gate_up = torch.randn(e, 2 * i, h, generator=wgen, device=args.device, dtype=torch.bfloat16) * 0.02
    down = torch.randn(e, h, i, generator=wgen, device=args.device, dtype=torch.bfloat16) * 0.02
    module = NF4Experts.from_weights(gate_up, down, torch.nn.SiLU(), blocksize=64, double_quant=True)
    del gate_up, down
    results["layer_nf4_bytes"] = {w: streamed_bytes(module, w, e) for w in ("gate_up", "down")}
    gen = torch.Generator().manual_seed(0)
    for tokens in (int(t) for t in args.tokens.split(",") if t.strip()):
        ids = route(tokens, e, args.top_k, gen).reshape(-1)
        ids, _ = ids.sort(stable=True)  # the rows sorted by expert, as the grouped paths need
        counts = torch.bincount(ids, minlength=e)
        offsets = counts.cumsum(0).to(torch.int32).to(args.device)
        busy = int((counts > 0).sum())
        log(f"== {tokens} tokens: {len(ids)} rows, {busy} busy experts, max rows/expert {int(counts.max())}")
        ids = ids.to(args.device)
        for name in ("gate_up", "down"):
            _, n, k = module._shapes[name]
            x = (torch.randn(len(ids), k, generator=gen) * 0.5).to(torch.bfloat16).to(args.device)
            nbytes = streamed_bytes(module, name, busy)
            ref = None
            try:
                fns = variants(module, name, x, offsets, ids, args)
            except Exception as err:  # e.g. a failed CUDA graph capture: record it, keep the eager variants
                results["errors"].append(
                    {"tokens": tokens, "weight": name, "traceback": traceback.format_exc()}
                )
                log(f"variants failed: {err}")
                continue
            for variant, fn in fns.items():
                if args.no_sweep and variant.startswith(("nf4_gemv[", "nf4_pair[")):
                    continue
                if args.only and variant != "dequant+grouped_mm" and not any(o in variant for o in args.only):
                    continue
                row = {"tokens": tokens, "rows": len(ids), "weight": name, "N": n, "K": k, "variant": variant}
                try:
                    row.update(
                        time_fn(
                            fn, args.device.startswith("cuda"), args.iters, args.warmup, args.sleep_cycles
                        )
                    )
                    y = fn()
                    if variant == "dequant+grouped_mm":  # the reference, timed first
                        ref = y.clone()
                    if ref is not None:
                        row["max_rel"] = round(max_rel(y, ref), 6)
                    if variant.startswith("nf4_gemv"):
                        row["gb_s"] = round(nbytes / (row["median_ms"] * 1e-3) / 1e9, 1)
                    if variant.startswith("nf4_pair"):  # every pair streams its expert
                        pair_bytes = streamed_bytes(module, name, len(ids))
                        row["gb_s"] = round(pair_bytes / (row["median_ms"] * 1e-3) / 1e9, 1)
                except Exception as err:
                    record_error(results, row, err, cuda)
                results["runs"].append(row)
                save()
                log(json.dumps(row))
            del x, ref, fns
            if cuda:
                torch.cuda.empty_cache()
    results["autotune_choices"] = {str(key): str(cfg) for key, cfg in nf4_decode._tuned.cache.items()}
    results["speedup_of_nf4_gemv"] = summarize(results["runs"])
    save()
    log(
        json.dumps(
            {"autotune": results["autotune_choices"], "speedup": results["speedup_of_nf4_gemv"]}, indent=1
        )
    )
    log(f"wrote {args.out}")


def summarize(runs: list[dict]) -> dict:
    """Per tokens/weight: each baseline's median_ms over nf4_gemv's (and over the best swept config)."""
    table: dict = {}
    by = {(r["tokens"], r["weight"], r["variant"]): r.get("median_ms") for r in runs}
    for tokens, weight in dict.fromkeys((r["tokens"], r["weight"]) for r in runs):
        mine = by.get((tokens, weight, "nf4_gemv"))
        swept = [r["median_ms"] for r in runs if r.get("median_ms") and r["tokens"] == tokens
                 and r["weight"] == weight and r["variant"].startswith("nf4_gemv[")]  # fmt: skip
        entry = {}
        for base in ("dequant+grouped_mm", "gathered+bmm", "gathered_compiled"):
            t = by.get((tokens, weight, base))
            if t and mine:
                entry[f"vs {base}"] = round(t / mine, 2)
            if t and swept:
                entry[f"vs {base} (best swept)"] = round(t / min(swept), 2)
        table[f"{tokens}/{weight}"] = entry
    return table


if __name__ == "__main__":
    main()
