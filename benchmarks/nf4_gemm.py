"""Grouped expert matmuls on DeepSeek-V2-Lite MoE shapes: NF4 Triton kernels vs today's path vs bf16.

One MoE layer's routed experts (E=64, H=2048, I=1408: gate_up [E, 2I, H], down [E, H, I]), random
weights NF4-quantized as `NF4Experts` does (bitsandbytes, blocksize 64, double quantization), token
rows routed top-6 by a skewed random router (some experts hot, some cold, as trained routers are) and
sorted by expert. For each scenario (training 4 x 2048 tokens; decode 1 and 128 tokens) and each
weight (gate_up, down), with and without LoRA r=16 on every expert, it times:

  dequant+grouped_mm   today's NF4Experts path: bnb dequantize_4bit of the whole layer, then
                       torch.nn.functional.grouped_mm (LoRA as two more grouped products + add)
  bf16_grouped_mm      the stock stack: weights already bf16, the same grouped products
  nf4_triton           finetune.kernels.nf4_grouped_mm (dequantizing tiles in registers, LoRA fused)

for the forward (y = x @ W.T) and backward-dX (dx = dy @ W) products, plus a training pair
(forward + backward through autograd, LoRA gradients included) for the reference and the kernel.
Each result is compared with dequant+grouped_mm (`vs_reference`, max and mean |diff| / |ref|): the
kernel should agree to bf16 rounding (max_rel ~1e-2 or less); bf16_grouped_mm differs by the NF4
quantization error itself (~0.1), since its weights are the unquantized ones. Every variant's failure is caught and
recorded; the JSON is rewritten after every measurement, so a crash keeps what was measured.

    PYTHONUNBUFFERED=1 python benchmarks/nf4_gemm.py --out nf4_gemm.json

A smoke run of the script itself on a CPU (tiny shapes, the kernels under Triton's interpreter):

    TRITON_INTERPRET=1 python benchmarks/nf4_gemm.py --device cpu --experts 4 --hidden 128 \
        --intermediate 64 --train-tokens 16 --decode-tokens 1,4 --rank 8 --top-k 2 --iters 1 --warmup 0

The first call of the Triton kernels autotunes (a few configs per shape key); that time is reported
as `first_call_s` and excluded from the timings.
"""

from __future__ import annotations

import argparse
import functools
import json
import traceback

import bitsandbytes.functional as bnbf
import torch
from timing import results_head, route, time_fn  # benchmarks/ is on sys.path when this script runs

from finetune.kernels import nf4_grouped as kernels_module
from finetune.kernels.nf4_grouped import NF4Weight, nf4_grouped_linear, nf4_grouped_mm

grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm


def log(msg: str) -> None:
    print(msg, flush=True)


DEVICE = "cuda"
CUDA = True  # False only for a CPU smoke run of this script (--device cpu, TRITON_INTERPRET=1)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (a.float() - ref.float()).abs()
    scale = ref.float().abs()
    return {
        "max_rel": float(diff.max() / scale.max().clamp(min=1e-12)),
        "mean_rel": float(diff.mean() / scale.mean().clamp(min=1e-12)),
    }


class Layer:
    """One weight (gate_up or down) in the three forms the variants read."""

    def __init__(self, w16: torch.Tensor, rank: int, gen: torch.Generator) -> None:
        e, n, k = w16.shape
        self.w16 = w16
        packed, state = bnbf.quantize_4bit(w16, blocksize=64, compress_statistics=True, quant_type="nf4")
        self.packed, self.state = packed, state
        self.nf4 = NF4Weight.from_quant_state(packed, state)
        self.nf4_bytes = sum(
            t.numel() * t.element_size()
            for t in (packed, state.absmax, state.state2.absmax, state.code, state.state2.code)
        )
        # LoRA factors as NF4Experts holds them: fp32 parameters (B nonzero here so the delta is checked).
        self.a = (torch.randn(e, rank, k, generator=gen) / k**0.5).to(DEVICE).requires_grad_()
        self.b = (torch.randn(e, n, rank, generator=gen) * 0.01).to(DEVICE).requires_grad_()
        self.scale = 2.0

    def dequant(self) -> torch.Tensor:
        return bnbf.dequantize_4bit(self.packed, self.state)


def ref_forward(x, w, offsets, layer: Layer | None):
    y = grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    if layer is not None:
        a, b = layer.a.to(x.dtype), layer.b.to(x.dtype)
        low = grouped_mm(x, a.transpose(-2, -1), offs=offsets) * layer.scale
        y = y + grouped_mm(low, b.transpose(-2, -1), offs=offsets)
    return y


