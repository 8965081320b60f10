"""Each adapter target preset, alone and combined, in NF4 and in 16-bit: exactly its modules get LoRA,
and two optimizer steps change them (and nothing else)."""

from __future__ import annotations

import itertools

import pytest
import torch

from finetune.model import adapters
from finetune.model.experts import NF4Experts, PlainExperts
from finetune.model.load import load_model, resolve_source

LINEAR_PRESETS = ("mla", "shared_experts", "dense_mlp")
COMBOS = [
    [*combo, *extra]
    for n in range(1, 4)
    for combo in itertools.combinations(LINEAR_PRESETS, n)
    for extra in ([], ["routed_experts"])
] + [["routed_experts"]]


def expected_modules(config, preset: str) -> set[str]:
    """The module names of one kind, derived from the config alone (independently of adapters.py)."""
    dense = range(config.first_k_dense_replace)
    moe = range(config.first_k_dense_replace, config.num_hidden_layers)
    query = ["q_proj"] if config.q_lora_rank is None else ["q_a_proj", "q_b_proj"]
    attn = [*query, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    mlp = ["gate_proj", "up_proj", "down_proj"]
    return {
        "mla": {f"model.layers.{i}.self_attn.{p}" for i in range(config.num_hidden_layers) for p in attn},
        "shared_experts": {f"model.layers.{i}.mlp.shared_experts.{p}" for i in moe for p in mlp},
        "dense_mlp": {f"model.layers.{i}.mlp.{p}" for i in dense for p in mlp},
        "routed_experts": {f"model.layers.{i}.mlp.experts" for i in moe},
    }[preset]


def _lora_owners(model) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    owners: dict[str, list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            owner = name.removeprefix("base_model.model.").split(".lora_")[0]
            owners.setdefault(owner, []).append((name, param))
    return owners


@pytest.mark.parametrize("quantization", ["nf4", "none"])
@pytest.mark.parametrize("targets", COMBOS, ids=lambda t: "+".join(t))
def test_targets_wrap_exactly_their_modules_and_train(quantization, targets):
    model = load_model(resolve_source("tiny", None), quantization=quantization, dtype="float32")
    config = model.config
    torch.manual_seed(0)
    peft_model = adapters.attach(model, r=4, alpha=8, dropout=0.0, targets=targets)
    owners = _lora_owners(peft_model)
    expected = set().union(*(expected_modules(config, t) for t in targets))
    assert set(owners) == expected

    experts_cls = NF4Experts if quantization == "nf4" else PlainExperts
    for name in expected_modules(config, "routed_experts") & expected:
        assert type(peft_model.base_model.model.get_submodule(name)) is experts_cls

    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for params in owners.values() for n, p in params}
    optimizer = torch.optim.AdamW([p for params in owners.values() for _, p in params], lr=1e-2)
    ids = torch.randint(7, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        optimizer.zero_grad()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    for owner, params in owners.items():
        for name, param in params:
            assert not torch.equal(param.detach(), before[name]), f"{name} of {owner} did not change"
    for name, value in frozen.items():
        assert torch.equal(dict(peft_model.named_parameters())[name].detach(), value), name


def test_plain_experts_match_the_native_module():
    """The 16-bit twin computes what transformers' DeepseekV2Experts computes (before any LoRA)."""
    model = load_model(resolve_source("tiny", None), quantization="none", dtype="float32")
    native = model.model.layers[1].mlp.experts
    plain = PlainExperts.from_experts(native)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, config_hidden(model), generator=g)
    index = torch.randint(0, model.config.n_routed_experts, (10, 2), generator=g)
    weights = torch.rand(10, 2, generator=g)
    torch.testing.assert_close(plain(hidden, index, weights), native(hidden, index, weights))


def config_hidden(model) -> int:
    return model.config.hidden_size
