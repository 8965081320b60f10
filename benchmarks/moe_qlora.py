"""QLoRA step on DeepSeek-V2-Lite shapes (random weights built on the GPU): stock stack vs NF4 experts.

Variants, measured in one process, one after the other:
  stock          every nn.Linear but lm_head in bnb Linear4bit (what BitsAndBytesConfig(load_in_4bit) does),
                 routed experts bf16 through transformers' grouped_mm; LoRA r=16 on MLA
  nf4-experts    the same, plus the routed experts in NF4 (finetune.model.experts)
  nf4-experts+lora   the same, plus LoRA r=16 on every routed expert
Suffixes that combine with any variant:
  +head          the loss through TRL's chunked LM head (`add_fused_lm_head`, what TRL's SFTTrainer runs)
                 instead of the model's full [tokens x vocab] logits
  +bf16          trainable parameters cast to bf16, as TRL's trainers do on a quantized model (else fp32)
  +kernels       the fused norms, SwiGLU and expert combine of `model.kernels: auto` (finetune.fast.fusion)
  +frozen        Python's heap frozen after the warm-up step, as every training stage does (finetune.heap):
                 no full garbage collections walking the model and the compiled kernels' caches
  +tritondq      the experts' whole-weight dequantize through finetune/kernels/nf4_dequant.py (decoding's),
                 not bitsandbytes' dequantize_4bit (the same bits)
  +bnblinear     with +kernels: the 4-bit MLA projections stay on bitsandbytes' matmul_4bit (without it
                 they go through finetune.fast.linear4bit, as `kernels: auto` trains them)
  +modules       with +kernels: each attention, MLP and experts module compiled as a region of its own,
                 not each decoder layer as two (finetune.fast.blocks)
  +cppwrapper    with +kernels: inductor's C++ wrapper launches the compiled graphs' kernels instead of
                 its Python wrapper (`torch._inductor.config.cpp_wrapper`; compiled afresh)
  +cudagraphs    with +kernels: the compiled regions replayed as CUDA graphs (inductor's cudagraph trees,
                 what `mode="reduce-overhead"` sets; compiled afresh): no launches from the host
  +reentrant     reentrant gradient checkpointing (else non-reentrant, as TRL's trainers set it);
                 inductor's cudagraph trees fail under a non-reentrant checkpoint (pytorch#154306)
  +checkpoint    with +kernels: the layers' recomputation through torch's checkpoint instead of inside
                 their regions' backward graphs (finetune.fast.blocks, `recompute_in_graph=False`; the
                 default before 2026-11-29; `+ingraph`, the default now, is accepted and changes nothing)
  +combo         with +kernels: inductor's combo kernels (independent kernels of a graph launched as one,
                 `torch._inductor.config.combo_kernels`; compiled afresh): fewer launches
  +noguards      with +kernels: after the warm-up step, dynamo skips guard evaluation
                 (`skip_guard_eval_unsafe`): a measurement of what the guards cost the host, not a mode
                 to train in (a changed model would run stale graphs)

    PYTHONUNBUFFERED=1 python benchmarks/moe_qlora.py --out results.json [--layers 27] [--steps 3] [--rounds 3]

`--device cpu --preset tiny` is a dry run of the same code on the CPU (the experts through torch's grouped
kernel, as on CUDA; no memory figures): a variant's bug costs no device time.

`--rounds N` measures the variant list N times over, interleaved (stock, ours, stock, ours, ...), and
adds per variant the median tokens/s and its ratio to the first variant's in the same round: on the
H200 two runs of one commit differed by up to 25 % (docs/benchmarks.md), a single round's ratio less.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import time
import traceback

import bitsandbytes as bnb
import torch
from peft import LoraConfig, get_peft_model
from transformers import DeepseekV2ForCausalLM

from finetune.fast import fusion, linear4bit
from finetune.model import adapters
from finetune.model.experts import NF4Experts, quantize_experts
from finetune.model.inspect import report
from finetune.model.presets import preset_config


def quantize_linears(model: torch.nn.Module, dtype: torch.dtype, device: str = "cuda") -> None:
    """Swap every nn.Linear except lm_head for an NF4 bnb Linear4bit, in place, one at a time."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear) or child_name == "lm_head":
                continue
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=False,
                compute_dtype=dtype,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                child.weight.data.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True
            )
            q.weight = q.weight.to(device)  # Params4bit quantizes when moved to its device
            setattr(module, child_name, q)
            del child
    if device == "cuda":
        torch.cuda.empty_cache()


def flags(variant: str) -> set[str]:
    return set(variant.split("+")[1:])


def step_loss(model: torch.nn.Module, ids: torch.Tensor, variant: str) -> torch.Tensor:
    """The training loss of one batch, as the variant computes it."""
    if "head" in flags(variant):
        return model(input_ids=ids, labels=ids, fused_lm_head=True).loss
    return model(input_ids=ids, labels=ids).loss


