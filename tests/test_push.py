"""`finetune push`: the folder it uploads (`--dry-run DIR` writes it) loads back with PEFT (an MLA-only
adapter), with our loader (expert LoRA) and with plain transformers (an export); the card's metrics are
summary.json's; bad input is one line; the upload drives huggingface_hub's client against a local Hub."""

from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from conftest import base_recipe, fails, one_error_line, write_recipe
from hub_server import local_hub
from peft import PeftModel
from transformers import AutoModelForCausalLM

from finetune import pipeline, recipe, rundir
from finetune.cli import main
from finetune.model import adapters
from finetune.model.load import embedded_checkpoint, load_model, resolve_source

IDS = torch.tensor([[5, 89, 76, 93, 76, 89, 90, 76, 33, 7, 72, 73, 74, 75, 6]])
MLA = {"targets": ["mla"]}
EXPERTS = {"targets": ["mla", "routed_experts"], "router": "trainable"}
SUMMARY = {
    "stage": "sft",
    "type": "sft",
    "train": {"train_loss": 1.2345678901234567, "epoch": 0.5, "seconds": 3.5, "steps": 2},
    "heldout": {
        "metric": "exact_match",
        "before": {"exact_match": 0.0, "n": 8},
        "after": {"exact_match": 0.375},
    },
    "eval": {"eval_loss": 0.8125, "accuracy": 0.75},
}


def make_stage(tmp_path: Path, adapter: dict) -> Path:
    """RUN/sft as a finished run leaves it (recipe.yaml, adapter with tokenizer, summary.json), its LoRA
    B factors random so the adapter changes the outputs. Unquantized fp32 base: PEFT, transformers and
    our loader then compute the same numbers."""
    data = base_recipe(tmp_path)
    data["model"] = {"preset": "tiny", "quantization": "none", "dtype": "float32"}
    data["adapter"].update(adapter)
    r = recipe.load(write_recipe(tmp_path / "r.yaml", data))
    ctx = pipeline.plan(r).context
    model = ctx.adapted_model()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or re.search(r"lora_(gate_up|down)_B$", name):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    stage = Path(r.output_dir) / "sft"
    stage.mkdir(parents=True)
    rundir.write_recipe(r, stage.parent)
    adapters.save_adapter(model, stage / "adapter")
    ctx.tokenizer().save_pretrained(str(stage / "adapter"))
    rundir.write_summary(stage / "summary.json", {**SUMMARY, "adapter": str(stage / "adapter")})
    return stage


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def exported(stage: Path, out: Path) -> Path:
    assert main(["export", str(stage), "--out", str(out)]) == 0
    return out


