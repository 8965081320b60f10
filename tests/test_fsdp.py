"""FSDP2 over two CPU processes (torchrun, gloo): each rank stores half of the NF4 routed experts, and the
sharded model computes the logits and LoRA gradients one process computes. The accelerate launch configs:
DDP trains; under fsdp.yaml an SFT stage trains the sharded model to the adapter one process trains, and
what FSDP does not support stops with one line (docs/recipes.md, Several GPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, base_recipe, fails, write_recipe

pytestmark = pytest.mark.long  # multi-process runs: .ci/run's own step, out of the default suite

# The NF4 storage of the routed experts (frozen parameters; the scalar offset is a buffer).
STORAGE = tuple(f"_{p}" for p in ("packed", "absmax", "code", "absmax2", "code2"))
ROWS, LENGTH = 4, 16


def _build(tmp: Path) -> torch.nn.Module:
    """The tiny NF4 model as a run loads it, LoRA on MLA and every routed expert, B factors non-zero so
    that every LoRA factor gets a gradient."""
    from finetune import pipeline, recipe

    data = base_recipe(tmp, use_cpu=True)
    data["adapter"].update(targets=["mla", "routed_experts"])
    r = recipe.load(write_recipe(tmp / "r.yaml", data))
    torch.manual_seed(0)
    model = pipeline.plan(r).context.adapted_model()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith(("lora_B.default.weight", "_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _ids() -> torch.Tensor:
    return torch.randint(5, 60, (ROWS, LENGTH), generator=torch.Generator().manual_seed(0))


def _step(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach()


def _storage(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".mlp.experts." in n and n.endswith(STORAGE)}


def _linear4bit(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    from finetune.model import fsdp

    weights = fsdp.linear4bit_weights(model)
    return {n: p for n, p in model.named_parameters() if any(p is w for w in weights)}


def _worker(out: Path) -> None:
    """One rank (under torchrun): shard, measure, one forward + backward on its half of the batch."""
    import torch.distributed as dist

    from finetune.model import fsdp

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    for shard_linear4bit in (True, False):
        model = _build(out / f"r{rank}")
        padding = sum(p[0].numel() * p.element_size() for p in _storage(model).values())  # a row per tensor
        total = fsdp.local_bytes(model, tuple(_storage(model)))
        linear_total = fsdp.local_bytes(model, tuple(_linear4bit(model)))
        linear_names = tuple(_linear4bit(model))
        fsdp.shard(model, shard_linear4bit=shard_linear4bit)
        local = sum(p.to_local().numel() * p.element_size() for p in _storage(model).values())
        linear_local = fsdp.local_bytes(model, linear_names)
        logits = _step(model, _ids()[rank::world])
        grads = {n: fsdp.full_tensor(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        result = {
            "total": total,
            "local": local,
            "padding": padding,
            "linear_total": linear_total,
            "linear_local": linear_local,
            "logits": logits,
            "grads": grads,
        }
        torch.save(result, out / f"rank{rank}-{int(shard_linear4bit)}.pt")
    dist.destroy_process_group()


def test_fsdp2_shards_the_nf4_experts_and_matches_one_process(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.Popen(
        [*launch, __file__, str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # Meanwhile, the reference: one process, the whole batch (on one thread, as each rank; restored after,
    # since later tests compare in-process runs with subprocess runs at the default thread count).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _build(tmp_path / "ref")
        ref_logits = _step(model, _ids())
    finally:
        torch.set_num_threads(threads)
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]

    assert any(".self_attn." in n for n in ref_grads) and any(".mlp.experts.lora_" in n for n in ref_grads)
    for shard_linear4bit in (1, 0):
        ranks = [torch.load(tmp_path / f"rank{r}-{shard_linear4bit}.pt") for r in range(2)]
        # (a) Each rank stores half of the NF4 expert storage: FSDP2 splits dim 0 in two, the first rank
        # taking the odd row (measured: 27,536 and 27,528 of 55,064 bytes; tolerance one row per tensor).
        for got in ranks:
            assert got["total"] == ranks[0]["total"] > 0
            assert abs(got["local"] - got["total"] / 2) <= got["padding"], (got["local"], got["total"])
        assert ranks[0]["local"] + ranks[1]["local"] >= ranks[0]["total"]
        # bitsandbytes Linear4bit weights: halved when sharded, whole on every rank when ignored.
        for got in ranks:
            if shard_linear4bit:
                assert abs(got["linear_local"] - got["linear_total"] / 2) <= 64, got
            else:
                assert got["linear_local"] == got["linear_total"] > 0
        # (b) Logits of each rank's rows equal the one-process logits (float32; measured ≤ 1e-6).
        for r, got in enumerate(ranks):
            torch.testing.assert_close(got["logits"], ref_logits[r::2], rtol=0, atol=1e-5)
        # (c) FSDP2 averages the two ranks' gradients, each of the mean loss over half of the rows (equal
        # token counts): the gradient of the mean over all rows. Measured: relative error ≤ 1e-6.
        grads = ranks[0]["grads"]
        assert set(grads) == set(ref_grads) and len(grads) == 32
        for name, ref in ref_grads.items():
            scale = ref.abs().max().item()
            assert scale > 0, name
            assert (grads[name] - ref).abs().max().item() <= 1e-5 * scale, name


def _two_and_one(sharded: list[str], single: list[str], sharded_env: dict, env: dict) -> None:
    """Runs the 2-process command and the 1-process one side by side; both must succeed, and the run
    folder is announced once (by rank 0)."""
    two = subprocess.Popen(
        sharded, env=sharded_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    one = subprocess.run(single, env=env, capture_output=True, text=True, timeout=300)
    out, err = two.communicate(timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, err[-3000:]
    assert out.count("run directory:") == 1


def _sft_recipe(tmp: Path, out: Path, adapter: dict | None = None) -> Path:
    """Tiny NF4 SFT, LoRA on MLA and the routed experts; 4 steps of a 16-row global batch, an eval split
    and a held-out check (both run on every rank under FSDP)."""
    data = REPO / "recipes" / "data" / "reverse"
    eval_rows = tmp / "eval.jsonl"
    eval_rows.write_text("".join((data / "test.jsonl").read_text().splitlines(keepends=True)[:8]))
    recipe = {
        "name": "fsdp",
        "output_dir": str(out),
        "seed": 3,
        "model": {"preset": "tiny", "quantization": "nf4", "dtype": "float32"},
        "adapter": adapter or {"r": 8, "alpha": 16, "targets": ["mla", "routed_experts"]},
        "stages": {
            "sft": {
                "type": "sft",
                "data": {"train": str(data / "train.jsonl"), "max_samples": 64, "eval": str(eval_rows)},
                "heldout": {"data": str(data / "test.jsonl"), "max_samples": 4, "max_new_tokens": 8},
                "train": {
                    "max_steps": 4,
                    "per_device_train_batch_size": 4,
                    # 16 rows a step: 2 micro-batches each on 2 ranks (gradients accumulate on the shards)
                    "gradient_accumulation_steps": 4,
                    "learning_rate": 3e-3,
                    "max_grad_norm": 0.5,  # clipping on the sharded gradients
                    "logging_steps": 2,
                    "save_strategy": "no",
                    "use_cpu": True,
                },
            }
        },
    }
    return write_recipe(tmp / f"{out.name}.yaml", recipe)


def test_sft_trains_under_fsdp_as_one_process_does(tmp_path):
    """`finetune run` under `accelerate launch --config_file recipes/accelerate/fsdp.yaml` (2 gloo CPU
    processes; accelerate itself ignores FSDP on the CPU, the stage does not): the stage shards the model
    (NF4 experts included), trains, evaluates, runs the held-out check on both ranks and saves the gathered
    adapter once; the adapter agrees with a 1-process run's and loads back on one process."""
    from safetensors.torch import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    accelerate = Path(sys.executable).parent / "accelerate"
    config = REPO / "recipes" / "accelerate" / "fsdp.yaml"
    launch = [str(accelerate), "launch", "--config_file", str(config), "--num_processes", "2"]
    _two_and_one(
        [*launch, "-m", "finetune", "run", str(_sft_recipe(tmp_path, two))],
        [sys.executable, "-m", "finetune", "run", str(_sft_recipe(tmp_path, one))],
        env,
        env,
    )

    # The same 4 optimizer steps on the same 16-row batches, gradients clipped (norm ~1.8 > 0.5). TRL
    # keeps a 4-bit model's LoRA and its gradients in bf16, so splitting an accumulation window over ranks
    # sums the micro-batch gradients in another order, and Adam turns a near-zero gradient's rounding into
    # up to a learning-rate step (3e-3). Measured: 15 of 42,706 values (MLA and routed-expert LoRA) differ
    # by more than 1e-3, at most 3.0e-3; DDP (ddp.yaml) of this recipe differs from one process in the same
    # values by the same amounts, and from FSDP by ≤ 4.9e-4 (one bf16 ulp).
    beyond, total = 0, 0
    for name in ("adapter_model.safetensors", "routed_experts.safetensors"):
        a, b = load_file(str(one / "sft" / "adapter" / name)), load_file(str(two / "sft" / "adapter" / name))
        assert a.keys() == b.keys() and a, name
        for key in a:
            assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
            diff = (a[key].float() - b[key].float()).abs()
            assert diff.max() <= 5e-3 * max(1.0, float(a[key].abs().max())), key
            beyond, total = beyond + int((diff > 1e-3).sum()), total + diff.numel()
    assert total > 40_000 and beyond <= total // 1000, (beyond, total)
    summaries = [json.loads((d / "sft" / "summary.json").read_text()) for d in (one, two)]
    for s in summaries:
        assert s["heldout"]["before"]["n"] == s["heldout"]["after"]["n"] == 4
        assert "eval_loss" in s["eval"]
    # Measured: eval loss 4.63196 and 4.63194; the same greedy held-out outputs.
    assert abs(summaries[0]["eval"]["eval_loss"] - summaries[1]["eval"]["eval_loss"]) <= 1e-3
    assert summaries[0]["heldout"]["after"]["examples"] == summaries[1]["heldout"]["after"]["examples"]
    rows = [
        [json.loads(x) for x in (d / "sft" / "metrics.jsonl").read_text().splitlines()] for d in (one, two)
    ]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]  # written once, not per rank
    logged = [(a, b) for a, b in zip(*rows, strict=True) if "grad_norm" in a]
    assert len(logged) == 2
    for a, b in logged:  # measured: losses to 3e-5, gradient norms 1.820 / 1.828 (bf16 LoRA)
        assert (
            abs(a["loss"] - b["loss"]) <= 1e-3
            and abs(a["grad_norm"] - b["grad_norm"]) <= 0.02 * a["grad_norm"]
        )
    assert not (two / "sft" / "checkpoints").exists() or not any((two / "sft" / "checkpoints").iterdir())

    # The adapter saved under FSDP loads back on one process, routed-expert LoRA included.
    from finetune import pipeline, recipe
    from finetune.model import adapters

    r = recipe.load(_sft_recipe(tmp_path, two))
    model = adapters.load_adapter(pipeline.plan(r).context.base_model("causal_lm"), two / "sft" / "adapter")
    experts, _ = adapters.extra_tensors(model)
    saved = load_file(str(two / "sft" / "adapter" / "routed_experts.safetensors"))
    assert experts.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(experts[key].to(value.dtype), value, rtol=0, atol=0)


