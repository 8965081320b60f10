"""The evaluation harness: specs, extractors and scorers on hand-checked answers, log-likelihoods equal to a
hand computation on the tiny model, pass@k equal to its closed form, outside predictions, results in
lm-evaluation-harness's shape, and bad input as one error line."""

from __future__ import annotations

import doctest
import itertools
import json
import math

import pytest
import torch
from conftest import REPO, one_error_line, write_jsonl

from finetune.bench import extract, harness, run, score, spec
from finetune.cli import main

REVERSE = REPO / "recipes" / "data" / "reverse" / "test.jsonl"


def test_every_bundled_spec_loads():
    names = spec.known()
    assert {"gsm8k", "math500", "mmlu", "arc_challenge", "hellaswag", "humaneval", "reverse"} <= set(names)
    kinds = {n: spec.load(n).kind for n in names}
    assert (
        kinds["gsm8k"] == "generate"
        and kinds["mmlu"] == "multiple_choice"
        and kinds["word_class"] == "classification"
    )


@pytest.mark.parametrize("module", [extract, score])
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted >= 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # openai/gsm8k main test rows 0 and 1 (answers as the dataset writes them).
        (
            "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.\n#### 18",
            "18",
        ),
        (
            "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 bolts of fabric\n#### 3",
            "3",
        ),
        ("The total is 1,200 dollars.", "1200"),
        ("#### -5", "-5"),
    ],
)
def test_gsm8k_extractor_on_real_answers(text, expected):
    assert extract.gsm8k(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # MATH-500 style solutions: the last \boxed{} with nested braces.
        (
            "So the point is $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$.",
            "\\left( 3, \\frac{\\pi}{2} \\right)",
        ),
        ("Thus $p - q = \\boxed{p - q}$, done.", "p - q"),
        ("First \\boxed{1}, then \\boxed{\\frac{14}{3}}", "\\frac{14}{3}"),
        ("no box here", None),
    ],
)
def test_boxed_extractor(text, expected):
    assert extract.boxed(text) == expected


def test_math_verify_scorer_accepts_equivalent_forms():
    assert score.math_verify("so the answer is \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert score.math_verify("so the answer is \\boxed{3}", "\\frac{14}{3}") == 0.0


def test_pass_at_k_equals_the_closed_form():
    """The estimator against brute force: the share of k-subsets of n samples holding a passing one."""
    for n, c, k in [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 1, 5), (4, 4, 2)]:
        samples = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(samples, k))
        assert score.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    assert score.pass_at_k(10, 1, 1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="at least 5 samples"):
        score.pass_at_k(3, 1, 5)