def card_parts(folder: Path) -> tuple[dict, dict]:
    """The card's YAML metadata and its metrics table (values parsed as JSON)."""
    text = (folder / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    table = text.split("## Metrics")[1].split("## Load it")[0]
    rows = re.findall(r"^\| (\S+) \| (\S+) \|$", table, flags=re.M)
    return meta, {k: json.loads(v) for k, v in rows if k != "metric"}


def summary_numbers(summary: dict) -> dict:
    """Every number of summary.json, dotted (what the card must show, nothing else)."""
    out = {}
    for section in summary.keys() - {"stage", "type", "adapter"}:
        stack = [(section, summary[section])]
        while stack:
            key, value = stack.pop()
            if isinstance(value, dict):
                stack += [(f"{key}.{k}", v) for k, v in value.items()]
            elif isinstance(value, int | float):
                out[key] = value
    return out


def test_dry_run_mla_adapter_loads_with_peft_and_card_metrics_are_the_summary(tmp_path, capsys):
    stage = make_stage(tmp_path, MLA)
    dry = tmp_path / "dry"
    assert main(["push", str(stage), "--repo", "me/tiny-sft", "--dry-run", str(dry)]) == 0
    assert f"→ {dry}" in capsys.readouterr().out
    adapter = stage / "adapter"
    assert sorted(p.name for p in dry.iterdir()) == sorted(
        {p.name for p in adapter.iterdir()} | {"README.md"}
    )
    for path in adapter.iterdir():  # the adapter's files unchanged; PEFT's template card replaced
        if path.name != "README.md":
            assert (dry / path.name).read_bytes() == path.read_bytes(), path.name

    meta, table = card_parts(dry)
    assert meta["library_name"] == "peft" and "sft" in meta["tags"]
    assert table == summary_numbers(json.loads((stage / "summary.json").read_text()))
    assert "PeftModel.from_pretrained" in (dry / "README.md").read_text()

    # Plain PEFT on plain transformers loads it, and computes what the merged export computes.
    base = AutoModelForCausalLM.from_pretrained(embedded_checkpoint("tiny", 0), dtype=torch.float32)
    before = logits(base)
    peft_model = PeftModel.from_pretrained(base, str(dry))
    after = logits(peft_model)
    assert not torch.allclose(before, after, atol=1e-3)
    merged = AutoModelForCausalLM.from_pretrained(exported(stage, tmp_path / "merged"), dtype=torch.float32)
    torch.testing.assert_close(after, logits(merged), atol=1e-4, rtol=1e-4)


def test_dry_run_expert_lora_loads_with_our_loader_and_an_export_with_transformers(tmp_path):
    stage = make_stage(tmp_path, EXPERTS)
    merged = exported(stage, tmp_path / "merged")
    reference = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))

    dry = tmp_path / "dry"
    assert main(["push", str(stage), "--repo", "me/tiny-experts", "--dry-run", str(dry)]) == 0
    assert {"routed_experts.safetensors", "router.safetensors"} <= {p.name for p in dry.iterdir()}
    text = (dry / "README.md").read_text()
    assert "load_adapter" in text and "PeftModel" not in text  # PEFT alone would drop the expert LoRA
    base = load_model(resolve_source("tiny", None), quantization="none", dtype="float32")
    before = logits(base)
    ours = logits(adapters.load_adapter(base, dry))
    assert not torch.allclose(before, ours, atol=1e-3)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)

    dry_export = tmp_path / "dry-export"
    assert (
        main(
            [
                "push",
                str(stage),
                "--repo",
                "me/tiny-merged",
                "--export",
                str(merged),
                "--dry-run",
                str(dry_export),
            ]
        )
        == 0
    )
    for path in merged.iterdir():
        assert (dry_export / path.name).read_bytes() == path.read_bytes(), path.name
    meta, table = card_parts(dry_export)
    assert meta["library_name"] == "transformers"
    assert table == summary_numbers(SUMMARY)
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-merged")' in (dry_export / "README.md").read_text()
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(dry_export, dtype=torch.float32)), reference
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "error: --repo: give the Hub repo to push to"),
        (["--repo", "a/b/c"], "error: --repo: 'a/b/c' is not a Hub repo id"),
        (["--repo", ""], "error: --repo: give the Hub repo to push to"),
    ],
)
def test_push_without_a_repo_id_is_one_line_and_writes_nothing(tmp_path, capsys, argv, expected):
    stage = tmp_path / "run" / "sft"  # checked before the stage is read: any path
    line = fails(capsys, tmp_path, ["push", str(stage), *argv, "--dry-run", str(tmp_path / "dry")])
    assert line.startswith(expected), line
    assert not (tmp_path / "dry").exists()


def test_push_of_a_stage_that_did_not_finish_is_one_line(tmp_path, capsys):
    (tmp_path / "run" / "sft").mkdir(parents=True)
    from finetune.cli import main as cli

    assert (
        cli(["push", str(tmp_path / "run" / "sft"), "--repo", "me/x", "--dry-run", str(tmp_path / "d")]) == 2
    )
    assert "not a finished stage" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_upload_drives_the_hub_client_against_a_local_endpoint(tmp_path, capsys, monkeypatch):
    stage = make_stage(tmp_path, EXPERTS)
    assert main(["push", str(stage), "--repo", "me/tiny-up", "--dry-run", str(tmp_path / "dry")]) == 0
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # conftest's, read at import
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    with local_hub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert main(["push", str(stage), "--repo", "me/tiny-up", "--private"]) == 0
    assert f"→ {hub.url}/me/tiny-up" in capsys.readouterr().out
    assert hub.repos["me/tiny-up"] == {
        "name": "tiny-up",
        "organization": "me",
        "visibility": "private",
        "type": "model",
    }
    assert {c["authorization"] for c in hub.calls} == {"Bearer hf_local_test_token"}
    assert [c["path"] for c in hub.calls] == [
        "/api/repos/create",
        "/api/validate-yaml",
        "/api/models/me/tiny-up/preupload/main",
        "/api/models/me/tiny-up/commit/main",
    ]
    # What arrived is byte for byte the dry run's folder, card included.
    assert hub.cards[0]["library_name"] == "peft"
    sent = hub.files["me/tiny-up"]
    assert sent == {p.name: p.read_bytes() for p in (tmp_path / "dry").iterdir()}


