"""Routing health: entropy / max share / dead experts per MoE layer, the alarms, routing.png, the recipe keys."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import base_recipe, chat_rows, fails, write_recipe

from finetune import health, pipeline, recipe, rundir
from finetune.model import routing
from finetune.model.load import load_model, resolve_source
from finetune.stages import sft


def router_inputs(model: torch.nn.Module, layer: int, batches: list[torch.Tensor]) -> torch.Tensor:
    """The hidden states layer `layer`'s router reads for `batches`, one row per token."""
    seen: list[torch.Tensor] = []
    hook = routing.routers(model)[layer].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).detach().float())
    )
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    hook.remove()
    return torch.cat(seen)


def collapse(model: torch.nn.Module, layer: int, batches: list[torch.Tensor]) -> None:
    """Router weights of `layer` set so that every token of `batches` selects experts 0 and 1: a direction
    v with v·h > 0 for every router input h (a perceptron), expert 0's row 1000·v, expert 1's 500·v, the
    others 0. The margin (cosine >= 0.1) keeps the collapse while a small LoRA step moves the states."""
    h = router_inputs(model, layer, batches)
    v = h.mean(0)
    for _ in range(1000):
        low = (h @ v) <= 0.1 * h.norm(dim=-1) * v.norm()
        if not low.any():
            break
        v = v + h[low].mean(0)
    assert not low.any(), "no direction with every router input on one side"
    gate = routing.routers(model)[layer]
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[0] = 1000 * v / v.norm()
        gate.weight[1] = 500 * v / v.norm()


def chat_batches(tokenizer) -> list[torch.Tensor]:
    return [
        tokenizer.apply_chat_template(row["messages"], return_tensors="pt", return_dict=True)["input_ids"]
        for row in chat_rows(16)
    ]


def test_statistics_equal_a_computation_from_the_counts():
    model = load_model(resolve_source("tiny", None), quantization="none", dtype="float32")
    gens = torch.Generator().manual_seed(0)
    steps = [torch.randint(7, 100, (2, 12), generator=gens) for _ in range(3)]
    collapse(model, 2, steps)
    picked: dict[int, list[torch.Tensor]] = {1: [], 2: []}
    hooks = [
        r.register_forward_hook(lambda m, a, out, i=i: picked[i].append(out[2].flatten()))
        for i, r in routing.routers(model).items()
    ]
    monitor = routing.RouterMonitor(model)
    monitor.start(0)
    with torch.no_grad():
        for step, ids in enumerate(steps, start=1):
            model(input_ids=ids)
            monitor.end_step(step)
    report = monitor.report(dead_after=3)
    for layer in (1, 2):
        counts = torch.bincount(torch.cat(picked[layer]), minlength=8).tolist()
        total = sum(counts)
        entropy = -sum(c / total * math.log(c / total) for c in counts if c) / math.log(8)
        share = max(counts) / (total / 2)  # top-2: total / 2 tokens
        assert report[f"routing/entropy/layer{layer}"] == pytest.approx(entropy, abs=1e-5)
        assert report[f"routing/max_share/layer{layer}"] == pytest.approx(share, abs=1e-5)
        assert report[f"routing/dead_experts/layer{layer}"] == sum(c == 0 for c in counts)
    # The collapsed layer: experts 0 and 1 take every token; its floor entropy ln 2 / ln 8.
    assert report["routing/max_share/layer2"] == 1.0
    assert report["routing/entropy/layer2"] == pytest.approx(math.log(2) / math.log(8), abs=1e-5)
    assert report["routing/dead_experts/layer2"] == 6
    assert report["routing/max_share"] == pytest.approx(
        (report["routing/max_share/layer1"] + 1.0) / 2, abs=1e-5
    )
    # Dead means unused for the whole window: none before `dead_after` steps have passed, none used in it.
    with torch.no_grad():
        model(input_ids=steps[0])
    monitor.end_step(4)
    assert monitor.report(dead_after=5)["routing/dead_experts/layer2"] == 0  # only 4 steps seen
    monitor.end_step(5)  # a step without forwards: the window of the last 1 step saw no token
    with torch.no_grad():
        model(input_ids=steps[0])
    assert monitor.report(dead_after=1)["routing/dead_experts/layer2"] == 8
    monitor.remove()
    for hook in hooks:
        hook.remove()


def sft_recipe(tmp_path, routing_keys=None):
    data = base_recipe(tmp_path, max_steps=3)
    if routing_keys:
        data["routing"] = routing_keys
    return recipe.load(write_recipe(tmp_path / "r.yaml", data))


def run_sft(tmp_path, r, *, collapsed_layer=None):
    plan = pipeline.plan(r)
    model = plan.context.adapted_model()
    if collapsed_layer is not None:
        collapse(model, collapsed_layer, chat_batches(plan.context.tokenizer()))
    (tmp_path / "run").mkdir()
    sft.run("sft", r.stages["sft"], plan.inputs["sft"], plan.context, model=model)
    out = tmp_path / "run" / "sft"
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()], out


