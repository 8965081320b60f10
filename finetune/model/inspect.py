"""Quantization-coverage report: parameters, bytes, dtypes and trainable parameters per module kind."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

KINDS = (
    "mla",
    "dense_mlp",
    "shared_experts",
    "routed_experts",
    "router",
    "embeddings",
    "lm_head",
    "score",
    "norms",
    "other",
)


def kind_of(name: str) -> str:
    """The module kind of a parameter or buffer name (LoRA weights count with the module they adapt)."""
    owner = name.split(".")[-2] if "." in name else name
    if "norm" in owner:
        return "norms"
    if ".self_attn." in name:
        return "mla"
    if ".mlp.experts." in name or name.endswith(".mlp.experts"):
        return "routed_experts"
    if ".mlp.gate." in name:
        return "router"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp." in name:
        return "dense_mlp"
    if "embed_tokens" in name:
        return "embeddings"
    if "lm_head" in name:
        return "lm_head"
    if "score" in name.split("."):
        return "score"  # the sequence-classification / reward head
    return "other"


def _quant_state_tensors(state: Any) -> list[torch.Tensor]:
    """Tensors of a bitsandbytes QuantState (absmax, code, and the nested double-quant state)."""
    if state is None:
        return []
    tensors = [t for t in (getattr(state, "absmax", None), getattr(state, "code", None)) if t is not None]
    return tensors + _quant_state_tensors(getattr(state, "state2", None))


def _logical_numel(tensor: torch.Tensor) -> int:
    state = getattr(tensor, "quant_state", None)
    return state.shape.numel() if state is not None else tensor.numel()


def _dtype_name(tensor: torch.Tensor) -> str:
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        return str(getattr(state, "quant_type", "4bit"))
    return str(tensor.dtype).removeprefix("torch.")


def report(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """{kind: {params, bytes, dtypes, trainable_params}} plus a `total` entry.

    `params` counts logical weights (a 4-bit matrix counts its full shape); `bytes` is what is stored,
    scales included. Modules that hold packed weights of their own report them through
    `storage() -> list[(name, logical_params, bytes, dtype)]`.
    """
    rows: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"params": 0, "bytes": 0, "dtypes": set(), "trainable_params": 0}
    )
    seen: set[int] = set()
    custom: set[str] = set()
    for module_name, module in model.named_modules():
        storage = getattr(module, "storage", None)
        if callable(storage) and not isinstance(module, torch.nn.Linear):
            custom.add(module_name + ".")
            for name, numel, nbytes, dtype in storage():
                row = rows[kind_of(f"{module_name}.{name}")]
                row["params"] += numel
                row["bytes"] += nbytes
                row["dtypes"].add(dtype)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen or name.endswith(("inv_freq", "original_inv_freq")):
            continue
        seen.add(id(tensor))
        is_param = isinstance(tensor, torch.nn.Parameter)
        row = rows[kind_of(name)]
        if is_param and tensor.requires_grad:
            row["trainable_params"] += tensor.numel()
        own_lora = is_param and name.split(".")[-1].startswith(("lora_", "full_"))  # LoRA, ESFT copies
        if not own_lora and any(name.startswith(prefix) for prefix in custom):
            continue  # packed weights (frozen parameters, buffers), counted by the module's storage()
        if is_param or tensor.dtype == torch.uint8:
            row["params"] += _logical_numel(tensor)
            row["dtypes"].add(_dtype_name(tensor))
        # Scales count once: the NF4 code table is one tensor shared by many layers.
        stored = [tensor] + [
            t for t in _quant_state_tensors(getattr(tensor, "quant_state", None)) if id(t) not in seen
        ]
        seen.update(id(t) for t in stored)
        row["bytes"] += sum(t.numel() * t.element_size() for t in stored)
    total = {"params": 0, "bytes": 0, "dtypes": set(), "trainable_params": 0}
    out: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        if kind not in rows:
            continue
        row = rows[kind]
        out[kind] = {**row, "dtypes": sorted(row["dtypes"])}
        for key in ("params", "bytes", "trainable_params"):
            total[key] += row[key]
        total["dtypes"] |= row["dtypes"]
    has_lm_head = any(n.endswith("lm_head") for n, _ in model.named_modules())
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if "lm_head" not in out and tied and has_lm_head:
        out["lm_head"] = {"params": 0, "bytes": 0, "dtypes": ["tied to embeddings"], "trainable_params": 0}
    out["total"] = {**total, "dtypes": sorted(total["dtypes"])}
    return out


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'kind':<16}{'params':>14}{'bytes':>14}{'bytes/param':>12}  {'trainable':>12}  dtypes"]
    for kind, row in rows.items():
        per = row["bytes"] / row["params"] if row["params"] else 0.0
        lines.append(
            f"{kind:<16}{row['params']:>14,}{row['bytes']:>14,}{per:>12.2f}  {row['trainable_params']:>12,}  "
            + ", ".join(row["dtypes"])
        )
    return "\n".join(lines)
