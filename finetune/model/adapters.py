"""LoRA targets by name (`mla`, `shared_experts`, `dense_mlp`) resolved to the modules a model has.

Targets resolve to full module names, so PEFT wraps exactly those and nothing else: the router
(`mlp.gate`, a DeepseekV2TopkRouter) can never be matched by a suffix like `gate` or `all-linear`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from peft.utils.constants import DUMMY_TARGET_MODULES
from safetensors.torch import load_file, save_file

from finetune import family
from finetune.compat import peft as compat_peft
from finetune.errors import UserError, first_line
from finetune.model import routing

# The adapter folder's file names, also asked of this module by the stages and the run folder.
from finetune.model.adapter_files import (  # noqa: F401
    EXPERTS_FILE,
    FULL_EXPERTS_FILE,
    HEAD_FILE,
    ROUTER_FILE,
    header,
)
from finetune.model.experts import NF4Experts, unquantized_experts_to_plain
from finetune.model.shards import DTYPES

PRESETS = family.TARGET_PRESETS


def _linear_names(model: torch.nn.Module) -> list[str]:
    # bitsandbytes' Linear4bit subclasses nn.Linear, so this covers quantized layers too.
    return [name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]


def resolve_targets(model: torch.nn.Module, targets: list[str], key: str = "adapter.targets") -> list[str]:
    """Full names of the Linear modules the targets select; presets missing from the model are errors."""
    linears = _linear_names(model)
    available = [p for p in PRESETS if family.preset_modules(p, linears)]
    chosen: list[str] = []
    has_experts = any(isinstance(m, (NF4Experts, family.Experts)) for m in model.modules())
    if has_experts:
        available.append("routed_experts")
    for target in targets:
        if target == "routed_experts":
            if not has_experts:
                raise UserError(
                    f"{key}: preset `routed_experts` matches nothing in this model (it has: {', '.join(available)})"
                )
            continue
        if target in PRESETS:
            found = family.preset_modules(target, linears)
            if not found:
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


def exact_targets() -> contextlib.AbstractContextManager[None]:
    """Keep PEFT from re-targeting our resolved module names while it wraps or loads (`compat.peft`)."""
    return compat_peft.exact_targets(family.MODEL_TYPES)


def expert_layers(model: torch.nn.Module) -> dict[int, NF4Experts]:
    """Decoder layer index → its NF4 routed experts."""
    return routing.by_layer(model, NF4Experts)


def attach(
    model: torch.nn.Module,
    *,
    r: int,
    alpha: float,
    dropout: float,
    targets: list[str],
    expert_r: int | None = None,
    expert_alpha: float | None = None,
    experts: dict[int, list[int]] | None = None,
    router: str = "frozen",
    trainable_modules: list[str] | None = None,
    head: str = "causal_lm",
) -> PeftModel:
    """Freeze the base model and add LoRA on the resolved targets.

    `routed_experts` puts per-expert LoRA inside the NF4 expert layers (rank `expert_r`, default `r`),
    on every expert or, with `experts`, on the listed expert ids of the listed layers only.
    """
    modules = resolve_targets(model, targets)
    for param in model.parameters():
        param.requires_grad_(False)
    # PEFT trains and saves a full copy of these modules (`modules_to_save`), reloaded with the adapter.
    to_save = [{"embeddings": "embed_tokens", "lm_head": "lm_head"}[m] for m in trainable_modules or []]
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        # Only `routed_experts`: PEFT's dummy target wraps nothing, so the model is still a PeftModel, which
        # transformers requires to train a quantized model; the expert LoRA is added below.
        target_modules=modules or DUMMY_TARGET_MODULES,
        modules_to_save=to_save or None,
        # With tied embeddings, one trained copy must serve both the input embeddings and lm_head.
        ensure_weight_tying=bool(to_save) and bool(getattr(model.config, "tie_word_embeddings", False)),
        # SEQ_CLS: PEFT also trains and saves the new `score` head in full.
        task_type={"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}[head],
    )
    if "routed_experts" in targets:
        unquantized_experts_to_plain(model)  # 16-bit experts take the same per-expert LoRA code path
    with exact_targets():
        peft_model = get_peft_model(model, config)
    if "routed_experts" in targets:
        # After get_peft_model: PEFT freezes every parameter that is not its own when it wraps.
        layers = expert_layers(peft_model)
        chosen = experts if experts is not None else {i: None for i in layers}
        for index, ids in chosen.items():
            if index not in layers:
                raise UserError(
                    f"adapter.experts: layer {index} has no routed experts (MoE layers: {sorted(layers)})"
                )
            bad = [e for e in ids or [] if not 0 <= e < layers[index].num_experts]
            if bad:
                raise UserError(
                    f"adapter.experts: layer {index}: no expert {bad[0]} (0..{layers[index].num_experts - 1})"
                )
            layers[index].add_lora(r=expert_r or r, alpha=expert_alpha or alpha, experts=ids, dropout=dropout)
    if router == "trainable":
        # The router weight itself (fp32, never wrapped or quantized) is trained, not a LoRA on it.
        for gate in routing.routers(peft_model).values():
            gate.weight.requires_grad_(True)
    # With gradient checkpointing and frozen embeddings, inputs must require grad for LoRA grads to flow.
    peft_model.enable_input_require_grads()
    disable_covers_expert_lora(peft_model)
    return peft_model


def disable_covers_expert_lora(model: PeftModel) -> None:
    """Make `model.disable_adapter()` switch off the routed-expert LoRA too (PEFT does not know it): TRL
    takes the adapter-disabled model as GRPO's reference policy, which must be the base model."""
    peft_disable = type(model).disable_adapter.__get__(model)

    @contextlib.contextmanager
    def disable_adapter() -> Iterator[None]:
        layers = list(expert_layers(model).values())
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(peft_disable())
            except ValueError:  # routed experts alone: PEFT has no layer of its own to disable
                if not layers:
                    raise
            for layer in layers:
                layer.lora_enabled = False
            try:
                yield
            finally:
                for layer in layers:
                    layer.lora_enabled = True

    model.disable_adapter = disable_adapter  # type: ignore[method-assign]


