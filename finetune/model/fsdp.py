"""FSDP2 (`torch.distributed.fsdp.fully_shard`) over a loaded, adapted DeepSeek-V2 model.

One FSDP unit per decoder layer, then the root (embeddings, final norm, lm_head / score). FSDP2 shards
parameters only: the routed experts' NF4 storage (`NF4Experts`: packed data, absmax, code tables) is made
of frozen parameters for that reason, and is sharded along dim 0 like every other parameter, so each rank
holds 1/N of it and all-gathers one decoder layer at a time.

bitsandbytes `Linear4bit` weights are sharded too (`shard_linear4bit=False` leaves them whole on every
rank through `ignored_params`). FSDP2 hands the layer a plain parameter, without the `Params4bit` subclass
and its `quant_state`; bitsandbytes' forward rebuilds the `Params4bit` from the module's own copy of the
quant state (`fix_4bit_weight_quant_state_from_module`, written for FSDP1), so the packed bytes shard and
their absmax / code tables stay whole on every rank. Checked on CPU processes (tests/test_fsdp.py):
logits and LoRA gradients equal one process's, with gradient checkpointing and optimizer steps.

No mixed-precision casting (`MixedPrecisionPolicy()`): FSDP2 casts every parameter of a unit to
`param_dtype` when it all-gathers, the uint8 packed weights and fp32 quantization tables included, which
would corrupt them. The model runs in the dtype it was loaded in (`model.dtype`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from bitsandbytes.nn import Linear4bit
from torch import nn

from finetune import family
from finetune.compat import torch as compat_torch
from finetune.distributed import is_sharded  # noqa: F401  (the stages ask it here)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers, in order."""
    return [m for m in model.modules() if isinstance(m, family.DecoderLayer)]


def linear4bit_weights(model: nn.Module) -> set[nn.Parameter]:
    """The packed weights of bitsandbytes 4-bit linear layers (with their `quant_state`)."""
    return {m.weight for m in model.modules() if isinstance(m, Linear4bit)}


def shard(
    model: nn.Module,
    *,
    mesh: object | None = None,
    shard_linear4bit: bool = True,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Apply `fully_shard` to every decoder layer of `model` and to its root module, in place.

    `model` may be a `PeftModel`: the root unit is the transformers model inside it, so PEFT's wrapper
    keeps its class. `mesh`: a 1-D device mesh over the data-parallel processes (default: every process
    of the default group, on CUDA when the model is there, else the CPU through gloo). Returns `model`."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("FSDP2 needs a process group (torchrun / accelerate launch)")
    layers = decoder_layers(model)
    if not layers:
        raise ValueError("no family.DecoderLayer in the model")
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    if mesh is None:
        on_cuda = any(p.is_cuda for p in root.parameters())
        mesh = init_device_mesh("cuda" if on_cuda else "cpu", (dist.get_world_size(),))
    ignored = set() if shard_linear4bit else linear4bit_weights(root)
    common = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(), "ignored_params": ignored or None}
    with compat_torch.fsdp_integer_parameters():
        for layer in layers:
            fully_shard(layer, reshard_after_forward=reshard_after_forward, **common)
        # The root's own parameters (embeddings, norm, head) are gathered for the whole step anyway.
        fully_shard(root, reshard_after_forward=False, **common)
    if hasattr(root, "generate"):  # `generate` reads the head and embeddings outside the root's forward
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(root, "generate")
    return model


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """FSDP2's `no_sync`: backward passes inside accumulate whole (unsharded) gradients on each rank, and
    the first backward after it reduce-scatters them (the micro-batches of one accumulation window)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_requires_gradient_sync(True, recurse=False)


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter of `model`, whole and on the CPU, keyed by its name as `state_dict` names
    it. A collective under FSDP: every rank must call it, in the same order (each DTensor is all-gathered);
    the frozen 4-bit storage is not gathered."""
    return {name: full_tensor(p.detach()).cpu() for name, p in model.named_parameters() if p.requires_grad}


def local_bytes(model: nn.Module, names: tuple[str, ...] = ()) -> int:
    """Bytes of parameters (those whose name contains one of `names`, or all) this process stores:
    its shard of FSDP-sharded ones, the whole of replicated ones."""
    total = 0
    for name, p in model.named_parameters():
        if names and not any(n in name for n in names):
            continue
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a sharded (DTensor) parameter or gradient; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
