"""`type: eval`: benchmarks from `eval/` on the run's base model and on adapters of earlier stages, all on
one loaded base (`finetune eval` with the run's model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from finetune import rundir, stagetypes
from finetune.bench import harness
from finetune.bench import run as bench_run
from finetune.bench import spec as specs
from finetune.context import StageContext
from finetune.distributed import is_primary
from finetune.errors import UserError
from finetune.stagetypes import STAGE_TYPES, EvalSchema

TYPE = STAGE_TYPES["eval"]
Schema = EvalSchema  # the `stages.<name>` section, declared with the type
TRAINER_CONFIG = TYPE.trainer_config  # None: trains nothing, no `train:` section


@dataclass
class EvalInputs:
    train: None = None
    report: list = field(default_factory=list)
    summary: str = ""  # what `validate` prints for the stage


def check(name: str, stage: Schema, ctx: StageContext, *, fetch: bool = True) -> EvalInputs:
    """Every spec loads and its bundled data has the fields it names; `compare` names `base` or earlier
    stages that save an adapter."""
    counts = []
    for bench in stage.benchmarks:
        try:
            counts.append(f"{bench} ({len(bench_run.rows(specs.load(bench), None, stage.limit))} items)")
        except UserError as err:
            raise UserError(f"stages.{name}.benchmarks: {err}") from None
    trained = stagetypes.types_with("adapter")  # every stage type that saves an adapter
    for other in stage.compare:
        if other != "base":
            ctx.earlier_stage(name, other, f"stages.{name}.compare", trained, listed="use base or one of: ")
    return EvalInputs(summary=f"{', '.join(counts)} on {', '.join(stage.compare)}")


def run(
    name: str,
    stage: Schema,
    inputs: EvalInputs,
    ctx: StageContext,
    *,
    resume_from: str | None = None,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    out = ctx.stage_dir(name)
    candidates = [
        harness.Candidate("base") if c == "base" else harness.candidate(str(ctx.output_dir / c))
        for c in stage.compare
    ]
    for c, label in zip(candidates, stage.compare, strict=True):
        c.label = label
    base = model if model is not None else ctx.base_model()
    results = harness.evaluate(
        stage.benchmarks,
        out=out,
        candidates=candidates,
        load_base=lambda: (base, ctx.tokenizer()),
        limit=stage.limit,
        batch_size=stage.batch_size,
        seed=ctx.seed,
        kernels=ctx.kernels,
        config={"recipe": ctx.name, "stage": name, "limit": stage.limit},
    )
    summary = {
        "stage": name,
        "type": "eval",
        "results": {label: r["results"] for label, r in results.items()},
        # Flat figures (`<model> <benchmark> <metric>`) for the table `finetune run` prints.
        "eval": {
            f"{label} {bench} {key.split(',')[0]}": value
            for label, r in results.items()
            for bench, metrics in r["results"].items()
            for key, value in metrics.items()
            if key != "alias" and "_stderr," not in key
        },
    }
    if is_primary():  # every process evaluated its share of the items; one writes
        rundir.write_summary(out / "summary.json", summary)
    return summary
