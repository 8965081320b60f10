"""Running a benchmark spec: its rows, prompts, the model's outputs (or outside predictions), scores."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from finetune import data
from finetune.bench import extract, score
from finetune.bench.spec import Classification, Generate, MultipleChoice
from finetune.bench.spec import field as get
from finetune.errors import UserError
from finetune.fast import generation


@dataclass
class Outcome:
    """One benchmark on one model: metric values (lm-eval keys), per-item samples, throughput."""

    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    n: int = 0
    tokens_per_s: float | None = None


def rows(spec: Any, source: str | None, limit: int | None) -> list[dict[str, Any]]:
    """The benchmark's rows (the bundled sample, or `--data`), first `limit` of them, fields checked."""
    where = "--data" if source else f"benchmark {spec.name}"
    source = source or spec.data.sample
    if source is None:
        raise UserError(
            f"benchmark {spec.name} bundles no sample; get its data with `finetune eval fetch {spec.name}`"
        )
    items = data.load_rows(source, key=where, max_samples=limit).to_list()
    for template in _templates(spec):
        try:
            render(template, items[0])
        except (KeyError, IndexError) as err:
            raise UserError(
                f"{where}: the rows lack field {err} that benchmark {spec.name} names (fields: {', '.join(items[0])})"
            ) from None
    for name in _fields(spec):
        try:
            get(items[0], name)
        except KeyError:
            raise UserError(
                f"{where}: the rows lack field {name!r} that benchmark {spec.name} names (fields: {', '.join(items[0])})"
            ) from None
    return items


def _templates(spec: Any) -> list[str]:
    out = [spec.prompt]
    if isinstance(spec, Generate):
        out.append(spec.target)
        if spec.tests:
            out.append(spec.tests)
    return out


def _fields(spec: Any) -> list[str]:
    if isinstance(spec, MultipleChoice):
        return [spec.choices, spec.gold, *([spec.labels] if spec.labels else [])]
    if isinstance(spec, Classification):
        return [spec.label]
    return [spec.choices] if spec.choices else []


def render(template: str, row: dict[str, Any]) -> str:
    return template.format(**row)


def prompts(spec: Any, items: list[dict[str, Any]]) -> list[str]:
    """Each item's prompt, after the few-shot examples (prompt + target of the first n example rows)."""
    prefix = ""
    if spec.fewshot.n:
        source = spec.fewshot.data
        examples = data.load_rows(source, key=f"benchmark {spec.name} fewshot").to_list() if source else items
        shots = examples[: spec.fewshot.n]
        target = spec.target if isinstance(spec, Generate) else "{" + spec.gold + "}"
        prefix = spec.fewshot.separator.join(render(spec.prompt, r) + render(target, r) for r in shots)
        prefix += spec.fewshot.separator
    return [prefix + render(spec.prompt, r) for r in items]


