"""The classify stage: a 4-bit DeepseekV2ForSequenceClassification learns the bundled word classes;
labels are read from the data (or declared), class weights and multi-label change the loss, and bad
label data is one error line before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, one_error_line, write_jsonl, write_recipe

from finetune import labels, pipeline, recipe
from finetune.cli import main
from finetune.stages import classify

CLASSIFY = REPO / "recipes" / "tiny" / "classify.yaml"


def test_tiny_classify_recipe_learns_the_classes(tmp_path):
    r = recipe.load(CLASSIFY, [f"output_dir={tmp_path / 'run'}"])
    plan = pipeline.plan(r)
    ctx, inputs = plan.context, plan.inputs["classify"]
    assert inputs.names == ["early", "late", "middle"]  # inferred from the data, sorted
    model = ctx.adapted_model(
        "seq_cls", num_labels=3, pad_token_id=ctx.tokenizer().pad_token_id, labels=inputs.names
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    (tmp_path / "run").mkdir()
    summary = classify.run("classify", r.stages["classify"], inputs, ctx, model=model)

    e = summary["eval"]
    # Chance: 0.37 always answering the commonest class; a uniform guess has macro-F1 ~0.33.
    assert e["rows"] == 300 and e["majority_accuracy"] == pytest.approx(0.37)
    assert e["macro_f1"] >= 0.9 and e["accuracy"] >= 0.9, e  # 1.0 measured
    assert set(e["per_class"]) == {"early", "late", "middle"}
    assert sum(c["support"] for c in e["per_class"].values()) == 300
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n].detach(), v) for n, v in frozen.items())
    moved = {n for n, v in trained.items() if not torch.equal(now[n].detach(), v)}
    assert any(".score." in n for n in moved) and any("lora_B" in n for n in moved)
    stage = tmp_path / "run" / "classify"
    assert json.loads((stage / "summary.json").read_text())["eval"] == e
    assert (stage / "confusion_matrix.png").stat().st_size > 0 and (stage / "routing.png").stat().st_size > 0
    head = json.loads((stage / "adapter" / "head.json").read_text())
    assert head == {
        "type": "classify",
        "labels": ["early", "late", "middle"],
        "multi_label": False,
        "max_length": 32,
    }
    assert model.config.id2label == {0: "early", 1: "late", 2: "middle"}


def _stage_recipe(tmp_path, rows, eval_rows=None, **stage) -> dict:
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    data = {"train": str(train)}
    if eval_rows is not None:
        data["eval"] = str(write_jsonl(tmp_path / "eval.jsonl", eval_rows))
    return {
        "name": "t",
        "output_dir": str(tmp_path / "run"),
        "seed": 3,
        "model": {"preset": "tiny", "dtype": "float32"},
        "adapter": {"r": 4, "alpha": 8, "targets": ["mla"]},
        "stages": {
            "cls": {"type": "classify", "data": data, **stage, "train": {"max_steps": 2, "logging_steps": 1}}
        },
    }


def test_labels_are_inferred_from_any_text_label_file(tmp_path, capsys):
    """The same tiny recipe on another file: its own label set, no recipe edit."""
    rows = [
        {"text": w, "label": "pos" if w[0] < "n" else "neg"} for w in ["abcd", "zzzz", "mmmm", "qrst"] * 4
    ]
    data = write_jsonl(tmp_path / "sentiment.jsonl", rows)
    r = recipe.load(CLASSIFY, [f"stages.classify.data.train={data}", "stages.classify.data.eval=null"])
    assert pipeline.plan(r).inputs["classify"].names == ["neg", "pos"]


def test_integer_ids_with_declared_names_and_without(tmp_path):
    rows = [{"text": w, "label": i % 3} for i, w in enumerate(["abcd", "efgh", "ijkl", "mnop"] * 3)]
    named = recipe.Recipe.model_validate(_stage_recipe(tmp_path, rows, labels=["a", "b", "c"]))
    inputs = pipeline.plan(named).inputs["cls"]
    assert inputs.names == ["a", "b", "c"] and inputs.train_split.ids[:4] == [0, 1, 2, 0]
    assert inputs.train["labels"][:4] == [0, 1, 2, 0]
    plain = recipe.Recipe.model_validate(_stage_recipe(tmp_path, rows, num_labels=4))
    assert pipeline.plan(plain).inputs["cls"].names == ["0", "1", "2", "3"]  # a class the data lacks


def test_class_weights_balanced_follow_sklearn_and_change_the_loss():
    where = labels.Where("cls", None, None, False)
    ids = [0] * 6 + [1] * 2
    weights = labels.class_weights("balanced", ["a", "b"], ids, where)
    assert weights.tolist() == pytest.approx([8 / (2 * 6), 8 / (2 * 2)])
    given = labels.class_weights({"b": 3.0}, ["a", "b"], ids, where)
    assert given.tolist() == [1.0, 3.0]

    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-1.0, 1.0]])
    targets = torch.tensor([1, 0, 1])
    out = type("Out", (), {"logits": logits})()
    plain = classify.loss_function(None, False)(out, targets)
    assert plain == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item())
    weighted = classify.loss_function(given, False)(out, targets, num_items_in_batch=torch.tensor(3))
    each = torch.nn.functional.cross_entropy(logits, targets, reduction="none") * torch.tensor(
        [3.0, 1.0, 3.0]
    )
    assert weighted == pytest.approx((each.sum() / 3).item()) and weighted != pytest.approx(plain.item())


def test_multi_label_uses_binary_cross_entropy_and_sigmoid_decisions():
    logits = torch.tensor([[2.0, -1.0, 0.3], [-0.5, 0.5, -3.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = type("Out", (), {"logits": logits})()
    loss = classify.loss_function(None, True)(out, targets)
    assert loss == pytest.approx(torch.nn.functional.binary_cross_entropy_with_logits(logits, targets).item())
    assert labels.decide(logits, True) == [[0, 2], [1]]
    assert labels.decide(logits, False) == [0, 1]
    where = labels.Where("cls", None, None, True)
    pos = labels.class_weights("balanced", ["a", "b", "c"], [[0, 2], [1], [0]], where)
    assert pos.tolist() == pytest.approx([1 / 2, 2 / 1, 2 / 1])  # negatives / positives per label


def test_multi_label_stage_trains_and_reports(tmp_path):
    words = ["abcz", "azzz", "bcde", "zyxw", "qraz", "mnop", "aaaa", "zzzz"]
    rows = [{"text": w, "label": [t for t in ("a", "z") if t in w]} for w in words * 2]
    r = recipe.Recipe.model_validate(
        _stage_recipe(tmp_path, rows, rows[:8], multi_label=True, class_weights="balanced")
    )
    plan = pipeline.plan(r)
    inputs = plan.inputs["cls"]
    assert inputs.names == ["a", "z"] and inputs.train["labels"][0] == [1.0, 1.0]
    (tmp_path / "run").mkdir()
    summary = classify.run("cls", r.stages["cls"], inputs, plan.context)
    assert set(summary["eval"]) >= {"accuracy", "macro_f1", "per_class", "majority_accuracy"}
    assert summary["eval"]["per_class"]["a"]["support"] == 4
    head = json.loads((tmp_path / "run" / "cls" / "adapter" / "head.json").read_text())
    assert head["multi_label"] is True
    assert (tmp_path / "run" / "cls" / "confusion_matrix.png").stat().st_size > 0


WORDS = ["abcd", "wxyz", "hijk", "mnop"]


@pytest.mark.parametrize(
    ("rows", "stage", "eval_rows", "message"),
    [
        (
            [{"text": "a"}],
            {},
            None,
            "stages.cls.data.train: a classifier needs a `text` or `messages` column and a `label` column; missing label (found: text)",
        ),
        ([{"label": "x"}], {}, None, "missing text (or messages) (found: label)"),
        (
            [{"text": w, "label": "x"} for w in WORDS],
            {},
            None,
            "every row has label 'x'; a classifier needs at least 2 classes",
        ),
        (
            [{"text": w, "label": y} for w, y in zip(WORDS, "abca", strict=True)],
            {"labels": ["a", "b"]},
            None,
            "row 3: label 'c' is not one of stages.cls.labels (a, b)",
        ),
        (
            [{"text": w, "label": y} for w, y in zip(WORDS, "abca", strict=True)],
            {"num_labels": 2},
            None,
            "stages.cls.num_labels: 2 disagrees with the 3 labels of stages.cls.data.train (a, b, c)",
        ),
        (
            [{"text": w, "label": y} for w, y in zip(WORDS, "abba", strict=True)],
            {"labels": ["a", "b"], "num_labels": 3},
            None,
            "stages.cls.num_labels: 3 disagrees with stages.cls.labels (2 names)",
        ),
        (
            [{"text": w, "label": i} for i, w in enumerate(WORDS)],
            {"num_labels": 3},
            None,
            "row 4: label id 3 is outside 0..2",
        ),
        (
            [{"text": w, "label": y} for w, y in zip(WORDS, ["a", 1, "b", "a"], strict=True)],
            {},
            None,
            "labels mix names and integer ids",
        ),
        (
            [{"text": w, "label": ["a"]} for w in WORDS],
            {},
            None,
            "row 1: label ['a'] is a list; set stages.cls.multi_label: true",
        ),
        (
            [{"text": w, "label": "a"} for w in WORDS],
            {"multi_label": True},
            None,
            "row 1: with stages.cls.multi_label a label is a list of names or ids",
        ),
        (
            [{"text": w, "label": True} for w in WORDS],
            {},
            None,
            "row 1: a label is a name (string) or an id (integer), got True",
        ),
        ([{"text": 3, "label": "a"}], {}, None, "row 1: `text` must be a string"),
        (
            [{"text": w, "label": y} for w, y in zip(WORDS, "abba", strict=True)],
            {"class_weights": {"c": 2.0}},
            None,
            "stages.cls.class_weights: 'c' is not a label (a, b)",
        ),
        (
            [{"text": w, "label": y} for w, y in zip(WORDS, "abba", strict=True)],
            {"class_weights": {"a": 0}},
            None,
            "stages.cls.class_weights.a: a weight must be > 0",
        ),
        (
            [{"text": w, "label": y} for w, y in zip(WORDS, "abba", strict=True)],
            {"labels": ["a", "b", "c"], "class_weights": "balanced"},
            None,
            "balanced weights need every label in the train data; 'c' has no row",
        ),
        (
            [{"text": w, "label": y} for w, y in zip(WORDS, "abba", strict=True)],
            {},
            [{"text": "q", "label": "c"}],
            "stages.cls.data.eval: row 1: label 'c' is not one of the train labels",
        ),
        (
            [{"text": w, "label": y} for w, y in zip(WORDS, "abba", strict=True)],
            {"labels": ["a", "a"]},
            None,
            "stages.cls.labels: 'a' is listed twice",
        ),
    ],
)
def test_bad_label_data_is_one_line_and_writes_nothing(tmp_path, capsys, rows, stage, eval_rows, message):
    path = write_recipe(tmp_path / "r.yaml", _stage_recipe(tmp_path, rows, eval_rows, **stage))
    assert main(["validate", str(path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line, line
    assert main(["run", str(path)]) == 2
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("q_lora_rank", [None, 24], ids=["lite-mla", "v2-mla"])
def test_classify_on_a_hub_layout_checkpoint_with_expert_lora(tmp_path, q_lora_rank):
    """Both MLA variants, deepseek-ai Hub layout (per-expert keys), `[mla, routed_experts]` targets."""
    from hub_layout import write_hub_checkpoint
    from safetensors.torch import load_file

    from finetune.model import adapters

    folder = tmp_path / "ckpt"
    write_hub_checkpoint(folder, q_lora_rank=q_lora_rank)
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"model.path={folder}",
        "adapter.targets=[mla, routed_experts]",
        "stages.classify.data.max_samples=64",
        "stages.classify.train.max_steps=3",
        "stages.classify.train.per_device_train_batch_size=8",
    ]
    summary = pipeline.run(recipe.load(CLASSIFY, overrides))["classify"]
    assert summary["train"]["steps"] == 3 and summary["eval"]["rows"] == 300
    saved = load_file(str(tmp_path / "run" / "classify" / "adapter" / adapters.EXPERTS_FILE))
    assert all(saved[f"layers.{i}.lora_down_B"].abs().max() > 0 for i in (1, 2))  # expert LoRA trained


def test_integer_labels_take_the_names_a_dataset_gives_them(tmp_path):
    """A Hub-style ClassLabel column (here in a Parquet file, as ag_news ships it) names the ids."""
    from datasets import ClassLabel, Dataset, Features, Value

    names = ["World", "Sports", "Business", "Sci/Tech"]
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    Dataset.from_dict({"text": WORDS * 3, "label": [0, 1, 2, 1] * 3}, features=features).to_parquet(
        tmp_path / "news.parquet"
    )
    r = recipe.load(
        CLASSIFY,
        [f"stages.classify.data.train={tmp_path / 'news.parquet'}", "stages.classify.data.eval=null"],
    )
    inputs = pipeline.plan(r).inputs["classify"]
    assert inputs.names == names and inputs.train_split.ids[:4] == [0, 1, 2, 1]  # Sci/Tech has no row: kept


def test_max_length_keeps_the_first_tokens_and_is_reported(tmp_path, capsys):
    rows = [{"text": w * 3, "label": y} for w, y in zip(WORDS, "abab", strict=True)]  # 12 letters + EOS
    r = recipe.Recipe.model_validate(_stage_recipe(tmp_path, rows, max_length=5))
    inputs = pipeline.plan(r).inputs["cls"]
    assert all(len(ids) == 5 for ids in inputs.train["input_ids"])
    report = inputs.report[0]
    assert (report.rows, report.cut, report.max) == (4, 4, 13)
    assert "stages.cls.max_length: 5 cuts 4 of 4 train rows" in capsys.readouterr().err
