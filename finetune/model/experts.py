"""Routed experts of DeepSeek-V2 MoE layers stored in 4-bit NF4, with optional per-expert LoRA.

transformers 5 keeps a layer's routed experts in two fused 3D parameters (`DeepseekV2Experts`), and
bitsandbytes' `Linear4bit` only replaces `nn.Linear`, so `load_in_4bit` leaves ~92 % of DeepSeek-V2-Lite
in 16 bits. `NF4Experts` is a drop-in replacement that keeps both fused tensors NF4-packed, dequantizes
the whole layer per call and runs the experts as grouped matmuls over tokens sorted by expert.
"""

from __future__ import annotations

import math

import bitsandbytes.functional as bnbf
import torch
from torch import nn

from finetune import family
from finetune.compat import bitsandbytes as compat_bnb
from finetune.compat import torch as compat_torch
from finetune.fast import decode, pieces
from finetune.fast.mode import ExpertsMode
from finetune.kernels.nf4_torch import nf4_quant_state

_WEIGHTS = ("gate_up", "down")
# Packed data and QuantState tensors, per weight; the nested ones exist only with double quantization.
_QUANT_PARTS = ("packed", "absmax", "code", "absmax2", "code2", "offset")
# Stored as frozen parameters, so FSDP2 shards them (it shards parameters only); the scalar double-quant
# `offset` has no dimension to shard and stays a buffer.
_SHARDED_PARTS = ("packed", "absmax", "code", "absmax2", "code2")
_LORA_PARTS = ("A", "B")
# Keys of `NF4Experts.lora_state_dict()`, as saved per layer in `routed_experts.safetensors`.
LORA_STATE_KEYS = (*(f"lora_{w}_{p}" for w in _WEIGHTS for p in _LORA_PARTS), "lora_experts", "lora_alpha")
# Keys of `NF4Experts.full_state_dict()` (ESFT `train: full`), as saved per layer in `expert_weights.safetensors`.
FULL_STATE_KEYS = ("gate_up", "down", "experts")


# bitsandbytes' 4-bit kernels index elements with 32-bit integers: DeepSeek-V2's fused gate_up
# (160 x 3072 x 5120 = 2.5 B values) fails in them ("invalid argument"). Larger tensors go through
# them in slices of whole blocks; the result is the same bytes as one call.
_KERNEL_NUMEL_LIMIT = 2**31 - 1


