"""Merge a trained adapter (routed-expert LoRA and a trained router included) into plain 16-bit weights.

PEFT's `merge_and_unload` on a 4-bit model re-quantizes the merged weights and knows nothing of our
NF4 experts, so we dequantize every weight ourselves, add the LoRA deltas, and fill a fresh native
`DeepseekV2ForCausalLM` that `AutoModelForCausalLM.from_pretrained` loads without this toolkit.
"""

from __future__ import annotations

import copy
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from transformers import DeepseekV2ForCausalLM

from finetune.model.experts import NF4Experts


def _dense(weight: torch.Tensor) -> torch.Tensor:
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight.detach().float()
    return bnb.functional.dequantize_4bit(weight.data, state).float()


def _expert_weights(module: NF4Experts) -> dict[str, torch.Tensor]:
    out = {f"{w}_proj": module.dequantize(w, torch.float32) for w in ("gate_up", "down")}
    if module.has_lora:
        for w in ("gate_up", "down"):
            a = getattr(module, f"lora_{w}_A").float()
            b = getattr(module, f"lora_{w}_B").float()
            out[f"{w}_proj"][module.lora_experts] += torch.bmm(b, a) * module.lora_scale
    return out


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 weights of the adapted model, LoRA merged, named as in a plain DeepseekV2ForCausalLM."""
    inner = next(m for m in model.modules() if isinstance(m, DeepseekV2ForCausalLM))
    out: dict[str, torch.Tensor] = {}
    handled: set[str] = set()
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            weight = _dense(base.weight)
            for adapter in module.active_adapters:
                weight += module.get_delta_weight(adapter).float()
            out[f"{name}.weight"] = weight
            handled.add(f"{name}.")
        elif isinstance(module, bnb.nn.Linear4bit) and not any(name.startswith(h) for h in handled):
            out[f"{name}.weight"] = _dense(module.weight)
            handled.add(f"{name}.")
        elif isinstance(module, ModulesToSaveWrapper):  # a fully trained copy (embeddings, lm_head)
            trained = module.modules_to_save[module.active_adapters[0]]
            out.update({f"{name}.{k}": v.detach().float() for k, v in trained.named_parameters()})
            handled.add(f"{name}.")
        elif isinstance(module, NF4Experts):
            out.update({f"{name}.{k}": v for k, v in _expert_weights(module).items()})
            handled.add(f"{name}.")
    for name, param in inner.named_parameters():
        if not any(name.startswith(h) for h in handled):
            out[name] = param.detach().float()
    return out


def export(
    model: torch.nn.Module, tokenizer, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Write `out_dir` as a plain transformers checkpoint (config, safetensors, tokenizer)."""
    inner = next(m for m in model.modules() if isinstance(m, DeepseekV2ForCausalLM))
    config = copy.deepcopy(inner.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    state = merged_state_dict(model)
    plain = DeepseekV2ForCausalLM._from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"export: weights do not fit the plain model: missing {missing}, unexpected {unexpected}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