def test_an_unreachable_hub_is_one_line(tmp_path, capsys, monkeypatch):
    stage = make_stage(tmp_path, MLA)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    with local_hub() as hub:
        closed = hub.url  # nothing listens there once the block ends
    monkeypatch.setenv("HF_ENDPOINT", closed)
    capsys.readouterr()
    assert main(["push", str(stage), "--repo", "me/x"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: push me/x: the upload failed ("), line


def test_upload_refused_offline_or_without_a_token(tmp_path, capsys, monkeypatch):
    stage = make_stage(tmp_path, MLA)
    assert main(["push", str(stage), "--repo", "me/x"]) == 2  # conftest: HF_HUB_OFFLINE=1
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token file either
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    assert main(["push", str(stage), "--repo", "me/x"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the `push:` recipe key


def push_recipe(tmp_path: Path, push: dict, stage_type_extra: dict | None = None) -> Path:
    data = base_recipe(tmp_path)
    data["stages"]["sft"].update({"push": push, **(stage_type_extra or {})})
    return write_recipe(tmp_path / "r.yaml", data)


@pytest.mark.parametrize(
    ("push", "expected"),
    [
        ({"repo": "a/b/c"}, "`stages.sft.push.repo`: not a Hub repo id"),
        ({"private": True}, "stages.sft.push.repo"),
        ({"repo": "me/x", "exprot": True}, "stages.sft.push.exprot"),
        ({"repo": "me/x"}, "stages.sft.push: HF_HUB_OFFLINE is set"),  # conftest's offline mode
    ],
)
def test_push_key_is_checked_by_validate(tmp_path, capsys, push, expected):
    line = fails(capsys, tmp_path, ["validate", str(push_recipe(tmp_path, push))])
    assert expected in line, line


def test_validate_says_what_a_stage_will_push(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    path = push_recipe(tmp_path, {"repo": "me/x", "private": True, "export": True})
    assert main(["validate", str(path)]) == 0
    assert "then pushes its export (base original) to me/x (private)" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_push_key_without_a_token_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    line = fails(capsys, tmp_path, ["run", str(push_recipe(tmp_path, {"repo": "me/x"}))])
    assert "stages.sft.push: no Hugging Face token" in line


@pytest.mark.long  # two training stages in a fresh process, one exported (~30 s)
def test_push_key_uploads_each_stage_at_its_end(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    data = base_recipe(tmp_path)
    data["stages"]["sft"]["push"] = {"repo": "me/run-adapter", "private": True}
    data["stages"]["merged"] = {**data["stages"]["sft"], "push": {"repo": "me/run-export", "export": True}}
    path = write_recipe(tmp_path / "r.yaml", data)
    with local_hub() as hub:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": "hf_local_test_token",
        }
        env.pop("HF_HUB_OFFLINE")
        done = subprocess.run(
            [sys.executable, "-m", "finetune", "run", str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    sent = len(hub.files["me/run-adapter"])
    assert f"stage sft: pushed its adapter ({sent} files) → {hub.url}/me/run-adapter" in done.stdout
    assert f"stage merged: pushed its export ({len(hub.files['me/run-export'])} files)" in done.stdout
    assert (
        hub.repos["me/run-adapter"]["visibility"] == "private"
        and hub.repos["me/run-export"]["visibility"] == "public"
    )
    run = tmp_path / "run"
    adapter = hub.files["me/run-adapter"]
    assert (
        adapter["adapter_model.safetensors"]
        == (run / "sft" / "adapter" / "adapter_model.safetensors").read_bytes()
    )
    export = hub.files["me/run-export"]
    assert "config.json" in export and "model.safetensors" in export and "adapter_config.json" not in export
    assert not list(run.glob(".push-export-*"))  # the temporary export is gone
    for name, files in (("sft", adapter), ("merged", export)):
        summary = json.loads((run / name / "summary.json").read_text())
        (tmp_path / name).mkdir()
        (tmp_path / name / "README.md").write_bytes(files["README.md"])
        assert card_parts(tmp_path / name)[1] == summary_numbers(summary), name
