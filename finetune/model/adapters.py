"""LoRA targets by name (`mla`, `shared_experts`, `dense_mlp`) resolved to the modules a model has.

Targets resolve to full module names, so PEFT wraps exactly those and nothing else: the router
(`mlp.gate`, a DeepseekV2TopkRouter) can never be matched by a suffix like `gate` or `all-linear`.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from finetune.errors import UserError

_MLA = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
PRESETS = ("mla", "shared_experts", "dense_mlp", "routed_experts")


def _linear_names(model: torch.nn.Module) -> list[str]:
    # bitsandbytes' Linear4bit subclasses nn.Linear, so this covers quantized layers too.
    return [name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]


def _preset_modules(name: str, linears: list[str]) -> list[str]:
    def tail(n: str) -> str:
        return n.rsplit(".", 1)[-1]

    if name == "mla":
        return [n for n in linears if ".self_attn." in n and tail(n) in _MLA]
    if name == "shared_experts":
        return [n for n in linears if ".mlp.shared_experts." in n and tail(n) in _MLP]
    if name == "dense_mlp":
        return [n for n in linears if n.endswith(tuple(f".mlp.{p}" for p in _MLP))]
    return []


def resolve_targets(model: torch.nn.Module, targets: list[str], key: str = "adapter.targets") -> list[str]:
    """Full names of the Linear modules the targets select; presets missing from the model are errors."""
    linears = _linear_names(model)
    available = [p for p in PRESETS if _preset_modules(p, linears)]
    chosen: list[str] = []
    for target in targets:
        if target in PRESETS:
            found = _preset_modules(target, linears)
            if not found:
                if target == "routed_experts":
                    raise UserError(f"{key}: `routed_experts` LoRA needs the NF4 expert layer, not built yet")
                raise UserError(
                    f"{key}: preset `{target}` matches nothing in this model (it has: {', '.join(available)})"
                )
        else:
            if target in ("gate", "router") or target.endswith(".gate"):
                raise UserError(f"{key}: `{target}` is the MoE router; it is never wrapped with LoRA")
            found = [n for n in linears if n == target or n.endswith("." + target)]
            if not found:
                raise UserError(
                    f"{key}: `{target}` matches no linear module; use a preset ({', '.join(available)}) "
                    "or a module name such as `o_proj`"
                )
        chosen += [n for n in found if n not in chosen]
    return chosen


def attach(model: torch.nn.Module, *, r: int, alpha: float, dropout: float, targets: list[str]) -> PeftModel:
    """Freeze the base model and add LoRA on the resolved targets."""
    modules = resolve_targets(model, targets)
    for param in model.parameters():
        param.requires_grad_(False)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    # With gradient checkpointing and frozen embeddings, inputs must require grad for LoRA grads to flow.
    peft_model.enable_input_require_grads()
    return peft_model


def load_adapter(model: torch.nn.Module, folder: str, *, trainable: bool = False) -> PeftModel:
    """Put a saved adapter (a PEFT folder) on a freshly loaded base model."""
    return PeftModel.from_pretrained(model, folder, is_trainable=trainable)
