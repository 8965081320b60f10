"""Load routed experts straight into NF4, one MoE layer at a time.

`from_pretrained` would first materialise every routed expert in 16 bits (28.8 GB on V2-Lite) before
`quantize_experts` could shrink them. Instead the model is built with parameter-less stand-ins for the
experts, so transformers neither allocates nor reads them; afterwards each layer's expert tensors are
read from the safetensors files (per-expert Hub keys or transformers' fused keys), quantized on the
layer's device and dropped. Peak: the final 4-bit model plus one layer of 16-bit experts.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers.activations import ACT2FN

from finetune import family
from finetune.compat import transformers as compat_transformers
from finetune.model.experts import NF4Experts


class PendingExperts(nn.Module):
    """Stand-in for DeepseekV2Experts during loading: the dimensions, no weights."""

    # transformers' weight init runs `isinstance(module, DeepseekV2Experts)` against the swapped name:
    # mark the stand-in initialized so it is skipped.
    _is_hf_initialized = True

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, *args, **kwargs):
        raise RuntimeError("routed experts were not loaded (finetune.model.streaming.fill_experts)")


@contextlib.contextmanager
def deferred_experts() -> Iterator[None]:
    """While active, DeepSeek-V2 models are built with `PendingExperts`.

    DeepseekV2Moe looks the experts class up in its module at construction time; swapping that name for
    the duration of `from_pretrained` is the one place to keep the 16-bit experts out of memory without
    forking the model code. Their checkpoint keys then count as unexpected, which we silence here.
    """
    with compat_transformers.experts_class(
        family.MODELING, family.Experts.__name__, PendingExperts, family.PreTrainedModel
    ):
        yield


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Checkpoint key → safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    files: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            files.update(dict.fromkeys(f.keys(), path))
    return files


class _Reader:
    def __init__(self, folder: Path):
        self.files = _tensor_files(folder)
        self._open: dict[Path, object] = {}

    def has(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str, device: torch.device) -> torch.Tensor:
        path = self.files[key]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._open[path].get_tensor(key).to(device)

    def stack(self, keys: list[str], device: torch.device) -> torch.Tensor:
        return torch.stack([self.get(k, device) for k in keys])


def _layer_weights(
    reader: _Reader, prefix: str, n: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [E, 2I, H] and down [E, H, I] of one layer, from fused or per-expert keys."""
    if reader.has(f"{prefix}.gate_up_proj"):
        return reader.get(f"{prefix}.gate_up_proj", device), reader.get(f"{prefix}.down_proj", device)
    missing = [
        k for k in (f"{prefix}.0.gate_proj.weight", f"{prefix}.0.down_proj.weight") if not reader.has(k)
    ]
    if missing:
        raise KeyError(f"no routed-expert weights for {prefix} in the checkpoint (looked for {missing[0]})")
    gate = reader.stack([f"{prefix}.{j}.gate_proj.weight" for j in range(n)], device)
    up = reader.stack([f"{prefix}.{j}.up_proj.weight" for j in range(n)], device)
    gate_up = torch.cat([gate, up], dim=1)  # transformers' fused order: gate rows, then up rows
    del gate, up
    return gate_up, reader.stack([f"{prefix}.{j}.down_proj.weight" for j in range(n)], device)


@torch.no_grad()
def fill_experts(
    model: nn.Module,
    folder: str | Path,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> int:
    """Replace every `PendingExperts` by `NF4Experts` quantized from the checkpoint; returns the count."""
    reader = _Reader(Path(folder))
    pending = [(name, m) for name, m in model.named_modules() if isinstance(m, PendingExperts)]
    for name, stand_in in pending:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        device = next(parent.parameters()).device  # the router's device: the layer's
        gate_up, down = _layer_weights(reader, name, stand_in.num_experts, device)
        quantized = NF4Experts.from_weights(
            gate_up,
            down,
            stand_in.act_fn,
            blocksize=blocksize,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
        )
        del gate_up, down
        setattr(parent, child, quantized)
    return len(pending)