def keep_router_fp32(model: torch.nn.Module) -> None:
    """Put trainable router weights back in fp32 (before the optimizer exists, so its state follows)."""
    for gate in routing.routers(model).values():
        if gate.weight.requires_grad and gate.weight.dtype != torch.float32:
            gate.weight.data = gate.weight.data.float()


def keep_full_copies_dtype(model: torch.nn.Module) -> None:
    """Put trained full copies (PEFT `modules_to_save`) back in the dtype of the module they replace."""
    params = dict(model.named_parameters())
    for name, param in params.items():
        if param.requires_grad and ".modules_to_save." in name:
            original = params.get(re.sub(r"\.modules_to_save\.[^.]+\.", ".original_module.", name))
            if original is not None and param.dtype != original.dtype:
                param.data = param.data.to(original.dtype)


def extra_tensors(
    model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What PEFT does not save: the routed-expert LoRA (`EXPERTS_FILE`) and a trained router
    (`ROUTER_FILE`), keyed `layers.<i>.<name>`; adapter folders and trainer checkpoints both carry them.

    `state`: whole values of the parameters by name (see `save_adapter`), used where it has them."""
    names = {id(m): n for n, m in model.named_modules()} if state is not None else {}

    def whole(module: torch.nn.Module, key: str, value: torch.Tensor) -> torch.Tensor:
        if state is not None:
            value = state.get(f"{names[id(module)]}.{key}", value)
        return value.detach().contiguous().cpu()

    experts = {
        f"layers.{index}.{key}": whole(layer, key, value)
        for index, layer in expert_layers(model).items()
        if layer.has_lora
        for key, value in layer.lora_state_dict().items()
    }
    routers = {
        f"layers.{index}.weight": whole(gate, "weight", gate.weight)
        for index, gate in routing.routers(model).items()
        if gate.weight.requires_grad
    }
    return experts, routers


def full_expert_tensors(
    model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """ESFT's trained 16-bit experts (`FULL_EXPERTS_FILE`), keyed `layers.<i>.{gate_up,down,experts}`;
    `state` as in `extra_tensors`."""
    names = {id(m): n for n, m in model.named_modules()} if state is not None else {}
    out = {}
    for index, layer in expert_layers(model).items():
        for key, value in layer.full_state_dict().items():
            if state is not None and key != "experts":
                value = state.get(f"{names[id(layer)]}.full_{key}", value)
            out[f"layers.{index}.{key}"] = value.detach().contiguous().cpu()
    return out


def _load_per_layer(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor], load: str, trained: str, trainable: bool | None
) -> None:
    """`layers.<i>.<key>` tensors into each expert layer's `load` method; with `trainable`, the
    parameters named `trained*` get that requires_grad (the NF4 base weights are frozen integers)."""
    for index, layer in expert_layers(model).items():
        prefix = f"layers.{index}."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if own:
            getattr(layer, load)(own)
            for name, p in layer.named_parameters() if trainable is not None else ():
                if name.startswith(trained):
                    p.requires_grad_(trainable)


def load_extra_tensors(model: torch.nn.Module, folder: str | Path, *, trainable: bool | None = None) -> None:
    """Restore `extra_tensors` from `folder` in place; `trainable` (when given) sets their requires_grad."""
    # Expert LoRA, then ESFT's trained copies: each file per layer, each with its own trainable prefix.
    for name, load, trained in (
        (EXPERTS_FILE, "load_lora_state_dict", "lora_"),
        (FULL_EXPERTS_FILE, "load_full_state_dict", "full_"),
    ):
        path = Path(folder) / name
        if path.is_file():
            _load_per_layer(model, load_file(str(path)), load, trained, trainable)
    path = Path(folder) / ROUTER_FILE
    if path.is_file():
        tensors = load_file(str(path))
        with torch.no_grad():
            for index, gate in routing.routers(model).items():
                if f"layers.{index}.weight" in tensors:
                    gate.weight.copy_(tensors[f"layers.{index}.weight"])
                    if trainable is not None:
                        gate.weight.requires_grad_(trainable)


def save_adapter(model: PeftModel, folder: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """The PEFT folder, plus the routed-expert LoRA and a trained router beside it.

    `state`: the trainable parameters whole, by name (`fsdp.full_trainable_state`), for a model whose own
    parameters are FSDP shards; saved instead of the model's values."""
    model.save_pretrained(str(folder), **({"state_dict": state} if state is not None else {}))
    experts, routers = extra_tensors(model, state)
    if experts:
        save_file(experts, str(Path(folder) / EXPERTS_FILE))
    if routers:
        save_file(routers, str(Path(folder) / ROUTER_FILE))
    full = full_expert_tensors(model, state)
    if full:
        save_file(full, str(Path(folder) / FULL_EXPERTS_FILE))


def load_adapter(model: torch.nn.Module, folder: str | Path, *, trainable: bool = False) -> PeftModel:
    """Put a saved adapter on a freshly loaded base model, routed-expert LoRA included."""
    if (Path(folder) / EXPERTS_FILE).is_file() or (Path(folder) / FULL_EXPERTS_FILE).is_file():
        unquantized_experts_to_plain(model)
    with exact_targets():
        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
    _check_all_loaded(peft_model, Path(folder))
    load_extra_tensors(peft_model, folder, trainable=trainable)
    _lora_dtype_as_saved(peft_model, Path(folder))
    disable_covers_expert_lora(peft_model)
    if trainable:
        peft_model.enable_input_require_grads()
    return peft_model


def _check_all_loaded(model: PeftModel, folder: Path) -> None:
    """Every tensor of the adapter file landed in the model. PEFT only warns when an adapter names modules
    the model lacks (an adapter of another architecture), and the model then runs as if untrained."""
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        return
    have = set(get_peft_model_state_dict(model))
    missing = sorted(k for k in header(path) if k not in have)
    if missing:
        raise UserError(
            f"{folder}: the adapter does not fit the model: {len(missing)} of its tensors have no module in it "
            f"(first: {missing[0]}); it was trained on another architecture"
        )


def _lora_dtype_as_saved(model: torch.nn.Module, folder: Path) -> None:
    """Run the LoRA factors in the dtype they were trained and saved in: TRL trains a quantized model's
    LoRA in bf16, PEFT reloads it as fp32, and the outputs would then differ from the trained model's."""
    saved = {
        DTYPES[e.dtype]
        for path in (folder / "adapter_model.safetensors", folder / EXPERTS_FILE)
        if path.is_file()
        for k, e in header(path).items()
        if "lora_" in k
    }
    if len(saved) != 1:
        return
    dtype = saved.pop()
    for name, param in model.named_parameters():
        if "lora_" in name and param.dtype != dtype:
            param.data = param.data.to(dtype)


@contextlib.contextmanager
def applied(model: torch.nn.Module, folder: str | Path | None) -> Iterator[torch.nn.Module]:
    """`model` with the adapter in `folder` loaded for the block (None: the base model itself), and the
    base model as it was afterwards: several adapters are evaluated on one loaded base."""
    if folder is None:
        yield model
        return
    routers = {i: g.weight.detach().clone() for i, g in routing.routers(model).items()}
    try:
        peft_model = load_adapter(model, folder)
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"{folder}: the adapter does not fit the model ({first_line(err)})") from None
    try:
        yield peft_model
    finally:
        for layer in expert_layers(peft_model).values():
            layer.remove_lora()
            layer.remove_full()
        base = peft_model.unload()
        with torch.no_grad():
            for i, gate in routing.routers(base).items():
                gate.weight.copy_(routers[i])