def test_loglikelihoods_equal_a_hand_computation_on_the_tiny_model():
    from finetune.model.load import load_model, load_tokenizer, resolve_source

    source = resolve_source("tiny", None)
    model, tokenizer = load_model(source, dtype="float32"), load_tokenizer(source)
    pairs = [("reverse: abcd\nAnswer:", " dcba"), ("reverse: abcd\nAnswer:", " abcd"), ("xyz ", "w")]
    got = run.loglikelihoods(model, tokenizer, pairs, batch_size=2, desc="t")
    for (context, continuation), value in zip(pairs, got, strict=True):
        context, continuation = context.rstrip(), context[len(context.rstrip()) :] + continuation
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
        expected = sum(float(logits[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))
        assert value == pytest.approx(expected, abs=1e-4)


def test_multiple_choice_accuracy_follows_the_loglikelihoods():
    s = spec.MultipleChoice(
        name="t",
        kind="multiple_choice",
        data={"sample": "x"},
        prompt="{q}",
        choices="c",
        gold="g",
        continuation=" {choice}",
    )
    items = [{"q": "a", "c": ["x", "yyyy"], "g": 1}, {"q": "b", "c": ["x", "y"], "g": "A"}]
    choices, golds = run.choice_lists(s, items)
    assert golds == [1, 0]
    # item 0: sums favour choice 0 (acc 0) but per character choice 1 (acc_norm 1); item 1: choice 0.
    outcome = run.score_choices(s, items, ["a", "b"], [-2.0, -4.0, -1.0, -3.0], choices, golds)
    assert outcome.metrics["acc,none"] == 0.5 and outcome.metrics["acc_norm,none"] == 1.0
    assert outcome.metrics["acc_stderr,none"] == pytest.approx(score.mean_stderr([0.0, 1.0]))


def test_gold_predictions_score_one_and_results_have_lm_eval_shape(tmp_path, capsys):
    rows = [json.loads(line) for line in REVERSE.read_text().splitlines()][:20]
    predictions = write_jsonl(
        tmp_path / "p.jsonl",
        [{"doc_id": i, "output": r["messages"][1]["content"]} for i, r in enumerate(rows)],
    )
    out = tmp_path / "out"
    assert (
        main(["eval", "reverse", "--predictions", str(predictions), "--limit", "20", "--out", str(out)]) == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["results"]["reverse"]["exact_match,none"] == 1.0
    assert results["results"]["reverse"]["exact_match_stderr,none"] == 0.0
    assert results["n-samples"]["reverse"] == {"original": 20, "effective": 20}
    assert results["versions"]["reverse"] == 1 and results["configs"]["reverse"]["kind"] == "generate"
    samples = [json.loads(line) for line in (out / "samples_reverse.jsonl").read_text().splitlines()]
    assert samples[0].keys() >= {"doc_id", "prompt", "output", "extracted", "target", "score"}
    assert (out / "results.md").read_text().startswith("| benchmark | metric | predictions |")
    assert (out / "results.png").stat().st_size > 0


def test_eval_runs_the_tiny_model_and_compares_adapters(tmp_path):
    """The base model and an adapter side by side on one loaded base: the table has both columns."""
    from finetune.model import adapters
    from finetune.model.load import load_model, resolve_source

    model = adapters.attach(
        load_model(resolve_source("tiny", None), dtype="float32"),
        r=4,
        alpha=8,
        dropout=0.0,
        targets=["mla", "routed_experts"],
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_down_B" in name or "lora_gate_up_B" in name:
                p.normal_(0, 0.5)
    adapters.save_adapter(model, tmp_path / "mine")
    out = tmp_path / "out"
    args = ["eval", "reverse", "--model", "tiny", "--limit", "6", "--out", str(out), "--batch-size", "4"]
    assert main([*args, "--adapter", "base", "--adapter", str(tmp_path / "mine")]) == 0
    base = json.loads((out / "base" / "results.json").read_text())
    other = json.loads((out / "mine" / "results.json").read_text())
    assert base["results"]["reverse"]["exact_match,none"] == 0.0
    assert "exact_match,none" in other["results"]["reverse"]
    base_out = [
        json.loads(x)["output"] for x in (out / "base" / "samples_reverse.jsonl").read_text().splitlines()
    ]
    other_out = [
        json.loads(x)["output"] for x in (out / "mine" / "samples_reverse.jsonl").read_text().splitlines()
    ]
    assert base_out != other_out  # the adapter (expert LoRA included) changed the generations
    # The base model is restored after each adapter: a second base run gives the same outputs.
    assert main([*args, "--out", str(tmp_path / "again")]) == 0
    again = [
        json.loads(x)["output"]
        for x in (tmp_path / "again" / "samples_reverse.jsonl").read_text().splitlines()
    ]
    assert again == base_out


def _fails(capsys, argv) -> str:
    assert main(argv) == 2
    return one_error_line(capsys.readouterr().err)


def test_bad_eval_input_is_one_line(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "unknown benchmark 'gsm9k'; known: arc_challenge, gsm8k" in _fails(
        capsys, ["eval", "gsm9k", "--model", "tiny", "--out", out]
    )
    preds = [{"doc_id": 0, "output": "a"}, {"doc_id": 0, "output": "b"}]
    line = _fails(
        capsys,
        [
            "eval",
            "reverse",
            "--predictions",
            str(write_jsonl(tmp_path / "d.jsonl", preds)),
            "--limit",
            "2",
            "--out",
            out,
        ],
    )
    assert "--predictions: row 2: duplicate doc_id 0" in line
    preds = [{"doc_id": 0, "output": "a"}, {"doc_id": 7, "output": "b"}]
    line = _fails(
        capsys,
        [
            "eval",
            "reverse",
            "--predictions",
            str(write_jsonl(tmp_path / "u.jsonl", preds)),
            "--limit",
            "2",
            "--out",
            out,
        ],
    )
    assert "--predictions: row 2: unknown doc_id 7 (the data has doc_ids 0..1)" in line
    line = _fails(
        capsys,
        [
            "eval",
            "reverse",
            "--data",
            str(write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}])),
            "--model",
            "tiny",
            "--out",
            out,
        ],
    )
    assert "--data: the rows lack field 'messages' that benchmark reverse names" in line
    assert "give --recipe RECIPE or --model" in _fails(capsys, ["eval", "reverse", "--out", out])
    line = _fails(
        capsys, ["eval", "mmlu", "--predictions", str(tmp_path / "u.jsonl"), "--limit", "2", "--out", out]
    )
    assert "--predictions: benchmark mmlu is multiple_choice; only generate benchmarks score outputs" in line
    line = _fails(capsys, ["eval", "hellaswag", "--model", "tiny", "--out", out])
    assert "benchmark hellaswag bundles no sample; get its data with `finetune eval fetch hellaswag`" in line
    assert not (tmp_path / "out").exists()


def test_bad_specs_name_the_field(tmp_path, capsys):
    def write(body: str):
        path = tmp_path / "s.yaml"
        path.write_text(body)
        return str(path)

    base = "name: s\ndata: {sample: x.jsonl}\nprompt: '{q}'\n"
    assert "`gold` is not a field of a generate benchmark" in _fails(
        capsys,
        [
            "eval",
            write(base + "kind: generate\ntarget: '{a}'\ngold: a\n"),
            "--model",
            "tiny",
            "--out",
            str(tmp_path),
        ],
    )
    assert "`extract: choice_letter` needs `choices`" in _fails(
        capsys,
        [
            "eval",
            write(base + "kind: generate\ntarget: '{a}'\nextract: choice_letter\n"),
            "--model",
            "tiny",
            "--out",
            str(tmp_path),
        ],
    )
    assert "`extract: regex` needs `pattern`" in _fails(
        capsys,
        [
            "eval",
            write(base + "kind: generate\ntarget: '{a}'\nextract: regex\n"),
            "--model",
            "tiny",
            "--out",
            str(tmp_path),
        ],
    )


def test_an_adapter_of_other_shapes_is_refused(tmp_path, capsys):
    from finetune.model import adapters
    from finetune.model.load import load_model, resolve_source

    other = adapters.attach(
        load_model(resolve_source("tiny-v2", None), dtype="float32"),
        r=4,
        alpha=8,
        dropout=0.0,
        targets=["mla"],
    )
    adapters.save_adapter(other, tmp_path / "v2")
    line = _fails(
        capsys,
        [
            "eval",
            "reverse",
            "--model",
            "tiny",
            "--adapter",
            str(tmp_path / "v2"),
            "--limit",
            "2",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert "the adapter does not fit the model" in line


def test_mean_stderr_matches_the_sample_formula():
    values = [1.0, 0.0, 1.0, 1.0]
    mean = sum(values) / 4
    assert score.mean_stderr(values) == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 3 / 4))
    assert harness.candidate("base").folder is None


@pytest.mark.parametrize(
    ("bench", "field", "metric"),
    [
        ("gsm8k", "answer", "exact_match,gsm8k"),
        ("math500", "solution", "math_verify,boxed"),
        ("humaneval", "canonical_solution", "pass@1,none"),
    ],
)
def test_gold_solutions_score_one_on_the_bundled_samples(tmp_path, bench, field, metric):
    """The bundled real rows, their own gold solutions as predictions: every one is right."""
    rows = [
        json.loads(line)
        for line in (REPO / "eval" / "data" / bench / "sample.jsonl").read_text().splitlines()
    ]
    rows = rows[:40]
    predictions = write_jsonl(
        tmp_path / "p.jsonl", [{"doc_id": i, "output": r[field]} for i, r in enumerate(rows)]
    )
    out = tmp_path / "out"
    assert main(["eval", bench, "--predictions", str(predictions), "--limit", "40", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["results"][bench][metric] == 1.0


def test_wrong_answers_score_zero(tmp_path):
    rows = [
        json.loads(line)
        for line in (REPO / "eval" / "data" / "gsm8k" / "sample.jsonl").read_text().splitlines()
    ][:5]
    wrong = [
        {"doc_id": i, "output": r["answer"].rsplit("####", 1)[0] + "#### 123456"} for i, r in enumerate(rows)
    ]
    out = tmp_path / "out"
    assert (
        main(
            [
                "eval",
                "gsm8k",
                "--predictions",
                str(write_jsonl(tmp_path / "w.jsonl", wrong)),
                "--limit",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads((out / "results.json").read_text())["results"]["gsm8k"]["exact_match,gsm8k"] == 0.0


@pytest.mark.parametrize("bench", ["mmlu", "arc_challenge"])
def test_multiple_choice_benchmarks_run_on_the_tiny_model(tmp_path, bench):
    out = tmp_path / "out"
    assert main(["eval", bench, "--model", "tiny", "--limit", "4", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["results"][bench]
    assert set(results) >= {"acc,none", "acc_norm,none", "acc_stderr,none"}
    samples = [json.loads(x) for x in (out / f"samples_{bench}.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(len(s["loglikelihoods"]) >= 3 for s in samples)


def test_same_accuracy_as_lm_evaluation_harness(tmp_path):
    """One multiple-choice task through our harness and through lm-eval's HFLM on the same loaded tiny
    model: the same acc and acc_norm (and standard errors)."""
    pytest.importorskip("lm_eval")
    import random

    from finetune.bench import lm_eval_bridge
    from finetune.model.load import load_model, load_tokenizer, resolve_source

    words = [
        json.loads(line)["messages"][0]["content"].split()[-1] for line in REVERSE.read_text().splitlines()
    ][:30]
    rng = random.Random(0)
    rows = []
    for w in words:
        options = [w[::-1], w, "".join(sorted(w)), w[1:] + w[0]]
        rng.shuffle(options)
        rows.append({"question": f"reverse: {w}", "choices": options, "answer": options.index(w[::-1])})
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (tmp_path / "ours.yaml").write_text(
        f'name: tiny_mc\nkind: multiple_choice\ndata: {{sample: {data}}}\nprompt: "{{question}}\\nAnswer:"\n'
        "choices: choices\ngold: answer\n"
    )
    source = resolve_source("tiny", None)
    model, tokenizer = load_model(source, dtype="float32"), load_tokenizer(source)
    theirs = lm_eval_bridge.evaluate(["tiny_mc"], model, tokenizer, include_path=str(tmp_path))["results"][
        "tiny_mc"
    ]
    results = harness.evaluate(
        [str(tmp_path / "ours.yaml")],
        out=tmp_path / "out",
        candidates=[harness.Candidate("base")],
        load_base=lambda: (model, tokenizer),
    )
    ours = results["base"]["results"]["tiny_mc"]
    for key in ("acc,none", "acc_norm,none", "acc_stderr,none"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-12), key
    # The same task through the CLI: lm-eval's task on the model our loader built, beside our results.
    out = tmp_path / "cli"
    argv = [
        "eval",
        "--lm-eval-task",
        "tiny_mc",
        "--lm-eval-include",
        str(tmp_path),
        "--model",
        "tiny",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    cli = json.loads((out / "results.json").read_text())["results"]["lm_eval:tiny_mc"]
    assert cli["acc,none"] == pytest.approx(theirs["acc,none"], abs=1e-12)


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"benchmarks": ["nope"]}, "stages.ev.benchmarks: unknown benchmark 'nope'; known:"),
        (
            {"benchmarks": ["reverse"], "compare": ["base", "ghost"]},
            "stages.ev.compare: no stage 'ghost' in this recipe",
        ),
        (
            {"benchmarks": ["reverse"], "compare": ["later"]},
            "stages.ev.compare: stage 'later' runs after 'ev'",
        ),
        ({"benchmarks": ["reverse"], "train": {"max_steps": 1}}, "unknown key `stages.ev.train`"),
    ],
)
def test_bad_eval_stages(tmp_path, capsys, stage, message):
    from conftest import write_recipe

    data = {
        "name": "t",
        "output_dir": str(tmp_path / "run"),
        "model": {"preset": "tiny", "dtype": "float32"},
        "stages": {
            "ev": {"type": "eval", **stage},
            "later": {"type": "sft", "data": {"train": str(REVERSE)}, "train": {"max_steps": 1}},
        },
    }
    path = write_recipe(tmp_path / "r.yaml", data)
    assert message in _fails(capsys, ["validate", str(path)])
    assert not (tmp_path / "run").exists()


def test_fetch_converts_a_local_file_and_names_the_hub_failure(tmp_path, capsys):
    source = REPO / "eval" / "data" / "gsm8k" / "sample.jsonl"
    out = tmp_path / "full.jsonl"
    assert main(["eval", "fetch", "gsm8k", "--from", str(source), "--out", str(out)]) == 0
    assert [json.loads(x) for x in out.read_text().splitlines()] == [
        json.loads(x) for x in source.read_text().splitlines()
    ]
    line = _fails(
        capsys, ["eval", "fetch", "gsm8k", "--out", str(tmp_path / "hub.jsonl")]
    )  # tests are offline
    assert "benchmark gsm8k: cannot load openai/gsm8k (main, test) from the Hub" in line
    assert "unknown benchmark 'nope'" in _fails(capsys, ["eval", "fetch", "nope"])


def test_sampled_generation_is_deterministic_under_the_seed(tmp_path):
    """n samples per item at temperature 1: the same seed gives the same outputs, another seed others."""
    spec_file = tmp_path / "sampled.yaml"
    spec_file.write_text(
        f"name: sampled\nkind: generate\ndata: {{sample: {REVERSE}}}\nprompt: '{{messages[0][content]}}'\n"
        "target: '{messages[1][content]}'\nchat: true\nmax_new_tokens: 6\nsamples: 3\ntemperature: 1.0\n"
    )

    def outputs(seed: int, name: str) -> list:
        out = tmp_path / name
        argv = [
            "eval",
            str(spec_file),
            "--model",
            "tiny",
            "--limit",
            "4",
            "--seed",
            str(seed),
            "--out",
            str(out),
        ]
        assert main(argv) == 0
        return [json.loads(x)["output"] for x in (out / "samples_sampled.jsonl").read_text().splitlines()]

    first, again, other = outputs(0, "a"), outputs(0, "b"), outputs(1, "c")
    assert first == again and first != other
    assert all(len(o) == 3 for o in first)
