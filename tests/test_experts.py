"""NF4 routed experts: parity with the family's experts (transformers' DeepseekV2Experts), whole-model quantization, per-expert LoRA."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from transformers import DeepseekV2ForCausalLM

from finetune import family
from finetune.model.experts import NF4Experts, expert_bytes, quantize_experts
from finetune.model.presets import preset_config

E, H, INTER, K = 8, 64, 32, 2
HAS_GROUPED_MM = hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")
# torch's CPU grouped_mm kernel lets the grouped path (used on CUDA) be checked here too.
PATHS = [False, pytest.param(True, marks=pytest.mark.skipif(not HAS_GROUPED_MM, reason="no grouped_mm"))]


def tiny_model(q_lora_rank: int | None = None) -> DeepseekV2ForCausalLM:
    torch.manual_seed(0)
    config = preset_config("tiny")
    config.q_lora_rank = q_lora_rank
    assert (config.hidden_size, config.moe_intermediate_size, config.n_routed_experts) == (H, INTER, E)
    assert config.num_experts_per_tok == K
    return DeepseekV2ForCausalLM(config).float().eval()


@pytest.fixture(scope="module")
def experts() -> family.Experts:
    return tiny_model().model.layers[1].mlp.experts


def routing(tokens: int, seed: int, top_k: int = K, num_experts: int = E - 1):
    """Random tokens and distinct top-k experts; expert E-1 gets no token, so empty groups are covered."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g)
    index = torch.rand(tokens, num_experts, generator=g).topk(top_k, dim=-1).indices
    weights = torch.rand(tokens, top_k, generator=g)
    return x, index, weights


def nf4(experts: family.Experts, grouped: bool = False, **kw) -> NF4Experts:
    module = NF4Experts.from_experts(experts, compute_dtype=torch.float32, **kw)
    module.use_grouped_mm = grouped
    return module


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def lora(module: NF4Experts) -> dict[str, torch.nn.Parameter]:
    """The LoRA factors; the other parameters are the frozen NF4 storage."""
    return {n: p for n, p in module.named_parameters() if n.startswith("lora_")}


def stored(module: NF4Experts) -> dict[str, torch.Tensor]:
    """The quantized storage: frozen parameters (what FSDP2 shards) and the scalar buffers."""
    return {n: t for n, t in [*module.named_parameters(), *module.named_buffers()] if "lora" not in n}


def randomize_lora(module: NF4Experts, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora(module).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ----------------------------------------------------------------------------------- one layer
@pytest.mark.parametrize("grouped", PATHS)
def test_one_layer_matches_original_up_to_quantization(experts, grouped):
    x, index, weights = routing(48, seed=1)
    module = nf4(experts, grouped)
    assert (module.num_experts, module.hidden_dim, module.intermediate_dim) == (E, H, INTER)
    assert module.act_fn is experts.act_fn
    with torch.no_grad():
        ref = experts(x, index, weights)
        out = module(x, index, weights)
    assert out.shape == ref.shape and out.dtype == x.dtype
    # NF4 moves each Gaussian weight by ~9 % (rms); gate, up and down errors compound to ~16 %.
    assert rel(module.dequantize("gate_up"), experts.gate_up_proj) < 0.1
    assert rel(module.dequantize("down"), experts.down_proj) < 0.1
    assert 0.01 < rel(out, ref) < 0.25

    # The original layer run on the dequantized weights gives the same numbers: only quantization differs.
    exact = copy.deepcopy(experts)
    with torch.no_grad():
        exact.gate_up_proj.copy_(module.dequantize("gate_up"))
        exact.down_proj.copy_(module.dequantize("down"))
        torch.testing.assert_close(module(x, index, weights), exact(x, index, weights), rtol=1e-5, atol=1e-5)


def test_bf16_compute_and_single_expert_routing(experts):
    x, index, weights = routing(16, seed=2, top_k=1)
    module = NF4Experts.from_experts(experts)  # default compute dtype: bfloat16
    assert module.compute_dtype == torch.bfloat16
    with torch.no_grad():
        out = module(x, index, weights)
        ref = nf4(experts)(x, index, weights)
    assert out.dtype == torch.float32
    assert rel(out, ref) < 0.02


def test_to_moves_the_storage_but_never_casts_it(experts):
    x, index, weights = routing(12, seed=3)
    module = nf4(experts)
    dtypes = {n: b.dtype for n, b in stored(module).items()}
    assert dtypes["gate_up_packed"] == torch.uint8 and dtypes["gate_up_absmax2"] == torch.float32
    # Everything with a dimension is a frozen parameter (FSDP2 shards parameters only); the scalar offset a buffer.
    params = dict(module.named_parameters())
    assert set(params) == {
        f"{w}_{p}" for w in ("gate_up", "down") for p in ("packed", "absmax", "code", "absmax2", "code2")
    }
    assert not any(p.requires_grad for p in params.values())
    assert set(dict(module.named_buffers())) == {"gate_up_offset", "down_offset"}
    with torch.no_grad():
        before = module(x, index, weights)
        module.to(torch.bfloat16).to("cpu").half().float()
        after = module(x, index, weights)
    assert {n: b.dtype for n, b in stored(module).items()} == dtypes
    assert all(p is params[n] for n, p in module.named_parameters())  # the same Parameter objects
    assert torch.equal(before, after)
    # The storage is saved and restored with the module, under the same keys as when it was all buffers.
    assert set(module.state_dict()) == set(dtypes)
    clone = nf4(experts, blocksize=128, double_quant=False)
    with pytest.raises(RuntimeError):
        clone.load_state_dict(module.state_dict())
    fresh = nf4(experts)
    fresh.load_state_dict(module.state_dict())
    assert torch.equal(fresh(x, index, weights), after)


def test_no_double_quant_and_other_blocksize(experts):
    x, index, weights = routing(20, seed=4)
    with torch.no_grad():
        ref = experts(x, index, weights)
        plain = nf4(experts, blocksize=128, double_quant=False)
        assert "gate_up_absmax2" not in stored(plain)
        assert plain.gate_up_absmax.dtype == torch.float32
        assert rel(plain.dequantize("down"), experts.down_proj) < 0.1
        assert rel(plain(x, index, weights), ref) < 0.25


# ----------------------------------------------------------------------------------- whole model
@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_quantize_experts_on_the_model(q_lora_rank):
    model = tiny_model(q_lora_rank)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items() if ".experts." not in k}
    old = [(m.gate_up_proj, m.down_proj) for m in model.modules() if isinstance(m, family.Experts)]
    n_params = sum(p.numel() for pair in old for p in pair)

    assert quantize_experts(model) == 2
    assert not any(isinstance(m, family.Experts) for m in model.modules())
    assert all(p.numel() == 0 for pair in old for p in pair)  # originals freed
    for layer in model.model.layers[1:]:
        assert isinstance(layer.mlp.experts, NF4Experts)
        assert layer.mlp.gate.weight.dtype == torch.float32
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # routers, shared experts, the rest
    assert any(".mlp.gate.weight" in k for k in before) and any(".shared_experts." in k for k in before)
    assert expert_bytes(model) / n_params <= 0.6
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".experts." in n)

    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.9


