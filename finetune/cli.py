"""`finetune run | validate | inspect | experts RECIPE [key=value ...]`, `export`, `eval`, `predict`,
`push`, `finetune --version`.

A user mistake prints one line and exits with 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

import finetune
from finetune import quiet
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
            existing = sub.add_mutually_exclusive_group()
            existing.add_argument(
                "--resume",
                action="store_true",
                help="continue the run in output_dir (same recipe): finished stages are skipped, the others "
                "continue from their last complete checkpoint",
            )
            existing.add_argument(
                "--overwrite",
                action="store_true",
                help="replace the run in output_dir (deleted once the new run has started; without this "
                "flag or --resume, a folder holding a run is refused)",
            )
        sub.add_argument("recipe", help="recipe YAML file")
        sub.add_argument(
            "overrides", nargs="*", metavar="key=value", help="e.g. stages.sft.train.learning_rate=1e-4"
        )
        sub.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks"
        )
    text = "ESFT: score the routed experts on a stage's data and show the experts `select: esft` trains"
    sub = verbs.add_parser("experts", help=text, description=text)
    sub.add_argument("recipe", help="recipe YAML file with adapter.experts: {select: esft, ...}")
    sub.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. adapter.experts.p=0.3")
    sub.add_argument(
        "--stage", help="the stage whose training rows are scored (default: the first that trains)"
    )
    sub.add_argument(
        "--out", help="folder for <stage>/expert_scores.json and .png (default: <output_dir>.experts)"
    )
    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    text = "merge a stage's adapter into the base checkpoint, streamed: a plain transformers checkpoint"
    sub = verbs.add_parser("export", help=text, description=text)
    sub.add_argument("stage_dir", metavar="RUN_DIR/STAGE", help="a stage folder of a finished run")
    sub.add_argument("--out", required=True, help="folder to write the merged checkpoint to")
    sub.add_argument(
        "--base",
        choices=["original", "quantized"],
        default="original",
        help="add the deltas to the original weights (default) or to their NF4 round trip, "
        "which reproduces the trained 4-bit model",
    )
    sub.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="cast every floating tensor (default: each tensor keeps the checkpoint's dtype)",
    )
    sub.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    sub.add_argument(
        "--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB (default 5GB)"
    )
    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    text = "evaluate a model (and adapters) on benchmarks in eval/, or score outside predictions"
    sub = verbs.add_parser(
        "eval", help=text, description=text + "; `finetune eval fetch NAME` gets a full test set"
    )
    sub.add_argument(
        "benchmarks", nargs="*", metavar="BENCH", help="benchmark names (eval/<name>.yaml) or spec files"
    )
    source = sub.add_mutually_exclusive_group()
    source.add_argument("--recipe", help="load the model as this recipe does")
    source.add_argument("--model", help="an embedded preset (tiny, tiny-v2), a checkpoint folder or a Hub id")
    sub.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="DIR",
        help="RUN_DIR/STAGE, an adapter folder, or `base`; repeat to compare",
    )
    sub.add_argument("--limit", type=int, help="the first N items of each benchmark")
    sub.add_argument("--data", help="a local file replacing the benchmark's data (same fields)")
    sub.add_argument("--predictions", help="JSONL of {doc_id, output} to score instead of running a model")
    sub.add_argument("--out", help="folder for results.json, samples_<bench>.jsonl, results.md, results.png")
    sub.add_argument("--batch-size", type=int, default=16)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument(
        "--kernels",
        choices=["auto", "off"],
        help="fast generation (static cache, compiled decode step) on CUDA; default: the recipe's "
        "model.kernels, else auto",
    )
    sub.add_argument(
        "--from", dest="from_file", help="fetch: convert this local file instead of the Hub split"
    )
    sub.add_argument(
        "--lm-eval-task",
        dest="lm_eval",
        action="append",
        default=[],
        metavar="TASK",
        help="an lm-evaluation-harness task run on the same model (the [eval] extra); repeat",
    )
    sub.add_argument("--lm-eval-include", metavar="DIR", help="a folder of local lm-eval task YAMLs")
    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    text = "upload a finished stage's adapter (or its export) with a generated model card to the Hub"
    sub = verbs.add_parser("push", help=text, description=text)
    sub.add_argument("stage_dir", metavar="RUN_DIR/STAGE", help="a stage folder of a finished run")
    sub.add_argument("--repo", help="the Hub model repo, e.g. you/model-name (created if missing)")
    sub.add_argument(
        "--export", metavar="DIR", help="push this `finetune export` folder instead of the adapter"
    )
    sub.add_argument("--private", action="store_true", help="create the repo private")
    sub.add_argument(
        "--dry-run",
        metavar="DIR",
        help="write the folder that would be uploaded (card included) here; no network",
    )
    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    text = "score rows with a trained classifier or reward model: one JSON row per input row, in order"
    sub = verbs.add_parser("predict", help=text, description=text)
    sub.add_argument("stage_dir", metavar="RUN_DIR/STAGE", help="a finished classify or reward stage")
    sub.add_argument("--input", required=True, help="JSONL/JSON/CSV/Parquet file (or Hub dataset) of rows")
    sub.add_argument("--output", required=True, help="JSONL file to write")
    sub.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
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
    if rows:
        print(f"\n{'stage':<12}{'held-out metric':<18}{'before':>8}{'after':>8}")
        for name, metric, before, after in rows:
            print(f"{name:<12}{metric:<18}{before:>8.1%}{after:>8.1%}")
    # Every stage type's final eval figures, whatever they are (numbers at the top of `eval`).
    figures = [
        (name, key, value)
        for name, s in summaries.items()
        for key, value in (s.get("eval") or {}).items()
        if isinstance(value, int | float) and not isinstance(value, bool) and not key.startswith("eval_")
    ]
    if figures:
        width = max(22, *(len(key) + 2 for _, key, _ in figures))
        print(f"\n{'stage':<12}{'eval metric':<{width}}{'value':>10}")
        for name, key, value in figures:
            print(f"{name:<12}{key:<{width}}{value:>10.4g}")


def _validate(args: argparse.Namespace) -> int:
    from finetune import data, pipeline, recipe

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
        rows = getattr(
            checked.inputs[name], "summary", ""
        ) or (  # a stage that trains nothing says what it does
            "Hub dataset (loaded when a run starts)"
            if train is None
            else f"{len(train)} training rows"
            if hasattr(train, "__len__")
            else "streamed training rows"
        )
        print(f"  stage {name} ({stage.type}): {rows}")
        # Per split: rows read, kept after templating/truncation, cut by max_length, token lengths.
        report = getattr(checked.inputs[name], "report", ())
        if report:
            print(data.format_report(list(report)))
        push = getattr(stage, "push", None)
        if push is not None:
            what = "its export (base original)" if push.export else "its adapter"
            print(f"    then pushes {what} to {push.repo}{' (private)' if push.private else ''}")
    e = checked.context.esft
    if e is not None:
        bounds = "".join(f", {k} {e[k]}" for k in ("min_experts", "max_experts") if e[k] is not None)
        print(
            f"  adapter.experts: ESFT — {e['score']} score, p {e['p']}{bounds}, train {e['train']}; each stage "
            f"chooses its experts from its first {e['samples']} training rows when it runs "
            "(`finetune experts RECIPE` scores and lists them now)"
        )
    held = pipeline.held_run(r)
    if held is not None:
        print(f"  output_dir {r.output_dir} holds {held}: `run` needs --resume or --overwrite")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json

    from finetune import pipeline, recipe
    from finetune.model.inspect import format_table, report

    r = recipe.load(args.recipe, args.overrides)
    ctx = pipeline.plan(r).context
    rows = report(ctx.adapted_model())
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    if ctx.esft is not None and not args.json:
        print(
            "routed_experts: ESFT adds its trainable experts once a stage has scored them "
            "(`finetune experts RECIPE` lists them with their parameter count)"
        )
    return 0


def _experts(args: argparse.Namespace) -> int:
    from pathlib import Path

    from finetune import pipeline, recipe

    r = recipe.load(args.recipe, args.overrides)
    out = Path(args.out) if args.out else Path(f"{str(r.output_dir).rstrip('/')}.experts")
    name, record = pipeline.score_experts(r, args.stage, out)
    print(
        f"stage {name}: {record['score']} score over {record['tokens']} loss tokens of {record['rows']} rows, "
        f"p {record['p']} → {record['experts']} of {record['of']} experts ({record['share']:.1%}), "
        f"{record['expert_parameters']:,} expert parameters to train ({record['train']})"
    )
    for layer, ids in record["selection"].items():
        print(f"  layer {layer}: {len(ids)} experts {ids}")
    print(f"scores: {out / name / 'expert_scores.json'}, heatmap: {out / name / 'expert_scores.png'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import re

    from finetune import recipe
    from finetune.model.export import export

    size = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?B?)", args.max_shard_size.strip().upper())
    if size is None or float(size[1]) <= 0:
        raise UserError(f"--max-shard-size: {args.max_shard_size!r}; give bytes or a size such as 5GB, 500MB")
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(size[2][:1], 1)
    result = export(
        args.stage_dir,
        args.out,
        lambda resolved: recipe.load(resolved).model,
        base=args.base,
        dtype=args.dtype,
        overwrite=args.overwrite,
        max_shard_bytes=int(float(size[1]) * scale),
        progress=True,
    )
    size = f"{result.nbytes / 1e9:.2f} GB" if result.nbytes >= 1e8 else f"{result.nbytes / 1e6:.1f} MB"
    print(
        f"exported {args.stage_dir} → {result.folder}: {size} in {result.shards} shard(s), "
        f"{result.tensors} tensors, base {args.base}; load it with {result.auto_class}.from_pretrained"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from finetune.bench import fetch, harness

    if not args.benchmarks and not args.lm_eval:
        raise UserError(
            "name a benchmark (known: see eval/*.yaml) or an lm-eval task with --lm-eval-task TASK"
        )
    if args.benchmarks and args.benchmarks[0] == "fetch":
        if len(args.benchmarks) != 2:
            raise UserError("usage: finetune eval fetch NAME [--out FILE] [--from FILE]")
        path = fetch.fetch(args.benchmarks[1], out=args.out, source=args.from_file)
        print(f"wrote {path}; evaluate on it with: finetune eval {args.benchmarks[1]} --data {path} ...")
        return 0
    if args.out is None:
        raise UserError("--out: give the folder for the results")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit: {args.limit}; give a number >= 1")
    if args.batch_size < 1:
        raise UserError(f"--batch-size: {args.batch_size}; give a number >= 1")
    if args.predictions is None and args.recipe is None and args.model is None:
        raise UserError(
            "give --recipe RECIPE or --model PRESET_OR_PATH (or --predictions FILE to score outputs)"
        )
    candidates = [harness.candidate(a) for a in args.adapter] or [harness.Candidate("base")]
    config = {
        "model_source": args.recipe or args.model,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    results = harness.evaluate(
        args.benchmarks,
        out=Path(args.out),
        candidates=candidates,
        load_base=None if args.predictions else (lambda: fetch.base_model(args.recipe, args.model)),
        limit=args.limit,
        data_file=args.data,
        predictions_file=args.predictions,
        batch_size=args.batch_size,
        seed=args.seed,
        config=config,
        lm_eval_tasks=args.lm_eval,
        lm_eval_include=args.lm_eval_include,
        kernels=args.kernels or fetch.recipe_kernels(args.recipe),
    )
    print(harness.table(results), end="")
    print(f"\nresults: {args.out}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from finetune.predict import predict_file

    if args.batch_size < 1:
        raise UserError(f"--batch-size: {args.batch_size}; give a number >= 1")
    n = predict_file(args.stage_dir, args.input, args.output, batch_size=args.batch_size)
    print(f"predicted {n} rows → {args.output}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from finetune.push import push

    pushed = push(
        args.stage_dir, args.repo, export_dir=args.export, private=args.private, dry_run=args.dry_run
    )
    what = f"{pushed.kind} of {args.stage_dir} ({len(pushed.files)} files, README.md card included)"
    print(f"wrote {what} → {pushed.where}" if args.dry_run else f"pushed {what} → {pushed.where}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from finetune import pipeline, recipe
    from finetune.distributed import is_primary

    r = recipe.load(args.recipe, args.overrides)
    summaries = pipeline.run(r, resume=args.resume, overwrite=args.overwrite)
    if is_primary():  # under torchrun, one process reports
        _print_table(summaries)
        print(f"\nrun directory: {r.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verb is None:
        _parser().print_help()
        return EXIT_USER_ERROR
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet.library_noise_off()
    try:
        verbs = {
            "run": _run,
            "validate": _validate,
            "inspect": _inspect,
            "export": _export,
            "experts": _experts,
            "predict": _predict,
            "eval": _eval,
            "push": _push,
        }
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