def ref_dx(dy, w, offsets, layer: Layer | None):
    dx = grouped_mm(dy, w, offs=offsets)
    if layer is not None:
        a, b = layer.a.to(dy.dtype), layer.b.to(dy.dtype)
        low = grouped_mm(dy, b, offs=offsets) * layer.scale
        dx = dx + grouped_mm(low, a, offs=offsets)
    return dx


class _RefNF4(torch.autograd.Function):
    """Today's NF4Experts base product: dequantize in forward and again in backward, dX only."""

    @staticmethod
    def forward(ctx, x, layer, offsets):  # type: ignore[override]
        ctx.layer = layer
        ctx.save_for_backward(offsets)
        return grouped_mm(x, layer.dequant().transpose(-2, -1), offs=offsets)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        (offsets,) = ctx.saved_tensors
        return grouped_mm(dy.contiguous(), ctx.layer.dequant(), offs=offsets), None, None


def ref_train(x, layer: Layer, offsets, grad, lora: bool):
    y = _RefNF4.apply(x, layer, offsets)
    if lora:
        a, b = layer.a.to(x.dtype), layer.b.to(x.dtype)
        low = grouped_mm(x, a.transpose(-2, -1), offs=offsets) * layer.scale
        y = y + grouped_mm(low, b.transpose(-2, -1), offs=offsets)
    y.backward(grad)


def kernel_train(x, layer: Layer, offsets, grad, lora: bool):
    if lora:
        y = nf4_grouped_linear(x, offsets, layer.nf4, layer.a, layer.b, layer.scale)
    else:
        y = nf4_grouped_linear(x, offsets, layer.nf4)
    y.backward(grad)


def variants_for(x, dy, layer: Layer, offsets, lora: bool, train_pair: bool) -> dict:
    """op -> variant -> a call producing that op's result (or running forward + backward)."""
    lay = layer if lora else None
    kw = dict(lora_a=layer.a, lora_b=layer.b, lora_scale=layer.scale) if lora else {}
    out = {
        "fwd": {
            "dequant+grouped_mm": lambda: ref_forward(x, layer.dequant(), offsets, lay),
            "bf16_grouped_mm": lambda: ref_forward(x, layer.w16, offsets, lay),
            "nf4_triton": lambda: nf4_grouped_mm(x, offsets, layer.nf4, **kw)[0],
        },
        "dx": {
            "dequant+grouped_mm": lambda: ref_dx(dy, layer.dequant(), offsets, lay),
            "bf16_grouped_mm": lambda: ref_dx(dy, layer.w16, offsets, lay),
            "nf4_triton": lambda: nf4_grouped_mm(dy, offsets, layer.nf4, transpose=True, **kw)[0],
        },
    }
    if train_pair:
        xg = x.detach().requires_grad_()
        out["fwd+bwd"] = {
            "dequant+grouped_mm": lambda: ref_train(xg, layer, offsets, dy, lora),
            "nf4_triton": lambda: kernel_train(xg, layer, offsets, dy, lora),
        }
    return out


def measure(row: dict, fn, ref: torch.Tensor | None, flops: int, args, check=None) -> None:
    """Time `fn` into `row` (median/min ms, first call, TFLOP/s, extra peak memory) and check it."""
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    row.update(time_fn(fn, CUDA, args.iters, args.warmup))
    if CUDA:
        row["peak_extra_mb"] = round((torch.cuda.max_memory_allocated() - base_mem) / 2**20, 1)
    row["tflops"] = round(flops / (row["median_ms"] * 1e-3) / 1e12, 3)
    if ref is not None:
        row["vs_reference"] = rel_err(fn(), ref)
    if check is not None:
        row["vs_reference"] = check()


