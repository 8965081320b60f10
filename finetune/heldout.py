"""Exact-match check by greedy generation: the quick before/after signal until the eval harness lands."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from finetune import data
from finetune.distributed import is_primary
from finetune.fast import generation
from finetune.model import fsdp


@torch.no_grad()
def exact_match(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list,
    targets: list[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    desc: str = "held-out check",
    kernels: str = "auto",
    synced: bool = False,
) -> dict:
    """Fraction of prompts whose greedy completion equals the target (whitespace-stripped).

    `synced`: every process calls this on the same prompts with an FSDP-sharded model; generation keeps
    them in step (transformers' `synced_gpus`) until all are done, and fast decoding is off."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    device = next(model.parameters()).device
    outputs: list[str] = []
    # A sharded model never decodes compiled (`generation.enabled`), so `extra` is empty when synced.
    synced_gpus = {"synced_gpus": True} if synced else {}
    try:
        with generation.compiled_decoding(model, generation.enabled(kernels, model)) as extra:
            for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
                chunk = prompts[start : start + batch_size]
                texts = [data.prompt_text(tokenizer, p) for p in chunk]
                # Chat templates already carry their special tokens; raw text prompts get BOS as in training.
                plain = all(isinstance(p, str) for p in chunk)
                batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=plain).to(
                    device
                )
                generated = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    **extra,
                    **synced_gpus,
                )
                new = generated[:, batch["input_ids"].shape[1] :]
                outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    hits = [out.strip() == ref.strip() for out, ref in zip(outputs, targets, strict=True)]
    examples = [{"target": ref, "output": out} for out, ref in list(zip(outputs, targets, strict=True))[:5]]
    return {"exact_match": sum(hits) / max(len(hits), 1), "n": len(hits), "examples": examples}


def check(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: tuple[list, list[str]] | None,
    *,
    max_new_tokens: int,
    batch_size: int,
    kernels: str,
    when: str,
) -> dict | None:
    """A stage's check `when` (before / after training), or None without held-out pairs or off the
    primary process. One process generates and the others go on, unless the model is FSDP-sharded (after
    training under an FSDP launch): then every rank generates the same prompts in step, as each forward
    all-gathers the layers, and rank 0 reports."""
    sharded = fsdp.is_sharded(model)
    if pairs is None or not (is_primary() or sharded):
        return None
    return exact_match(
        model,
        tokenizer,
        *pairs,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        desc=f"held-out check ({when})",
        kernels=kernels,
        synced=sharded,
    )
