"""Sequences in, head outputs out: how reward models and classifiers read text, for training-time
evaluation and for `finetune predict` alike (so the two agree to the last digit)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch


def encode(tokenizer: Any, item: str | list[dict], max_length: int | None = None) -> list[int]:
    """Token ids of one text or conversation, as TRL's RewardTrainer prepares one side of a pair: a
    conversation through the chat template, a text with EOS appended (the pooled last token then sees it
    all). `max_length` keeps the first tokens."""
    if isinstance(item, list):
        ids = tokenizer.apply_chat_template(item, tokenize=True, return_dict=True)["input_ids"]
    else:
        eos = tokenizer.eos_token or ""
        ids = tokenizer(item if item.endswith(eos) else item + eos)["input_ids"]
    return list(ids[:max_length] if max_length is not None else ids)


def join(prompt: str | list[dict], completion: str | list[dict]) -> str | list[dict]:
    """A prompt and its completion as one sequence (both texts or both message lists)."""
    if isinstance(prompt, list) != isinstance(completion, list):
        raise ValueError("a prompt and its completion must both be texts or both message lists")
    return prompt + completion  # type: ignore[operator]


def pair_items(rows: Iterable[dict]) -> list[str | list[dict]]:
    """Each pair's chosen then rejected sequence, its explicit `prompt` (when any) in front, as TRL's
    RewardTrainer joins them: what the reward stage's eval and `finetune predict` both score."""
    out: list[str | list[dict]] = []
    for row in rows:
        prompt = row.get("prompt")
        out += [join(prompt, row[side]) if prompt else row[side] for side in ("chosen", "rejected")]
    return out


@torch.no_grad()
def head_outputs(
    model: torch.nn.Module,
    tokenizer: Any,
    sequences: Sequence[list[int]],
    *,
    batch_size: int = 8,
    desc: str | None = None,
) -> torch.Tensor:
    """The head's outputs (float32, [len(sequences), num_labels]) in order, in batches padded on the
    tokenizer's side; the model pools the last token that is not padding either way."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    out = []
    try:
        starts = range(0, len(sequences), batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=desc is None, leave=False):
            chunk = [{"input_ids": ids} for ids in sequences[start : start + batch_size]]
            batch = tokenizer.pad(chunk, return_tensors="pt")
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            out.append(logits.float().cpu())
    finally:
        model.train(was_training)
    width = getattr(model.config, "num_labels", 1)
    return torch.cat(out) if out else torch.empty(0, width)
