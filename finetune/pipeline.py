"""Check every stage's inputs, then run the stages in order and write the run directory."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune import esft, family, push, rundir, stagetypes
from finetune import recipe as recipe_mod
from finetune.context import StageContext
from finetune.distributed import barrier, is_primary
from finetune.errors import UserError
from finetune.model import adapters, routing
from finetune.model.export import export
from finetune.model.load import model_skeleton, resolve_source
from finetune.recipe import AdapterConfig, ESFTConfig, Recipe
from finetune.stages import REGISTRY


@dataclass
class Plan:
    recipe: Recipe
    context: StageContext
    inputs: dict[str, Any]  # stage name → the stage module's checked inputs


def plan(recipe: Recipe, *, fetch: bool = False) -> Plan:
    """Everything `validate` checks: model source, adapter targets, trainer arguments, each stage's data.

    Writes nothing into the run directory. Hub datasets are only loaded with `fetch=True` (a run).
    """
    m = recipe.model
    check_output_dir(Path(recipe.output_dir))
    source = resolve_source(m.preset, m.path)
    ctx = context(recipe, source)
    inputs = {
        name: REGISTRY[stage.type].check(name, stage, ctx, fetch=fetch)
        for name, stage in recipe.stages.items()
    }
    for name, stage in recipe.stages.items():
        if getattr(stage, "push", None) is not None:  # what the upload will need, read locally
            push.check_upload(f"stages.{name}.push")
    if ctx.esft is not None:
        esft.check(ctx.stages, stagetypes.types_with("esft"))
    skeleton = model_skeleton(source, seed=m.seed)
    if skeleton is not None:  # a Hub id is only checked when a run downloads it
        check_experts(skeleton, recipe.adapter)
        adapters.resolve_targets(skeleton, recipe.adapter.targets)
    return Plan(recipe, ctx, inputs)


def check_output_dir(path: Path) -> None:
    """`output_dir` is a folder, or can be made one, that this user may write into. Writes nothing."""
    path = Path(os.path.abspath(path.expanduser()))
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"output_dir: {path} is a file, not a folder")
        probe = path
        while not probe.exists():  # the nearest folder that exists is where the run folder gets created
            probe = probe.parent
    except OSError as err:
        raise UserError(f"output_dir: cannot look at {path} ({err.strerror or err})") from None
    if not probe.is_dir():
        raise UserError(f"output_dir: {path} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output_dir: {probe} is not writable (permissions or a read-only file system)")


def check_experts(skeleton: torch.nn.Module, adapter: AdapterConfig) -> None:
    """`adapter.experts` names MoE layers of this model and expert ids they have (run time: `attach`)."""
    if adapter.experts == "all":
        return
    layers = routing.by_layer(skeleton, family.Experts)
    if isinstance(adapter.experts, ESFTConfig):
        if not layers:
            raise UserError(
                "adapter.experts: `select: esft` scores routed experts and this model has none; "
                "drop `experts` or use a mixture-of-experts model"
            )
        return
    for index, ids in adapter.experts.items():
        if index not in layers:
            raise UserError(
                f"adapter.experts: layer {index} has no routed experts (MoE layers: {sorted(layers)})"
            )
        n = layers[index].num_experts
        bad = [e for e in ids if not 0 <= e < n] if isinstance(ids, list) else []
        if bad:
            raise UserError(f"adapter.experts: layer {index}: no expert {bad[0]} (0..{n - 1})")


def score_experts(recipe: Recipe, stage: str | None, out: Path) -> tuple[str, dict[str, Any]]:
    """`finetune experts`: the ESFT scores and selection of one stage (default: the first that trains),
    written to `out/<stage>/` (expert_scores.json, .png); the stage is run up to its trainer and stops
    there. Returns (stage name, the selection record)."""
    checked = plan(recipe, fetch=True)
    ctx = checked.context
    if ctx.esft is None:
        raise UserError(
            "adapter.experts: `finetune experts` scores experts for ESFT; set `adapter.experts: {select: esft}`"
        )
    names = [n for n, s in recipe.stages.items() if s.type in stagetypes.types_with("esft")]
    name = stage or (names[0] if names else None)
    if name not in names:
        raise UserError(f"--stage: {stage!r} is not a training stage of this recipe ({', '.join(names)})")
    ctx = dataclasses.replace(ctx, output_dir=out, esft={**ctx.esft, "scores_only": True})
    inputs = checked.inputs[name]
    args = copy.copy(inputs.args)
    args.output_dir = str(out / name / "checkpoints")  # the trainer makes it: not in the run's folder
    fields = {f.name for f in dataclasses.fields(inputs)}
    # no generation before a stage that stops
    inputs = dataclasses.replace(inputs, args=args, **({"heldout": None} if "heldout" in fields else {}))
    try:
        REGISTRY[recipe.stages[name].type].run(name, recipe.stages[name], inputs, ctx)
    except esft.ScoredOnly as done:
        return name, done.record
    raise AssertionError("the stage trained instead of stopping after the scores")


# The stage context of a recipe (built by the recipe module; kept here under its earlier name).
context = recipe_mod.stage_context


def run(recipe: Recipe, *, resume: bool = False, overwrite: bool = False) -> dict[str, dict]:
    """Check all inputs first (so bad input writes nothing), then train stage by stage.

    The run folder is locked while the run writes it. A folder that holds a run (finished or not) is
    refused unless `resume` or `overwrite` says what to do with it; the refusal writes nothing. With
    `resume`, a run folder holding the same recipe continues: a finished stage (summary.json and
    adapter) is skipped, a stage with a complete checkpoint continues from it, any other stage starts
    fresh. With `overwrite`, the old run is moved aside until the new one has written its recipe (a start
    that fails puts it back), then deleted.
    """
    checked = plan(recipe, fetch=True)
    out = Path(recipe.output_dir)
    stages = list(recipe.stages)
    # Under torchrun every rank runs this: the first one holds the lock and writes the shared files.
    primary = is_primary()
    if resume:
        _previous_recipe(recipe, out, quiet=True)  # a different recipe is refused before anything is written
    elif primary and not overwrite:
        _refuse_a_run_there(out, stages)  # before the lock, which would write its pid
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"output_dir: cannot create {out} ({err.strerror or err})") from None
    summaries = {}
    with rundir.locked(out) if primary else contextlib.nullcontext():
        if primary:
            rundir.recover_aside(out)  # a run killed while --overwrite started it
        previous = _previous_recipe(recipe, out) if resume else None
        if primary:
            replaced, aside = None, None
            if overwrite:
                replaced = rundir.describe_run(out, stages)
                aside = rundir.set_aside(out, stages)
            elif not resume:
                _refuse_a_run_there(out, stages, locked=True)  # one may have appeared since the check above
            try:
                rundir.write_recipe(recipe, out, resumed=previous)
            except BaseException:
                if aside is not None:
                    rundir.restore(aside, out)
                raise
            if aside is not None:
                rundir.discard(aside)
                print(f"{out}: replaced {replaced} (--overwrite)", flush=True)
            rundir.remove_leftovers(out)
        for name, stage in recipe.stages.items():
            stage_dir = out / name
            checkpoint = None
            if previous is not None:
                done = rundir.read_summary(stage_dir)
                if done is not None:
                    print(
                        f"stage {name}: finished in an earlier attempt ({stage_dir / 'summary.json'}), skipped"
                    )
                    summaries[name] = done
                    continue
                checkpoint = rundir.last_checkpoint(stage_dir)
                where = f"from {checkpoint}" if checkpoint else "from the start (no complete checkpoint)"
                print(f"stage {name}: resuming {where}", flush=True)
            elif primary:
                _clear_stage(stage_dir)
            if primary:
                rundir.remove_leftovers(stage_dir)
            torch.manual_seed(recipe.seed)
            summaries[name] = REGISTRY[stage.type].run(
                name,
                stage,
                checked.inputs[name],
                checked.context,
                resume_from=str(checkpoint) if checkpoint else None,
            )
            if primary and getattr(stage, "push", None) is not None:
                _push(stage_dir, stage.push)
            barrier()  # the next stage may read what rank 0 wrote (an adapter to continue or evaluate)
    return summaries


def _push(stage_dir: Path, config: Any) -> None:
    """A stage's `push:`: its adapter, or its export (base original), to the Hub with a model card."""
    pushed = push.push_stage(
        stage_dir,
        config.repo,
        private=config.private,
        export=config.export,
        export_fn=lambda stage, out: export(stage, out, lambda resolved: recipe_mod.load(resolved).model),
    )
    print(f"stage {stage_dir.name}: pushed its {pushed.kind} ({len(pushed.files)} files) → {pushed.where}")


