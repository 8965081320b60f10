"""The CLI contract: each bad input is one line on stderr, exit code 2, and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, base_recipe, fails, write_jsonl, write_recipe

import finetune
from finetune.cli import main


def _recipe(tmp_path, mutate) -> str:
    data = base_recipe(tmp_path)
    mutate(data)
    return str(write_recipe(tmp_path / "r.yaml", data))


@pytest.mark.parametrize("verb", ["run", "validate"])
def test_unknown_key(capsys, tmp_path, verb):
    path = _recipe(tmp_path, lambda d: d["adapter"].update(rank=8))
    assert "unknown key `adapter.rank`" in fails(capsys, tmp_path, [verb, path])


def test_missing_recipe(capsys, tmp_path):
    assert "recipe not found" in fails(capsys, tmp_path, ["run", str(tmp_path / "missing.yaml")])


def test_wrong_type(capsys, tmp_path):
    path = _recipe(tmp_path, lambda d: d.update(seed="abc"))
    assert "`seed`" in fails(capsys, tmp_path, ["run", path])


def test_extends_cycle(capsys, tmp_path):
    write_recipe(tmp_path / "a.yaml", {"extends": "a.yaml"})
    assert "`extends` cycle" in fails(capsys, tmp_path, ["validate", str(tmp_path / "a.yaml")])


def test_missing_data_file(capsys, tmp_path):
    path = _recipe(tmp_path, lambda d: d["stages"]["sft"]["data"].update(train=str(tmp_path / "nope.jsonl")))
    msg = fails(capsys, tmp_path, ["run", path])
    assert "stages.sft.data.train: data file not found" in msg and "nope.jsonl" in msg


def test_dataset_without_needed_columns(capsys, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    path = _recipe(tmp_path, lambda d: d["stages"]["sft"]["data"].update(train=str(bad)))
    msg = fails(capsys, tmp_path, ["run", path])
    assert "stages.sft.data.train: needs a `messages` column" in msg and "found: answer, question" in msg


def test_empty_dataset(capsys, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    path = _recipe(tmp_path, lambda d: d["stages"]["sft"]["data"].update(train=str(empty)))
    assert "stages.sft.data.train: dataset is empty" in fails(capsys, tmp_path, ["run", path])


def test_model_path_not_deepseek(capsys, tmp_path):
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    path = _recipe(tmp_path, lambda d: d.update(model={"path": str(other)}))
    msg = fails(capsys, tmp_path, ["run", path])
    assert "model.path" in msg and "model_type 'llama'" in msg


def test_override_for_missing_key(capsys, tmp_path):
    path = _recipe(tmp_path, lambda d: None)
    msg = fails(capsys, tmp_path, ["run", path, "stages.sft.train.learnig_rate=1e-4"])
    assert "did you mean `learning_rate`?" in msg


def test_invalid_trainer_combination_named(capsys, tmp_path):
    path = _recipe(tmp_path, lambda d: d["stages"]["sft"]["train"].update(lr_scheduler_type="nonsense"))
    assert "stages.sft.train" in fails(capsys, tmp_path, ["validate", path])


def test_debug_shows_traceback(tmp_path):
    path = _recipe(tmp_path, lambda d: d["adapter"].update(rank=8))
    from finetune.errors import UserError

    with pytest.raises(UserError):
        main(["validate", path, "--debug"])


def test_validate_ok(capsys, tmp_path):
    assert main(["validate", _recipe(tmp_path, lambda d: None)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "16 training rows" in out
    assert not (tmp_path / "run").exists()


def test_version_and_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "finetune", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"finetune {finetune.__version__}"


def test_unreachable_hub_model(capsys, tmp_path):
    path = _recipe(tmp_path, lambda d: d.update(model={"path": "no-such-org/no-such-model"}))
    assert main(["validate", path]) == 0  # validate accepts a Hub id without the network
    capsys.readouterr()
    msg = fails(capsys, tmp_path, ["inspect", path])
    assert "model.path: cannot load Hub id 'no-such-org/no-such-model'" in msg


def test_stderr_holds_no_library_notices(tmp_path):
    """`validate` on the CI recipe, offline, as a user runs it: nothing on stderr (bitsandbytes' import on
    AVX512-BF16 CPUs logged the `kernels` package's publisher-trust notice there)."""
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "validate", str(REPO / "recipes" / "tiny" / "sft.yaml")],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | {"HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
