"""Bad input of every kind (recipe files, overrides, output_dir, run folders): one line, exit 2, nothing written.

Each entry of `CASES` is one bad input. It runs through `finetune.cli.main` with `validate` and `run`
(`run` fails in its checks, before a model is loaded): exit code 2, exactly one `error: ` line naming
the key or file, no traceback, and no file under the test folder created, changed or removed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import base_recipe, one_error_line, write_recipe

from finetune import recipe, rundir
from finetune.cli import main


@dataclass
class Case:
    id: str
    expected: str  # in the error line
    edit: Callable[[dict], None] | None = None  # changes the recipe mapping before it is written
    text: Callable[[str], str | bytes] | None = None  # rewrites the recipe file
    overrides: tuple[str, ...] = ()
    setup: Callable[[Path], object] | None = None  # prepares the test folder; may return a cleanup callable
    verbs: tuple[str, ...] = ("validate", "run")
    flags: tuple[str, ...] = ()  # e.g. --resume


def _train(**args) -> Callable[[dict], None]:
    return lambda d: d["stages"]["sft"]["train"].update(args)


def _set(*keys, value) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        node = d
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value

    return edit


def _replace(old: str, new: str) -> Callable[[str], str]:
    def text(t: str) -> str:
        assert old in t, t
        return t.replace(old, new, 1)

    return text


def _file_at_output(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file where the run folder should go\n")


def _locked_run_folder(tmp_path: Path) -> Callable[[], None]:
    """Another run holds the run folder (the lock is per open file, so this process can stand in for it)."""
    (tmp_path / "run").mkdir()
    stack = contextlib.ExitStack()
    stack.enter_context(rundir.locked(tmp_path / "run"))
    return stack.close


def _earlier_run(**train) -> Callable[[Path], None]:
    """A run folder holding a recipe that differs from the test recipe in `train`."""

    def setup(tmp_path: Path) -> None:
        other = write_recipe(tmp_path / "other.yaml", base_recipe(tmp_path, **train))
        (tmp_path / "run").mkdir()
        rundir.write_recipe(recipe.load(other), tmp_path / "run")
        other.unlink()

    return setup


def _broken_run_recipe(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text("name: [cut short by a crash\n")


CASES = [
    # -- the recipe file itself
    Case("duplicate-key", "line 22: duplicate key `seed` (first at line 3)", text=lambda t: t + "seed: 7\n"),
    Case(
        "duplicate-nested-key",
        "line 20: duplicate key `max_steps` (first at line 19)",
        text=_replace(
            "      per_device_train_batch_size", "      max_steps: 3\n      per_device_train_batch_size"
        ),
    ),
    Case(
        "binary-recipe",
        "r.yaml: a binary file, not a YAML recipe",
        text=lambda t: b"\x89PNG\r\n\x1a\n\x00\x00" + t.encode(),
    ),
    Case(
        "latin-1-recipe",
        "r.yaml: not UTF-8 text (byte 0xe9 at offset 9)",
        text=lambda t: t.replace("name: t", "name: caf\xe9").encode("latin-1"),
    ),
    Case(
        "control-character",
        "r.yaml: not a YAML text file (character #x0007",
        text=_replace("name: t", "name: t\x07"),
    ),
    Case("not-yaml", "r.yaml: line 2 is not valid YAML", text=lambda t: "name: [unclosed\n" + t),
    Case("recipe-is-a-list", "a recipe is a mapping of keys, got list", text=lambda t: "- a\n- b\n"),
    Case("recipe-is-a-folder", "recipe not found", setup=lambda tmp: (tmp / "r.yaml").mkdir()),
    # -- booleans are not numbers
    Case("seed-true", "`seed`: Input should be a valid integer", edit=_set("seed", value=True)),
    Case("seed-override-yes", "`seed`: Input should be a valid integer", overrides=("seed=yes",)),
    Case("model-seed-false", "`model.seed`", edit=_set("model", "seed", value=False)),
    Case("rank-true", "`adapter.r`", edit=_set("adapter", "r", value=True)),
    Case("alpha-on", "`adapter.alpha`", text=_replace("alpha: 8", "alpha: on")),
    Case(
        "max-samples-true", "`stages.sft.data.max_samples`", overrides=("stages.sft.data.max_samples=true",)
    ),
    Case(
        "batch-size-true",
        "`stages.sft.train.per_device_train_batch_size`",
        edit=_train(per_device_train_batch_size=True),
    ),
    Case(
        "learning-rate-yes",
        "`stages.sft.train.learning_rate`",
        overrides=("stages.sft.train.learning_rate=yes",),
    ),
    Case("double-quant-word", "`model.double_quant`", overrides=("model.double_quant=maybe",)),
    # -- trainer numbers out of range
    Case(
        "batch-size-0",
        "`stages.sft.train.per_device_train_batch_size` must be > 0, got 0",
        edit=_train(per_device_train_batch_size=0),
    ),
    Case(
        "max-length-0",
        "`stages.sft.train.max_length` must be > 0, got 0",
        overrides=("stages.sft.train.max_length=0",),
    ),
    Case(
        "negative-learning-rate",
        "`stages.sft.train.learning_rate` must be > 0, got -0.001",
        edit=_train(learning_rate=-1e-3),
    ),
    Case(
        "zero-epochs",
        "`stages.sft.train.num_train_epochs` must be > 0 when max_steps is -1",
        edit=_train(max_steps=-1, num_train_epochs=-1),
    ),
    Case(
        "max-steps-0",
        "`stages.sft.train.max_steps` must be -1 (train num_train_epochs) or > 0, got 0",
        overrides=("stages.sft.train.max_steps=0",),
    ),
    Case(
        "grad-accumulation-0",
        "`stages.sft.train.gradient_accumulation_steps` must be > 0",
        edit=_train(gradient_accumulation_steps=0),
    ),
    Case("warmup-negative", "`stages.sft.train.warmup_steps` must be >= 0", edit=_train(warmup_steps=-5)),
    Case(
        "save-steps-0",
        "`stages.sft.train.save_steps` must be > 0",
        overrides=("stages.sft.train.save_steps=0",),
    ),
    Case("adam-beta-1", "`stages.sft.train.adam_beta2` must be in [0, 1)", edit=_train(adam_beta2=1.0)),
    Case(
        "resume-from-checkpoint",
        "`stages.sft.train.resume_from_checkpoint` cannot be set: use `finetune run RECIPE --resume`",
        edit=_train(resume_from_checkpoint="x"),
    ),
    # -- routed-expert ids the model does not have (tiny: layer 0 dense, layers 1-2 with 8 experts)
    Case(
        "experts-no-such-layer",
        "adapter.experts: layer 5 has no routed experts (MoE layers: [1, 2])",
        edit=_set("adapter", "experts", value={5: [0]}),
    ),
    Case(
        "experts-dense-layer",
        "adapter.experts: layer 0 has no routed experts",
        overrides=("adapter.experts={0: all}",),
    ),
    Case(
        "experts-id-too-big",
        "adapter.experts: layer 1: no expert 8 (0..7)",
        edit=_set("adapter", "experts", value={1: [0, 8]}),
    ),
    Case(
        "experts-id-negative",
        "adapter.experts: layer 2: no expert -1 (0..7)",
        overrides=("adapter.experts={2: [-1]}",),
    ),
    Case(
        "experts-layer-word",
        "`adapter.experts.yes`",
        text=_replace("  targets:", "  experts: {yes: [0]}\n  targets:"),
    ),
    # -- output_dir
    Case(
        "output-dir-is-a-file",
        "output_dir: {tmp}/taken is a file, not a folder",
        overrides=("output_dir={tmp}/taken",),
        setup=_file_at_output,
    ),
    Case(
        "output-dir-under-a-file",
        "output_dir: {tmp}/taken/run cannot be created: {tmp}/taken is a file",
        overrides=("output_dir={tmp}/taken/run",),
        setup=_file_at_output,
    ),
    Case(
        "output-dir-read-only", "output_dir: /proc/1 is not writable", overrides=("output_dir=/proc/1/run",)
    ),
    # -- run folders: locked by another run, resumed with another recipe
    Case(
        "run-folder-locked",
        f"{{tmp}}/run: another run (pid {os.getpid()}) is writing this run folder",
        setup=_locked_run_folder,
        verbs=("run",),
    ),
    Case(
        "run-folder-locked-resume",
        f"{{tmp}}/run: another run (pid {os.getpid()})",
        setup=_locked_run_folder,
        verbs=("run",),
        flags=("--resume",),
    ),
    Case(
        "run-folder-holds-a-run",
        "output_dir: {tmp}/run holds a partial run (sft: not started); continue it with --resume, "
        "replace it with --overwrite, or choose another output_dir",
        setup=_earlier_run(),
        verbs=("run",),
    ),
    Case(
        "resume-other-recipe",
        "--resume: the recipe differs from the run's {tmp}/run/recipe.yaml at `stages.sft.train.learning_rate` "
        "(run: 0.5, given: not set)",
        setup=_earlier_run(learning_rate=0.5),
        verbs=("run",),
        flags=("--resume",),
    ),
    Case(
        "resume-other-override",
        "at `adapter.r` (run: 4, given: 8)",
        setup=_earlier_run(),
        overrides=("adapter.r=8",),
        verbs=("run",),
        flags=("--resume",),
    ),
    Case(
        "resume-broken-run-recipe",
        "{tmp}/run/recipe.yaml: line 2 is not valid YAML",
        setup=_broken_run_recipe,
        verbs=("run",),
        flags=("--resume",),
    ),
]


def _snapshot(root: Path) -> dict[str, tuple]:
    return {
        str(p.relative_to(root)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def _prepare(tmp_path: Path, case: Case) -> str:
    data = base_recipe(tmp_path)
    if case.edit:
        case.edit(data)
    path = tmp_path / "r.yaml"
    if not path.exists():
        write_recipe(path, data)
        if case.text:
            new = case.text(path.read_text())
            path.write_bytes(new) if isinstance(new, bytes) else path.write_text(new)
    return str(path)


def _setup(tmp_path: Path, case: Case) -> Callable[[], None]:
    cleanup = case.setup(tmp_path) if case.setup else None
    return cleanup if callable(cleanup) else lambda: None


@pytest.mark.parametrize(
    ("case", "verb"),
    [(c, v) for c in CASES for v in c.verbs],
    ids=[f"{c.id}-{v}" for c in CASES for v in c.verbs],
)
def test_bad_input_is_one_line(capsys, tmp_path, case, verb):
    cleanup = _setup(tmp_path, case)
    path = _prepare(tmp_path, case)
    had_run_folder = (tmp_path / "run").exists()
    before = _snapshot(tmp_path)
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in case.overrides]
    try:
        code = main([verb, path, *overrides, *case.flags])
    finally:
        cleanup()
    err = capsys.readouterr().err
    assert code == 2, err
    line = one_error_line(err)
    assert case.expected.replace("{tmp}", str(tmp_path)) in line, line
    assert _snapshot(tmp_path) == before, "a failed command must not write anything"
    assert (tmp_path / "run").exists() == had_run_folder


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_dir_in_read_only_folder(capsys, tmp_path):
    path = _prepare(tmp_path, Case("", ""))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["validate", path, f"output_dir={locked}/run"]) == 2
    finally:
        locked.chmod(0o755)
    assert f"output_dir: {locked} is not writable" in capsys.readouterr().err


# ----------------------------------------------------------------------------- words typed by the schema


def _load_text(tmp_path: Path, old: str, new: str, *overrides: str) -> recipe.Recipe:
    path = Path(_prepare(tmp_path, Case("", "", text=_replace(old, new))))
    return recipe.load(path, overrides)


TRAINER_WORDS = (
    "      eval_strategy: no\n      save_strategy: no\n      report_to: none\n"
    "      lr_scheduler_type: constant\n      gradient_checkpointing: yes\n      data_seed: null\n"
)


def test_trainer_words_in_a_file_keep_their_spelling(tmp_path):
    r = _load_text(tmp_path, "      logging_steps: 1\n", "      logging_steps: 1\n" + TRAINER_WORDS)
    train = r.stages["sft"].train
    assert train["eval_strategy"] == "no" and train["save_strategy"] == "no"
    assert train["report_to"] == "none" and train["lr_scheduler_type"] == "constant"
    assert train["gradient_checkpointing"] is True and train["data_seed"] is None


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("stages.sft.train.eval_strategy=no", "eval_strategy", "no"),
        ("stages.sft.train.save_strategy=no", "save_strategy", "no"),
        ("stages.sft.train.report_to=none", "report_to", "none"),
        ("stages.sft.train.lr_scheduler_type=constant", "lr_scheduler_type", "constant"),
        ("stages.sft.train.packing=on", "packing", True),
        ("stages.sft.train.completion_only_loss=off", "completion_only_loss", False),
        ("stages.sft.train.max_length=null", "max_length", None),
    ],
)
def test_trainer_word_overrides(tmp_path, override, key, expected):
    r = recipe.load(_prepare(tmp_path, Case("", "")), [override])
    assert r.stages["sft"].train[key] == expected and type(r.stages["sft"].train[key]) is type(expected)


def test_schema_words(tmp_path):
    r = _load_text(
        tmp_path,
        "name: t\n",
        "name: yes\n",
        "model.double_quant=no",
        "model.attn_implementation=null",
        "stages.sft.data.eval=~",
    )
    assert r.name == "yes" and type(r.name) is str
    assert r.model.double_quant is False and r.model.attn_implementation is None
    assert r.stages["sft"].data.eval is None


def test_stage_named_on(tmp_path):
    r = _load_text(tmp_path, "  sft:\n", "  on:\n")
    assert list(r.stages) == ["on"]


def test_words_survive_the_resolved_recipe(tmp_path):
    r = _load_text(tmp_path, "      logging_steps: 1\n", "      logging_steps: 1\n" + TRAINER_WORDS)
    recipe.dump(r, tmp_path / "out.yaml")
    assert (
        yaml.safe_load((tmp_path / "out.yaml").read_text())["stages"]["sft"]["train"]["eval_strategy"] == "no"
    )
    again = recipe.load(tmp_path / "out.yaml")
    assert again.stages["sft"].train == r.stages["sft"].train


def test_validate_accepts_trl_spelling(capsys, tmp_path):
    path = _prepare(
        tmp_path,
        Case("", "", text=_replace("      logging_steps: 1\n", "      logging_steps: 1\n" + TRAINER_WORDS)),
    )
    assert main(["validate", path, "stages.sft.train.eval_strategy=no"]) == 0, capsys.readouterr().err
