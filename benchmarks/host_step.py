"""Host time of a `model.kernels: auto` training step, measured on the CPU.

The embedded tiny preset's widths with V2-Lite's layer count (27) and the CUDA path's structure (NF4
experts through the grouped kernel, so they compile whole; bf16; TRL's head replaced by ours; LoRA
r=16 on MLA, optionally on every expert): little arithmetic, the same modules, compiled regions, dynamo
guards, autograd nodes and checkpoint hooks a V2-Lite step has. On the H200 that step is partly
host-bound (docs/benchmarks.md), so what this cuts is what the GPU waits for there. Variants,
interleaved in one process:
  layers    each decoder layer as two compiled regions (finetune.fast.blocks), torch's checkpoint
  modules   each attention, MLP and experts module compiled as a region of its own (the earlier scheme)
  ingraph   `layers` with the recomputation inside the regions' backward graphs instead of torch's
            checkpoint (`fusion.apply(recompute_in_graph=True)`, the default)
  noguards  (with --noguards) `layers` with dynamo's guard evaluation skipped after the warm-up
            (`skip_guard_eval_unsafe`): what the guards cost, not a mode to train in

    python benchmarks/host_step.py [--layers 27] [--rounds 5] [--steps 10] [--expert-lora] [--noguards] [--out host.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from moe_qlora import build, step_loss
from torch.profiler import ProfilerActivity, profile

from finetune.fast import fusion

VARIANTS = {  # name: fusion.apply's arguments
    "layers": {"recompute_in_graph": False},
    "modules": {"layer_regions": False},
    "ingraph": {"recompute_in_graph": True},
    "noguards": {"recompute_in_graph": False},
}


def region_entries(step) -> int:
    """Compiled-region entries of one step (each one a dynamo guard evaluation)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(e.count for e in prof.key_averages() if "Cache Lookup" in e.key)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--expert-lora", action="store_true")
    parser.add_argument("--noguards", action="store_true")
    parser.add_argument("--out", default="host_step.json")
    args = parser.parse_args()
    variant = "nf4-experts+bf16+head" + ("+lora" if args.expert_lora else "")
    model = build(variant, args.layers, torch.bfloat16, preset="tiny", device="cpu")  # grouped experts
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))

    def step() -> None:
        step_loss(model, ids, variant).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    variants = {n: v for n, v in VARIANTS.items() if args.noguards or n != "noguards"}
    times: dict[str, list[float]] = {name: [] for name in variants}
    entries: dict[str, int] = {}
    for round_ in range(args.rounds):
        for name, options in variants.items():
            fusion.apply(model, **options)
            for _ in range(2):  # compiles (first round) and warms up
                step()
            if round_ == 0:
                entries[name] = region_entries(step)
            torch.compiler.set_stance("default", skip_guard_eval_unsafe=name == "noguards")
            steps = []
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                steps.append(time.perf_counter() - start)
            torch.compiler.set_stance("default")
            times[name].append(statistics.median(steps) * 1e3)
            print(f"round {round_} {name}: {times[name][-1]:.1f} ms", flush=True)
    fusion.remove(model)
    result = {
        "variant": variant,
        "layers": args.layers,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "step_ms": {n: [round(t, 2) for t in ts] for n, ts in times.items()},
        "median_step_ms": {n: round(statistics.median(ts), 2) for n, ts in times.items()},
        "region_entries_per_step": entries,
    }
    print(json.dumps(result))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
