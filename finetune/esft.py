"""ESFT in a stage: score the routed experts on the stage's own training rows, as its trainer feeds
them, choose the experts, and make only those trainable (`adapter.experts: {select: esft}`).

`stages.common.fit` calls `apply` once the trainer is built (its dataset tokenized, its collator set)
and before it trains, so the scored tokens are exactly those the loss counts: positions whose next
token has a label (SFT; prompt and padding masked as the trainer masks them), every non-padding token
for a sequence head (reward, classify: its score reads the whole sequence), and the prompt tokens for
GRPO (its completions do not exist before it generates). Scoring runs on the model the stage starts
from (the base, or `init_from`'s adapter), without gradients.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from finetune import rundir
from finetune.errors import UserError
from finetune.model import adapters
from finetune.model import esft as scores_mod
from finetune.model.experts import NF4Experts

SCORES_FILE = "expert_scores.json"
HEATMAP_FILE = "expert_scores.png"
SELECTION_FILE = "esft.json"  # in the adapter folder: what was chosen and how


class ScoredOnly(Exception):
    """Raised by `apply` with `scores_only`: the scores are written and the stage stops before training."""

    def __init__(self, record: dict[str, Any]):
        super().__init__("scored")
        self.record = record


def check(stages: dict[str, str], types: tuple[str, ...]) -> None:
    """Every training stage of the recipe is of a type ESFT supports (`types`; eval stages train
    nothing and are left alone)."""
    for name, kind in stages.items():
        if kind not in (*types, "eval"):
            raise UserError(
                f"stages.{name}: `adapter.experts: {{select: esft}}` works with {', '.join(types)} stages, "
                f"not {kind}; train this stage in a recipe without it"
            )


def _prompt_ids(tokenizer: Any, prompt: Any, max_length: int) -> list[int]:
    if isinstance(prompt, list):  # a conversation, rendered as GRPO's generation reads it
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    return tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]


def batches(trainer: Any, samples: int, max_length: int) -> list[tuple[torch.Tensor, Any, torch.Tensor]]:
    """(input_ids, attention_mask, scored-token mask) of the first `samples` training rows, batched
    by the trainer's own collator in its per-device batch size (see the module for the masks)."""
    dataset = trainer.train_dataset
    rows = [dataset[i] for i in range(min(samples, len(dataset)))]
    size = max(1, int(trainer.args.per_device_train_batch_size))
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        if "prompt" in chunk[0] and not any(k.endswith("input_ids") for k in chunk[0]):  # GRPO: raw prompts
            tokenizer = trainer.processing_class
            ids = [_prompt_ids(tokenizer, r["prompt"], max_length) for r in chunk]
            width = max(len(i) for i in ids)
            pad = tokenizer.pad_token_id or 0
            input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids])
            attention = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
            out.append((input_ids, attention, attention.bool()))
            continue
        batch = trainer.data_collator(chunk)  # reward: chosen and rejected rows stacked
        input_ids = batch["input_ids"][:, :max_length]
        attention = batch.get("attention_mask")
        attention = attention[:, :max_length] if attention is not None else torch.ones_like(input_ids)
        labels = batch.get("labels")
        if labels is not None and labels.shape == batch["input_ids"].shape:
            labels = labels[:, :max_length]
            mask = torch.zeros_like(input_ids, dtype=torch.bool)
            mask[:, :-1] = labels[:, 1:] != -100  # the position whose output predicts a labelled token
        else:
            mask = attention.bool()
        out.append((input_ids, attention, mask))
    return out


