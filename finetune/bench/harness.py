"""`finetune eval`: benchmarks on one loaded base model, with each adapter in turn (or outside
predictions, with no model), written in lm-evaluation-harness's result shape."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune import distributed, labels, rundir
from finetune.bench import lm_eval_bridge, run
from finetune.bench import spec as specs
from finetune.errors import UserError
from finetune.model import adapters
from finetune.predict import Predictor


@dataclass
class Candidate:
    """A model to evaluate: the base (`folder` None) or an adapter folder, shown as `label`."""

    label: str
    folder: Path | None = None
    stage_dir: Path | None = None  # the stage folder, when given as RUN_DIR/STAGE (a classifier's predictor)

    @property
    def classifier(self) -> bool:
        """A sequence-classification adapter: it runs classification benchmarks only (and they need one)."""
        if self.folder is None:
            return False
        config = json.loads((self.folder / "adapter_config.json").read_text())
        return config.get("task_type") == "SEQ_CLS"


def candidate(text: str) -> Candidate:
    """`base`, an adapter folder, or a stage folder `RUN_DIR/STAGE` (its `adapter/`)."""
    if text == "base":
        return Candidate("base")
    path = Path(text)
    if (path / "adapter" / "adapter_config.json").is_file():
        return Candidate(f"{path.parent.name}/{path.name}", path / "adapter", path)
    if (path / "adapter_config.json").is_file():
        return Candidate(path.parent.name if path.name == "adapter" else path.name, path)
    raise UserError(
        f"--adapter: {path} is neither an adapter folder nor a stage folder (RUN_DIR/STAGE) with one"
    )


def evaluate(
    names: list[str],
    *,
    out: Path,
    candidates: list[Candidate],
    load_base: Callable[[], tuple[Any, Any]] | None,
    limit: int | None = None,
    data_file: str | None = None,
    predictions_file: str | None = None,
    batch_size: int = 16,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    lm_eval_tasks: list[str] | None = None,
    lm_eval_include: str | None = None,
    kernels: str = "auto",
) -> dict[str, dict[str, Any]]:
    """Every benchmark (and lm-evaluation-harness task) for every candidate; returns {label: lm-eval-shaped
    results} and writes them."""
    loaded = [specs.load(n) for n in names]  # every spec checked before any model loads
    rows = {s.name: run.rows(s, data_file, limit) for s in loaded}
    if predictions_file is not None:
        if len(loaded) != 1:
            raise UserError("--predictions scores one benchmark at a time; name one")
        s = loaded[0]
        outputs = run.predictions(s, predictions_file, len(rows[s.name]))
        texts = run.prompts(s, rows[s.name])
        outcome = run.score_generations(s, rows[s.name], texts, outputs)
        results = {"predictions": _results(loaded, {s.name: outcome}, rows, config or {}, predictions_file)}
        _write(out, results)
        return results
    assert load_base is not None
    model, tokenizer = load_base()
    results = {}
    for c in candidates:
        # A classifier adapter answers the classification benchmarks; the base and causal-LM adapters the others.
        mine = [s for s in loaded if isinstance(s, specs.Classification) == c.classifier]
        outcomes = {}
        with adapters.applied(model, None if c.classifier else c.folder) as current:
            for s in mine:
                outcomes[s.name] = _one(s, rows[s.name], current, tokenizer, c, batch_size, seed, kernels)
            if lm_eval_tasks and not c.classifier:
                outcomes.update(
                    _lm_eval(lm_eval_tasks, current, tokenizer, lm_eval_include, limit, batch_size)
                )
        results[c.label] = _results(
            mine,
            outcomes,
            {**rows, **{k: [None] * o.n for k, o in outcomes.items() if k not in rows}},
            config or {},
            c.label,
        )
    for s in loaded:
        if not any(s.name in r["results"] for r in results.values()):
            need = (
                "--adapter RUN_DIR/STAGE of a classify stage"
                if isinstance(s, specs.Classification)
                else "the base model or a causal-LM adapter"
            )
            raise UserError(f"benchmark {s.name} ({s.kind}) has no model to run on: give {need}")
    _write(out, results)
    return results


def _sharded(fn, items: list, *args: Any, **kwargs: Any) -> Any:
    """`fn` over this process's share of `items`, the results gathered in order (several processes)."""
    return distributed.unshard(fn(distributed.shard(items), *args, **kwargs), len(items))


def _one(
    s: Any,
    items: list[dict],
    model: Any,
    tokenizer: Any,
    c: Candidate,
    batch_size: int,
    seed: int,
    kernels: str,
) -> run.Outcome:
    texts = run.prompts(s, items)
    if isinstance(s, specs.Generate):
        timing: list = []

        def generate(shard: list[str]) -> list:
            outputs, tokens, seconds = run.generate(
                model, tokenizer, shard, s, batch_size=batch_size, seed=seed, kernels=kernels
            )
            timing.append((tokens, seconds))
            return outputs

        outputs = _sharded(generate, texts)
        outcome = run.score_generations(s, items, texts, outputs)
        tokens, seconds = timing[0]
        outcome.tokens_per_s = tokens / seconds if seconds else None  # this process's rate
        return outcome
    if isinstance(s, specs.MultipleChoice):
        choices, golds = run.choice_lists(s, items)
        pairs = [
            (t, s.continuation.format(choice=o))
            for t, options in zip(texts, choices, strict=True)
            for o in options
        ]
        lls = run.loglikelihoods(
            model, tokenizer, pairs, batch_size=batch_size, desc=f"{s.name}: log-likelihoods"
        )
        return run.score_choices(s, items, texts, lls, choices, golds)
    return _classification(s, items, texts, c, batch_size)


