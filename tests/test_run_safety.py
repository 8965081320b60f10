"""Run folders: one run at a time (a lock the kernel frees however the holder ends), and files that are
whole or absent after a failed write (a full disk while saving the adapter or a checkpoint)."""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import base_recipe, one_error_line, write_recipe

from finetune import rundir
from finetune.cli import main
from finetune.errors import UserError
from finetune.model import adapters

HOLDER = """
import sys, time
from pathlib import Path
from finetune import rundir
with rundir.locked(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def _one_error(capsys) -> str:
    return one_error_line(capsys.readouterr().err)


def test_second_run_is_refused_and_a_killed_holder_frees_the_folder(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        recipe = write_recipe(tmp_path / "r.yaml", base_recipe(tmp_path))
        assert main(["run", str(recipe)]) == 2
        message = _one_error(capsys)
        assert f"{out}: another run (pid {holder.pid}) is writing this run folder" in message
        assert sorted(p.name for p in out.iterdir()) == [rundir.LOCK_FILE]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with rundir.locked(out):  # the kernel released the lock of the killed process
        assert (out / rundir.LOCK_FILE).read_text().strip() == str(os.getpid())


def test_replaced_folder_keeps_the_old_one_when_writing_fails(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    message = r"adapter/weights\.bin: cannot write \(No space left on device\)"
    with pytest.raises(UserError, match=message), rundir.replaced_folder(folder) as tmp:
        (tmp / "README.md").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "weights.bin"))
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert [p.name for p in folder.iterdir()] == ["old.txt"]
    with rundir.replaced_folder(folder) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in folder.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_metrics_write_error_is_one_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = rundir.MetricsLogger(path)
    path.unlink()
    path.mkdir()  # the file can no longer be appended to

    class State:
        is_world_process_zero, global_step, epoch = True, 3, 0.5

    with pytest.raises(UserError, match=r"metrics\.jsonl: cannot write \(Is a directory\)"):
        logger.on_log(None, State(), None, logs={"loss": 1.0})


def test_full_disk_while_saving_then_resume(capsys, tmp_path, monkeypatch):
    """The disk fills while the trainer writes a checkpoint, then while the adapter is saved: each is one
    line, leaves no half-written file behind, and `--resume` then completes the stage."""
    recipe = str(write_recipe(tmp_path / "r.yaml", base_recipe(tmp_path, max_steps=2, save_steps=1)))
    out = tmp_path / "run"
    stage = out / "sft"

    real_save = torch.save

    def full_disk_at_step_2(obj, f, *args, **kwargs):
        if "checkpoint-2" in str(f):
            # What torch.save raised when a tmpfs filled up under it.
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_at_step_2)
    # --resume on a folder with no run yet simply starts it.
    assert main(["run", recipe, "--resume"]) == 2
    assert f"{stage / 'checkpoints'}: cannot write ([enforce fail at inline_container.cc:672]" in _one_error(
        capsys
    )
    assert rundir.is_complete(stage / "checkpoints" / "checkpoint-1")
    assert not rundir.is_complete(stage / "checkpoints" / "checkpoint-2")
    assert not (stage / "adapter").exists() and not (stage / "summary.json").exists()
    monkeypatch.setattr(torch, "save", real_save)

    def full_disk(model, folder, *_):
        (Path(folder) / "README.md").write_text("half an adapter")
        raise OSError(
            errno.ENOSPC, "No space left on device", str(Path(folder) / "adapter_model.safetensors")
        )

    monkeypatch.setattr(adapters, "save_adapter", full_disk)
    assert main(["run", recipe, "--resume"]) == 2
    message = _one_error(capsys)
    assert (
        f"{stage / 'adapter' / 'adapter_model.safetensors'}: cannot write (No space left on device)"
        in message
    )
    assert not (stage / "adapter").exists() and not (stage / "summary.json").exists()
    assert not [p for p in stage.iterdir() if p.name.startswith(".")], "no temporary folder left behind"
    monkeypatch.undo()

    # The second attempt trained step 2 and saved its checkpoint; this one only saves the adapter.
    assert main(["run", recipe, "--resume"]) == 0
    capsys.readouterr()
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["train"]["steps"] == 2 and summary["train"]["resumed_from"].endswith("checkpoint-2")
    assert (stage / "adapter" / "adapter_model.safetensors").is_file()
    losses = [row["step"] for row in rundir.read_metrics(stage / "metrics.jsonl") if "loss" in row]
    assert losses == [1, 2]


def test_leftovers_of_a_killed_run_are_removed(tmp_path):
    (tmp_path / ".adapter.tmp-123").mkdir()
    (tmp_path / ".adapter.old-123").mkdir()
    (tmp_path / ".summary.json.tmp-123").write_text("{")
    (tmp_path / rundir.LOCK_FILE).write_text("123\n")
    (tmp_path / "summary.json").write_text("{}")
    rundir.remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [rundir.LOCK_FILE, "summary.json"]


# ------------------------------------------------------------------------- a run already in the folder


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (its lock included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_is_kept_until_overwrite_replaces_it(capsys, tmp_path, monkeypatch):
    """A second `run` into a finished run's folder is refused and changes no byte; `--overwrite` with a
    recipe that fails validation, or whose start fails, keeps the old run; `--overwrite` then replaces it."""
    data = base_recipe(tmp_path, max_steps=1)
    recipe = str(write_recipe(tmp_path / "r.yaml", data))
    out = tmp_path / "run"
    assert main(["run", recipe]) == 0
    capsys.readouterr()
    first = _files(out)
    assert "sft/summary.json" in first and "sft/adapter/adapter_model.safetensors" in first

    assert main(["run", recipe]) == 2
    message = _one_error(capsys)
    assert message == (
        f"error: output_dir: {out} holds a finished run (sft: finished); continue it with --resume, "
        "replace it with --overwrite, or choose another output_dir"
    )
    assert _files(out) == first

    # --overwrite with a recipe that fails validation: refused before the old run is touched.
    data["stages"]["other"] = data["stages"].pop("sft")
    bad = write_recipe(tmp_path / "bad.yaml", {**data, "adapter": {**data["adapter"], "rank": 8}})
    assert main(["run", str(bad), "--overwrite"]) == 2
    assert "unknown key `adapter.rank`" in _one_error(capsys)
    assert _files(out) == first

    # --overwrite whose start fails (the new recipe.yaml cannot be written): the old run comes back.
    other = str(write_recipe(tmp_path / "other.yaml", data))

    def cannot_write(*args, **kwargs):
        raise UserError(f"{out / 'recipe.yaml'}: cannot write (No space left on device)")

    monkeypatch.setattr(rundir, "write_recipe", cannot_write)
    assert main(["run", other, "--overwrite"]) == 2
    assert "cannot write (No space left on device)" in _one_error(capsys)
    assert _files(out) == first
    monkeypatch.undo()

    # --resume and --overwrite exclude each other (argparse: exit 2).
    with pytest.raises(SystemExit) as exited:
        main(["run", other, "--resume", "--overwrite"])
    assert exited.value.code == 2
    capsys.readouterr()

    assert main(["run", other, "--overwrite"]) == 0
    assert f"{out}: replaced a finished run (sft: finished) (--overwrite)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [rundir.LOCK_FILE, "other", "recipe.yaml"]
    assert json.loads((out / "other" / "summary.json").read_text())["train"]["steps"] == 1
    assert "other:" in (out / "recipe.yaml").read_text()


def test_a_partial_run_is_named_and_resume_continues_it(capsys, tmp_path):
    """A stopped run (a stage with a complete checkpoint, one not started) is refused without a flag,
    naming how far each stage got; `--resume` continues it as before."""
    data = base_recipe(tmp_path, max_steps=1)
    data["stages"]["second"] = copy.deepcopy(data["stages"]["sft"])
    recipe = str(write_recipe(tmp_path / "r.yaml", data))
    out = tmp_path / "run"
    assert main(["run", recipe]) == 0
    capsys.readouterr()
    # As if the run had stopped during `second`, after its checkpoint of step 1.
    (out / "second" / "summary.json").unlink()
    shutil.rmtree(out / "second" / "adapter")
    kept = _files(out)
    assert main(["run", recipe]) == 2
    assert "holds a partial run (sft: finished, second: stopped after checkpoint-1); " in _one_error(capsys)
    assert _files(out) == kept
    assert main(["validate", recipe]) == 0  # says so too
    assert (
        f"  output_dir {out} holds a partial run (sft: finished, second: stopped after checkpoint-1): "
        "`run` needs --resume or --overwrite"
    ) in capsys.readouterr().out.splitlines()
    assert main(["run", recipe, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "stage sft: finished in an earlier attempt" in printed
    assert f"stage second: resuming from {out / 'second' / 'checkpoints' / 'checkpoint-1'}" in printed
    assert (out / "sft" / "summary.json").read_bytes() == kept["sft/summary.json"]
    assert (out / "second" / "summary.json").is_file()


def test_other_files_in_the_folder_are_no_run(capsys, tmp_path):
    """A folder holding other things (no recipe.yaml, no folder of the recipe's stages) takes the run."""
    out = tmp_path / "run"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "a.txt").write_text("mine")
    assert rundir.describe_run(out, ["sft"]) is None
    (out / "sft").mkdir()
    assert rundir.describe_run(out, ["sft"]) is None  # empty: nothing to lose
    (out / "sft" / "metrics.jsonl").write_text("")
    assert rundir.describe_run(out, ["sft"]) == "a partial run (sft: started)"
    aside = rundir.set_aside(out, ["sft"])
    assert aside is not None and sorted(p.name for p in out.iterdir()) == [aside.name, "notes"]
    # Killed before the new run wrote its recipe: the next run puts the old one back ...
    rundir.recover_aside(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes", "sft"]
    # ... and once the new recipe is written, what is left aside is deleted.
    aside = rundir.set_aside(out, ["sft"])
    (out / "recipe.yaml").write_text("name: new\n")
    rundir.recover_aside(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes", "recipe.yaml"]