def test_replaced_module_is_called_whatever_the_experts_implementation():
    model = tiny_model()
    quantize_experts(model, compute_dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits
        for impl in ("eager", "batched_mm", "grouped_mm"):
            model.set_experts_implementation(impl)
            assert torch.equal(model(ids).logits, base), impl
        # A change inside NF4Experts reaches the logits, so the model does call it.
        model.model.layers[2].mlp.experts.add_lora(8, 8)
        assert torch.equal(model(ids).logits, base)
        randomize_lora(model.model.layers[2].mlp.experts)
        assert not torch.allclose(model(ids).logits, base, atol=1e-3)


# ----------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("subset", [None, [3, 0]])
def test_zero_b_lora_is_the_identity(experts, subset):
    x, index, weights = routing(24, seed=5)
    module = nf4(experts)
    with torch.no_grad():
        ref = module(x, index, weights)
        module.add_lora(8, 16, experts=subset)
        assert torch.equal(module(x, index, weights), ref)
    n = E if subset is None else 2
    assert module.lora_gate_up_A.shape == (n, 8, H) and module.lora_gate_up_B.shape == (n, 2 * INTER, 8)
    assert module.lora_down_A.shape == (n, 8, INTER) and module.lora_down_B.shape == (n, H, 8)
    assert all(p.dtype == torch.float32 for p in lora(module).values())
    assert module.lora_scale == 2.0 and module.lora_experts.tolist() == ([0, 3] if subset else list(range(E)))
    # PEFT's nn.Linear init: kaiming_uniform(a=sqrt(5)) gives |A| <= 1/sqrt(fan_in), B zero.
    assert module.lora_gate_up_A.abs().max() <= 1 / math.sqrt(H)
    assert module.lora_gate_up_A.abs().max() > 0.5 / math.sqrt(H)
    assert not module.lora_down_B.any()
    with pytest.raises(ValueError):
        module.add_lora(8, 16)
    with pytest.raises(ValueError):
        nf4(experts).add_lora(8, 16, experts=[E])


@pytest.mark.parametrize("grouped", PATHS)
def test_lora_training_touches_only_lora(experts, grouped):
    x, index, weights = routing(32, seed=6)
    target = torch.randn(32, H, generator=torch.Generator().manual_seed(7))
    module = nf4(experts, grouped)
    module.add_lora(8, 16)
    packed = {n: b.clone() for n, b in stored(module).items()}
    factors = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert sorted(factors) == ["lora_down_A", "lora_down_B", "lora_gate_up_A", "lora_gate_up_B"]
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)  # the frozen storage gets no gradient: never stepped
    losses = []
    for step in range(4):
        xr = x.clone().requires_grad_()
        loss = (module(xr, index, weights) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert xr.grad is not None and xr.grad.abs().sum() > 0
        grads = {n: p.grad for n, p in lora(module).items()}
        assert all(g is not None for g in grads.values())
        # With B = 0 at the first step, only B gets a gradient (dL/dA goes through B).
        assert all(g.abs().sum() > 0 for n, g in grads.items() if step > 0 or n.endswith("_B"))
        assert all(b.grad is None for b in stored(module).values())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, factors[n]) for n, p in lora(module).items())
    assert all(torch.equal(b, packed[n]) for n, b in stored(module).items())


