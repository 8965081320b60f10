"""Bad input to `finetune export`: each case prints one `error: ...` line, exits 2, shows no traceback,
and leaves `--out` as it was (no export, no temporary folder beside it)."""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import base_recipe, one_error_line, write_recipe
from safetensors.torch import load_file, save_file

from finetune import pipeline, recipe, rundir
from finetune.cli import main
from finetune.model import adapters
from finetune.model.load import embedded_checkpoint


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[[Path, Path], list[str]]  # (run folder, --out) → extra arguments
    expect: str  # substring of the one error line
    during: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def adapter(run: Path) -> Path:
    return run / "sft" / "adapter"


def truncate(path: Path, keep: float = 0.7) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_tensors(path: Path, edit: Callable[[dict], dict]) -> None:
    save_file(edit(load_file(str(path))), str(path))


def edit_recipe(run: Path, **model) -> None:
    data = recipe.load(run / "recipe.yaml").model_dump(exclude_none=True)
    data["model"] = {k: v for k, v in data["model"].items() if k != "preset"} | model
    write_recipe(run / "recipe.yaml", data)


def broken_base(run: Path, out: Path) -> list[str]:
    copy = run.parent / "base-copy"
    shutil.copytree(embedded_checkpoint("tiny", 0), copy)
    truncate(copy / "model.safetensors", 0.5)
    edit_recipe(run, path=str(copy))
    return []


def make_file(path: Path) -> list[str]:
    path.write_text("not a folder")
    return []


def make_non_empty(path: Path) -> list[str]:
    path.mkdir()
    (path / "keep.txt").write_text("mine")
    return []