@pytest.mark.parametrize("train", ["full", "lora"])
def test_esft_trains_under_fsdp_as_one_process_does(tmp_path, train):
    """ESFT under `FINETUNE_FSDP=1 torchrun` (2 gloo processes), MLA LoRA beside it: every rank scores the
    same rows and picks the same experts, and the trained experts (16-bit copies or their LoRA) and the
    MLA LoRA agree with a 1-process run's; only the chosen experts are saved."""
    from safetensors.torch import load_file

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    experts = {"select": "esft", "score": "token", "train": train}
    adapter = {"r": 8, "alpha": 16, "targets": ["mla", "routed_experts"], "experts": experts}
    one, two = tmp_path / "one", tmp_path / "two"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _two_and_one(
        [*launch, "-m", "finetune", "run", str(_sft_recipe(tmp_path, two, adapter))],
        [sys.executable, "-m", "finetune", "run", str(_sft_recipe(tmp_path, one, adapter))],
        {**env, "FINETUNE_FSDP": "1"},
        env,
    )
    choices = [json.loads((d / "sft" / "adapter" / "esft.json").read_text()) for d in (one, two)]
    assert choices[0]["selection"] == choices[1]["selection"] and choices[0]["experts"] >= 2
    chosen = {(int(layer), e) for layer, ids in choices[0]["selection"].items() for e in ids}
    experts_file, ids = (
        ("expert_weights.safetensors", "experts")
        if train == "full"
        else ("routed_experts.safetensors", "lora_experts")
    )
    for name in ("adapter_model.safetensors", experts_file):
        a, b = load_file(str(one / "sft" / "adapter" / name)), load_file(str(two / "sft" / "adapter" / name))
        assert a.keys() == b.keys() and a, name
        if name == experts_file:  # only the chosen experts are stored
            stored = {
                (int(k.split(".")[1]), e) for k, v in a.items() if k.endswith(f".{ids}") for e in v.tolist()
            }
            assert stored == chosen, (stored, chosen)
        for key in a:  # bf16 rounding of gradients summed in another order (see the SFT test above)
            diff = (a[key].float() - b[key].float()).abs().max()
            assert diff <= 5e-3 * max(1.0, float(a[key].abs().max())), (key, float(diff))