def _slices(numel: int, blocksize: int) -> list[tuple[int, int]]:
    step = (_KERNEL_NUMEL_LIMIT // 2 // blocksize) * blocksize  # well inside the limit, whole blocks
    return [(start, min(start + step, numel)) for start in range(0, numel, step)]


def _quantize(
    weight: torch.Tensor, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, bnbf.QuantState]:
    """`bnbf.quantize_4bit(weight, ...)` (NF4), for tensors of any size."""
    compat_bnb.install_cpu_kernels()  # the same numbers on every CPU (idempotent)
    if weight.numel() <= _KERNEL_NUMEL_LIMIT:
        return bnbf.quantize_4bit(
            weight, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
        )
    if weight.numel() % blocksize:
        raise ValueError(
            f"cannot quantize {tuple(weight.shape)} in slices: size not a multiple of {blocksize}"
        )
    flat = weight.view(-1)
    packed, absmax = [], []
    for start, end in _slices(flat.numel(), blocksize):
        p, st = bnbf.quantize_4bit(
            flat[start:end], blocksize=blocksize, compress_statistics=False, quant_type="nf4"
        )
        packed.append(p)
        absmax.append(st.absmax)
    full = torch.cat(absmax)
    state = bnbf.QuantState(
        absmax=full,
        shape=weight.shape,
        code=st.code,
        blocksize=blocksize,
        quant_type="nf4",
        dtype=weight.dtype,
    )
    if double_quant:  # as bitsandbytes does it: the block scales, centred, in 8 bits per 256
        offset = full.mean()
        qabsmax, state2 = bnbf.quantize_blockwise(full - offset, blocksize=256)
        state.absmax, state.offset, state.state2, state.nested = qabsmax, offset, state2, True
    return torch.cat(packed), state


def _dequantize(packed: torch.Tensor, state: bnbf.QuantState) -> torch.Tensor:
    """`bnbf.dequantize_4bit(packed, state)`, for tensors of any size."""
    numel = math.prod(state.shape)
    if numel <= _KERNEL_NUMEL_LIMIT:
        return bnbf.dequantize_4bit(packed, state)
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(absmax, state.state2) + state.offset
    out = torch.empty(state.shape, dtype=state.dtype, device=packed.device)
    flat, size = out.view(-1), state.blocksize
    for start, end in _slices(numel, size):
        part = bnbf.QuantState(
            absmax=absmax[start // size : end // size],
            shape=torch.Size([end - start]),
            code=state.code,
            blocksize=size,
            quant_type="nf4",
            dtype=state.dtype,
        )
        flat[start:end] = bnbf.dequantize_4bit(packed[start // 2 : end // 2], part)
    return out


def _grouped_mm_ok(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]) -> bool:
    """Whether the fused CUDA kernel can run grouped products of `dtype` on `device` over `dims`."""
    if compat_torch.grouped_mm() is None or device.type != "cuda" or dtype != torch.bfloat16:
        return False
    # The kernel wants 16-byte aligned row strides: every bf16 inner and outer dim divisible by 8.
    if any(d % 8 for d in dims):
        return False
    return compat_torch.grouped_mm_runs_on(torch.cuda.get_device_capability(device))


def _grouped_linear(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, counts: list[int] | None
) -> torch.Tensor:
    """Rows of `x` sorted into groups; returns `x_g @ w[g].T` for each group g.

    `counts` (rows per group, on the host) selects the per-group loop; None selects the grouped kernel,
    which reads the group ends from `offsets` (int32, cumulative) on the device and never syncs.
    """
    if counts is None:
        op = compat_torch.grouped_mm()
        assert op is not None
        return op(x, w.transpose(-2, -1), offs=offsets)
    outs, start = [], 0
    for g, n in enumerate(counts):
        if n:
            outs.append(x[start : start + n] @ w[g].transpose(0, 1))
            start += n
    if not outs:
        return x.new_zeros(x.shape[0], w.shape[-2])
    return torch.cat(outs)


# Mean rows an expert up to which `NF4Experts.grouped_kernel` applies (two of the kernel's 16-row chunks).
_GROUPED_KERNEL_ROWS = 32


class _NF4GroupedLinear(torch.autograd.Function):
    """Grouped `x_g @ W_g.T` with W dequantized from NF4 inside forward and again inside backward.

    Autograd would otherwise keep the dequantized [E, N, K] weight alive from forward to backward:
    a 16-bit copy of every MoE layer at once, which is what quantizing was meant to avoid.
    The base weight is frozen, so only the input gets a gradient.
    """

    @staticmethod
    def forward(ctx, x, owner, name, offsets, counts, keep=False):  # type: ignore[override]
        ctx.owner, ctx.name, ctx.counts, ctx.keep = owner, name, counts, keep
        w = owner.dequantize(name)
        # keep: inside a checkpointed layer the saved weight lives only from the layer's recomputation
        # to its backward (one layer in 16 bits at a time), and saves the backward's dequantization.
        ctx.save_for_backward(offsets, w if keep else None)
        return _grouped_linear(x, w, offsets, counts)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        offsets, w = ctx.saved_tensors
        if not ctx.keep:
            w = ctx.owner.dequantize(ctx.name)
        # dL/dx_g = dL/dy_g @ W_g, i.e. the same grouped product with W transposed.
        grad_x = _grouped_linear(grad_out.contiguous(), w.transpose(1, 2), offsets, ctx.counts)
        return grad_x, None, None, None, None, None


class NF4Experts(nn.Module):
    """Drop-in for `DeepseekV2Experts` holding `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] in NF4.

    The packed data and the QuantState tensors are frozen parameters (`requires_grad=False`, so FSDP2
    shards them) but for the scalar `offset`, a buffer; all follow `.to(device)` and none is ever cast by
    `.to(dtype)`. LoRA factors added by `add_lora` are the only trainable parameters.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        act_fn: nn.Module,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.act_fn = act_fn
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        # None: grouped kernel on CUDA/bf16 where supported, else the loop; True/False force it (tests).
        self.use_grouped_mm: bool | None = None
        self._shapes = {
            "gate_up": (num_experts, 2 * intermediate_dim, hidden_dim),
            "down": (num_experts, hidden_dim, intermediate_dim),
        }
        self._nested_blocksize: dict[str, int] = {}
        self.lora_r = 0
        self.lora_alpha = 0.0
        self.lora_scale = 0.0
        self.lora_dropout: nn.Module = nn.Identity()
        self.lora_enabled = True  # off inside PeftModel.disable_adapter() (adapters.attach wires it)
        compat_torch.overrides_module_apply()  # `_apply` below keeps dtype casts off the packed weights
        self.mode = ExpertsMode()  # how it computes: set by the fast path (`finetune.fast.mode`)

    @classmethod
    def from_experts(
        cls,
        experts: family.Experts,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> NF4Experts:
        """Quantize one experts module on the device its weights are on; it is left for the caller to free."""
        if getattr(experts, "is_transposed", False):
            raise ValueError("transposed expert layouts are not supported")
        return cls.from_weights(
            experts.gate_up_proj,
            experts.down_proj,
            experts.act_fn,
            blocksize=blocksize,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
        )

    @classmethod
    def from_weights(
        cls,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        act_fn: nn.Module,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> NF4Experts:
        """Quantize fused expert weights gate_up [E, 2I, H] and down [E, H, I] on their device."""
        if gate_up.is_meta or down.is_meta:
            raise ValueError("cannot quantize experts whose weights are on the meta device; load them first")
        num_experts, two_i, hidden = gate_up.shape
        if two_i % 2 or down.shape != (num_experts, hidden, two_i // 2):
            raise ValueError(
                f"unexpected expert layout: gate_up {tuple(gate_up.shape)}, down {tuple(down.shape)}"
            )
        module = cls(
            num_experts,
            hidden,
            two_i // 2,
            act_fn,
            blocksize=blocksize,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
        )
        for name, weight in (("gate_up", gate_up), ("down", down)):
            module._store(name, weight.detach())
        return module

    def _store(self, name: str, weight: torch.Tensor) -> None:
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            weight = weight.float()
        # One call for the whole 3D tensor: blocks run over the flattened weight, as in Linear4bit.
        packed, state = _quantize(weight.contiguous(), self.blocksize, self.double_quant)
        parts = {"packed": packed, "absmax": state.absmax, "code": state.code}  # code: the 16 NF4 levels
        if state.nested:
            parts |= {"absmax2": state.state2.absmax, "code2": state.state2.code, "offset": state.offset}
            self._nested_blocksize[name] = state.state2.blocksize
        for part, tensor in parts.items():
            if part in _SHARDED_PARTS:
                self.register_parameter(f"{name}_{part}", nn.Parameter(tensor, requires_grad=False))
            else:
                self.register_buffer(f"{name}_{part}", tensor)

    def quant_state(self, name: str, dtype: torch.dtype | None = None) -> bnbf.QuantState:
        """The bitsandbytes QuantState of `gate_up` or `down`, rebuilt from the stored tensors (on their device)."""
        absmax, code = getattr(self, f"{name}_absmax"), getattr(self, f"{name}_code")
        nested = decode.nested_state(self, name)
        return nf4_quant_state(
            absmax, code, self._shapes[name], self.blocksize, dtype or self.compute_dtype, nested
        )

    def dequantize(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole [E, N, K] weight `gate_up` or `down` in `dtype` (default: compute_dtype)."""
        packed, state = getattr(self, f"{name}_packed"), self.quant_state(name, dtype)
        if self.mode.dequant_kernel and packed.is_cuda:
            # bitsandbytes' CUDA kernel streams at ~2.1 TB/s on the H200, ours at ~4.0 (same bits).
            from finetune.kernels.nf4_dequant import nf4_dequantize  # triton: imported where used

            return nf4_dequantize(packed, state)
        return _dequantize(packed, state)

    def _quant_tensors(self) -> dict[str, tuple[dict[str, torch.Tensor | None], torch.Tensor]]:
        """Name → (the dict holding it: `_parameters` or `_buffers`, the tensor) of the quantization tensors."""
        out = {}
        for n in (f"{w}_{p}" for w in _WEIGHTS for p in _QUANT_PARTS):
            for held in (self._parameters, self._buffers):
                if held.get(n) is not None:
                    out[n] = (held, held[n])
        return out

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # The quantization tensors follow device moves but never dtype casts: model.to(torch.bfloat16)
        # would round the fp32 absmax/code tables and corrupt every weight. A uint8 probe reveals the
        # target device without triggering a cast.
        held = self._quant_tensors()
        for n, (where, _) in held.items():
            where[n] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for n, (where, t) in held.items():
                device = fn(torch.empty(0, dtype=torch.uint8, device=t.device)).device
                if isinstance(t, nn.Parameter) and t.device != device:
                    t.data = t.data.to(device)  # the same Parameter object, as nn.Module._apply keeps it
                elif not isinstance(t, nn.Parameter):
                    t = t.to(device)
                where[n] = t
        return self

    def storage(self) -> list[tuple[str, int, int, str]]:
        """(weight, logical parameters, stored bytes, format) of the base weights, for inspect reports.

        Sharded (FSDP2) tensors count whole: the bytes are those of the full model, not of one rank."""
        rows = []
        for w in _WEIGHTS:
            nbytes = sum(
                t.numel() * t.element_size()
                for n, (_, t) in self._quant_tensors().items()
                if n.startswith(f"{w}_")
            )
            rows.append((f"{w}_proj", math.prod(self._shapes[w]), nbytes, "nf4"))
        return rows

    # ------------------------------------------------------------------- trained 16-bit experts
    @property
    def has_full(self) -> bool:
        return hasattr(self, "full_gate_up")

    def add_full(self, experts: list[int], dtype: torch.dtype | None = None) -> None:
        """Trainable 16-bit copies of `experts` (ESFT `train: full`), dequantized from the stored weights;
        every other expert stays as stored and frozen. The copies replace their experts' rows in
        `forward` (and in `decode`), so the model computes exactly as before until they train."""
        if self.has_full:
            raise ValueError("trained experts already added to this experts module")
        ids = sorted(set(experts))
        if not ids or ids[0] < 0 or ids[-1] >= self.num_experts:
            raise ValueError(
                f"experts must be a non-empty subset of 0..{self.num_experts - 1}, got {experts}"
            )
        device = next(iter(self.parameters())).device
        slot = torch.full((self.num_experts,), -1, dtype=torch.long)
        slot[ids] = torch.arange(len(ids))
        self.register_buffer("full_slot", slot.to(device), persistent=False)
        self.register_buffer(
            "full_experts", torch.tensor(ids, dtype=torch.long, device=device), persistent=False
        )
        index = self.full_experts
        for w in _WEIGHTS:
            with torch.no_grad():
                weight = self.dequantize(w, dtype or self.compute_dtype)[index].clone()
            setattr(self, f"full_{w}", nn.Parameter(weight))

    def remove_full(self) -> None:
        for name in ("full_gate_up", "full_down"):
            if hasattr(self, name):
                delattr(self, name)
        for name in ("full_slot", "full_experts"):
            self._buffers.pop(name, None)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained experts' weights ([n, 2I, H] and [n, H, I]) and their ids, detached copies."""
        if not self.has_full:
            return {}
        return {
            "gate_up": self.full_gate_up.detach().clone(),
            "down": self.full_down.detach().clone(),
            "experts": self.full_experts.detach().cpu().clone(),
        }

    def load_full_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Restore `full_state_dict()` output, creating the copies first if this module has none."""
        experts = [int(e) for e in sd["experts"].tolist()]
        if not self.has_full:
            self.add_full(experts, sd["gate_up"].dtype)
        elif experts != self.full_experts.tolist():
            raise ValueError(f"trained experts differ: saved {experts}, module {self.full_experts.tolist()}")
        with torch.no_grad():
            for w in _WEIGHTS:
                param = getattr(self, f"full_{w}")
                if sd[w].shape != param.shape:
                    raise ValueError(f"full_{w}: saved {tuple(sd[w].shape)}, module {tuple(param.shape)}")
                param.data = sd[w].to(param.device).clone()

    @staticmethod
    def _rows_of(slot: torch.Tensor, sorted_ids: torch.Tensor) -> torch.Tensor:
        """The sorted rows whose expert has a slot (trained copies or LoRA): a host sync, so once a forward."""
        return (slot[sorted_ids] >= 0).nonzero().squeeze(1)

    def _full_rows(
        self, name: str, x: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor, base: torch.Tensor
    ) -> torch.Tensor:
        """`base` with the `rows` of trained experts recomputed from their 16-bit copies."""
        x, counts = x[rows], counts[self.full_experts]
        w = getattr(self, f"full_{name}").to(x.dtype)
        offsets = counts.cumsum(0).to(torch.int32)
        grouped = self._grouped(x, tuple(w.shape[1:]))
        out = _grouped_linear(x, w, offsets, None if grouped else counts.tolist())
        return base.index_copy(0, rows, out.to(base.dtype))

    # ----------------------------------------------------------------------------------- LoRA
    @property
    def has_lora(self) -> bool:
        return self.lora_r > 0

    def add_lora(self, r: int, alpha: float, experts: list[int] | None = None, dropout: float = 0.0) -> None:
        """Per-expert LoRA on gate_up and down for `experts` (all when None); B starts at zero."""
        if self.has_lora:
            raise ValueError("LoRA already added to this experts module")
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        ids = sorted(set(range(self.num_experts) if experts is None else experts))
        if not ids or ids[0] < 0 or ids[-1] >= self.num_experts:
            raise ValueError(
                f"LoRA experts must be a non-empty subset of 0..{self.num_experts - 1}, got {experts}"
            )
        device = next(iter(self.parameters())).device  # the base weights' (frozen parameters)
        # Sorted ids keep slot order equal to expert order, so the expert-sorted rows of LoRA experts
        # are already grouped by slot.
        slot = torch.full((self.num_experts,), -1, dtype=torch.long)
        slot[ids] = torch.arange(len(ids))
        self.register_buffer("lora_slot", slot.to(device), persistent=False)
        self.register_buffer(
            "lora_experts", torch.tensor(ids, dtype=torch.long, device=device), persistent=False
        )
        h, i, n = self.hidden_dim, self.intermediate_dim, len(ids)
        shapes = {"gate_up": ((n, r, h), (n, 2 * i, r)), "down": ((n, r, i), (n, h, r))}
        for name, (a_shape, b_shape) in shapes.items():
            a = torch.empty(a_shape, dtype=torch.float32, device=device)
            for s in range(n):  # per slot, so fan_in is the input width as in PEFT's nn.Linear init
                nn.init.kaiming_uniform_(a[s], a=math.sqrt(5))
            setattr(self, f"lora_{name}_A", nn.Parameter(a))
            setattr(
                self, f"lora_{name}_B", nn.Parameter(torch.zeros(b_shape, dtype=torch.float32, device=device))
            )
        self.lora_r, self.lora_alpha, self.lora_scale = r, float(alpha), float(alpha) / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def remove_lora(self) -> None:
        """Back to the plain experts (another adapter is loaded next)."""
        for name in ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B"):
            if hasattr(self, name):
                delattr(self, name)
        for name in ("lora_slot", "lora_experts"):
            self._buffers.pop(name, None)
        self.lora_r, self.lora_alpha, self.lora_scale = 0, 0.0, 0.0
        self.lora_dropout = nn.Identity()

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA factors plus `lora_experts` and `lora_alpha`, detached copies."""
        if not self.has_lora:
            return {}
        sd = {
            f"lora_{w}_{p}": getattr(self, f"lora_{w}_{p}").detach().clone()
            for w in _WEIGHTS
            for p in _LORA_PARTS
        }
        sd["lora_experts"] = self.lora_experts.detach().cpu().clone()
        sd["lora_alpha"] = torch.tensor(self.lora_alpha)
        return sd

    def load_lora_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Restore `lora_state_dict()` output, creating the LoRA first if this module has none (dropout 0)."""
        experts = [int(e) for e in sd["lora_experts"].tolist()]
        if not self.has_lora:
            self.add_lora(sd["lora_gate_up_A"].shape[1], float(sd["lora_alpha"]), experts)
        elif experts != self.lora_experts.tolist():
            raise ValueError(f"LoRA experts differ: saved {experts}, module {self.lora_experts.tolist()}")
        with torch.no_grad():
            for w in _WEIGHTS:
                for p in _LORA_PARTS:
                    param = getattr(self, f"lora_{w}_{p}")
                    if sd[f"lora_{w}_{p}"].shape != param.shape:
                        raise ValueError(
                            f"lora_{w}_{p}: saved {tuple(sd[f'lora_{w}_{p}'].shape)}, module {tuple(param.shape)}"
                        )
                    param.copy_(sd[f"lora_{w}_{p}"])
        self.lora_alpha = float(sd["lora_alpha"])
        self.lora_scale = self.lora_alpha / self.lora_r

    def _lora_delta(
        self, name: str, x: torch.Tensor, rows: torch.Tensor | None, counts: torch.Tensor, base: torch.Tensor
    ) -> torch.Tensor:
        """`base` plus `(x_e @ A_e.T) @ B_e.T * scale` on the rows of experts that have LoRA (`rows`; None:
        every expert has LoRA, every row)."""
        a = getattr(self, f"lora_{name}_A").to(x.dtype)
        b = getattr(self, f"lora_{name}_B").to(x.dtype)
        if rows is not None:
            x, counts = x[rows], counts[self.lora_experts]
        offsets = counts.cumsum(0).to(torch.int32)
        grouped = self._grouped(x, (x.shape[-1], self.lora_r, b.shape[1]))
        host = None if grouped else counts.tolist()
        # Scale the [rows, r] intermediate, not the [rows, N] delta: profiled on the H200, scaling the
        # delta cost about as much GPU time as the LoRA matmuls themselves.
        low = _grouped_linear(self.lora_dropout(x), a, offsets, host) * self.lora_scale
        delta = _grouped_linear(low, b, offsets, host)
        return base + delta if rows is None else base.index_add(0, rows, delta)

    def _base_product(
        self, name: str, x: torch.Tensor, offsets: torch.Tensor, host: list[int] | None, keep: bool
    ) -> torch.Tensor:
        """x_g @ W_g.T over the experts' sorted rows, W = weight `name` without LoRA."""
        # The kernel needs rows of whole blocks (K a multiple of the blocksize), as V2-Lite's 2,048 / 1,408,
        # and decodes the weight again for every 16 rows of an expert: decode steps, not a long prefill.
        # (On a CPU the op runs its plain-torch path.)
        if (
            self.mode.grouped_kernel
            and not torch.is_grad_enabled()
            and self._shapes[name][2] % self.blocksize == 0
            and x.shape[0] <= _GROUPED_KERNEL_ROWS * self.num_experts
        ):
            from finetune.kernels.nf4_decode import nf4_expert_gemv  # triton: imported where used

            packed, absmax, code = (getattr(self, f"{name}_{part}") for part in ("packed", "absmax", "code"))
            nested = decode.nested_state(self, name)
            return nf4_expert_gemv(
                x, offsets, packed, absmax, nested, code, self._shapes[name], self.blocksize
            )
        return _NF4GroupedLinear.apply(x, self, name, offsets, host, keep)

    def _grouped(self, x: torch.Tensor, dims: tuple[int, ...]) -> bool:
        """Grouped kernel for products of `x`'s dtype/device over `dims`, or the per-expert loop."""
        if self.use_grouped_mm is not None:
            return self.use_grouped_mm and compat_torch.grouped_mm() is not None
        return _grouped_mm_ok(x.device, x.dtype, dims)

    def compiles_whole(self, x: torch.Tensor) -> bool:
        """Whether the grouped path traces as one graph for inputs like `x` (compute dtype): no host
        sync (`counts.tolist()` of the per-expert loop) and no data-dependent shape (the `nonzero` of
        LoRA on some experts only)."""
        if not self._grouped(x, (self.hidden_dim, self.intermediate_dim)):
            return False
        if self.has_full and self.lora_enabled:
            return False  # the trained experts' rows: a data-dependent shape
        if not (self.has_lora and self.lora_enabled):
            return True
        all_experts = self.lora_experts.numel() == self.num_experts
        return all_experts and self._grouped(x, (self.hidden_dim, self.intermediate_dim, self.lora_r))

    # ----------------------------------------------------------------------------------- forward
    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states [T, H], top_k_index [T, K] in [0, E), top_k_weights [T, K] -> [T, H]."""
        num_tokens, top_k = top_k_index.shape
        if torch.compiler.is_compiling() and (
            num_tokens * top_k <= self.num_experts
            or not self.compiles_whole(hidden_states.to(self.compute_dtype))
        ):
            # A compiled decode step: dequantize just the picked experts, fused into one kernel. Also
            # for more tokens (in chunks) where the grouped path below would break the graph: a break
            # under transformers' variadic forward wrappers drops whole frames to eager.
            return decode.few_token_forward(self, hidden_states, top_k_index, top_k_weights)
        ids = top_k_index.reshape(-1)
        # Stable sort: rows of one expert stay in token order, so results are deterministic.
        sorted_ids, perm = torch.sort(ids, stable=True)
        # Group ends by binary search rather than bincount: the shape is fixed, so it compiles.
        experts = torch.arange(1, self.num_experts + 1, device=ids.device)
        offsets = torch.searchsorted(sorted_ids, experts).to(torch.int32)
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        if self.mode.fused:
            x = pieces.permute(hidden_states.to(self.compute_dtype), perm, inverse, top_k)
        else:
            x = hidden_states.to(self.compute_dtype)[perm // top_k]

        grouped = self._grouped(x, (self.hidden_dim, self.intermediate_dim))
        host = None if grouped else counts.tolist()

        # (autograd.Function.forward runs without grad mode: decided here)
        keep = self.mode.fused and self.mode.checkpointed() and torch.is_grad_enabled()
        gate_up = self._base_product("gate_up", x, offsets, host, keep)
        lora = self.has_lora and self.lora_enabled
        full = self.has_full and self.lora_enabled
        full_rows = self._rows_of(self.full_slot, sorted_ids) if full else None
        some = lora and self.lora_experts.numel() < self.num_experts
        lora_rows = self._rows_of(self.lora_slot, sorted_ids) if some else None
        if full:
            gate_up = self._full_rows("gate_up", x, full_rows, counts, gate_up)
        if lora:
            gate_up = self._lora_delta("gate_up", x, lora_rows, counts, gate_up)
        if self.mode.fused:
            h = pieces.compiled("swiglu_fused")(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            h = self.act_fn(gate) * up
        y = self._base_product("down", h, offsets, host, keep)
        if full:
            y = self._full_rows("down", h, full_rows, counts, y)
        if lora:
            y = self._lora_delta("down", h, lora_rows, counts, y)

        # Weight and sum in fp32 (`pieces.weighted_sum`); fused, the same with a gather-only backward.
        if self.mode.fused:
            out = pieces.combine(y, top_k_weights, perm, inverse)
        else:
            out = pieces.weighted_sum(y, top_k_weights, inverse)
        return out.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        lora = f", lora_r={self.lora_r}, lora_experts={self.lora_experts.numel()}" if self.has_lora else ""
        lora += f", trained_experts={self.full_experts.numel()}" if self.has_full else ""
        return (
            f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}, "
            f"nf4 blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}{lora}"
        )


class PlainExperts(NF4Experts):
    """The 16-bit twin of `NF4Experts` (`quantization: none`), so routed-expert LoRA runs the same code.

    It holds the original fused tensors as frozen parameters under their original names (`gate_up_proj`,
    `down_proj`), so state-dict keys match `DeepseekV2Experts` and FSDP2 shards them; no copy is made.
    """

    @classmethod
    def from_experts(cls, experts: family.Experts, **_: object) -> PlainExperts:  # type: ignore[override]
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        num_experts, two_i, hidden = gate_up.shape
        module = cls(num_experts, hidden, two_i // 2, experts.act_fn, compute_dtype=gate_up.dtype)
        module.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        module.down_proj = nn.Parameter(down, requires_grad=False)
        return module

    def _base_product(
        self, name: str, x: torch.Tensor, offsets: torch.Tensor, host: list[int] | None, keep: bool
    ) -> torch.Tensor:
        return _NF4GroupedLinear.apply(x, self, name, offsets, host, keep)  # 16-bit: no NF4 kernel

    def dequantize(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        weight = getattr(self, f"{name}_proj")
        return weight.to(dtype or weight.dtype)

    def _quant_tensors(self) -> dict[str, tuple[dict[str, torch.Tensor | None], torch.Tensor]]:
        return {}  # plain weights follow dtype casts like any parameter

    def storage(self) -> list[tuple[str, int, int, str]]:
        return [
            (f"{w}_proj", t.numel(), t.numel() * t.element_size(), str(t.dtype).removeprefix("torch."))
            for w in _WEIGHTS
            for t in [getattr(self, f"{w}_proj")]
        ]

    def forward(self, hidden_states, top_k_index, top_k_weights):  # type: ignore[override]
        self.compute_dtype = self.gate_up_proj.dtype  # follows model.to(dtype)
        return super().forward(hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return super().extra_repr().replace("nf4 blocksize", "16-bit (unquantized), blocksize")


def unquantized_experts_to_plain(model: nn.Module) -> int:
    """Swap every 16-bit `DeepseekV2Experts` for a `PlainExperts` sharing its tensors; returns the count."""
    names = [name for name, m in model.named_modules() if type(m) is family.Experts]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, PlainExperts.from_experts(getattr(parent, child)))
    return len(names)


def expert_bytes(module: nn.Module) -> int:
    """Bytes held by the routed experts in `module`: NF4 storage, or the 16-bit fused parameters."""
    total = 0
    for m in module.modules():
        if isinstance(m, NF4Experts):
            total += sum(nbytes for _, _, nbytes, _ in m.storage())
        elif isinstance(m, family.Experts):
            total += sum(p.numel() * p.element_size() for p in (m.gate_up_proj, m.down_proj))
    return total


def quantize_experts(
    model: nn.Module,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> int:
    """Replace every `DeepseekV2Experts` in `model` by `NF4Experts`; returns how many were replaced.

    One layer at a time, each original's 16-bit storage freed before the next, so the peak is the
    final size plus one layer in 16 bits. Routers (`mlp.gate`) and `mlp.shared_experts` are not touched.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, family.Experts)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        setattr(
            parent,
            child,
            NF4Experts.from_experts(
                old, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype
            ),
        )
        # Emptying .data frees the storage even if something else (an optimizer, a caller's list)
        # still holds the Parameter objects.
        for p in (old.gate_up_proj, old.down_proj):
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        del old
    return len(names)
