"""An adapter folder read without a model: which checkpoint tensor each of its files changes, and how.

PEFT's `adapter_config.json` + `adapter_model.safetensors` (LoRA keys
`base_model.model.<module>.lora_{A,B}.weight`, full `modules_to_save` copies `base_model.model.<name>`),
`routed_experts.safetensors` (per MoE layer `layers.<i>.lora_{gate_up,down}_{A,B}`, `lora_experts`,
`lora_alpha`, as `NF4Experts.lora_state_dict` writes them) `router.safetensors` (`layers.<i>.weight`) and ESFT's `expert_weights.safetensors` (per MoE layer
`layers.<i>.{gate_up,down}`, the trained experts' whole weights, and `layers.<i>.experts`, their ids).
Only headers and the few small tensors that say which experts are adapted are read here; the factors
stay on disk until the export needs them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.compat import peft as compat_peft
from finetune.errors import UserError, first_line
from finetune.model.experts import FULL_STATE_KEYS, LORA_STATE_KEYS
from finetune.model.shards import BadFile, Entry, Reader, read_header

EXPERTS_FILE = "routed_experts.safetensors"  # per-expert LoRA factors, beside PEFT's adapter files
# ESFT `train: full`: the trained experts' whole weights, per layer `layers.<i>.{gate_up,down,experts}`.
FULL_EXPERTS_FILE = "expert_weights.safetensors"
ROUTER_FILE = "router.safetensors"  # full router weights, when adapter.router is trainable
# A classifier's or reward model's head: stage type, label names in id order, multi-label, max_length.
HEAD_FILE = "head.json"

_PEFT = "base_model.model."
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "use_qalora": "QALoRA",
}


@dataclass
class ExpertLoRA:
    """One MoE layer's expert LoRA: the factor tensors, the adapted expert ids (slot order), alpha/r."""

    entries: dict[str, Entry]  # lora_{gate_up,down}_{A,B}
    experts: list[int]
    scale: float


@dataclass
class FullExperts:
    """One MoE layer's ESFT-trained experts: their ids and whole weights ([n, 2I, H], [n, H, I])."""

    experts: list[int]
    gate_up: Entry
    down: Entry


@dataclass
class Adapter:
    """What an adapter folder changes, keyed by checkpoint tensor name; tensors are read lazily."""

    folder: Path
    linear: dict[str, tuple[Entry, Entry, float]] = field(default_factory=dict)  # key → (A, B, scale)
    full: dict[str, Entry] = field(default_factory=dict)  # key → trained tensor replacing it
    experts: dict[int, ExpertLoRA] = field(default_factory=dict)  # MoE layer → expert LoRA
    full_experts: dict[int, FullExperts] = field(default_factory=dict)  # MoE layer → trained experts


def header(path: Path) -> dict[str, Entry]:
    """The tensors of a safetensors file; a truncated or corrupt file is a user error naming it."""
    try:
        return read_header(path)
    except (BadFile, OSError) as err:
        raise UserError(f"{path}: not a readable safetensors file: {first_line(err)}") from None


def read_adapter(folder: Path) -> Adapter:
    """Parse an adapter folder (PEFT files, routed-expert LoRA, routers) without loading its tensors."""
    path = folder / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a valid adapter config ({first_line(err)})") from None
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type {config.get('peft_type')!r}; export merges LoRA adapters only")
    bad = [name for key, name in _UNSUPPORTED.items() if config.get(key)]
    if bad:
        raise UserError(f"{path}: {bad[0]} adapters cannot be merged by export")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, int | float):
        raise UserError(
            f"{path}: needs a positive integer `r` and a number `lora_alpha`, got {r!r}, {alpha!r}"
        )
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    adapter = Adapter(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{weights}: not found; the adapter folder is incomplete")
    entries = header(weights)
    for key, entry in entries.items():
        if not key.startswith(_PEFT):
            raise UserError(f"{weights}: unexpected key {key!r} (not a PEFT LoRA key)")
        name = key[len(_PEFT) :]
        if ".lora_" not in name:
            adapter.full[name] = entry  # modules_to_save: the whole trained tensor
            continue
        module, _, part = name.rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise UserError(f"{weights}: {key!r} is a LoRA part export cannot merge (lora_{part})")
        if part == "B.weight":
            continue
        b = entries.get(f"{_PEFT}{module}.lora_B.weight")
        if b is None:
            raise UserError(f"{weights}: {key!r} has no matching lora_B")
        rank = ranks.get(compat_peft.pattern_key(list(ranks), module), r)
        lora_alpha = alphas.get(compat_peft.pattern_key(list(alphas), module), alpha)
        if entry.shape[0] != rank or len(entry.shape) != 2 or b.shape[-1] != rank:
            raise UserError(
                f"{weights}: {module}: LoRA shapes {entry.shape} / {b.shape} do not match rank {rank}"
            )
        scale = lora_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        adapter.linear[f"{module}.weight"] = (entry, b, scale)
    for layer, parts, ids in _layer_parts(folder / EXPERTS_FILE, LORA_STATE_KEYS, "lora_experts"):
        alpha_e = float(parts.pop("lora_alpha"))
        rank = parts["lora_gate_up_A"].shape[1]
        adapter.experts[layer] = ExpertLoRA(parts, ids, alpha_e / rank)
    for layer, parts, ids in _layer_parts(folder / FULL_EXPERTS_FILE, FULL_STATE_KEYS, "experts"):
        adapter.full_experts[layer] = FullExperts(ids, parts["gate_up"], parts["down"])
    router_path = folder / ROUTER_FILE
    if router_path.is_file():
        for key, entry in header(router_path).items():
            found = re.fullmatch(r"layers\.(\d+)\.weight", key)
            if found is None:
                raise UserError(f"{router_path}: unexpected key {key!r}")
            adapter.full[f"model.layers.{found[1]}.mlp.gate.weight"] = entry
    return adapter


def _layer_parts(
    path: Path, keys: tuple[str, ...], ids_key: str
) -> list[tuple[int, dict[str, Any], list[int]]]:
    """(layer, parts, expert ids) per MoE layer of a per-layer experts file (`layers.<i>.<key>`); the
    ids are read, and so is a scalar `lora_alpha`; the weights stay lazy entries. [] when absent."""
    if not path.is_file():
        return []
    reader = Reader()
    out = []
    try:
        entries = header(path)
        layers = sorted({int(k.split(".")[1]) for k in entries if re.fullmatch(r"layers\.\d+\..+", k)})
        for layer in layers:
            parts: dict[str, Any] = {p: entries.get(f"layers.{layer}.{p}") for p in keys}
            missing = [p for p, e in parts.items() if e is None]
            if missing:
                raise UserError(f"{path}: layer {layer} has no {missing[0]}")
            ids = [int(i) for i in reader.tensor(parts.pop(ids_key)).tolist()]
            if "lora_alpha" in parts:
                parts["lora_alpha"] = reader.tensor(parts["lora_alpha"])
            out.append((layer, parts, ids))
    except BadFile as err:
        raise UserError(f"{path}: {first_line(err)}") from None
    finally:
        reader.close()
    return out