def build(
    variant: str, layers: int, dtype: torch.dtype, preset: str = "v2-lite", device: str = "cuda"
) -> torch.nn.Module:
    cfg = preset_config(preset)
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekV2ForCausalLM._from_config(cfg, dtype=dtype)
    model.set_experts_implementation("grouped_mm")
    quantize_linears(model, dtype, device)
    if not variant.startswith("stock"):
        quantize_experts(model, compute_dtype=dtype)
    if "head" in flags(variant):
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)  # before PEFT, as TRL's SFTTrainer does it
    targets = adapters.resolve_targets(model, ["mla"])
    for p in model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0))
    if "lora" in flags(variant):
        for module in model.modules():
            if isinstance(module, NF4Experts):
                module.add_lora(r=16, alpha=32)
        model.to(device)
    if "bf16" in flags(variant):
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)
    reentrant = "reentrant" in flags(variant)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    for module in model.modules():
        if isinstance(module, NF4Experts):
            module.mode.dequant_kernel = "tritondq" in flags(variant)
            if device != "cuda":
                module.use_grouped_mm = True  # the CUDA path's structure (torch's kernel runs on the CPU)
    if "kernels" in flags(variant):
        fusion.apply(
            model,
            layer_regions="modules" not in flags(variant),
            recompute_in_graph="checkpoint" not in flags(variant),
        )
        if "bnblinear" in flags(variant):
            for module in model.modules():
                if linear4bit.supported(module):
                    linear4bit.unpatch(module)
    return model


@contextlib.contextmanager
def inductor_config(variant: str):
    """The variant's inductor settings; graphs compiled under others are dropped before and after."""
    settings = {"cpp_wrapper": "cppwrapper", "triton.cudagraphs": "cudagraphs", "combo_kernels": "combo"}
    patch = {key: True for key, flag in settings.items() if flag in flags(variant)}
    if not patch:
        yield
        return
    torch._dynamo.reset()  # every compiled function compiles again, under the settings
    try:
        with torch._inductor.config.patch(patch):
            yield
    finally:
        torch._dynamo.reset()


def measure(
    variant: str,
    layers: int,
    steps: int,
    batch: int,
    seq: int,
    preset: str = "v2-lite",
    device: str = "cuda",
) -> dict:
    try:
        with inductor_config(variant):
            return _measure(variant, layers, steps, batch, seq, preset, device)
    finally:  # also after a failed variant: the next one starts as a plain process would
        gc.unfreeze()  # (a no-op where nothing was frozen)
        torch.compiler.set_stance("default")


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _measure(variant: str, layers: int, steps: int, batch: int, seq: int, preset: str, device: str) -> dict:
    dtype = torch.bfloat16
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = build(variant, layers, dtype, preset, device)
    weights = report(model)
    weight_bytes = torch.cuda.memory_allocated() if cuda else 0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, min(100_000, model.config.vocab_size), (batch, seq), device=device)
    model.train()
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps + 1):
        sync()
        start = time.perf_counter()
        if "cudagraphs" in flags(variant):
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be reused
        loss = step_loss(model, ids, variant)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step:  # the first step warms up kernels and the allocator
            times.append(time.perf_counter() - start)
            continue
        if "frozen" in flags(variant):
            gc.collect()
            gc.freeze()
        if "noguards" in flags(variant):
            torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    gc.unfreeze()  # before the model is dropped: frozen cycles would never be collected
    step_s = sum(times) / len(times)
    step_times = [round(t, 4) for t in times]
    result = {
        "variant": variant,
        "preset": preset,
        "layers": layers,
        "batch": batch,
        "seq": seq,
        "step_s": round(step_s, 4),
        "step_times": step_times,
        "tokens_per_s": round(batch * seq / step_s),
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
        "allocated_after_build_gb": round(weight_bytes / 1e9, 2),
        "weights_gb": round(weights["total"]["bytes"] / 1e9, 2),
        "by_kind_gb": {k: round(v["bytes"] / 1e9, 3) for k, v in weights.items()},
        "trainable_params": weights["total"]["trainable_params"],
        "loss": round(loss.item(), 4),
    }
    del model, opt, params, loss
    _free(device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="moe_qlora.json")
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--variants", default="stock,nf4-experts,nf4-experts+lora")
    parser.add_argument("--preset", default="v2-lite", help="v2 for DeepSeek-V2 (236B) shapes; cut --layers")
    parser.add_argument("--append", action="store_true", help="add to the runs already in --out")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run (with --preset tiny)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="the variant list measured N times, interleaved"
    )
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    results = {"device": name, "torch": torch.__version__, "runs": []}
    if args.append and os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    variants = args.variants.split(",")
    for round_ in range(args.rounds):
        for variant in variants:
            try:
                row = measure(
                    variant, args.layers, args.steps, args.batch, args.seq, args.preset, args.device
                )
            except Exception as e:  # an experimental variant that fails is a result; the others go on
                traceback.print_exc()
                row = {"variant": variant, "error": f"{type(e).__name__}: {e}"[:2000]}
            if "error" in row:  # its traceback is gone now: the model it held can be collected
                _free(args.device)
            row["round"] = round_
            print(json.dumps(row))
            results["runs"].append(row)
            if args.rounds > 1:
                results["summary"] = summary(results["runs"], variants)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)


def summary(runs: list[dict], variants: list[str]) -> dict:
    """Per variant: tokens/s of every round, their median, and the median of its ratio to the first
    variant's tokens/s in the same round (the comparison least moved by the machine's drift)."""
    base = {
        r["round"]: r["tokens_per_s"] for r in runs if r["variant"] == variants[0] and "tokens_per_s" in r
    }
    out = {}
    for variant in variants:
        rows = [r for r in runs if r["variant"] == variant and "round" in r and "error" not in r]
        if not rows:  # not measured yet (the summary is written after every row)
            continue
        ratios = [r["tokens_per_s"] / base[r["round"]] for r in rows if r["round"] in base]
        out[variant] = {
            "tokens_per_s": [r["tokens_per_s"] for r in rows],
            "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
            "median_ratio_to_first": round(statistics.median(ratios), 3) if ratios else None,
        }
    return out


if __name__ == "__main__":
    main()
