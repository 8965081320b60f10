"""`finetune run | validate RECIPE [key=value ...]`, `finetune --version`.

A user mistake prints one line and exits with 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

import finetune
from finetune.errors import UserError

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune",
        description="LoRA / QLoRA fine-tuning of DeepSeek-V2-family MoE models from YAML recipes.",
    )
    parser.add_argument("--version", action="version", version=f"finetune {finetune.__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, text in (
        ("run", "validate the recipe, then train its stages in order"),
        ("validate", "check schema, files, data columns and model source; train nothing"),
        ("inspect", "load the model as the recipe would and report params/bytes/dtypes per module kind"),
    ):
        sub = verbs.add_parser(verb, help=text, description=text)
        if verb == "inspect":
            sub.add_argument("--json", action="store_true", help="print one JSON object keyed by module kind")
        if verb == "run":
            sub.add_argument(
                "--resume",
                action="store_true",
                help="continue the run in output_dir (same recipe): finished stages are skipped, the others "
                "continue from their last complete checkpoint",
            )
        sub.add_argument("recipe", help="recipe YAML file")
        sub.add_argument(
            "overrides", nargs="*", metavar="key=value", help="e.g. stages.sft.train.learning_rate=1e-4"
        )
        sub.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks"
        )
    sub = verbs.add_parser(
        "export",
        help="merge a stage's adapter into plain 16-bit weights loadable by transformers alone",
        description="merge a stage's adapter into plain 16-bit weights loadable by transformers alone",
    )
    sub.add_argument("stage_dir", metavar="RUN_DIR/STAGE", help="a stage folder of a finished run")
    sub.add_argument("--out", required=True, help="folder to write the merged checkpoint to")
    sub.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    return parser


def _print_table(summaries: dict[str, dict]) -> None:
    rows = [
        (
            name,
            s["heldout"]["metric"],
            s["heldout"]["before"]["exact_match"],
            s["heldout"]["after"]["exact_match"],
        )
        for name, s in summaries.items()
        if "heldout" in s
    ]
    if not rows:
        return
    print(f"\n{'stage':<12}{'held-out metric':<18}{'before':>8}{'after':>8}")
    for name, metric, before, after in rows:
        print(f"{name:<12}{metric:<18}{before:>8.1%}{after:>8.1%}")


def _validate(args: argparse.Namespace) -> int:
    from finetune import pipeline, recipe

    r = recipe.load(args.recipe, args.overrides)
    checked = pipeline.plan(r)
    where = {
        "preset": "embedded preset",
        "local": "local checkpoint",
        "hub": "Hub id (checked when a run loads it)",
    }
    print(f"{args.recipe}: ok — model: {where[checked.context.source.kind]} {checked.context.source.ref}")
    for name, stage in r.stages.items():
        train = checked.inputs[name].train
        rows = (
            f"{len(train)} training rows" if train is not None else "Hub dataset (loaded when a run starts)"
        )
        print(f"  stage {name} ({stage.type}): {rows}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json

    from finetune import pipeline, recipe
    from finetune.model.inspect import format_table, report

    r = recipe.load(args.recipe, args.overrides)
    ctx = pipeline.plan(r).context
    rows = report(ctx.adapted_model())
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from finetune import pipeline, recipe
    from finetune.errors import UserError
    from finetune.model import adapters
    from finetune.model.export import export
    from finetune.model.load import DTYPES, resolve_source

    stage_dir = Path(args.stage_dir)
    resolved = stage_dir.parent / "recipe.yaml"
    if not (stage_dir / "adapter" / "adapter_config.json").is_file():
        raise UserError(f"{stage_dir}: no adapter/ folder here; give RUN_DIR/STAGE of a finished run")
    if not resolved.is_file():
        raise UserError(f"{resolved}: not found; export needs the run's resolved recipe")
    r = recipe.load(resolved)
    ctx = pipeline.context(r, resolve_source(r.model.preset, r.model.path))
    model = adapters.load_adapter(ctx.base_model(), stage_dir / "adapter")
    out = export(model, ctx.tokenizer(), args.out, DTYPES[args.dtype])
    print(f"exported {stage_dir} → {out} ({args.dtype}); load it with AutoModelForCausalLM.from_pretrained")
    return 0


def _run(args: argparse.Namespace) -> int:
    from finetune import pipeline, recipe

    r = recipe.load(args.recipe, args.overrides)
    summaries = pipeline.run(r, resume=args.resume)
    _print_table(summaries)
    print(f"\nrun directory: {r.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verb is None:
        _parser().print_help()
        return EXIT_USER_ERROR
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        verbs = {"run": _run, "validate": _validate, "inspect": _inspect, "export": _export}
        return verbs[args.verb](args)
    except UserError as err:
        if args.debug:
            raise
        _close_progress_bars()
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted", file=sys.stderr)
        return 130


def _close_progress_bars() -> None:
    """End a progress bar an error cut short (training), so the message starts on a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
