"""What a run writes, and how: the resolved recipe with provenance, per-stage metrics.jsonl, summary.json,
loss.png, the adapter and the trainer's checkpoints; the lock that keeps two runs out of one folder.

Every file a later step trusts (recipe.yaml, summary.json, the adapter folder, a checkpoint) appears
complete or not at all: files are written under a temporary name and renamed, folders filled under a
temporary name and renamed, and a checkpoint only counts once its marker (written last) exists. A
write that fails (a full disk, permissions) is a one-line `UserError` naming the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import platform
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from finetune.distributed import is_primary
from finetune.errors import UserError, first_line
from finetune.model import adapters

if TYPE_CHECKING:
    from finetune.recipe import Recipe

LIBRARIES = ("finetune", "torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate")
LOCK_FILE = ".lock"  # in <output_dir>: flock-ed while a run writes the folder, holds the run's pid
CHECKPOINTS = "checkpoints"  # <output_dir>/<stage>/checkpoints/checkpoint-<step>/: the trainer's checkpoints
CHECKPOINT_DONE = "finetune_complete.json"  # written last into a checkpoint: it is complete
WRITE_ERRORS = (OSError, SafetensorError)


def _cannot_write(path: Path, err: BaseException) -> UserError:
    reason = getattr(err, "strerror", None) or first_line(err)
    return UserError(f"{getattr(err, 'filename', None) or path}: cannot write ({reason})")


# ------------------------------------------------------------------------------------ atomic writes


def _temporary(path: Path, what: str) -> Path:
    return path.with_name(f".{path.name}.{what}-{os.getpid()}")


def write_text(path: Path, text: str) -> None:
    """`path` gets `text` whole or keeps what it had: written beside it, then renamed over it."""
    tmp = _temporary(path, "tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _cannot_write(path, err) from None


def remove_leftovers(folder: Path) -> None:
    """Remove the temporary files and folders a killed run left in `folder` (never read by anything)."""
    for path in folder.glob(".*.*-*") if folder.is_dir() else ():
        if not path.name.rsplit("-", 1)[0].endswith((".tmp", ".old")):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def replaced_folder(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; once the block is done it replaces `path`.

    A failure (or a kill) while the block writes never leaves a half-written `path`: the temporary
    folder is removed (after a kill it stays under a dot-name that nothing reads), the old `path` kept.
    """
    tmp, old = _temporary(path, "tmp"), _temporary(path, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old.exists() and not path.exists():
                os.replace(old, path)
            raise
    except WRITE_ERRORS as err:
        # Name the file as it would have been called, not its temporary name.
        name = getattr(err, "filename", None)
        where = path / Path(name).relative_to(tmp) if name and Path(name).is_relative_to(tmp) else path
        raise UserError(
            f"{where}: cannot write ({getattr(err, 'strerror', None) or first_line(err)})"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_error(err: BaseException, where: Path) -> UserError | None:
    """A failed write inside a library (the trainer saving a checkpoint) as a one-line error, else None.

    torch.save reports a full disk as a RuntimeError from its zip writer (`inline_container.cc`,
    `PytorchStreamWriter`), so the free space is added to say what happened.
    """
    torch_save = isinstance(err, RuntimeError) and any(
        mark in str(err) for mark in ("inline_container", "PytorchStreamWriter")
    )
    if not (torch_save or isinstance(err, OSError | SafetensorError)):
        return None
    try:
        free = f"; {shutil.disk_usage(where if where.exists() else where.parent).free:,} bytes free there"
    except OSError:
        free = ""
    reason = getattr(err, "strerror", None) or first_line(err)
    return UserError(f"{getattr(err, 'filename', None) or where}: cannot write ({reason}{free})")


# ------------------------------------------------------------------------------------ the run lock


@contextlib.contextmanager
def locked(output_dir: Path) -> Iterator[None]:
    """Hold `<output_dir>/.lock` while the block runs: a second run into the folder is a user error.

    `fcntl.flock` on an open file: the kernel releases it when the process ends, however it ends.
    """
    path = output_dir / LOCK_FILE
    try:
        handle = open(path, "a+")  # noqa: SIM115 - held open for the whole block
    except OSError as err:
        raise UserError(f"{path}: cannot open the run folder's lock ({err.strerror or err})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise busy(output_dir, handle.read().strip() or "unknown") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def busy(output_dir: Path, pid: str) -> UserError:
    return UserError(
        f"{output_dir}: another run (pid {pid}) is writing this run folder; "
        "wait for it to end or choose another output_dir"
    )


def lock_holder(output_dir: Path) -> str | None:
    """The pid of the run writing `output_dir` (holding its lock), else None. Writes nothing."""
    try:
        handle = open(output_dir / LOCK_FILE)  # noqa: SIM115 - read-only: a probe must not touch the file
    except OSError:
        return None  # no lock file: no run has written here
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "unknown"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


# ------------------------------------------------------------------------------- a run already there

# <output_dir>/.overwritten-<pid>/: the old run while `--overwrite` starts the new one.
ASIDE = ".overwritten-"


def _saved_stages(output_dir: Path) -> list[str]:
    """The stage names of the run folder's recipe.yaml (none if it is missing or unreadable)."""
    import yaml

    try:
        saved = yaml.safe_load((output_dir / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return []
    stages = saved.get("stages") if isinstance(saved, dict) else None
    names = [str(name) for name in stages] if isinstance(stages, dict) else []
    # Only names a recipe allows (letters, digits, '-', '_'): never a path out of the folder.
    return [n for n in names if n.replace("_", "").replace("-", "").isalnum()]


def run_files(output_dir: Path, stages: list[str]) -> list[Path]:
    """What a run into `output_dir` with these `stages` would replace: the folder's recipe.yaml and the
    non-empty folders of its stages and of `stages`. Other files in the folder are not a run's."""
    if not output_dir.is_dir():
        return []
    found = [output_dir / "recipe.yaml"] if (output_dir / "recipe.yaml").is_file() else []
    for name in dict.fromkeys([*_saved_stages(output_dir), *stages]):
        folder = output_dir / name
        if folder.is_dir() and any(True for _ in folder.iterdir()):
            found.append(folder)
    return found


def _stage_state(folder: Path) -> str:
    if (folder / "summary.json").is_file():
        return "finished"
    complete = [c for c in _checkpoint_folders(folder) if is_complete(c)]
    if complete:
        return f"stopped after {complete[-1].name}"
    return "started" if folder.is_dir() and any(True for _ in folder.iterdir()) else "not started"


def describe_run(output_dir: Path, stages: list[str]) -> str | None:
    """What `output_dir` holds, e.g. "a finished run (sft: finished, eval: finished)"; None: no run."""
    files = run_files(output_dir, stages)
    if not files:
        return None
    names = list(dict.fromkeys([*_saved_stages(output_dir), *(f.name for f in files if f.is_dir())]))
    states = {name: _stage_state(output_dir / name) for name in names}
    finished = (output_dir / "recipe.yaml").is_file() and all(s == "finished" for s in states.values())
    detail = ", ".join(f"{name}: {state}" for name, state in states.items()) or "recipe.yaml only"
    return f"{'a finished' if finished else 'a partial'} run ({detail})"


def set_aside(output_dir: Path, stages: list[str]) -> Path | None:
    """Move the run in `output_dir` (its `run_files`) into `<output_dir>/.overwritten-<pid>/`, where
    `restore` puts it back and `discard` deletes it; None when there is no run. Renames only."""
    files = run_files(output_dir, stages)
    if not files:
        return None
    aside = output_dir / f"{ASIDE}{os.getpid()}"
    try:
        aside.mkdir()
        for path in files:
            os.replace(path, aside / path.name)
    except OSError as err:
        restore(aside, output_dir)
        raise UserError(f"{output_dir}: cannot move the earlier run aside ({err.strerror or err})") from None
    return aside


def restore(aside: Path, output_dir: Path) -> None:
    """Put a run set aside back (what the new run wrote in its place is replaced)."""
    for path in list(aside.iterdir()) if aside.is_dir() else ():
        target = output_dir / path.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(path, target)
    with contextlib.suppress(OSError):
        aside.rmdir()


def discard(aside: Path) -> None:
    shutil.rmtree(aside, ignore_errors=True)


def recover_aside(output_dir: Path) -> None:
    """After a run killed while `--overwrite` started it: a run set aside comes back if the new run had
    not written its recipe yet; otherwise it is deleted, as that run would have done."""
    for aside in sorted(output_dir.glob(f"{ASIDE}*")) if output_dir.is_dir() else ():
        if not aside.is_dir():
            continue
        if (output_dir / "recipe.yaml").is_file():
            discard(aside)
        else:
            restore(aside, output_dir)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_recipe(recipe: Recipe, output_dir: Path, *, resumed: Recipe | None = None) -> None:
    """`<output_dir>/recipe.yaml`: the recipe as resolved (extends and overrides applied) plus versions.

    `resumed`: the run folder's recipe, continued by `--resume`: its provenance is kept and the time
    and versions of this attempt are added under `resumed`.
    """
    now = datetime.now(UTC).isoformat()
    if resumed is not None:
        provenance = dict(resumed.provenance or {})
        provenance["resumed"] = [*provenance.get("resumed", []), {"time": now, "versions": versions()}]
    else:
        provenance = {"versions": versions(), "seed": recipe.seed, "created": now}
    resolved = recipe.model_copy(update={"provenance": provenance})
    tmp = _temporary(output_dir / "recipe.yaml", "tmp")
    try:
        tmp.write_text(resolved.to_yaml())
        os.replace(tmp, output_dir / "recipe.yaml")
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _cannot_write(output_dir / "recipe.yaml", err) from None


def _scalar(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class RouterFields(TrainerCallback):
    """Our fields of each log (expert load, balance loss, routing replay), computed once per log.

    Placed before the trainer's tracking integrations (`report_to`), it puts the scalar ones into the
    log they read, so tensorboard, trackio and W&B get them as they get the loss: trackers only see
    what goes through `Trainer.log`. `HideRouterFields`, placed after them, takes them out again so the
    console's log line stays the trainer's own; `MetricsLogger` writes all of them, per-expert lists too.
    """

    def __init__(self, report: Callable[[], dict[str, Any]]):
        self.report = report
        self.fields: dict[str, Any] = {}
        self.added: list[str] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Every rank computes them (they are sums over ranks); the integrations log on rank 0.
        self.fields = self.report() if logs else {}
        self.added = [k for k, v in self.fields.items() if _scalar(v) and k not in (logs or {})]
        for key in self.added:
            logs[key] = self.fields[key]


class HideRouterFields(TrainerCallback):
    """Takes `RouterFields`' scalars back out of the log once the trackers and metrics.jsonl have it."""

    def __init__(self, fields: RouterFields):
        self.router_fields = fields

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in self.router_fields.added:
            (logs or {}).pop(key, None)


class MetricsLogger(TrainerCallback):
    """Appends every trainer log (one JSON object per logging step) to metrics.jsonl.

    A fresh run starts an empty log. A run resumed from the checkpoint of step N keeps the rows up to
    step N, adds `{"step": N, "resumed_from": "checkpoint-N"}`, and appends the resumed run's rows, so
    steps never repeat: the rows a killed run logged after its last checkpoint are dropped (those steps
    are trained again).
    """

    def __init__(
        self,
        path: Path,
        extra: Callable[[], dict[str, Any]] | None = None,
        *,
        resumed_from: str | Path | None = None,
    ):
        self.path = path
        self.extra = extra  # more fields per row (expert load), kept out of the console log
        rows = ""
        if resumed_from is not None:
            step = checkpoint_step(Path(resumed_from))
            kept = [row for row in read_metrics(path) if row.get("step", 0) <= step]
            kept.append({"step": step, "resumed_from": Path(resumed_from).name})
            rows = "".join(json.dumps(row) + "\n" for row in kept)
        if is_primary():  # other ranks would truncate it after rank 0 has begun writing
            write_text(path, rows)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Every rank computes the extra fields (they are sums over ranks); rank 0 writes the row.
        more = self.extra() if self.extra and logs else {}
        if state.is_world_process_zero and logs:
            row = {"step": state.global_step, "epoch": state.epoch, **logs, **more}
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as err:
                raise _cannot_write(self.path, err) from None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a line cut short by a kill is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return [row for row in rows if isinstance(row, dict)]


def plot_loss(metrics: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Training (and eval) loss against step; False when nothing was logged."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
    return True


def plot_curves(metrics: list[dict[str, Any]], keys: list[str], path: Path, title: str) -> bool:
    """Each logged metric of `keys` against step (e.g. the total and per-reward means); False if none."""
    series = {k: [(m["step"], m[k]) for m in metrics if m.get(k) is not None and "step" in m] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key, points in series.items():
        ax.plot(*zip(*points, strict=True), label=key, linewidth=2 if key == keys[0] else 1)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def plot_histogram(values: list[float], path: Path, title: str) -> None:
    """A histogram of `values` (e.g. reward margins) with the zero line marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(values, bins=30)
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_xlabel("value")
    ax.set_ylabel("count")
    ax.set_title(title)
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Write a figure under a temporary name and rename it: never a half-written PNG."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = _temporary(path, "tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _cannot_write(path, err) from None
    finally:
        plt.close(fig)


def summary_numbers(summary: dict[str, Any]) -> dict[str, int | float]:
    """Every number of a stage's summary, dotted keys in its order (e.g. `heldout.after.exact_match`)."""
    out: dict[str, int | float] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif _scalar(value):
            out[key] = value

    walk({k: v for k, v in summary.items() if k not in ("stage", "type", "adapter")}, "")
    return out


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    write_text(path, json.dumps(summary, indent=2) + "\n")


def read_summary(stage_dir: Path) -> dict[str, Any] | None:
    """The summary of a stage that finished (summary.json and its adapter complete), else None."""
    if not (stage_dir / "adapter" / "adapter_config.json").is_file():
        return None
    try:
        summary = json.loads((stage_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


# ------------------------------------------------------------------------------------- checkpoints


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.rsplit("-", 1)[1])


def _checkpoint_folders(stage_dir: Path) -> list[Path]:
    folder = stage_dir / CHECKPOINTS
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()]
    return sorted(found, key=checkpoint_step)


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / CHECKPOINT_DONE).is_file() and (checkpoint / "trainer_state.json").is_file()


def last_checkpoint(stage_dir: Path) -> Path | None:
    """The newest complete checkpoint of a stage; incomplete ones (a run killed while saving) are removed."""
    complete = []
    for checkpoint in _checkpoint_folders(stage_dir):
        if is_complete(checkpoint):
            complete.append(checkpoint)
        else:
            shutil.rmtree(checkpoint, ignore_errors=True)
    return complete[-1] if complete else None


def trained_to_the_end(checkpoint: str | Path) -> dict[str, Any] | None:
    """The trainer state of a checkpoint saved at the last training step, else None."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return state if state.get("max_steps", 0) > 0 and state["global_step"] >= state["max_steps"] else None


def load_checkpoint_weights(model: torch.nn.Module, checkpoint: str | Path) -> None:
    """Restore the trained weights of a checkpoint into the adapted model of a resumed stage, in place.

    PEFT's own weights come from `adapter_model.safetensors` (PEFT's loader, with its transformers-4 MoE
    name shim kept off our module names), the routed-expert LoRA and the router from their files.
    Parameters keep their `requires_grad`, so the optimizer state of the checkpoint fits them.
    """
    from peft import set_peft_model_state_dict

    checkpoint = Path(checkpoint)
    with adapters.exact_targets():
        result = set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise UserError(f"{checkpoint}: adapter weights do not fit this recipe's adapter")
    adapters.load_extra_tensors(model, checkpoint)


class CompleteCheckpoints(TrainerCallback):
    """Completes each checkpoint the trainer writes, then marks it complete.

    transformers' `Trainer._save_checkpoint` (5.x) writes `checkpoint-N/` file by file in place (adapter,
    optimizer, scheduler, RNG, trainer_state.json last), then deletes checkpoints beyond
    `save_total_limit`, then calls `on_save`. Here `on_save` adds the routed-expert LoRA and the router,
    then writes `finetune_complete.json`: a checkpoint without it (a kill while saving) is ignored on
    resume. With `save_total_limit: 2` (the default) the previous complete checkpoint survives until
    the next one is marked.
    """

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        experts, routers = adapters.extra_tensors(model)
        try:
            if experts:
                save_file(experts, str(folder / adapters.EXPERTS_FILE))
            if routers:
                save_file(routers, str(folder / adapters.ROUTER_FILE))
            full = adapters.full_expert_tensors(model)
            if full:
                save_file(full, str(folder / adapters.FULL_EXPERTS_FILE))
        except WRITE_ERRORS as err:
            raise _cannot_write(folder, err) from None
        write_text(folder / CHECKPOINT_DONE, json.dumps({"global_step": state.global_step}) + "\n")
