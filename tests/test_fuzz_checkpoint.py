"""Bad checkpoints at `model.path`: `validate` (and `run`) print one `error: ...` line naming the file,
exit 2, show no traceback and create no run folder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import base_recipe, one_error_line, write_recipe
from hub_layout import SHARD_NAMES, write_hub_checkpoint

from finetune.cli import main


@dataclass(frozen=True)
class Case:
    name: str
    breaks: Callable[[Path], None]  # edits a valid Hub-layout checkpoint folder in place
    expect: str  # substring of the one error line


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _write_config(folder: Path, data) -> None:
    (folder / "config.json").write_text(json.dumps(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _no_weights(folder: Path) -> None:
    for path in folder.glob("*.safetensors*"):
        path.unlink()


CASES = [
    Case("config-is-a-list", lambda f: _write_config(f, [1, 2]), "must hold a JSON object, got a list"),
    Case("config-not-json", lambda f: (f / "config.json").write_text("{nope"), "is not valid JSON"),
    Case("config-binary", lambda f: (f / "config.json").write_bytes(b"\xff\xfe\x00"), "is not valid JSON"),
    Case("no-config", lambda f: (f / "config.json").unlink(), "no config.json"),
    Case(
        "other-model", lambda f: _write_config(f, {**_config(f), "model_type": "llama"}), "model_type 'llama'"
    ),
    Case("no-weights", _no_weights, "has no *.safetensors weights"),
    Case("truncated-shard", lambda f: _truncate(f / SHARD_NAMES[1]), "is not a readable safetensors file"),
    Case(
        "garbage-shard",
        lambda f: (f / SHARD_NAMES[0]).write_bytes(b"x" * 64),
        "is not a readable safetensors",
    ),
    Case("index-names-missing-shard", lambda f: (f / SHARD_NAMES[1]).unlink(), f"names {SHARD_NAMES[1]}"),
    Case(
        "index-not-json",
        lambda f: (f / "model.safetensors.index.json").write_text("[]"),
        "is not a safetensors index",
    ),
    Case(
        "config-bad-shape",
        lambda f: _write_config(f, {**_config(f), "hidden_size": "wide"}),
        "cannot build the model config",
    ),
    Case(
        "path-is-a-file",
        lambda f: (shutil.rmtree(f), f.write_text("x")),
        "is a file, not a checkpoint folder",
    ),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "ckpt"
    write_hub_checkpoint(folder, q_lora_rank=None)
    return folder


@pytest.mark.parametrize("verb", ["validate", "run"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_checkpoint(case, verb, pristine, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    shutil.copytree(pristine, folder)
    case.breaks(folder)
    data = base_recipe(tmp_path)
    data["model"] = {"path": str(folder), "quantization": "nf4", "dtype": "float32"}
    path = write_recipe(tmp_path / "r.yaml", data)
    code = main([verb, str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    line = one_error_line(err)
    assert case.expect in line and "model.path" in line, err
    assert not (tmp_path / "run").exists()