def alarms(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: stage sft:")]


@pytest.mark.long
def test_a_collapsed_layer_warns_once_per_condition_naming_it(tmp_path, capsys):
    r = sft_recipe(tmp_path, {"dead_after_steps": 2})
    rows, out = run_sft(tmp_path, r, collapsed_layer=1)
    logged = [row for row in rows if "loss" in row]
    assert len(logged) == 3
    assert all(row["routing/max_share/layer1"] == 1.0 for row in logged)
    assert [row["routing/dead_experts/layer1"] for row in logged] == [0, 6, 6]
    lines = alarms(capsys.readouterr().err)
    assert len(lines) == 2, lines  # three logs, each crossing both thresholds: one line per condition
    share = [line for line in lines if "select one expert" in line]
    entropy = [line for line in lines if "entropy" in line]
    assert len(share) == len(entropy) == 1
    assert share[0].startswith("warning: stage sft: MoE layer 1: 100.0% of tokens select one expert")
    assert "routing.max_share 0.9" in share[0]
    assert "entropy 0.333 is below routing.min_entropy 0.5" in entropy[0]
    assert (out / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.long
@pytest.mark.parametrize("max_share", [None, 0.3])
def test_a_healthy_run_prints_no_alarm_unless_a_threshold_says_so(tmp_path, capsys, max_share):
    r = sft_recipe(tmp_path, {"max_share": max_share} if max_share else None)
    rows, out = run_sft(tmp_path, r)
    logged = [row for row in rows if "loss" in row]
    lines = alarms(capsys.readouterr().err)
    if max_share is None:
        assert lines == []
        # Measured: entropy 0.69-0.83, share 0.78-0.83 (a random router on one chat template is uneven).
        for row in logged:
            assert all(row[f"routing/entropy/layer{i}"] > 0.5 for i in (1, 2))
            assert all(row[f"routing/max_share/layer{i}"] < 0.9 for i in (1, 2))
    else:  # the random tiny router's busiest expert takes ~80 % of tokens: each layer warns once
        assert sorted(line.split(":")[1:3] for line in lines) == [
            [" stage sft", " MoE layer 1"],
            [" stage sft", " MoE layer 2"],
        ]
    assert (out / "routing.png").is_file()


def test_the_means_reach_the_trainers_integrations(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = sft_recipe(tmp_path)
    r.stages["sft"].train.update(max_steps=1, report_to="tensorboard")
    rows, out = run_sft(tmp_path, r)
    events = EventAccumulator(str(next((out / "checkpoints").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/routing/entropy", "train/routing/max_share", "train/routing/dead_experts"} <= tags
    logged = next(row for row in rows if "loss" in row)
    assert events.Scalars("train/routing/entropy")[0].value == pytest.approx(logged["routing/entropy"])
    assert "train/routing/entropy/layer1" in tags  # per layer too (the console line shows neither)
    assert "routing/entropy/layer1" in logged and (out / "routing.png").read_bytes()[:4] == b"\x89PNG"


def test_sampler_kl_above_its_threshold_warns_once(capsys):
    model = load_model(resolve_source("tiny", None), quantization="none", dtype="float32")
    monitor = routing.RouterMonitor(model)
    fields = rundir.RouterFields(dict)  # no routing statistics this time: the logs' KL alone
    callback = health.RoutingHealth(monitor, "grpo", health.Thresholds(max_sampler_kl=0.05), fields)
    state = type("State", (), {"global_step": 1})()
    for kl in (0.01, 0.2, 0.3, 0.01):
        callback.on_log(None, state, None, logs={"loss": 1.0, health.KL_KEY: kl})
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert lines == [
        "warning: stage grpo: sampler/trainer KL (mismatch/kl) 0.2 is above routing.max_sampler_kl 0.05: "
        "rollouts come from a policy the trainer no longer computes (see metrics.jsonl; raise "
        "routing.max_sampler_kl if this is expected)"
    ]
    callback.on_log(None, state, None, logs={"loss": 1.0})  # absent (every stage but GRPO): nothing
    assert capsys.readouterr().err == ""
    monitor.remove()


def test_routing_png_is_a_heatmap_for_many_layers(tmp_path):
    rows = [
        {
            "step": s,
            **{
                f"routing/{k}/layer{i}": v
                for i in range(1, 27)
                for k, v in (("entropy", 0.9), ("max_share", 0.3), ("dead_experts", 0))
            },
        }
        for s in (1, 2, 3)
    ]
    assert health.plot_routing(rows, tmp_path / "routing.png", "t", health.Thresholds())
    assert (tmp_path / "routing.png").read_bytes()[:4] == b"\x89PNG"
    assert not health.plot_routing(
        [{"step": 1, "loss": 1.0}], tmp_path / "none.png", "t", health.Thresholds()
    )
    assert not (tmp_path / "none.png").exists()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("min_entropy", 1.5, "`routing.min_entropy`: Input should be less than or equal to 1, got 1.5"),
        (
            "min_entropy",
            True,
            "`routing.min_entropy`: Input should be a valid number, unable to parse string as a number, got 'true'",
        ),
        ("max_share", 0, "`routing.max_share`: Input should be greater than 0, got 0"),
        ("dead_after_steps", 0, "`routing.dead_after_steps`: Input should be greater than 0, got 0"),
        ("max_sampler_kl", -1, "`routing.max_sampler_kl`: Input should be greater than 0, got -1"),
        ("min_entropie", 0.5, "unknown key `routing.min_entropie` (did you mean `min_entropy`?)"),
    ],
)
def test_bad_thresholds_are_refused_naming_the_key(tmp_path, capsys, key, value, message):
    data = base_recipe(tmp_path)
    data["routing"] = {key: value}
    line = fails(capsys, tmp_path, ["validate", str(write_recipe(tmp_path / "r.yaml", data))])
    assert line.endswith(message), line


def test_the_recipe_passes_its_thresholds_to_the_stages(tmp_path):
    keys = {"min_entropy": 0.2, "max_share": 0.95, "dead_after_steps": 7, "max_sampler_kl": 0.5}
    assert pipeline.plan(sft_recipe(tmp_path, keys)).context.routing == health.Thresholds(**keys)
    assert pipeline.plan(sft_recipe(tmp_path)).context.routing == health.Thresholds()