def _new_dtype(model: torch.nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype the trainer gave the other trainable LoRA factors (TRL casts them to bf16 for a
    quantized model before `apply` runs); `default` when there are none."""
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" in name:
            return p.dtype
    return default


def apply(
    trainer: Any,
    out: Path,
    *,
    score: str,
    p: float,
    min_experts: int | None,
    max_experts: int | None,
    train: str,
    samples: int,
    max_length: int,
    lora_r: int,
    lora_alpha: float,
    dropout: float,
    stage: str,
    scores_only: bool = False,
) -> dict[str, Any]:
    """Score, select, write `expert_scores.json` / `.png` into `out`, and make the selected experts
    trainable: LoRA on them (`train: lora`) or 16-bit copies of them (`full`). Returns the record
    saved as the adapter's `esft.json`."""
    model = trainer.model
    layers = adapters.expert_layers(model)
    try:
        measured = scores_mod.score(model, batches(trainer, samples, max_length))
    except scores_mod.NoLossTokens:
        raise UserError(
            f"stages.{stage}: the ESFT scoring sample (the first {samples} training rows, up to "
            f"adapter.experts.max_length {max_length} tokens each) has no token the loss counts; raise "
            "adapter.experts.max_length or samples, or check the rows' completions"
        ) from None
    selection = scores_mod.select(measured[score], p, min_experts, max_experts)
    first = next(iter(layers.values()))
    per_expert = 3 * first.hidden_dim * first.intermediate_dim
    record = {
        "method": "esft",
        "score": score,
        "p": p,
        "min_experts": min_experts,
        "max_experts": max_experts,
        "train": train,
        "rows": min(samples, len(trainer.train_dataset)),
        "tokens": measured["tokens"],
        "selection": {str(i): ids for i, ids in selection.items()},
        **scores_mod.summary(selection, per_expert, first.num_experts),
    }
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_text(
        out / SCORES_FILE,
        json.dumps(
            {**record, "scores": {k: measured[k] for k in ("gate", "token")}, "top_k": measured["top_k"]}
        )
        + "\n",
    )
    plot(measured[score], selection, out / HEATMAP_FILE, f"{stage}: {score} score (selected: boxed)")
    if scores_only:
        raise ScoredOnly(record)
    inherited = {i: _trained_ids(layer) for i, layer in layers.items() if layer.has_full or layer.has_lora}
    if inherited:
        # `init_from` an ESFT stage: its experts were loaded trainable and go on training; a second set
        # chosen here would mix two selections on one layer.
        record["selection"] = {str(i): ids for i, ids in inherited.items()}
        record["inherited"] = True
        record.update(scores_mod.summary(inherited, per_expert, first.num_experts))
        return record
    for index, ids in selection.items():
        layer: NF4Experts = layers[index]
        if train == "lora":
            layer.add_lora(r=lora_r, alpha=lora_alpha, experts=ids, dropout=dropout)
            dtype = _new_dtype(model, torch.float32)
            for name, param in layer.named_parameters():
                if name.startswith("lora_"):
                    param.data = param.data.to(dtype)
        else:
            # One trainable dtype per layer, as FSDP2 requires of a unit: beside bf16 LoRA the copies are
            # bf16 too (the 16-bit copies a bf16 model gets anyway); alone they keep the compute dtype.
            layer.add_full(ids, dtype=_new_dtype(model, layer.compute_dtype))
    return record


def _trained_ids(layer: NF4Experts) -> list[int]:
    ids = layer.full_experts if layer.has_full else layer.lora_experts
    return [int(i) for i in ids.tolist()]


def save_record(record: dict[str, Any], adapter: Path) -> None:
    rundir.write_text(adapter / SELECTION_FILE, json.dumps(record, indent=1) + "\n")


def plot(scores: dict[int, list[float]], selection: dict[int, list[int]], path: Path, title: str) -> None:
    """Layer × expert heatmap of the score, the selected experts outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    index = sorted(scores)
    grid = [scores[i] for i in index]
    width = max(len(row) for row in grid)
    fig, ax = plt.subplots(figsize=(min(2 + width * 0.18, 16), 1.5 + len(index) * 0.3), dpi=100)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    for row, layer in enumerate(index):
        for e in selection.get(layer, []):
            ax.add_patch(Rectangle((e - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1))
    ax.set_yticks(range(len(index)), [str(i) for i in index])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    rundir.save_figure(fig, path)
