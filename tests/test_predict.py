"""`finetune predict` and the Predictor API: one row per input row, in order; the stage's summary
metrics are recomputed from its output; bad input is one error line and writes nothing."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import REPO, one_error_line, write_jsonl
from sklearn.metrics import accuracy_score, f1_score

from finetune import recipe
from finetune.cli import main
from finetune.predict import Predictor

DATA = REPO / "recipes" / "data"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A short classify run and a short reward run (the metrics need not be good, only reproducible)."""
    root = tmp_path_factory.mktemp("runs")
    for kind, steps in (("classify", 8), ("reward", 4)):
        overrides = [f"output_dir={root / kind}", f"stages.{kind}.train.max_steps={steps}"]
        assert main(["run", str(REPO / "recipes" / "tiny" / f"{kind}.yaml"), *overrides]) == 0
    return root


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_classifier_predictions_reproduce_the_summary_metrics(runs, tmp_path):
    out = tmp_path / "pred.jsonl"
    assert (
        main(
            [
                "predict",
                str(runs / "classify" / "classify"),
                "--input",
                str(DATA / "classify" / "test.jsonl"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    rows, truth = _read(out), [r["label"] for r in _read(DATA / "classify" / "test.jsonl")]
    assert len(rows) == len(truth) == 300
    assert all(set(r["probabilities"]) == {"early", "late", "middle"} for r in rows)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)
    assert all(r["label"] == max(r["probabilities"], key=r["probabilities"].get) for r in rows)
    summary = json.loads((runs / "classify" / "classify" / "summary.json").read_text())["eval"]
    predicted = [r["label"] for r in rows]
    assert accuracy_score(truth, predicted) == summary["accuracy"]
    assert f1_score(truth, predicted, average="macro", zero_division=0) == pytest.approx(
        summary["macro_f1"], abs=1e-12
    )


def test_reward_predictions_reproduce_the_summary_metrics(runs, tmp_path):
    out = tmp_path / "pred.jsonl"
    stage = runs / "reward" / "reward"
    assert (
        main(
            ["predict", str(stage), "--input", str(DATA / "preference" / "test.jsonl"), "--output", str(out)]
        )
        == 0
    )
    rows = _read(out)
    margins = [r["chosen_score"] - r["rejected_score"] for r in rows]
    summary = json.loads((stage / "summary.json").read_text())["eval"]
    assert len(rows) == summary["pairs"] == 200
    assert sum(m > 0 for m in margins) / len(margins) == summary["pairwise_accuracy"]
    assert sum(margins) / len(margins) == pytest.approx(summary["mean_margin"], abs=1e-5)


def test_reward_model_reads_pairs_single_sequences_and_either_padding_side(runs):
    pairs = _read(DATA / "preference" / "test.jsonl")[:6]
    rm = Predictor.load(runs / "reward" / "reward")
    paired = rm.predict(pairs)
    split = [{"prompt": p["chosen"][:1], "completion": p["chosen"][1:]} for p in pairs]
    assert [r["score"] for r in rm.predict(split)] == pytest.approx(
        [r["chosen_score"] for r in paired], abs=1e-5
    )
    whole = [{"messages": p["rejected"]} for p in pairs]
    assert [r["score"] for r in rm.predict(whole)] == pytest.approx(
        [r["rejected_score"] for r in paired], abs=1e-5
    )
    right = rm.scores([p["chosen"] for p in pairs])
    rm.tokenizer.padding_side = "left"
    assert rm.scores([p["chosen"] for p in pairs]) == pytest.approx(right, abs=1e-5)


def _fails(capsys, args) -> str:
    assert main(["predict", *args]) == 2
    return one_error_line(capsys.readouterr().err)


def test_predict_errors_are_one_line_and_write_nothing(runs, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    words = write_jsonl(tmp_path / "words.jsonl", [{"word": "abcd"}])
    classify, reward = runs / "classify" / "classify", runs / "reward" / "reward"

    def fails(stage, source, *extra) -> str:
        return _fails(capsys, [str(stage), "--input", str(source), "--output", str(out), *extra])

    assert "a classifier reads a `text` or `messages` column (found: word)" in fails(classify, words)
    assert "a reward model reads `chosen` + `rejected` pairs, `prompt` + `completion`" in fails(reward, words)
    assert "--input:" in fails(classify, tmp_path / "missing.jsonl")
    assert "not a stage of a run folder" in fails(tmp_path, words)
    assert "the run has no stage 'nope' (stages: classify)" in fails(runs / "classify" / "nope", words)
    assert "--batch-size: 0" in fails(classify, DATA / "classify" / "test.jsonl", "--batch-size", "0")
    assert "is a folder" in _fails(capsys, [str(classify), "--input", str(words), "--output", str(tmp_path)])
    mixed = write_jsonl(
        tmp_path / "mixed.jsonl", [{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}]
    )
    assert "must both be texts or both message lists" in fails(reward, mixed)
    assert not out.exists()


def test_predict_refuses_other_stage_types_unfinished_stages_and_other_shapes(runs, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    sft_run = tmp_path / "sft-run"
    (sft_run / "sft").mkdir(parents=True)
    recipe.dump(recipe.load(REPO / "recipes" / "tiny" / "sft.yaml"), sft_run / "recipe.yaml")
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "abcd"}])

    def fails(stage) -> str:
        return _fails(capsys, [str(stage), "--input", str(text), "--output", str(out)])

    assert "predict needs a classify or reward stage; 'sft' is a sft stage" in fails(sft_run / "sft")
    copy = tmp_path / "copy"
    shutil.copytree(runs / "classify", copy)
    head = copy / "classify" / "adapter" / "head.json"
    saved = json.loads(head.read_text())
    head.write_text(json.dumps({**saved, "labels": [*saved["labels"], "extra"]}))
    assert "the adapter does not fit the run's model" in fails(copy / "classify")
    head.unlink()
    assert "the stage has not finished" in fails(copy / "classify")
    assert not out.exists()