@contextlib.contextmanager
def disk_full_at(nbytes: int) -> Iterator[None]:
    """Writes past `nbytes` fail with EFBIG (an OSError, as a full disk's ENOSPC), in this process."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


PEFT_FILE = "adapter_model.safetensors"
Q_PROJ_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

CASES = [
    Case("out-is-a-file", lambda run, out: make_file(out), "is a file; give a folder"),
    Case("out-not-empty", lambda run, out: make_non_empty(out), "folder is not empty; pass --overwrite"),
    Case(
        "out-parent-is-a-file",
        lambda run, out: [*make_file(out.parent / "plain"), "--out", str(out.parent / "plain" / "x")],
        "cannot create",
    ),
    Case(
        "out-is-the-run-folder", lambda run, out: ["--out", str(run), "--overwrite"], "which the export reads"
    ),
    Case("no-adapter-folder", lambda run, out: shutil.rmtree(adapter(run)) or [], "no adapter/ folder here"),
    Case(
        "no-recipe",
        lambda run, out: (run / "recipe.yaml").unlink() or [],
        "export needs the run's resolved recipe",
    ),
    Case(
        "adapter-config-not-json",
        lambda run, out: (adapter(run) / "adapter_config.json").write_text("{r: 4") and [],
        "adapter_config.json: not a valid adapter config",
    ),
    Case(
        "adapter-config-not-lora",
        lambda run, out: edit_json(adapter(run) / "adapter_config.json", peft_type="IA3") or [],
        "merges LoRA adapters only",
    ),
    Case(
        "adapter-config-dora",
        lambda run, out: edit_json(adapter(run) / "adapter_config.json", use_dora=True) or [],
        "DoRA adapters cannot be merged",
    ),
    Case(
        "adapter-config-no-rank",
        lambda run, out: edit_json(adapter(run) / "adapter_config.json", r=None) or [],
        "positive integer `r`",
    ),
    Case(
        "adapter-weights-missing",
        lambda run, out: (adapter(run) / PEFT_FILE).unlink() or [],
        "adapter_model.safetensors: not found",
    ),
    Case(
        "adapter-weights-truncated",
        lambda run, out: truncate(adapter(run) / PEFT_FILE) or [],
        "adapter_model.safetensors: not a readable safetensors file",
    ),
    Case(
        "adapter-weights-garbage",
        lambda run, out: (adapter(run) / PEFT_FILE).write_bytes(b"\x93garbage" * 64) and [],
        "adapter_model.safetensors: not a readable safetensors file",
    ),
    Case(
        "lora-names-no-tensor",
        lambda run, out: (
            edit_tensors(
                adapter(run) / PEFT_FILE,
                lambda t: {k.replace("layers.2.", "layers.9."): v for k, v in t.items()},
            )
            or []
        ),
        "names no tensor of the base checkpoint",
    ),
    Case(
        "lora-wrong-shape",
        lambda run, out: (
            edit_tensors(adapter(run) / PEFT_FILE, lambda t: t | {Q_PROJ_B: t[Q_PROJ_B][:-3]}) or []
        ),
        "LoRA for model.layers.0.self_attn.q_proj.weight is",
    ),
    Case(
        "experts-truncated",
        lambda run, out: truncate(adapter(run) / adapters.EXPERTS_FILE, 0.95) or [],
        "routed_experts.safetensors: not a readable safetensors file",
    ),
    Case(
        "experts-layer-incomplete",
        lambda run, out: (
            edit_tensors(
                adapter(run) / adapters.EXPERTS_FILE,
                lambda t: {k: v for k, v in t.items() if k != "layers.1.lora_down_B"},
            )
            or []
        ),
        "layer 1 has no lora_down_B",
    ),
    Case(
        "experts-of-a-dense-layer",
        lambda run, out: (
            edit_tensors(
                adapter(run) / adapters.EXPERTS_FILE,
                lambda t: {k.replace("layers.2.", "layers.0."): v for k, v in t.items()},
            )
            or []
        ),
        "layer 0 has no routed experts in the base checkpoint",
    ),
    Case(
        "router-truncated",
        lambda run, out: truncate(adapter(run) / adapters.ROUTER_FILE) or [],
        "router.safetensors: not a readable safetensors file",
    ),
    Case(
        "base-missing",
        lambda run, out: edit_recipe(run, path=str(run.parent / "gone")) or [],
        "base checkpoint: model.path: folder not found",
    ),
    Case("base-shard-truncated", broken_base, "model.safetensors is not a readable safetensors file"),
    Case(
        "base-hub-id-unreachable",  # tests run offline (conftest): the snapshot cannot be fetched
        lambda run, out: edit_recipe(run, path="no-such-org/no-such-model") or [],
        "cannot download Hub id 'no-such-org/no-such-model'",
    ),
    Case(
        "quantized-base-of-a-16-bit-run",
        lambda run, out: edit_recipe(run, preset="tiny", quantization="none") or ["--base", "quantized"],
        "--base quantized: this run trained on 16-bit weights",
    ),
    Case("bad-shard-size", lambda run, out: ["--max-shard-size", "lots"], "--max-shard-size"),
    Case(
        "disk-full-while-writing",
        lambda run, out: [],
        "export failed, nothing written",
        lambda: disk_full_at(60_000),
    ),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A finished-looking run: resolved recipe, and an adapter with expert LoRA, router and embeddings."""
    tmp = tmp_path_factory.mktemp("pristine")
    data = base_recipe(tmp)
    data["adapter"].update(
        targets=["mla", "routed_experts"], router="trainable", trainable_modules=["embeddings"]
    )
    r = recipe.load(write_recipe(tmp / "r.yaml", data))
    model = pipeline.plan(r).context.adapted_model()
    run = Path(r.output_dir)
    (run / "sft").mkdir(parents=True)
    rundir.write_recipe(r, run)
    adapters.save_adapter(model, run / "sft" / "adapter")
    return run


def snapshot(path: Path) -> dict[str, bytes] | None:
    if path.is_file():
        return {"": path.read_bytes()}
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return None


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_export_input(case, pristine, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    out = tmp_path / "work" / "merged"
    out.parent.mkdir()
    extra = case.setup(run, out)
    target = Path(extra[extra.index("--out") + 1]) if "--out" in extra else out
    argv = ["export", str(run / "sft"), "--out", str(out), *extra]
    before = snapshot(target)
    capsys.readouterr()
    with case.during():
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    line = one_error_line(err)
    assert case.expect in line, line
    assert snapshot(target) == before, "a failed export must leave --out as it was"
    leftovers = [p for p in tmp_path.rglob("*") if ".partial-" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers


def test_overwrite_replaces_a_non_empty_folder(pristine, tmp_path):
    out = tmp_path / "merged"
    make_non_empty(out)
    assert main(["export", str(pristine / "sft"), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