def main() -> None:
    global DEVICE, CUDA
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="nf4_gemm.json")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--train-tokens", type=int, default=4 * 2048)
    parser.add_argument("--decode-tokens", default="1,128")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-train-pair", action="store_true", help="skip the forward+backward timings")
    parser.add_argument(
        "--device", default="cuda", help="cpu: a smoke run of this script (TRITON_INTERPRET=1)"
    )
    args = parser.parse_args()
    DEVICE, CUDA = args.device, args.device.startswith("cuda")
    if not CUDA:
        from finetune.compat.bitsandbytes import (
            install_cpu_kernels,  # exact plain-torch CPU 4-bit ops: the reference
        )

        install_cpu_kernels()

    results = results_head(args, torch.cuda.get_device_name() if CUDA else "cpu")

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)

    e, h, i = args.experts, args.hidden, args.intermediate
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16
    log(f"building weights E={e} H={h} I={i} on {results['device']}")
    layers = {}
    for name, shape in (("gate_up", (e, 2 * i, h)), ("down", (e, h, i))):
        w16 = (torch.randn(*shape, generator=gen) * 0.02).to(dtype).to(DEVICE)
        layers[name] = Layer(w16, args.rank, gen)
        results[f"{name}_bytes"] = {"bf16": w16.numel() * 2, "nf4": layers[name].nf4_bytes}
    save()

    scenarios = [("train", args.train_tokens)] + [
        (f"decode{t}", int(t)) for t in args.decode_tokens.split(",") if t.strip()
    ]
    for scenario, tokens in scenarios:
        ids = route(tokens, e, args.top_k, gen)
        counts = torch.bincount(ids.reshape(-1), minlength=e)
        offsets = counts.cumsum(0).to(torch.int32).to(DEVICE)
        m = int(counts.sum())
        log(
            f"== {scenario}: {tokens} tokens, {m} rows, rows/expert min {int(counts.min())} "
            f"max {int(counts.max())}, empty experts {int((counts == 0).sum())}"
        )
        for wname, layer in layers.items():
            _, n, k = layer.w16.shape
            x = (torch.randn(m, k, generator=gen) * 0.5).to(dtype).to(DEVICE)
            dy = (torch.randn(m, n, generator=gen) * 0.5).to(dtype).to(DEVICE)
            w_deq = layer.dequant()  # the reference's weight, for the correctness checks
            for lora in (False, True):
                lay = layer if lora else None
                ref = {"fwd": ref_forward(x, w_deq, offsets, lay), "dx": ref_dx(dy, w_deq, offsets, lay)}
                variants = variants_for(x, dy, layer, offsets, lora, not args.no_train_pair)
                for op, fns in variants.items():
                    flops = 2 * m * n * k + (2 * m * args.rank * (n + k) if lora else 0)
                    if op == "fwd+bwd":
                        flops *= 2
                    for variant, fn in fns.items():
                        row = {
                            "scenario": scenario,
                            "tokens": tokens,
                            "rows": m,
                            "weight": wname,
                            "N": n,
                            "K": k,
                            "op": op,
                            "lora_r": args.rank if lora else 0,
                            "variant": variant,
                        }
                        check = None
                        if op == "fwd+bwd" and variant == "nf4_triton":
                            xg = x.detach().requires_grad_()
                            check = functools.partial(check_train, xg, layer, offsets, dy, lora)
                        compare = ref.get(op) if variant != "dequant+grouped_mm" else None
                        try:
                            measure(row, fn, compare, flops, args, check)
                        except Exception as err:  # record and go on: one failure must not lose the run
                            row["error"] = f"{type(err).__name__}: {err}"[:2000]
                            results["errors"].append({**row, "traceback": traceback.format_exc()[-4000:]})
                            sync()
                        results["runs"].append(row)
                        save()
                        log(json.dumps(row))
                del ref
            del x, dy, w_deq
            if CUDA:
                torch.cuda.empty_cache()

    results["autotune_choices"] = {
        kname: {str(key): str(cfg) for key, cfg in getattr(kern, "cache", {}).items()}
        for kname, kern in (("forward", kernels_module._fwd_tuned), ("dx", kernels_module._dx_tuned))
    }
    results["speedup_vs_dequant"] = summarize(results["runs"])
    save()
    log(json.dumps(results["speedup_vs_dequant"], indent=1))
    log(f"wrote {args.out}")


def check_train(x, layer: Layer, offsets, dy, lora: bool) -> dict:
    """dx (and dA, dB) of the kernel's autograd vs today's path."""
    out = {}
    grads = []
    for fn in (ref_train, kernel_train):
        x.grad = None
        layer.a.grad = layer.b.grad = None
        fn(x, layer, offsets, dy, lora)
        grads.append((x.grad.clone(), *(t.grad.clone() if lora else None for t in (layer.a, layer.b))))
    out["dx"] = rel_err(grads[1][0], grads[0][0])
    if lora:
        out["dA"] = rel_err(grads[1][1], grads[0][1])
        out["dB"] = rel_err(grads[1][2], grads[0][2])
    x.grad = None
    layer.a.grad = layer.b.grad = None
    return out


def summarize(runs: list[dict]) -> dict:
    """median_ms of dequant+grouped_mm / each variant's, per scenario, weight, op and LoRA."""
    table: dict = {}
    base = {
        (r["scenario"], r["weight"], r["op"], r["lora_r"]): r.get("median_ms")
        for r in runs
        if r["variant"] == "dequant+grouped_mm"
    }
    for r in runs:
        key = (r["scenario"], r["weight"], r["op"], r["lora_r"])
        if r["variant"] == "dequant+grouped_mm" or not base.get(key) or not r.get("median_ms"):
            continue
        name = f"{r['scenario']}/{r['weight']}/{r['op']}/lora{r['lora_r']}"
        table.setdefault(name, {})[r["variant"]] = round(base[key] / r["median_ms"], 2)
    return table


if __name__ == "__main__":
    main()
