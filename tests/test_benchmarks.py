"""The GPU benchmarks' own code, dry-run on the CPU before device time is spent on it (slow: not in the
default run; `python -m pytest -m slow tests/test_benchmarks.py`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

VARIANTS = [
    "stock+bf16",
    "nf4-experts+bf16+head+kernels+frozen+checkpoint",
    "nf4-experts+bf16+head+kernels+frozen+modules+bnblinear",
    "nf4-experts+lora+bf16+head+kernels+frozen+noguards+tritondq",
    "nf4-experts+lora+bf16+head+kernels+frozen+cppwrapper+reentrant",
]


@pytest.mark.slow
def test_moe_qlora_runs_every_variant_on_the_cpu(tmp_path):
    out = tmp_path / "moe.json"
    args = ["--device", "cpu", "--preset", "tiny", "--layers", "2", "--steps", "1", "--batch", "1"]
    args += ["--seq", "16", "--rounds", "2", "--out", str(out), "--variants", ",".join(VARIANTS)]
    subprocess.run([sys.executable, "moe_qlora.py", *args], cwd=REPO / "benchmarks", check=True)
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["runs"]] == VARIANTS * 2
    assert not [r for r in result["runs"] if "error" in r]
    assert set(result["summary"]) == set(VARIANTS)
    trainable = {r["variant"]: r["trainable_params"] for r in result["runs"]}
    assert trainable[VARIANTS[3]] > trainable[VARIANTS[1]]  # + expert LoRA


@pytest.mark.slow
def test_host_step_compares_the_two_region_schemes(tmp_path):
    out = tmp_path / "host.json"
    args = ["--layers", "2", "--rounds", "1", "--steps", "2", "--noguards", "--out", str(out)]
    subprocess.run([sys.executable, "host_step.py", *args], cwd=REPO / "benchmarks", check=True)
    result = json.loads(out.read_text())
    # A dense and a MoE layer, each pass (forward, recomputation) two entries a layer, or one a module
    # (two norms, attention, then MLP or routed + shared experts); recomputed inside the graphs, one
    # pass; plus the final norm and the LM head.
    entries = result["region_entries_per_step"]
    layers = 2 * 2 * 2 + 2
    assert entries == {"layers": layers, "modules": 2 * (4 + 5) + 2, "ingraph": 2 * 2 + 2, "noguards": layers}


@pytest.mark.slow
def test_dpo_step_runs_every_variant_on_the_cpu(tmp_path):
    out = tmp_path / "dpo.json"
    args = ["--device", "cpu", "--preset", "tiny", "--layers", "2", "--seq", "32", "--steps", "1"]
    args += ["--warmup", "1", "--out", str(out)]
    subprocess.run([sys.executable, "dpo_step.py", *args], cwd=REPO / "benchmarks", check=True)
    runs = {r["variant"]: r for r in json.loads(out.read_text())["runs"]}
    assert list(runs) == ["sft", "dpo-init", "dpo-base", "dpo-precompute"]
    assert not [r for r in runs.values() if "error" in r]
    assert all(r["tokens_first_step"] == 8 * 32 for r in runs.values())  # 8 sequences × 32 tokens a step
    # The starting adapter is nonzero: against itself (init) the first margins are 0, against the base not.
    assert runs["dpo-init"]["rewards_margins"][0] == 0 and runs["dpo-base"]["rewards_margins"][0] != 0
    assert runs["dpo-precompute"]["rewards_margins"] == pytest.approx(
        runs["dpo-init"]["rewards_margins"], abs=1e-3
    )
    assert runs["dpo-init"]["frozen_reference_bytes"] > 0 and runs["dpo-base"]["frozen_reference_bytes"] == 0
    assert runs["dpo-precompute"]["precompute_s"] > 0 and runs["dpo-init"]["precompute_s"] is None