def _lm_eval(
    tasks: list[str], model: Any, tokenizer: Any, include: str | None, limit: int | None, batch_size: int
) -> dict[str, run.Outcome]:
    """lm-evaluation-harness tasks on the loaded model, as outcomes of ours (its metric keys kept)."""
    got = lm_eval_bridge.evaluate(
        tasks, model, tokenizer, include_path=include, limit=limit, batch_size=batch_size
    )
    out = {}
    for task, metrics in got["results"].items():
        outcome = run.Outcome(n=int(got.get("n-samples", {}).get(task, {}).get("effective", 0)))
        outcome.metrics = {k: float(v) for k, v in metrics.items() if "," in k and isinstance(v, int | float)}
        out[f"lm_eval:{task}"] = outcome
    return out


def _classification(
    s: Any, items: list[dict], texts: list[str], c: Candidate, batch_size: int
) -> run.Outcome:
    """A classifier adapter's labels, scored by the classify stage's own metric code."""
    if c.stage_dir is None:
        raise UserError(
            f"benchmark {s.name} is a classification benchmark: give --adapter RUN_DIR/STAGE of a classify stage"
        )
    predictor = Predictor.load(c.stage_dir, batch_size=batch_size)
    if predictor.kind != "classify":
        raise UserError(
            f"benchmark {s.name}: {c.stage_dir} is a {predictor.kind} stage, not a classify stage"
        )
    where = labels.Where("eval", predictor.labels, None, False)
    gold = labels.ids(
        [specs.field(r, s.label) for r in items], predictor.labels, where, f"benchmark {s.name}"
    )
    predicted = labels.decide(predictor.outputs(texts, desc=f"{s.name}: classify"), False)
    m = labels.metrics(gold, predicted, predictor.labels, False)
    outcome = run.Outcome(n=len(items))
    outcome.metrics = {"acc,none": m["accuracy"], "macro_f1,none": m["macro_f1"]}
    outcome.samples = [
        {
            "doc_id": i,
            "prompt": t,
            "predicted": predictor.labels[p],
            "target": predictor.labels[g],
            "score": float(p == g),
        }
        for i, (t, p, g) in enumerate(zip(texts, predicted, gold, strict=True))
    ]
    return outcome


def _results(loaded: list, outcomes: dict, rows: dict, config: dict, label: str) -> dict[str, Any]:
    return {
        "results": {name: {"alias": name, **o.metrics} for name, o in outcomes.items()},
        "n-samples": {name: {"original": len(rows[name]), "effective": o.n} for name, o in outcomes.items()},
        "versions": {s.name: s.version for s in loaded},
        "configs": {s.name: s.model_dump() for s in loaded},
        "config": {**config, "model": label},
        "throughput": {
            name: {"new_tokens_per_s": o.tokens_per_s} for name, o in outcomes.items() if o.tokens_per_s
        },
        "samples": {name: o.samples for name, o in outcomes.items()},
        "date": datetime.now(UTC).isoformat(),
        "versions_of_libraries": rundir.versions(),
    }


def _write(out: Path, results: dict[str, dict[str, Any]]) -> None:
    """One folder per model (results.json, samples_<bench>.jsonl), or the files in `out` for one model;
    `results.md` and `results.png` with every model side by side. Under torchrun, rank 0 writes."""
    if not distributed.is_primary():
        return
    out.mkdir(parents=True, exist_ok=True)
    single = len(results) == 1
    for label, r in results.items():
        folder = out if single else out / label.replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        samples = r.pop("samples")
        for name, rows in samples.items():
            rundir.write_text(
                folder / f"samples_{name}.jsonl", "".join(json.dumps(x, default=str) + "\n" for x in rows)
            )
        rundir.write_text(folder / "results.json", json.dumps(r, indent=2, default=str) + "\n")
    rundir.write_text(out / "results.md", table(results))
    chart(results, out / "results.png")


def metric_rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """(benchmark, metric key) pairs shown in the table: every metric but the standard errors."""
    seen: dict[tuple[str, str], None] = {}
    for r in results.values():
        for b, m in r["results"].items():
            for k in m:
                if k != "alias" and "_stderr," not in k:
                    seen[(b, k)] = None
    return list(seen)


def table(results: dict[str, dict[str, Any]]) -> str:
    labels = list(results)
    lines = ["| benchmark | metric | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
    for bench, key in metric_rows(results):
        cells = []
        for label in labels:
            metrics = results[label]["results"].get(bench, {})
            if key not in metrics:
                cells.append("–")
                continue
            err = metrics.get(key.replace(",", "_stderr,", 1))
            cells.append(f"{metrics[key]:.4f}" + (f" ± {err:.4f}" if err else ""))
        lines.append(f"| {bench} | {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Grouped bars: each benchmark's first metric, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = {}
    for bench, key in metric_rows(results):
        first.setdefault(bench, key)
    labels = list(results)
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(4, 1.5 * len(first) + 2), 3.5), dpi=100)
    for j, label in enumerate(labels):
        values = [results[label]["results"].get(b, {}).get(k, 0.0) for b, k in first.items()]
        ax.bar([i + j * width for i in range(len(first))], values, width, label=label)
    ax.set_xticks(
        [i + width * (len(labels) - 1) / 2 for i in range(len(first))],
        [f"{b}\n{k.split(',')[0]}" for b, k in first.items()],
    )
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    rundir.save_figure(fig, path)
