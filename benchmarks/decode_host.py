"""Host cost of a compiled decode step, measurable on a CPU: the tiny preset's widths with V2-Lite's
27 layers (the module and parameter count that dynamo's guards scale with), LoRA r=16 on MLA, decode
compiled with backend `eager` (no code generation) inside `generation.compiled_decoding`.

Prints ms per generated token and the top host ops per token (`TorchDynamo Cache Lookup` is the guards).
`--guard-filter NAME` passes `torch.compiler.NAME` as the compile's `guard_filter_fn`.

    python benchmarks/decode_host.py [--guard-filter skip_guard_on_inbuilt_nn_modules_unsafe]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import CompileConfig

from finetune.fast import generation
from finetune.model import adapters, presets
from finetune.model.load import load_model, resolve_source


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--guard-filter", default=None)
    args = parser.parse_args()
    presets.PRESETS["tiny"] = {**presets.PRESETS["tiny"], "num_hidden_layers": args.layers}
    torch.manual_seed(0)
    base = load_model(resolve_source("tiny", None), dtype="float32")
    model = adapters.attach(base, r=16, alpha=32, dropout=0.0, targets=["mla"]).eval()
    options = {"guard_filter_fn": getattr(torch.compiler, args.guard_filter)} if args.guard_filter else None
    config = CompileConfig(backend="eager", mode=None, fullgraph=True, options=options)
    ids = torch.randint(3, 100, (1, 8))

    @torch.no_grad()
    def generate(new: int) -> torch.Tensor:
        with generation.compiled_decoding(model, True, compile_config=config) as extra:
            return model.generate(
                input_ids=ids,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                **extra,
            )

    generate(33)  # compiles (the static cache's length follows max_new_tokens: keep it)
    start = time.perf_counter()
    generate(33)
    per_token = (time.perf_counter() - start) / 33  # the eager prefill's share included
    print(
        f"{args.layers} layers, {sum(1 for _ in model.parameters())} parameters: {per_token * 1e3:.2f} ms a token"
    )
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(33)
    for e in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:6]:
        print(f"  {e.self_cpu_time_total / 1e3 / 33:7.3f} ms/token  {e.key[:70]}")


if __name__ == "__main__":
    main()
