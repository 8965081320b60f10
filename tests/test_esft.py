"""ESFT (`adapter.experts: {select: esft}`): expert scores against an independent computation from the
router's logits, the cumulative selection rule, only the selected experts training (`lora`, `full`),
export of trained experts into a Hub-layout checkpoint, and the bad-input lines."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import base_recipe, fails, one_error_line, train_sft_keeping_before, write_recipe
from hub_layout import write_hub_checkpoint
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV2ForCausalLM

from finetune import esft, pipeline, recipe, stagetypes
from finetune.errors import UserError
from finetune.model import adapters, routing
from finetune.model import esft as scoring
from finetune.model.load import Source, embedded_checkpoint, load_model

pytestmark = pytest.mark.compat

IDS = torch.tensor(
    [
        [5, 89, 76, 93, 76, 89, 90, 76, 33, 7, 72, 73, 74, 75, 6],
        [5, 9, 7, 1, 40, 41, 42, 43, 50, 51, 52, 0, 0, 0, 0],
    ]
)


@pytest.mark.parametrize("preset", ["tiny", "tiny-v2"])
def test_scores_equal_an_independent_computation_from_router_logits(preset):
    model = load_model(Source("preset", preset), quantization="nf4", dtype="float32")
    mask = torch.zeros_like(IDS, dtype=torch.bool)
    mask[0, 3:12] = True
    mask[1, :9] = True
    attention = (IDS != 0).long()
    attention[0] = 1
    # Independently: the router's input hidden states, its logits by hand, softmax and top-k.
    inputs: dict[int, torch.Tensor] = {}
    handles = [
        r.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0].detach().clone()))
        for i, r in routing.routers(model).items()
    ]
    with torch.no_grad():
        model(input_ids=IDS, attention_mask=attention)
    for h in handles:
        h.remove()
    got = scoring.score(model, [(IDS, attention, mask)])
    keep = mask.reshape(-1)
    assert got["tokens"] == int(keep.sum())
    for i, router in routing.routers(model).items():
        hidden = inputs[i].reshape(-1, router.hidden_dim)[keep].double()
        probs = (hidden @ router.weight.detach().double().T).softmax(dim=-1)
        _, _, picked = router(inputs[i].reshape(-1, router.hidden_dim)[keep])
        n, e, k = probs.shape[0], probs.shape[1], picked.shape[1]
        gate = [sum(float(probs[t, x]) for t in range(n) if x in picked[t].tolist()) / n for x in range(e)]
        token = [sum(x in picked[t].tolist() for t in range(n)) / (n * k) for x in range(e)]
        assert got["gate"][i] == pytest.approx(gate, abs=1e-6)
        assert got["token"][i] == pytest.approx(token, abs=1e-6)
        assert sum(got["token"][i]) == pytest.approx(1.0, abs=1e-12)
        assert any(g == 0 for g in gate) or e <= n * k  # an expert no token picked scores 0


def test_selection_follows_the_cumulative_rule():
    s = [0.05, 0.30, 0.10, 0.30, 0.25, 0.0]
    # Descending score, ties by lower id: 1 (0.30), 3 (0.30), 4 (0.25), 2 (0.10), 0 (0.05), 5 (0.0)
    assert scoring.select_layer(s, 0.3) == [1]  # 0.30 reaches 0.3 exactly
    assert scoring.select_layer(s, 0.31) == [1, 3]
    assert scoring.select_layer(s, 0.6) == [1, 3]
    assert scoring.select_layer(s, 0.61) == [1, 3, 4]
    # p = 1 on ratios that sum to 1 (in floating point, within 1e-9): every expert with a share, not the zero one
    assert scoring.select_layer(s, 1.0) == [0, 1, 2, 3, 4]
    # scores that never reach p (gate scores sum below 1): every expert
    assert scoring.select_layer([0.1, 0.2, 0.0], 1.0) == [0, 1, 2]
    # ties broken by the lower id, whatever the list order
    assert scoring.select_layer([0.2, 0.2, 0.2, 0.2], 0.4) == [0, 1]
    assert scoring.select_layer(s, 0.3, min_experts=3) == [1, 3, 4]
    assert scoring.select_layer(s, 0.99, max_experts=2) == [1, 3]
    assert scoring.select({1: s, 2: [0.5, 0.5]}, 0.5) == {1: [1, 3], 2: [0]}


def _esft_recipe(tmp: Path, train: str, **extra) -> recipe.Recipe:
    data = base_recipe(tmp, learning_rate=1e-2, max_steps=3)
    data["adapter"].update(targets=["routed_experts"], experts={"select": "esft", "train": train, **extra})
    return recipe.load(write_recipe(tmp / "r.yaml", data))


def _train(tmp: Path, train: str, **extra):
    return train_sft_keeping_before(_esft_recipe(tmp, train, **extra), tmp)


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("esft-lora"), "lora", score="gate", p=0.3)


@pytest.fixture(scope="module")
def trained_full(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("esft-full"), "full", score="token", p=0.5)


def _selection(plan) -> dict[int, list[int]]:
    record = json.loads((plan.context.output_dir / "sft" / "adapter" / esft.SELECTION_FILE).read_text())
    return {int(k): v for k, v in record["selection"].items()}


@pytest.mark.long  # trains a stage
def test_lora_trains_only_the_selected_experts(trained_lora):
    plan, model, before = trained_lora
    now = dict([*model.named_parameters(), *model.named_buffers()])
    # Everything the model had before ESFT (NF4 bytes of every expert, routers, all else) is bit-identical.
    assert all(torch.equal(now[n], t) for n, t in before.items())
    selection = _selection(plan)
    scores = json.loads((plan.context.output_dir / "sft" / esft.SCORES_FILE).read_text())
    assert selection == scoring.select({int(k): v for k, v in scores["scores"]["gate"].items()}, 0.3)
    for index, layer in adapters.expert_layers(model).items():
        assert layer.lora_experts.tolist() == selection[index] and not layer.has_full
        for slot in range(len(selection[index])):  # each selected expert's LoRA moved off B = 0
            assert layer.lora_down_B[slot].abs().max() > 0 and layer.lora_gate_up_B[slot].abs().max() > 0
    saved = load_file(str(plan.context.output_dir / "sft" / "adapter" / adapters.EXPERTS_FILE))
    assert saved["layers.1.lora_experts"].tolist() == selection[1]


@pytest.mark.long  # trains a stage
def test_full_trains_only_the_selected_experts_and_reloads(trained_full):
    plan, model, before = trained_full
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(torch.equal(now[n], t) for n, t in before.items())
    selection = _selection(plan)
    for index, layer in adapters.expert_layers(model).items():
        assert layer.full_experts.tolist() == selection[index] and not layer.has_lora
        start = {w: layer.dequantize(w)[layer.full_experts] for w in ("gate_up", "down")}
        for slot in range(len(selection[index])):  # each selected expert's weights changed
            assert not torch.equal(layer.full_gate_up[slot], start["gate_up"][slot])
            assert not torch.equal(layer.full_down[slot], start["down"][slot])
    folder = plan.context.output_dir / "sft" / "adapter"
    assert not (folder / adapters.EXPERTS_FILE).exists()
    reloaded = adapters.load_adapter(plan.context.base_model(), folder).eval()
    model.eval()
    with torch.no_grad():
        a, b = model(IDS[:1]).logits, reloaded(IDS[:1]).logits
        base = plan.context.base_model().eval()(IDS[:1]).logits
    assert torch.equal(a, b) and (a - base).abs().max() > 1e-3
    with adapters.applied(plan.context.base_model(), folder) as applied:
        assert torch.equal(applied.eval()(IDS[:1]).logits, a)


@pytest.mark.long  # trains a stage
def test_full_export_into_a_hub_checkpoint(tmp_path):
    from test_export import checkpoint, export

    hub = tmp_path / "hub"
    write_hub_checkpoint(hub, q_lora_rank=None, seed=0)
    data = base_recipe(tmp_path, learning_rate=1e-2, max_steps=2)
    data["model"] = {"path": str(hub), "quantization": "nf4", "dtype": "bfloat16"}
    data["adapter"].update(targets=["routed_experts"], experts={"select": "esft", "train": "full"})
    r = recipe.load(write_recipe(tmp_path / "r.yaml", data))
    pipeline.run(r)
    stage = tmp_path / "run" / "sft"
    trained = load_file(str(stage / "adapter" / adapters.FULL_EXPERTS_FILE))
    original, got = checkpoint(hub), checkpoint(export(stage, tmp_path / "merged"))
    assert sorted(got) == sorted(original)
    changed = set()
    for key in [k for k in trained if k.endswith(".experts")]:
        layer = int(key.split(".")[1])
        gate_up, down = trained[f"layers.{layer}.gate_up"], trained[f"layers.{layer}.down"]
        for slot, e in enumerate(trained[key].tolist()):
            prefix = f"model.layers.{layer}.mlp.experts.{e}"
            gate, up = gate_up[slot].chunk(2)
            for proj, weight in (("gate", gate), ("up", up), ("down", down[slot])):
                name = f"{prefix}.{proj}_proj.weight"
                assert torch.equal(got[name], weight.to(original[name].dtype)), name
                changed.add(name)
    assert changed
    for key in original.keys() - changed:  # every other tensor byte for byte
        assert got[key].dtype == original[key].dtype
        assert torch.equal(got[key].view(torch.uint8), original[key].view(torch.uint8)), key
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert torch.isfinite(plain(IDS[:1]).logits).all()


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("experts", "expected"),
    [
        ({"select": "esft", "p": 0}, "`adapter.experts.p`: Input should be greater than 0"),
        ({"select": "esft", "p": 1.5}, "`adapter.experts.p`: Input should be less than or equal to 1"),
        ({"select": "esft", 1: [0, 2]}, "adapter.experts: `select: esft` chooses the experts itself"),
    ],
)
def test_bad_esft_settings_are_one_line(capsys, tmp_path, experts, expected):
    data = base_recipe(tmp_path)
    data["adapter"].update(targets=["routed_experts"], experts=experts)
    line = fails(capsys, tmp_path, ["validate", str(write_recipe(tmp_path / "r.yaml", data))])
    assert expected in line


def test_esft_on_a_model_without_routed_experts(capsys, tmp_path):
    source = embedded_checkpoint("tiny", 0)
    config = DeepseekV2Config.from_pretrained(source)
    config.first_k_dense_replace = config.num_hidden_layers  # every layer a dense MLP
    folder = tmp_path / "dense"
    DeepseekV2ForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).write_bytes((source / name).read_bytes())
    data = base_recipe(tmp_path)
    data["model"] = {"path": str(folder), "quantization": "nf4", "dtype": "float32"}
    data["adapter"].update(targets=["routed_experts"], experts={"select": "esft"})
    line = fails(capsys, tmp_path, ["validate", str(write_recipe(tmp_path / "r.yaml", data))])
    assert line == (
        "error: adapter.experts: `select: esft` scores routed experts and this model has none; "
        "drop `experts` or use a mixture-of-experts model"
    )


def test_a_scoring_sample_without_loss_tokens():
    model = load_model(Source("preset", "tiny"), quantization="nf4", dtype="float32")
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}]

    def collate(chunk):
        return {k: torch.tensor([r[k] for r in chunk]) for k in ("input_ids", "labels")}

    trainer = SimpleNamespace(
        model=model,
        train_dataset=rows,
        data_collator=collate,
        args=SimpleNamespace(per_device_train_batch_size=2),
    )
    arguments = dict(score="token", p=0.2, min_experts=None, max_experts=None, train="lora", samples=32)
    with pytest.raises(UserError) as err:
        esft.apply(
            trainer,
            Path("/nonexistent"),
            max_length=64,
            lora_r=2,
            lora_alpha=4,
            dropout=0,
            stage="sft",
            **arguments,
        )
    assert str(err.value) == (
        "stages.sft: the ESFT scoring sample (the first 32 training rows, up to adapter.experts.max_length "
        "64 tokens each) has no token the loss counts; raise adapter.experts.max_length or samples, or "
        "check the rows' completions"
    )


def test_trained_experts_in_the_decode_path_equal_the_grouped_forward():
    from finetune.fast import decode

    model = load_model(Source("preset", "tiny"), quantization="nf4", dtype="float32")
    layer = adapters.expert_layers(model)[1]
    layer.add_full([2, 5])
    with torch.no_grad():
        layer.full_gate_up.add_(0.05 * torch.randn_like(layer.full_gate_up))
        layer.full_down.add_(0.05 * torch.randn_like(layer.full_down))
    hidden = torch.randn(6, layer.hidden_dim)
    picks = torch.tensor([[2, 0], [5, 2], [1, 3], [5, 7], [4, 2], [6, 1]])
    weights = torch.rand(6, 2)
    with torch.no_grad():
        grouped = layer(hidden, picks, weights)
        pairs = decode.few_token_forward(layer, hidden, picks, weights)
        layer.lora_enabled = False  # the adapter off (a reference pass): the NF4 experts
        off = layer(hidden, picks, weights)
        layer.lora_enabled = True
        layer.remove_full()
        plain = layer(hidden, picks, weights)
    torch.testing.assert_close(pairs, grouped, rtol=1e-5, atol=1e-6)
    assert torch.equal(off, plain)
    changed = (grouped - plain).abs().amax(dim=1) > 1e-6
    assert changed.tolist() == [True, True, False, True, True, False]  # rows that routed to 2 or 5


def _stage_with_esft(tmp_path: Path, kind: str) -> tuple[recipe.Recipe, str]:
    from conftest import REPO

    esft_keys = [
        "adapter.targets=[mla, routed_experts]",
        "adapter.experts={select: esft, train: lora, p: 0.5}",
    ]
    if kind == "grpo":
        from test_grpo import _grpo

        data = _grpo(tmp_path, train={"max_steps": 2})
        return recipe.load(write_recipe(tmp_path / "r.yaml", data), esft_keys), "grpo"
    path = REPO / "recipes" / "tiny" / f"{kind}.yaml"
    overrides = [f"output_dir={tmp_path / 'run'}", f"stages.{kind}.train.max_steps=2", *esft_keys]
    return recipe.load(path, overrides), kind


@pytest.mark.long  # trains a stage of each type
@pytest.mark.parametrize("kind", ["reward", "classify", "grpo"])
def test_esft_selects_and_trains_in_every_stage_type(tmp_path, kind):
    r, name = _stage_with_esft(tmp_path, kind)
    pipeline.run(r)
    stage = tmp_path / "run" / name
    scores = json.loads((stage / esft.SCORES_FILE).read_text())
    assert scores["tokens"] > 0 and (stage / esft.HEATMAP_FILE).stat().st_size > 0
    want = scoring.select({int(k): v for k, v in scores["scores"]["token"].items()}, 0.5)
    record = json.loads((stage / "adapter" / esft.SELECTION_FILE).read_text())
    assert {int(k): v for k, v in record["selection"].items()} == want
    saved = load_file(str(stage / "adapter" / adapters.EXPERTS_FILE))
    for layer, ids in want.items():
        assert saved[f"layers.{layer}.lora_experts"].tolist() == ids
    assert any(saved[f"layers.{i}.lora_down_B"].abs().max() > 0 for i in want)
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["train"]["esft"]["experts"] == sum(len(v) for v in want.values())


@pytest.mark.long  # scores a stage through the CLI
def test_finetune_experts_prints_the_selection_and_trains_nothing(tmp_path, capsys):
    from finetune.cli import main

    r = _esft_recipe(tmp_path, "full", score="token", p=0.5)
    path = tmp_path / "r.yaml"
    assert main(["experts", str(path), "--out", str(tmp_path / "scores")]) == 0
    out = capsys.readouterr().out
    scores = json.loads((tmp_path / "scores" / "sft" / esft.SCORES_FILE).read_text())
    want = scoring.select({int(k): v for k, v in scores["scores"]["token"].items()}, 0.5)
    for layer, ids in want.items():
        assert f"  layer {layer}: {len(ids)} experts {ids}" in out
    assert "stage sft: token score over 80 loss tokens of 16 rows, p 0.5" in out
    assert not Path(r.output_dir).exists() and not (tmp_path / "scores" / "sft" / "adapter").exists()


def test_esft_needs_the_routed_experts_target_and_a_supported_stage(capsys, tmp_path):
    data = base_recipe(tmp_path)
    data["adapter"].update(targets=["mla"], experts={"select": "esft"})
    line = fails(capsys, tmp_path, ["validate", str(write_recipe(tmp_path / "r.yaml", data))])
    assert line == (
        "error: adapter.targets: `experts: {select: esft}` trains routed experts; add `routed_experts` to targets"
    )
    types = stagetypes.types_with("esft")
    assert types == ("sft", "reward", "classify", "grpo")
    esft.check({"sft": "sft", "eval": "eval", "grpo": "grpo"}, types)
    with pytest.raises(UserError) as err:
        esft.check({"sft": "sft", "pref": "dpo"}, types)
    assert str(err.value) == (
        "stages.pref: `adapter.experts: {select: esft}` works with sft, reward, classify, grpo stages, "
        "not dpo; train this stage in a recipe without it"
    )


@pytest.mark.long  # a whole `finetune run` up to the scoring pass
def test_a_run_whose_scoring_sample_has_no_loss_token_stops_in_one_line(tmp_path, capsys):
    """The scored rows cut to 4 tokens keep the prompt only: `finetune run` exits 2 naming the key
    (the scoring runs with the stage, so its run folder, logs included, stays)."""
    from finetune.cli import main

    _esft_recipe(tmp_path, "full", max_length=4)
    code = main(["run", str(tmp_path / "r.yaml")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert one_error_line(err) == (
        "error: stages.sft: the ESFT scoring sample (the first 32 training rows, up to "
        "adapter.experts.max_length 4 tokens each) has no token the loss counts; raise "
        "adapter.experts.max_length or samples, or check the rows' completions"
    )
