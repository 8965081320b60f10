"""What `finetune eval` loads: a benchmark's full test set (`finetune eval fetch`) and the base model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from finetune import data, rundir
from finetune import recipe as recipe_mod
from finetune.bench import spec as specs
from finetune.errors import UserError, first_line
from finetune.model.load import load_model, load_tokenizer, resolve_source
from finetune.model.presets import EMBEDDED


def default_path(name: str) -> Path:
    """Where `finetune eval fetch NAME` writes by default: beside the bundled sample."""
    return specs.SPECS / "data" / name / "full.jsonl"


def fetch(name: str, *, out: str | None = None, source: str | None = None) -> Path:
    """The benchmark's full test split as JSONL with the Hub's fields: from the Hub (`datasets`), or
    converted from a local file (`source`: JSONL, JSON, CSV, Parquet) already holding those fields."""
    spec = specs.load(name)
    path = Path(out) if out else default_path(spec.name)
    if source is not None:
        rows = data.load_rows(source, key="--from")
    else:
        if spec.data.hub is None:
            raise UserError(f"benchmark {spec.name} names no Hub dataset; give --from FILE")
        hub = spec.data.hub
        try:
            import datasets

            rows = datasets.load_dataset(hub.path, hub.config, split=hub.split)
        except Exception as err:  # offline, unknown split, ...: one line naming the dataset
            raise UserError(
                f"benchmark {spec.name}: cannot load {hub.path} ({hub.config or 'default'}, {hub.split}) from the "
                f"Hub: {first_line(err)}; download it elsewhere and use --from FILE"
            ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))
    return path


def recipe_kernels(recipe_path: str | None) -> str:
    """`model.kernels` of the recipe, or the default without one."""
    if recipe_path is None:
        return "auto"
    return recipe_mod.load(recipe_path).model.kernels


def base_model(recipe_path: str | None, model: str | None) -> tuple[Any, Any]:
    """The base model and tokenizer: as a recipe loads them, or from a preset / folder / Hub id with the
    toolkit's defaults (NF4, bf16 on a GPU, fp32 on the CPU)."""
    if recipe_path is not None:
        r = recipe_mod.load(recipe_path)
        ctx = recipe_mod.stage_context(r, resolve_source(r.model.preset, r.model.path))
        return ctx.base_model(), ctx.tokenizer()
    assert model is not None
    source = (
        resolve_source(model, None, key="--model")
        if model in EMBEDDED
        else resolve_source(None, model, key="--model")
    )
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    return load_model(source, dtype=dtype), load_tokenizer(source)