@pytest.mark.parametrize("kind", ["reward", "classify"])
def test_reward_and_classify_train_under_fsdp(tmp_path, kind):
    """`FINETUNE_FSDP=1 torchrun` (2 gloo processes) of the tiny reward / classify recipe (NF4, LoRA on MLA,
    the `score` head trained whole): the same adapter and eval figures as one process; `finetune predict`
    scores with it as with the one-process adapter."""
    from safetensors.torch import load_file

    from finetune.predict import Predictor

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    recipe = str(REPO / "recipes" / "tiny" / f"{kind}.yaml")
    train = f"stages.{kind}.train"
    overrides = [f"{train}.max_steps=2", f"{train}.logging_steps=1", f"{train}.use_cpu=true"]
    one, two = tmp_path / "one", tmp_path / "two"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _two_and_one(
        [*launch, "-m", "finetune", "run", recipe, f"output_dir={two}", *overrides],
        [sys.executable, "-m", "finetune", "run", recipe, f"output_dir={one}", *overrides],
        {**env, "FINETUNE_FSDP": "1"},
        env,
    )

    # Measured: max difference 4.1e-5 (reward) and 2.3e-9 (classify) on LoRA factors and head ≤ 0.26.
    a = load_file(str(one / kind / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / kind / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("score" in k for k in a)
    for key in a:
        assert (a[key].float() - b[key].float()).abs().max() <= 2e-3 * max(1.0, float(a[key].abs().max())), (
            key
        )
    evals = [json.loads((d / kind / "summary.json").read_text())["eval"] for d in (one, two)]
    if kind == "reward":  # measured: the same accuracy, mean margins 0.095924 and 0.095916
        assert evals[0]["pairwise_accuracy"] == evals[1]["pairwise_accuracy"]
        assert evals[0]["mean_margin"] == pytest.approx(evals[1]["mean_margin"], abs=1e-3)
    else:  # measured: identical figures
        assert evals[0]["accuracy"] == evals[1]["accuracy"] and evals[0]["rows"] == evals[1]["rows"]
    items = ["reverse: abcd", "the early bird", "late again"]
    scores = [Predictor.load(d / kind).outputs(items) for d in (one, two)]
    torch.testing.assert_close(scores[1], scores[0], rtol=0, atol=1e-3)


def test_fsdp_launch_signals(monkeypatch):
    """accelerate's FSDP launch or FINETUNE_FSDP=1 (torchrun); once the stages own the sharding, accelerate
    is told no FSDP (its FSDP2 path would shard the PEFT model again) and the launch is still known."""
    from finetune import distributed

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("FINETUNE_FSDP", raising=False)
    assert not distributed.fsdp_launch()
    monkeypatch.setenv("FINETUNE_FSDP", "1")
    assert distributed.fsdp_launch()
    monkeypatch.delenv("FINETUNE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    distributed.own_fsdp()
    assert "ACCELERATE_USE_FSDP" not in os.environ and distributed.fsdp_launch()


def test_fsdp_refusals_of_other_stages_and_resume(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from finetune.errors import UserError
    from finetune.stages import common

    monkeypatch.setenv("FINETUNE_FSDP", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = SimpleNamespace(fsdp="", save_strategy="no")
    ctx = SimpleNamespace(model_kwargs={"quantization": "nf4"})
    common.check_fsdp("s", "sft", args, ctx)
    for kind in ("grpo",):
        with pytest.raises(UserError, match=f"type: {kind} stage does not train under FSDP yet"):
            common.check_fsdp("s", kind, args, ctx)
    with pytest.raises(UserError, match="does not resume under FSDP"):
        common.fit(None, None, None, None, tmp_path, None, str(tmp_path / "checkpoint-2"))


def test_fsdp_launch_refuses_what_it_cannot_train(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with fsdp.yaml exports
    monkeypatch.delenv("FINETUNE_FSDP", raising=False)
    data = base_recipe(tmp_path)
    data["stages"]["sft"]["train"]["save_strategy"] = "steps"
    line = fails(capsys, tmp_path, ["run", str(write_recipe(tmp_path / "a.yaml", data))])
    assert "save_strategy: 'steps'" in line and "not written under FSDP" in line
    data = base_recipe(tmp_path)
    data["model"]["quantization"] = "none"
    line = fails(capsys, tmp_path, ["run", str(write_recipe(tmp_path / "b.yaml", data))])
    assert "model.quantization: 'none'" in line and "FSDP" in line
    line = fails(capsys, tmp_path, ["run", str(write_recipe(tmp_path / "d.yaml", base_recipe(tmp_path)))])
    assert "an FSDP launch of one process shards nothing" in line
    data = base_recipe(tmp_path)
    data["stages"]["sft"]["train"]["fsdp"] = "full_shard"
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    line = fails(capsys, tmp_path, ["run", str(write_recipe(tmp_path / "c.yaml", data))])
    assert "train.fsdp: drop it" in line
    assert not (tmp_path / "run" / "sft").exists()


def test_accelerate_ddp_config_runs_two_processes(tmp_path):
    """`accelerate launch --config_file recipes/accelerate/ddp.yaml` on the CPU (use_cpu: gloo): one
    training over both processes (the stage refuses to start when the trainer would see one process),
    files written once."""
    data = base_recipe(tmp_path, use_cpu=True)
    path = write_recipe(tmp_path / "r.yaml", data)
    accelerate = Path(sys.executable).parent / "accelerate"
    argv = [str(accelerate), "launch", "--config_file", str(REPO / "recipes" / "accelerate" / "ddp.yaml")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*argv, "--num_processes", "2", "-m", "finetune", "run", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory:") == 1
    rows = (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3  # two logged steps and the final row, once


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