# ------------------------------------------------------------------------------------------ generate


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    spec: Generate,
    *,
    batch_size: int,
    seed: int,
    kernels: str = "auto",
) -> tuple[list[list[str]], int, float]:
    """`spec.samples` outputs per prompt (greedy when temperature is 0), cut at the stop sequences, in
    batches padded on the left; (outputs, new tokens, seconds). `kernels`: see `model.kernels`."""
    from tqdm.auto import tqdm

    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out: list[list[str]] = []
    new_tokens, seconds = 0, 0.0
    try:
        with generation.compiled_decoding(model, generation.enabled(kernels, model)) as extra:
            for start in tqdm(range(0, len(texts), batch_size), desc=f"{spec.name}: generate", leave=False):
                chunk = texts[start : start + batch_size]
                if spec.chat:
                    chunk = [
                        tokenizer.apply_chat_template(
                            [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
                        )
                        for t in chunk
                    ]
                batch = tokenizer(
                    chunk, return_tensors="pt", padding=True, add_special_tokens=not spec.chat
                ).to(device)
                began = time.perf_counter()
                generated = model.generate(
                    **batch,
                    max_new_tokens=spec.max_new_tokens,
                    do_sample=spec.temperature > 0,
                    temperature=spec.temperature if spec.temperature > 0 else None,
                    top_p=None,
                    top_k=None,
                    num_return_sequences=spec.samples,
                    pad_token_id=tokenizer.pad_token_id,
                    **extra,
                )
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds += time.perf_counter() - began
                new = generated[:, batch["input_ids"].shape[1] :]
                pad = tokenizer.pad_token_id
                new_tokens += int((new != pad).sum()) if pad is not None else new.numel()
                decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
                cut = [_cut(t, spec.stop) for t in decoded]
                out += [cut[i : i + spec.samples] for i in range(0, len(cut), spec.samples)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out, new_tokens, seconds


def _cut(text: str, stops: list[str]) -> str:
    ends = [text.find(s) for s in stops if s and s in text]
    return text[: min(ends)] if ends else text


def score_generations(
    spec: Generate, items: list[dict[str, Any]], texts: list[str], outputs: list[list[str]]
) -> Outcome:
    """Extract and score every output; pass@k over the samples of an item for code."""
    filter_name = spec.extract
    result = Outcome(n=len(items))
    per_item: list[float] = []
    passes: dict[int, list[float]] = {k: [] for k in spec.k}
    for i, (row, prompt, outs) in enumerate(zip(items, texts, outputs, strict=True)):
        target = render(spec.target, row)
        n_choices = len(get(row, spec.choices)) if spec.choices else 0
        gold = (
            extract.extract(spec.extract, target, pattern=spec.pattern, n_choices=n_choices)
            if spec.extract_target
            else target
        )
        answers = [extract.extract(spec.extract, o, pattern=spec.pattern, n_choices=n_choices) for o in outs]
        if spec.score == "code_execution":
            program_tests = render(spec.tests or "", row)
            scores = [
                score.code_passes(render(spec.prompt, row) + o, program_tests, spec.timeout) for o in outs
            ]
            for k in spec.k:
                passes[k].append(score.pass_at_k(len(scores), int(sum(scores)), k))
            value = scores[0]
        elif spec.score == "math_verify":
            # math-verify reads the whole output (a \boxed{} answer first, else the last expression).
            scores = [score.math_verify(o, target) or 0.0 for o in outs]
            value = scores[0]
        else:
            scores = [score.exact_match(a, gold, spec.normalize) for a in answers]
            value = scores[0]
        per_item.append(value)
        result.samples.append(
            {
                "doc_id": i,
                "prompt": prompt,
                "output": outs[0] if len(outs) == 1 else outs,
                "extracted": answers[0] if len(answers) == 1 else answers,
                "target": gold,
                "score": value if len(scores) == 1 else scores,
            }
        )
    if spec.score == "code_execution":
        for k, values in passes.items():
            result.metrics[f"pass@{k},{filter_name}"] = sum(values) / len(values)
            result.metrics[f"pass@{k}_stderr,{filter_name}"] = score.mean_stderr(values)
    else:
        result.metrics[f"{spec.score},{filter_name}"] = sum(per_item) / len(per_item)
        result.metrics[f"{spec.score}_stderr,{filter_name}"] = score.mean_stderr(per_item)
    return result


def predictions(spec: Any, path: str, n: int) -> list[list[str]]:
    """Outside outputs, one row per doc: `{"doc_id": i, "output": "..."}` (a list of outputs for n > 1)."""
    if not isinstance(spec, Generate):
        raise UserError(
            f"--predictions: benchmark {spec.name} is {spec.kind}; only generate benchmarks score outputs"
        )
    got = data.load_rows(path, key="--predictions").to_list()
    by_id: dict[int, list[str]] = {}
    for i, row in enumerate(got, 1):
        doc, output = row.get("doc_id"), row.get("output")
        if not isinstance(doc, int) or isinstance(doc, bool) or output is None:
            raise UserError(f"--predictions: row {i}: needs an integer `doc_id` and an `output`")
        if not 0 <= doc < n:
            raise UserError(f"--predictions: row {i}: unknown doc_id {doc} (the data has doc_ids 0..{n - 1})")
        if doc in by_id:
            raise UserError(f"--predictions: row {i}: duplicate doc_id {doc}")
        by_id[doc] = output if isinstance(output, list) else [output]
    missing = [d for d in range(n) if d not in by_id]
    if missing:
        raise UserError(
            f"--predictions: no output for {len(missing)} doc_ids (first: {missing[0]}); give one per row"
        )
    return [by_id[d] for d in range(n)]


# ------------------------------------------------------------------------------------ multiple choice


def choice_lists(spec: MultipleChoice, items: list[dict[str, Any]]) -> tuple[list[list[str]], list[int]]:
    """Each item's choice texts and the index of the gold one (given as an index, a letter or a label)."""
    choices, golds = [], []
    for i, row in enumerate(items):
        texts = [str(c) for c in get(row, spec.choices)]
        gold = get(row, spec.gold)
        labels = [str(x) for x in get(row, spec.labels)] if spec.labels else None
        if labels is not None and str(gold) in labels:
            index = labels.index(str(gold))
        elif isinstance(gold, int) or (isinstance(gold, str) and gold.strip().isdigit()):
            index = int(gold)
        elif isinstance(gold, str) and len(gold.strip()) == 1 and gold.strip().isalpha():
            index = ord(gold.strip().upper()) - ord("A")
        else:
            raise UserError(f"benchmark {spec.name}: doc {i}: gold {gold!r} is not an index, letter or label")
        if not 0 <= index < len(texts):
            raise UserError(f"benchmark {spec.name}: doc {i}: gold {gold!r} names no choice of {len(texts)}")
        choices.append(texts)
        golds.append(index)
    return choices, golds


def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    # As lm-evaluation-harness does: trailing spaces of the context move to the continuation, and the
    # continuation's tokens are those of the whole string after the context's.
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    if not ctx:
        ctx = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        whole = ctx + whole
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def loglikelihoods(
    model: torch.nn.Module, tokenizer: Any, pairs: list[tuple[str, str]], *, batch_size: int, desc: str
) -> list[float]:
    """Sum of log-probabilities of each continuation given its context."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [_encode_pair(tokenizer, c, x) for c, x in pairs]
    out: list[float] = []
    try:
        for start in tqdm(range(0, len(encoded), batch_size), desc=desc, leave=False):
            chunk = encoded[start : start + batch_size]
            seqs = [(ctx + cont)[:-1] for ctx, cont in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            mask = torch.zeros(len(seqs), width, dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1).cpu()
            for i, (ctx, cont) in enumerate(chunk):
                positions = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))
                out.append(float(logprobs[i, positions, torch.tensor(cont)].sum()))
    finally:
        model.train(was_training)
    return out


def score_choices(
    spec: MultipleChoice,
    items: list[dict[str, Any]],
    texts: list[str],
    lls: list[float],
    choices: list[list[str]],
    golds: list[int],
) -> Outcome:
    """acc (highest log-likelihood) and acc_norm (per character of the choice), as lm-eval computes them."""
    result = Outcome(n=len(items))
    acc, acc_norm = [], []
    k = 0
    for i, (prompt, options, gold) in enumerate(zip(texts, choices, golds, strict=True)):
        values = lls[k : k + len(options)]
        k += len(options)
        best = max(range(len(options)), key=lambda j: values[j])
        best_norm = max(range(len(options)), key=lambda j: values[j] / max(len(options[j]), 1))
        acc.append(float(best == gold))
        acc_norm.append(float(best_norm == gold))
        result.samples.append(
            {
                "doc_id": i,
                "prompt": prompt,
                "loglikelihoods": values,
                "predicted": best,
                "target": gold,
                "score": acc[-1],
            }
        )
    for name, values in (("acc", acc), ("acc_norm", acc_norm)):
        result.metrics[f"{name},none"] = sum(values) / len(values)
        result.metrics[f"{name}_stderr,none"] = score.mean_stderr(values)
    return result
