"""A DPO step on DeepSeek-V2-Lite shapes (random weights built on the GPU), with each reference option,
against an SFT step of the same token count (issue 23: DPO's peak memory ≤ 1.3× SFT's).

The model is what a run trains: every linear layer but lm_head in bitsandbytes NF4, the routed experts in
NF4 (`NF4Experts`), LoRA r=16 on MLA and on every routed expert (`targets: [mla, routed_experts]`,
`expert_r: 16`), marked 4-bit so TRL casts the trainable tensors to bf16 as on a loaded model, gradient
checkpointing as TRL sets it. The starting adapter is nonzero (every LoRA B ~ N(0, 0.01)), as a stage
with `init_from` starts, so the `init` reference differs from the base. Each variant builds its own
model and trains it through `finetune.stages.common.fit`, the stages' own path (callbacks, heap freeze,
`model.kernels: auto` → `fusion.fused` with the stage's `chunked_head`):

  sft             TRL's SFTTrainer (the SFT stage's trainer), 8 prompt-completion rows × 1,024 tokens
                  (prompt 512, completion 512, loss on the completion), TRL's chunked LM head replaced by
                  ours under kernels (`chunked_head=True`)
  dpo-init        the DPO stage's trainer (`finetune.stages.dpo.Trainer`), 4 pairs × 2 sides × 1,024
                  tokens, reference `init`: a frozen copy of the starting adapter (`frozen_bytes`)
  dpo-base        the same, reference `base` (the adapter off, routed-expert LoRA included)
  dpo-precompute  reference `init` with `precompute_ref_log_probs`: the reference log-probs of every
                  training pair computed once as the trainer is built (eager: before `fusion.fused`, as in
                  a stage), timed on its own (`precompute_s`); the steps run no reference pass

Per variant: the median step time over `--steps` after `--warmup` steps (CUDA-synchronised at each
step's begin and end, callbacks of the trainer), the peak of `torch.cuda.max_memory_allocated` over the
timed steps (reset after the warm-up), the peak while the trainer was built (the precompute pass
included), the frozen reference copy's bytes; one JSON line each, all in `--out` with every variant's
peak and step time over the sft variant's (`peak_ratio_vs_sft`, `step_ratio_vs_sft`). Between variants
the model is dropped and the compiled regions reset (each variant compiles in its own warm-up).
With `--append` a run adds to the variants already in `--out` (variants split over several processes,
e.g. to fit a time limit; the ratios use the latest sft row there).

    PYTHONUNBUFFERED=1 python3 benchmarks/dpo_step.py --out $OUT/dpo.json

`--device cpu --preset tiny --layers 3 --seq 64` is a dry run of the same code on the CPU (fp32, no
kernels, the experts' per-expert loop): a variant's bug costs no device time; it measures nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
from datasets import Dataset
from moe_qlora import quantize_linears  # benchmarks/ is on sys.path when this script runs
from transformers import DeepseekV2ForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import DPOConfig, SFTConfig, SFTTrainer

from finetune.compat import bitsandbytes as compat_bnb
from finetune.model import adapters, routing
from finetune.model.experts import NF4Experts, quantize_experts
from finetune.model.presets import preset_config
from finetune.stages import common, dpo

VARIANTS = ("sft", "dpo-init", "dpo-base", "dpo-precompute")
PAIRS = 4  # preference pairs per DPO step: 8 sequences, as many as the SFT step's rows
LORA_B_STD = 0.01


def tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the model's whole vocabulary: `w<i>` is token i, one per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab - 2)} | {"<pad>": vocab - 2, "</s>": vocab - 1}
    core = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>")


def texts(n: int, words: int, vocab: int, gen: torch.Generator, *, eos: bool = False) -> list[str]:
    """`n` texts of `words` tokens each (the last one EOS with `eos`), each starting with a space so a
    completion joins its prompt on a word boundary. Ending in EOS, TRL appends none."""
    body = words - 1 if eos else words
    ids = torch.randint(0, vocab - 2, (n, body), generator=gen).tolist()
    return [" " + " ".join(f"w{i}" for i in row) + (" </s>" if eos else "") for row in ids]


def data(kind: str, rows: int, seq: int, vocab: int) -> Dataset:
    """`rows` DPO pairs (prompt, chosen, rejected) or SFT rows (prompt, completion): every sequence is
    `seq` tokens, the prompt half of it, the completion the rest (its EOS included)."""
    gen = torch.Generator().manual_seed(0)
    prompt, completion = seq // 2, seq - seq // 2
    prompts = [t[1:] for t in texts(rows, prompt, vocab, gen)]
    if kind == "sft":
        return Dataset.from_dict(
            {"prompt": prompts, "completion": texts(rows, completion, vocab, gen, eos=True)}
        )
    chosen = texts(rows, completion, vocab, gen, eos=True)
    rejected = texts(rows, completion, vocab, gen, eos=True)
    return Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})


def check_lengths(rows: Dataset, tok: PreTrainedTokenizerFast, seq: int) -> None:
    """Every prompt + completion is `seq` tokens, the prompt `seq // 2` of them."""
    for side in [c for c in ("completion", "chosen", "rejected") if c in rows.column_names]:
        for prompt, completion in zip(rows["prompt"], rows[side], strict=True):
            n, whole = len(tok(prompt).input_ids), len(tok(prompt + completion).input_ids)
            if (n, whole) != (seq // 2, seq):
                raise AssertionError(
                    f"{side}: {n} + {whole - n} tokens, expected {seq // 2} + {seq - seq // 2}"
                )


def build(preset: str, layers: int, device: str) -> torch.nn.Module:
    """The 4-bit model with LoRA on MLA and the routed experts, the adapter nonzero (see the module)."""
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        compat_bnb.install_cpu_kernels()  # as the loader does before a Linear4bit is built
    cfg = preset_config(preset)
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekV2ForCausalLM._from_config(cfg, dtype=dtype)
    quantize_linears(model, dtype, device)
    quantize_experts(model, compute_dtype=dtype)
    if not cuda:
        compat_bnb.no_cpu_repacking(model)
    # What a model loaded with BitsAndBytesConfig says of itself: TRL's trainers then cast the trainable
    # tensors to bf16, as in a run (the frozen reference copy is taken after that cast).
    model.is_loaded_in_4bit = True
    model = adapters.attach(
        model, r=16, alpha=32, dropout=0.0, targets=["mla", "routed_experts"], expert_r=16, expert_alpha=32
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or name.endswith("_B")):
                p.normal_(0.0, LORA_B_STD)
    return model


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gb(n: float | None) -> float | None:
    return None if n is None else round(n / 1e9, 3)


class Clock(TrainerCallback):
    """Step times (synchronised at each step's begin and end) and the peak allocated memory of the steps
    after `warmup`; the peak while the trainer was built, read as training begins."""

    def __init__(self, warmup: int, cuda: bool) -> None:
        self.warmup, self.cuda = warmup, cuda
        self.times: list[float] = []
        self.warmup_times: list[float] = []
        self.intervals: list[float] = []  # step end to step end: logging and data loading included
        self.peak_setup = self.allocated_at_start = self.peak_steps = self.reserved_steps = None
        self.precompute_s: float | None = None
        self._start = self._last_end = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if self.cuda:
            self.peak_setup = torch.cuda.max_memory_allocated()
            self.allocated_at_start = torch.cuda.memory_allocated()

    def on_step_begin(self, args, state, control, **kwargs):
        sync()
        if state.global_step == self.warmup and self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        now = time.perf_counter()
        timed = state.global_step > self.warmup
        (self.times if timed else self.warmup_times).append(now - self._start)
        if timed and state.global_step > self.warmup + 1:
            self.intervals.append(now - self._last_end)
        self._last_end = now
        if timed and self.cuda:
            self.peak_steps = torch.cuda.max_memory_allocated()
            self.reserved_steps = torch.cuda.max_memory_reserved()


def instrumented(base: type, clock: Clock) -> type:
    """`base` with `clock` among its callbacks and its reference precompute timed."""

    class Bench(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(clock)

        def _precompute_ref_logps(self, *args, **kwargs):
            sync()
            start = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*args, **kwargs)
            finally:
                sync()
                clock.precompute_s = (clock.precompute_s or 0.0) + time.perf_counter() - start

    Bench.__name__ = Bench.__qualname__ = f"Bench{base.__name__}"
    return Bench


def measure(variant: str, a: argparse.Namespace) -> dict:
    cuda = a.device == "cuda"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    before = torch.cuda.memory_allocated() if cuda else None  # what earlier variants left behind
    start = time.perf_counter()
    model = build(a.preset, a.layers, a.device)
    sync()
    build_s = time.perf_counter() - start
    if not cuda:  # the CUDA path's grouped kernel is not what the CPU runs in a stage
        for module in model.modules():
            if isinstance(module, NF4Experts):
                module.use_grouped_mm = False
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    vocab = model.config.vocab_size
    steps = a.warmup + a.steps
    rows = (PAIRS * 2 if variant == "sft" else PAIRS) * steps  # one pass over the rows: max_steps steps
    tok = tokenizer(vocab)
    common_args = dict(
        max_length=a.seq,
        bf16=cuda,
        use_cpu=not cuda,
        dataloader_pin_memory=cuda,
        gradient_checkpointing=True,
        max_steps=steps,
        learning_rate=1e-5,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    clock = Clock(a.warmup, cuda)
    monitor = routing.RouterMonitor(model)
    with tempfile.TemporaryDirectory(prefix=f"dpo-bench-{variant}-") as tmp:
        out = Path(tmp)
        if variant == "sft":
            config = SFTConfig(
                output_dir=str(out / "checkpoints"), per_device_train_batch_size=2 * PAIRS, **common_args
            )
            trainer_cls, kwargs, chunked_head = SFTTrainer, {}, True
        else:
            config = DPOConfig(
                output_dir=str(out / "checkpoints"),
                per_device_train_batch_size=PAIRS,
                precompute_ref_log_probs=variant == "dpo-precompute",
                **common_args,
            )
            reference = "base" if variant == "dpo-base" else "init"
            kwargs = {"router_monitor": monitor, "reference": reference, "evaluate_start": False}
            # As preference.run: TRL's chunked head stays (its trainers read outputs ours does not compute).
            trainer_cls, chunked_head = dpo.Trainer, False
        train = data(variant, rows, a.seq, vocab)
        check_lengths(train, tok, a.seq)
        inputs = SimpleNamespace(args=config, train=train, eval=None)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            trainer, _, trained, _ = common.fit(
                instrumented(trainer_cls, clock),
                model,
                inputs,
                tok,
                out,
                monitor,
                None,
                kernels="auto" if a.kernels else "off",
                chunked_head=chunked_head,
                **kwargs,
            )
        finally:
            monitor.remove()
        reference_copy = getattr(trainer, "reference", None)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        counted = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
        margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    step_s = statistics.median(clock.times)
    sequences = 2 * PAIRS
    result = {
        "variant": variant,
        "reference": None if variant == "sft" else ("base" if variant == "dpo-base" else "init"),
        "precompute_ref_log_probs": variant == "dpo-precompute",
        "preset": a.preset,
        "layers": a.layers,
        "sequences_per_step": sequences,
        "seq": a.seq,
        "kernels": bool(a.kernels and cuda),
        "step_s": round(step_s, 4),
        "step_times": [round(t, 4) for t in clock.times],
        "warmup_step_times": [round(t, 3) for t in clock.warmup_times],
        "interval_s": round(statistics.median(clock.intervals), 4) if clock.intervals else None,
        "tokens_per_s": round(sequences * a.seq / step_s),
        "tokens_first_step": counted[0] if counted else None,  # as the trainer counted them
        "peak_allocated_gb": gb(clock.peak_steps),
        "peak_reserved_gb": gb(clock.reserved_steps),
        "peak_setup_gb": gb(clock.peak_setup),
        "allocated_at_train_start_gb": gb(clock.allocated_at_start),
        "left_by_earlier_variants_gb": gb(before),
        "frozen_reference_bytes": reference_copy.frozen_bytes if reference_copy is not None else 0,
        "precompute_s": round(clock.precompute_s, 3) if clock.precompute_s is not None else None,
        "precompute_pairs": rows if clock.precompute_s is not None else None,
        # the precompute's cost per step of 4 pairs: what a step's own reference pass would have cost
        "precompute_s_per_step": round(clock.precompute_s / steps, 3)
        if clock.precompute_s is not None
        else None,
        "trainable_params": trainable,
        "build_s": round(build_s, 1),
        "train_s": trained.get("seconds"),
        "loss": [round(x, 4) for x in losses],
    }
    if margins:
        result["rewards_margins"] = [round(x, 4) for x in margins]
    del trainer, model, reference_copy, inputs
    free(cuda)
    return result


def free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch._dynamo.reset()  # compiled regions of the last variant's model: none of its tensors kept
        gc.collect()
        torch.cuda.empty_cache()


def ratios(runs: list[dict], key: str) -> dict[str, float]:
    """Each variant's `key` over the (latest) sft variant's; the latest row of each variant."""
    sft = [r for r in runs if r.get("variant") == "sft" and r.get(key)]
    if not sft:
        return {}
    base = sft[-1][key]
    return {r["variant"]: round(r[key] / base, 3) for r in runs if r.get(key)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="dpo_step.json")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the timed ones (compilation)")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence (half prompt)")
    parser.add_argument("--preset", default="v2-lite")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run (with --preset tiny)")
    parser.add_argument(
        "--kernels",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="as a stage runs with model.kernels: auto (CUDA only)",
    )
    parser.add_argument("--append", action="store_true", help="add to the variants already in --out")
    a = parser.parse_args()
    if a.steps < 1 or a.warmup < 0:
        parser.error("--steps must be ≥ 1 and --warmup ≥ 0")
    cuda = a.device == "cuda"
    head = {
        "device": torch.cuda.get_device_name() if cuda else a.device,
        "torch": torch.__version__,
        "shape": f"{PAIRS} pairs x 2 sides x {a.seq} tokens (prompt {a.seq // 2}) per DPO step; "
        f"{2 * PAIRS} rows x {a.seq} tokens per SFT step",
        "runs": [],
    }
    results = json.loads(Path(a.out).read_text()) if a.append and os.path.exists(a.out) else head
    for variant in a.variants.split(","):
        try:
            row = measure(variant, a)
        except Exception as e:  # a failed variant is a result; the others go on
            traceback.print_exc()
            row = {"variant": variant, "error": f"{type(e).__name__}: {e}"[:2000]}
            free(cuda)
        print(json.dumps(row), flush=True)
        results["runs"].append(row)
        results["peak_ratio_vs_sft"] = ratios(results["runs"], "peak_allocated_gb")
        results["step_ratio_vs_sft"] = ratios(results["runs"], "step_s")
        Path(a.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: results[k] for k in ("peak_ratio_vs_sft", "step_ratio_vs_sft")}), flush=True)


if __name__ == "__main__":
    main()