def held_run(recipe: Recipe) -> str | None:
    """What the recipe's output_dir holds as a run ("a finished run (sft: finished)"), else None."""
    return rundir.describe_run(Path(recipe.output_dir), list(recipe.stages))


def _refuse_a_run_there(out: Path, stages: list[str], *, locked: bool = False) -> None:
    """A run into a folder that holds one would replace it: a user error naming the ways on. Writes nothing.

    `locked`: this process holds the folder's lock (else a run holding it is named first)."""
    holder = None if locked else rundir.lock_holder(out)
    if holder is not None:
        raise rundir.busy(out, holder)
    held = rundir.describe_run(out, stages)
    if held is not None:
        raise UserError(
            f"output_dir: {out} holds {held}; continue it with --resume, replace it with --overwrite, "
            "or choose another output_dir"
        )


def _previous_recipe(recipe: Recipe, out: Path, *, quiet: bool = False) -> Recipe | None:
    """The run folder's recipe, which `--resume` continues; a different recipe is a user error."""
    saved_path = out / "recipe.yaml"
    if not saved_path.is_file():
        if not quiet:
            print(f"{out}: no earlier run here (no recipe.yaml); starting it", flush=True)
        return None
    saved = recipe_mod.load(saved_path)
    ignored = {"provenance", "output_dir"}
    difference = _first_difference(saved.model_dump(exclude=ignored), recipe.model_dump(exclude=ignored))
    if difference is not None:
        key, was, now = (v if v is not _MISSING else "not set" for v in difference)
        raise UserError(
            f"--resume: the recipe differs from the run's {saved_path} at `{key}` (run: {was}, given: {now}); "
            f"resume with the same recipe (e.g. finetune run {saved_path} --resume) or choose a new output_dir"
        )
    return saved


_MISSING = object()


def _first_difference(a: Any, b: Any, path: tuple = ()) -> tuple[str, Any, Any] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            found = _first_difference(a.get(key, _MISSING), b.get(key, _MISSING), (*path, key))
            if found is not None:
                return found
        return None
    if a == b and isinstance(a, bool) == isinstance(b, bool):
        return None
    return ".".join(str(p) for p in path) or "(top level)", a, b


def _clear_stage(stage_dir: Path) -> None:
    """A fresh start of a stage: an earlier run's summary and checkpoints must not be taken for this run's."""
    try:
        (stage_dir / "summary.json").unlink(missing_ok=True)
        if (stage_dir / rundir.CHECKPOINTS).exists():
            shutil.rmtree(stage_dir / rundir.CHECKPOINTS)
    except OSError as err:
        raise UserError(
            f"{stage_dir}: cannot clear the earlier run's files ({err.strerror or err})"
        ) from None
