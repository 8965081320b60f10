"""One GRPO step on DeepSeek-V2-Lite shapes (random weights built on the GPU), timed by phase.

The model is what a run trains: every linear layer but lm_head in bitsandbytes NF4, the routed experts
in NF4 (`NF4Experts`), LoRA r=16 on MLA, gradient checkpointing. The step is the GRPO stage's own
trainer (`finetune.stages.grpo.Trainer`, TRL's GRPOTrainer) with routing replay on: 8 prompts × 8
generations × 256 new tokens (EOS ignored), 64-token prompts, 16 completions per micro-batch, 4
micro-batches per optimizer step (`--kernels`: as under `model.kernels: auto`, rollouts from the graphed
decode step, training passes through the compiled regions and LM head; `--no-regions`: the fused
small kernels only, as the stage trained before issue 24). The sampler log-probs are recorded and TRL's
importance-sampling correction applied (`--no-correction`: off, no old-policy pass). Phases: generation
(transformers `generate`), log-probs without gradient (the old-policy pass; a reference pass too when
--beta > 0), the policy forward with gradient, backward, and the rest (rewards, advantages, optimizer).

    PYTHONUNBUFFERED=1 python benchmarks/grpo_step.py --out grpo.json [--layers 27] [--steps 2] [--kernels]
        [--beta 0.04] [--replay rollout|old_policy|off] [--no-regions] [--no-correction]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from datasets import Dataset
from moe_qlora import quantize_linears  # benchmarks/ is on sys.path when this script runs
from transformers import DeepseekV2ForCausalLM, PreTrainedTokenizerFast

from finetune.fast import fusion, generation
from finetune.model import adapters, replay, routing, sampler
from finetune.model.experts import quantize_experts
from finetune.model.presets import preset_config
from finetune.stages.grpo import Trainer


def tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the model's whole vocabulary, so any sampled id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab - 2)} | {"<pad>": vocab - 2, "</s>": vocab - 1}
    core = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>")


def build(layers: int, smoke: bool) -> torch.nn.Module:
    if smoke:  # the embedded tiny model on the CPU: checks this script, measures nothing
        from finetune.model.load import load_model, resolve_source

        model = load_model(resolve_source("tiny", None), dtype="float32")
        return adapters.attach(model, r=16, alpha=32, dropout=0.0, targets=["mla"])
    cfg = preset_config("v2-lite")
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DeepseekV2ForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    quantize_linears(model, torch.bfloat16)
    quantize_experts(model, compute_dtype=torch.bfloat16)
    return adapters.attach(model, r=16, alpha=32, dropout=0.0, targets=["mla"])


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer:
    """Wall time per phase, synchronised with the GPU at both ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, fn, name):
        def timed(*args, **kwargs):
            phase = name(*args, **kwargs) if callable(name) else name
            sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                self.seconds[phase] += time.perf_counter() - start

        return timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--replay", choices=["rollout", "old_policy", "off"], default="rollout")
    parser.add_argument("--regions", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--correction", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 8 new tokens")
    parser.add_argument(
        "--kernels",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="as the stage runs with model.kernels: auto (graphed decode step, fused kernels)",
    )
    a = parser.parse_args()

    from trl import GRPOConfig

    model = build(a.layers, a.smoke)
    new_tokens = 8 if a.smoke else 256
    tok = tokenizer(model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    prompts = [
        " ".join(f"w{i}" for i in torch.randint(0, 100000, (64,), generator=g).tolist()) for _ in range(64)
    ]
    data = Dataset.from_dict({"prompt": prompts})
    out_dir = Path("/tmp/grpo-bench")
    args = GRPOConfig(
        output_dir=str(out_dir),
        max_steps=a.steps,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=4,
        num_generations=8,
        max_completion_length=new_tokens,
        generation_kwargs={"min_new_tokens": new_tokens},  # ignore EOS: every completion is full length
        temperature=1.0,
        beta=a.beta,
        learning_rate=1e-5,
        bf16=not a.smoke,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        vllm_importance_sampling_correction=a.correction,
    )

    def reward(completions, **kwargs):
        return [float(len(c)) / 1000 for c in completions]

    replayer = replay.RoutingReplay(model, mode=a.replay, eos_token_ids=[tok.eos_token_id])
    mismatch = (
        sampler.Mismatch(args.vllm_importance_sampling_mode, None, args.vllm_importance_sampling_clip_max)
        if a.correction
        else None
    )
    monitor = routing.RouterMonitor(model, also=[replayer.report])
    trainer = Trainer(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=data,
        processing_class=tok,
        router_monitor=monitor,
        replayer=replayer,
        mismatch=mismatch,
        samples=out_dir / "samples.jsonl",
        samples_per_log=0,
    )
    timer = Timer()
    top = replayer.top
    kernels = contextlib.ExitStack()  # as stages/grpo.py and stages/common.fit run GRPO
    kernels.enter_context(generation.fast_generate(model, a.kernels))  # inside the timer's wrapper
    fused = {"regions": a.regions, "chunked_head": a.regions, "temperature": args.temperature}
    kernels.enter_context(fusion.fused(model, a.kernels, **fused))
    top.generate = timer.wrap(top.generate, "generation")
    trainer._get_per_token_logps_and_entropies = timer.wrap(
        trainer._get_per_token_logps_and_entropies,
        lambda *x, **k: "policy_forward" if torch.is_grad_enabled() else "logprobs_no_grad",
    )
    trainer.accelerator.backward = timer.wrap(trainer.accelerator.backward, "backward")
    per_step = []

    class Mark:
        t = time.perf_counter()

    mark = Mark()
    from transformers import TrainerCallback

    class Split(TrainerCallback):
        def on_step_end(self, args_, state, control, **kw):
            sync()
            now = time.perf_counter()
            phases = dict(timer.seconds)
            total = now - mark.t
            phases["other"] = total - sum(phases.values())
            per_step.append({"step": state.global_step, "total": total, **phases})
            print(json.dumps(per_step[-1]), flush=True)  # a run cut off by a time limit still reports
            timer.seconds.clear()
            mark.t = now

    trainer.add_callback(Split())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    mark.t = time.perf_counter()
    with kernels:
        trainer.train()
    result = {
        "layers": a.layers,
        "replay": a.replay,
        "kernels": a.kernels,
        "regions": a.kernels and a.regions,
        "correction": a.correction,
        "beta": a.beta,
        "shape": "8 prompts x 8 generations x 256 new tokens, prompt 64, micro-batch 16, 4 micro-batches/step",
        "steps": per_step,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
        "routing": replayer.report(),
        "mismatch": mismatch.report() if mismatch is not None else None,
        "log_history": trainer.state.log_history,
        "new_tokens_per_s_generation": 64 * new_tokens / per_step[-1]["generation"] if per_step else None,
    }
    print(json.dumps(result, indent=2))
    Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