@pytest.mark.parametrize("grouped", PATHS)
def test_lora_on_a_subset_leaves_other_experts_exactly(experts, grouped):
    x, index, weights = routing(48, seed=8)
    module = nf4(experts, grouped)
    with torch.no_grad():
        ref = module(x, index, weights)
        module.add_lora(8, 16, experts=[0, 3])
        randomize_lora(module)
        out = module(x, index, weights)
    touched = torch.isin(index, torch.tensor([0, 3])).any(dim=-1)
    assert 0 < touched.sum() < len(touched)
    assert torch.equal(out[~touched], ref[~touched])
    assert not torch.allclose(out[touched], ref[touched], atol=1e-3)
    # Each LoRA expert is applied to its own rows: expert 3's factors alone explain expert 3's change.
    only3 = (index == 3).any(-1) & ~(index == 0).any(-1)
    with torch.no_grad():
        module.lora_gate_up_B[0].zero_()
        module.lora_down_B[0].zero_()
        out3 = module(x, index, weights)
    assert torch.equal(out3[only3], out[only3])


def test_lora_state_dict_round_trip(experts):
    x, index, weights = routing(24, seed=9)
    module = nf4(experts)
    module.add_lora(4, 8, experts=[1, 2, 5])
    randomize_lora(module)
    sd = module.lora_state_dict()
    assert set(sd) == {
        "lora_gate_up_A",
        "lora_gate_up_B",
        "lora_down_A",
        "lora_down_B",
        "lora_experts",
        "lora_alpha",
    }
    with torch.no_grad():
        ref = module(x, index, weights)
        fresh = nf4(experts)  # no LoRA yet: created from the state dict
        fresh.load_lora_state_dict(sd)
        assert torch.equal(fresh(x, index, weights), ref)
        same = nf4(experts)
        same.add_lora(4, 8, experts=[1, 2, 5])
        same.load_lora_state_dict(sd)
        assert torch.equal(same(x, index, weights), ref)
    other = nf4(experts)
    other.add_lora(4, 8, experts=[1, 2])
    with pytest.raises(ValueError):
        other.load_lora_state_dict(sd)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_checkpoint_gives_the_same_gradients(experts, dropout):
    x, index, weights = routing(32, seed=10)
    module = nf4(experts)
    module.add_lora(8, 16, experts=[0, 2, 4, 6], dropout=dropout)
    randomize_lora(module)
    module.train()

    def grads(use_checkpoint: bool):
        module.zero_grad()
        xr = x.clone().requires_grad_()
        torch.manual_seed(123)
        if use_checkpoint:
            out = checkpoint(module, xr, index, weights, use_reentrant=False)
        else:
            out = module(xr, index, weights)
        out.pow(2).sum().backward()
        return [xr.grad] + [p.grad.clone() for p in lora(module).values()]

    plain, ckpt = grads(False), grads(True)
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_model_training_with_gradient_checkpointing():
    model = tiny_model()
    quantize_experts(model, compute_dtype=torch.float32)
    model.requires_grad_(False)
    for layer in model.model.layers[1:]:
        layer.mlp.experts.add_lora(8, 16)
        randomize_lora(layer.mlp.experts)
    model.train()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = grads()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(plain) == set(ckpt) == trainable and len(trainable) == 8
    assert all(".experts.lora_" in n for n in trainable)
    for n in plain:
        torch.testing.assert_close(plain[n], ckpt[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("double_quant", [True, False])
def test_tensors_past_the_kernel_limit_quantize_in_slices_to_the_same_bytes(monkeypatch, double_quant):
    # DeepSeek-V2's gate_up has 2.5 B values, past bitsandbytes' 32-bit indexing; a small limit here
    # sends small tensors through the same slicing.
    import bitsandbytes.functional as bnbf

    from finetune.model import experts as experts_module

    torch.manual_seed(0)
    gate_up, down = torch.randn(4, 64, 64), torch.randn(4, 64, 32)
    whole = NF4Experts.from_weights(gate_up, down, torch.nn.SiLU(), double_quant=double_quant)
    monkeypatch.setattr(experts_module, "_KERNEL_NUMEL_LIMIT", 5000)
    assert [end - start for start, end in experts_module._slices(gate_up.numel(), 64)] == [2496] * 6 + [1408]
    sliced = NF4Experts.from_weights(gate_up, down, torch.nn.SiLU(), double_quant=double_quant)
    assert sliced.state_dict().keys() == whole.state_dict().keys()
    for key, tensor in whole.state_dict().items():
        assert torch.equal(sliced.state_dict()[key], tensor), key
    for name in ("gate_up", "down"):
        reference = bnbf.dequantize_4bit(
            getattr(whole, f"{name}_packed"), whole.quant_state(name, torch.float32)
        )
        assert torch.equal(sliced.dequantize(name, torch.float32), reference)
