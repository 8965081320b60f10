"""Mixtures of data sources (weights, `columns:`, `format:`), Alpaca / ShareGPT conversion, streaming."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import pytest
import yaml
from conftest import base_recipe, chat_rows, fails, write_jsonl, write_recipe
from trl import SFTConfig

from finetune import data, formats, mixture, pipeline, preferences, recipe
from finetune.cli import main
from finetune.errors import UserError

WORDS = ["abcd", "wxyz", "hijk", "mnop", "qrst", "efgh", "uvwx", "ijkl"]


def _sharegpt(n: int, system: bool = True) -> list[dict]:
    head = [{"from": "system", "value": "be brief"}] if system else []
    return [
        {
            "conversations": [
                *head,
                {"from": "human", "value": f"reverse: {WORDS[i % 8]}"},
                {"from": "gpt", "value": WORDS[i % 8][::-1]},
            ],
            "n": i,
        }
        for i in range(n)
    ]


def _alpaca(n: int) -> list[dict]:
    return [
        {"instruction": "reverse", "input": WORDS[i % 8], "output": WORDS[i % 8][::-1], "n": 10000 + i}
        for i in range(n)
    ]


def _chat_parquet(path, n: int):
    rows = [{"chat": r["messages"], "n": 20000 + i} for i, r in enumerate(chat_rows(n))]
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def three_sources(tmp_path, n: int = 400, parquet: bool = True) -> list[dict]:
    """A ShareGPT JSONL, an Alpaca JSON (one array) and a messages Parquet whose column is `chat`
    (`parquet=False`: JSON Lines; a streamed mixture holding a Parquet source sleeps 5 s whenever its
    reader stops, datasets' guard against an Arrow shutdown crash, SLEEP_TIME_ON_THREADS_SHUTDOWN)."""
    sharegpt = write_jsonl(tmp_path / "sg.jsonl", _sharegpt(n))
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps(_alpaca(n)))
    if parquet:
        chat = _chat_parquet(tmp_path / "chat.parquet", n)
    else:
        rows = [{"chat": r["messages"], "n": 20000 + i} for i, r in enumerate(chat_rows(n))]
        chat = write_jsonl(tmp_path / "chat.jsonl", rows)
    return [
        {"path": str(sharegpt), "weight": 0.5},
        {"path": str(alpaca), "weight": 0.3},
        {"path": str(chat), "weight": 0.2, "columns": {"messages": "chat"}},
    ]


def _sources(specs: list[dict], key: str = "data.train") -> list[mixture.Source]:
    return [
        mixture.Source(
            s["path"],
            f"{key}.{i}",
            weight=s.get("weight"),
            columns=s.get("columns", {}),
            format=s.get("format", "auto"),
        )
        for i, s in enumerate(specs)
    ]


# ------------------------------------------------------------------------------------ conversions


def test_alpaca_conversion_keeps_system_and_appends_input():
    row = {"instruction": "Translate", "input": "chat", "output": "cat", "system": "You translate."}
    assert formats.alpaca_messages(row) == [
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "Translate\n\nchat"},
        {"role": "assistant", "content": "cat"},
    ]
    # No input, no system: one user turn of the instruction alone.
    assert formats.alpaca_messages({"instruction": "Hi", "input": "", "output": "Hello"}) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_sharegpt_roles_and_system_column():
    row = {
        "system": "sys",
        "conversations": [
            {"from": "human", "value": "a"},
            {"from": "gpt", "value": "b"},
            {"from": "user", "value": "c"},
            {"from": "assistant", "value": "d"},
        ],
    }
    assert [(m["role"], m["content"]) for m in formats.sharegpt_messages(row, "x")] == [
        ("system", "sys"),
        ("user", "a"),
        ("assistant", "b"),
        ("user", "c"),
        ("assistant", "d"),
    ]


def test_auto_detects_formats():
    assert formats.detect(["conversations", "id"]) == "sharegpt"
    assert formats.detect(["instruction", "input", "output"]) == "alpaca"
    assert formats.detect(["messages", "conversations"]) == "messages"
    assert formats.detect(["chosen", "rejected", "prompt"]) == "preference"
    assert formats.detect(["prompt", "completion", "label"]) == "kto"
    assert formats.detect(["prompt", "completion"]) == "prompt_completion"
    assert formats.detect(["text"]) == "text"
    assert formats.detect(["question", "answer"]) is None


def test_sharegpt_labels_equal_messages_labels(tmp_path):
    """A converted ShareGPT row trains exactly the tokens of the same conversation written as messages."""
    from finetune.model.load import load_tokenizer, resolve_source

    rows = _sharegpt(3)
    as_messages = [
        {
            "messages": [
                {"role": formats.SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in r["conversations"]
            ]
        }
        for r in rows
    ]
    sg = write_jsonl(tmp_path / "sg.jsonl", rows)
    msgs = write_jsonl(tmp_path / "m.jsonl", as_messages)
    tokenizer = load_tokenizer(resolve_source("tiny", None))
    args = SFTConfig(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True)
    prepared = []
    for path in (sg, msgs):
        got = mixture.read(
            _sources([{"path": str(path)}]),
            key="k",
            seed=0,
            shape=lambda r, k, s: data.sft_format(r, key=k, source=s),
        )
        prepared.append(data.tokenize_like_trainer(got.rows, tokenizer=tokenizer, args=args, split="train"))
    assert prepared[0]["labels"] == prepared[1]["labels"]
    assert prepared[0]["input_ids"] == prepared[1]["input_ids"]
    assert any(t != -100 for t in prepared[0]["labels"][0])  # the answer is trained, not all masked


# ---------------------------------------------------------------------------------------- mixing


def test_shares_realized_and_seeded_order(tmp_path):
    specs = three_sources(tmp_path, n=1200)

    def read(seed):
        return mixture.read(_sources(specs), key="data.train", seed=seed)

    got = read(7)
    rows = got.rows
    assert len(rows) == 2400 and got.rows.column_names == ["n", "messages"]
    origin = Counter(n // 10000 for n in rows["n"])  # 0: ShareGPT, 1: Alpaca, 2: Parquet
    for i, weight in enumerate((0.5, 0.3, 0.2)):
        assert abs(origin[i] / len(rows) - weight) <= 0.01
        assert got.parts[i].share == pytest.approx(origin[i] / len(rows))
    assert [p.format for p in got.parts] == ["sharegpt (auto)", "alpaca (auto)", "messages (auto)"]
    assert [(p.read, p.kept, p.cut) for p in got.parts] == [
        (1200, 1200, 0),
        (1200, 720, 480),
        (1200, 480, 720),
    ]
    assert read(7).rows["n"] == rows["n"]  # same seed, same rows in the same order
    assert read(8).rows["n"] != rows["n"]
    assert len(set(rows["n"])) == len(rows)  # shares without a row repeated


def test_row_counts_repeat_a_small_source(tmp_path):
    specs = three_sources(tmp_path, n=10)
    specs[0]["weight"], specs[1]["weight"], specs[2]["weight"] = 25, 4, 2
    got = mixture.read(_sources(specs), key="data.train", seed=1)
    origin = Counter(n // 10000 for n in got.rows["n"])
    assert origin == {0: 25, 1: 4, 2: 2}
    # 25 rows of 10: every row twice or three times.
    assert set(Counter(n for n in got.rows["n"] if n < 10000).values()) == {2, 3}
    assert any("repeated" in note for note in got.notes)
    capped = mixture.read(_sources(specs), key="data.train", seed=1, max_samples=10)
    assert len(capped.rows) == 10 and sum(p.kept for p in capped.parts) == 10


def test_no_weights_takes_every_row_shuffled(tmp_path):
    specs = [{k: v for k, v in s.items() if k != "weight"} for s in three_sources(tmp_path, n=20)]
    got = mixture.read(_sources(specs), key="data.train", seed=1)
    assert sorted(got.rows["n"]) == [*range(20), *range(10000, 10020), *range(20000, 20020)]
    assert got.rows["n"] != sorted(got.rows["n"])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ((0.5, 0.3, None), r"data.train.2.weight: give every source of data.train a weight, or none"),
        ((0.5, 0.3, 0.1), r"data.train: the weights are shares .* add up to 0.9; or give row counts"),
        ((0.5, 0.5, 20), r"data.train: weights mix shares \(≤ 1\) and row counts"),
        ((10, 10, 2.5), r"data.train.2.weight: 2.5 is a row count .* not a whole number"),
    ],
)
def test_weight_errors(tmp_path, weights, message):
    specs = three_sources(tmp_path, n=5)
    for s, w in zip(specs, weights, strict=True):
        s["weight"] = w
    with pytest.raises(UserError, match=message):
        mixture.read(_sources(specs), key="data.train", seed=0)


def test_mixture_of_preference_formats_for_kto(tmp_path):
    """Pairs (one source's columns renamed) and KTO rows join once each is shaped as KTO reads it."""
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"q": f"say {w}", "good": w, "bad": w[::-1]} for w in WORDS],
    )
    kto = write_jsonl(
        tmp_path / "kto.jsonl",
        [{"prompt": f"say {w}", "completion": w, "label": i % 2 == 0} for i, w in enumerate(WORDS)],
    )
    specs = [
        {
            "path": str(pairs),
            "columns": {"prompt": "q", "chosen": "good", "rejected": "bad"},
            "format": "preference",
        },
        {"path": str(kto), "format": "kto"},
    ]
    got = mixture.read(
        _sources(specs), key="data.train", seed=0, shape=lambda r, k, s: preferences.kto_rows(r, key=k)
    )
    assert sorted(got.rows.column_names) == ["completion", "label", "prompt"]
    assert len(got.rows) == 2 * len(WORDS) + len(WORDS)
    assert [p.format for p in got.parts] == ["preference", "kto"]


def test_format_named_needs_its_columns(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(
        UserError,
        match=r"data.train.0.format: alpaca needs columns instruction, output, which .*q.jsonl lacks",
    ):
        mixture.read(_sources([{"path": str(path), "format": "alpaca"}]), key="data.train", seed=0)
    got = mixture.read(
        _sources(
            [
                {
                    "path": str(path),
                    "format": "alpaca",
                    "columns": {"instruction": "question", "output": "answer"},
                }
            ]
        ),
        key="data.train",
        seed=0,
    )
    assert got.rows["messages"] == [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]


# ------------------------------------------------------------------------------------ recipes and CLI


def _recipe(tmp_path, train, **data_keys):
    d = base_recipe(tmp_path)
    d["stages"]["sft"]["data"] = {"train": train, **data_keys}
    return write_recipe(tmp_path / "r.yaml", d)


def test_validate_prints_sources_and_shares(capsys, tmp_path):
    path = _recipe(tmp_path, three_sources(tmp_path, n=400))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "800 training rows" in out and "mixture of 3 sources (seed 1)" in out
    lines = [
        line.split() for line in out.splitlines() if line.strip().endswith((".jsonl", ".json", ".parquet"))
    ]
    assert [line[:5] for line in lines] == [
        ["400", "400", "0", "0.5", "50.0%"],
        ["400", "240", "160", "0.3", "30.0%"],
        ["400", "160", "240", "0.2", "20.0%"],
    ]
    assert [line[5] for line in lines] == ["sharegpt", "alpaca", "messages"]


def test_data_list_shorthand_and_relative_paths(tmp_path):
    (tmp_path / "recipes").mkdir()
    write_jsonl(tmp_path / "recipes" / "sg.jsonl", _sharegpt(6))
    d = base_recipe(tmp_path)
    d["stages"]["sft"]["data"] = [{"path": "sg.jsonl"}]
    r = recipe.load(write_recipe(tmp_path / "recipes" / "r.yaml", d))
    assert r.stages["sft"].data.train[0].path == str(tmp_path / "recipes" / "sg.jsonl")
    report = pipeline.plan(r).inputs["sft"].report[0]
    assert report.rows == 6 and report.info == ["format: sharegpt (auto)"]


def test_single_path_format_and_columns(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"q": r["instruction"], "a": r["output"]} for r in _alpaca(5)])
    plan = pipeline.plan(
        recipe.load(
            _recipe(tmp_path, str(path), format="alpaca", columns={"instruction": "q", "output": "a"})
        )
    )
    assert plan.inputs["sft"].train["completion"][0] == [{"role": "assistant", "content": "dcba"}]


def _bad(capsys, tmp_path, train, **data_keys) -> str:
    return fails(capsys, tmp_path, ["run", str(_recipe(tmp_path, train, **data_keys))])


def test_bad_weight(capsys, tmp_path):
    specs = three_sources(tmp_path, n=5)
    specs[1]["weight"] = 0
    line = _bad(capsys, tmp_path, specs)
    assert "`stages.sft.data.train.1.weight`: Input should be greater than 0, got 0" in line
    specs[1]["weight"] = -0.3
    assert "train.1.weight" in _bad(capsys, tmp_path, specs)


def test_bad_column_mapping(capsys, tmp_path):
    specs = three_sources(tmp_path, n=5)
    specs[2]["columns"] = {"messages": "dialogue"}
    line = _bad(capsys, tmp_path, specs)
    assert line.startswith("error: stages.sft.data.train.2.columns.messages: no column `dialogue` in ")
    assert line.endswith("chat.parquet (its columns: chat, n)")


def test_unknown_sharegpt_role(capsys, tmp_path):
    rows = _sharegpt(4, system=False)
    rows[2]["conversations"][1]["from"] = "bot"
    path = write_jsonl(tmp_path / "sg.jsonl", rows)
    line = _bad(capsys, tmp_path, str(path))
    assert line == (
        f"error: stages.sft.data.train: {path}: row 3: `conversations` item 2: unknown ShareGPT role 'bot' "
        "(known: human, user, gpt, assistant, system); fix the row or drop it"
    )


def test_streaming_needs_max_steps(capsys, tmp_path):
    d = base_recipe(tmp_path)
    d["stages"]["sft"]["data"]["streaming"] = True
    d["stages"]["sft"]["train"]["max_steps"] = -1
    line = fails(capsys, tmp_path, ["run", str(write_recipe(tmp_path / "r.yaml", d))])
    assert line.startswith("error: stages.sft.train.max_steps: streamed data (stages.sft.data.streaming) ")


def test_streaming_refused_by_stages_that_read_rows_whole(capsys, tmp_path):
    d = base_recipe(tmp_path)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"chosen": "a", "rejected": "b"}] * 4)
    d["stages"]["sft"] = {
        "type": "reward",
        "data": {"train": str(pairs), "streaming": True},
        "train": {"max_steps": 1},
    }
    line = fails(capsys, tmp_path, ["validate", str(write_recipe(tmp_path / "r.yaml", d))])
    assert line.startswith("error: stages.sft.data.streaming: this stage type reads its rows whole")


# ------------------------------------------------------------------------------------------ streaming


def test_streamed_mixture_is_an_iterable_in_shares(tmp_path):
    specs = three_sources(tmp_path, n=300, parquet=False)
    shape = lambda r, k, s: data.sft_format(r, key=k, source=s)  # noqa: E731
    got = mixture.read(_sources(specs), key="data.train", seed=3, streaming=True, shape=shape)
    assert isinstance(got.rows, datasets.IterableDataset)
    assert got.sample is not None and got.sample.column_names == ["prompt", "completion"]
    first = [r["n"] for r in got.rows.take(300)]
    again = mixture.read(_sources(specs), key="data.train", seed=3, streaming=True, shape=shape)
    assert [r["n"] for r in again.rows.take(300)] == first  # same seed, same order
    origin = Counter(n // 10000 for n in first)
    assert origin[0] > origin[1] > origin[2] > 0  # drawn with the shares as probabilities


def test_streamed_sources_are_checked_on_their_first_rows(tmp_path):
    rows = _sharegpt(4, system=False)
    rows[1]["conversations"][0]["from"] = "robot"
    path = write_jsonl(tmp_path / "sg.jsonl", rows)
    with pytest.raises(UserError, match=r"row 2: `conversations` item 1: unknown ShareGPT role 'robot'"):
        mixture.read(_sources([{"path": str(path)}]), key="data.train", seed=0, streaming=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n[1]\n')
    with pytest.raises(UserError, match=r"bad.jsonl: line 2: a JSON list of numbers, not an object"):
        mixture.read(_sources([{"path": str(bad)}]), key="data.train", seed=0, streaming=True)


@pytest.mark.long
def test_sft_trains_on_a_three_source_mixture_and_a_stream(tmp_path):
    """A tiny SFT stage on the three-source mixture, then on the same mixture streamed."""
    for streaming in (False, True):
        specs = three_sources(tmp_path / str(streaming), n=40, parquet=not streaming)
        d = base_recipe(tmp_path)
        d["output_dir"] = str(tmp_path / f"run-{streaming}")
        d["stages"]["sft"]["data"] = {"train": specs, "streaming": streaming}
        d["stages"]["sft"]["train"].update(max_steps=2, learning_rate=5e-3)
        summary = pipeline.run(recipe.load(write_recipe(tmp_path / f"r{streaming}.yaml", d)))["sft"]
        assert summary["train"]["steps"] == 2
        metrics = [
            json.loads(x)
            for x in (tmp_path / f"run-{streaming}" / "sft" / "metrics.jsonl").read_text().splitlines()
        ]
        assert any("loss" in m for m in metrics)
        saved = yaml.safe_load((tmp_path / f"run-{streaming}" / "recipe.yaml").read_text())
        assert saved["stages"]["sft"]["data"]["train"][2]["columns"] == {"messages": "chat"}


# ------------------------------------------------------------------------------ every stage that trains


def _stage_sources(tmp_path, stage_type: str) -> list[dict]:
    """Two sources in the shape `stage_type` reads, the second under other column names."""
    if stage_type in ("dpo", "reward", "orpo"):
        rows = [{"prompt": f"say {w}", "chosen": w, "rejected": w[::-1]} for w in WORDS]
        renamed = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows]
        columns = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    elif stage_type == "kto":
        rows = [{"prompt": f"say {w}", "chosen": w, "rejected": w[::-1]} for w in WORDS]
        renamed = [{"q": r["prompt"], "a": r["chosen"], "ok": i % 2 == 0} for i, r in enumerate(rows)]
        columns = {"prompt": "q", "completion": "a", "label": "ok"}
    elif stage_type == "classify":
        rows = [{"text": w, "label": ["a", "b"][i % 2]} for i, w in enumerate(WORDS)]
        renamed = [{"sentence": r["text"], "label": r["label"]} for r in rows]
        columns = {"text": "sentence"}
    else:  # grpo: conversations whose last turn is the reference answer
        rows = _alpaca(8)
        renamed = [{"conversations": r["conversations"]} for r in _sharegpt(8, system=False)]
        columns = {}
    first = write_jsonl(tmp_path / "first.jsonl", rows)
    second = write_jsonl(tmp_path / "second.jsonl", renamed)
    return [{"path": str(first), "weight": 0.5}, {"path": str(second), "weight": 0.5, "columns": columns}]


@pytest.mark.parametrize("stage_type", ["dpo", "kto", "orpo", "reward", "classify", "grpo"])
def test_every_training_stage_reads_a_mixture(tmp_path, stage_type):
    stage: dict = {
        "type": stage_type,
        "data": _stage_sources(tmp_path, stage_type),
        "train": {"max_steps": 1},
    }
    if stage_type == "grpo":
        stage["rewards"] = [{"name": "similarity"}]
        stage["train"].update(num_generations=2, per_device_train_batch_size=2)
    d = {
        "name": "t",
        "output_dir": str(tmp_path / "run"),
        "seed": 1,
        "model": {"preset": "tiny", "dtype": "float32"},
    }
    d["stages"] = {"s": stage}
    plan = pipeline.plan(recipe.load(write_recipe(tmp_path / "r.yaml", d)))
    inputs = plan.inputs["s"]
    report = inputs.report[0]
    assert report.source == "mixture of 2 sources (seed 1)"
    # Rows as the stage reads them: KTO reads each pair as two rows, and the shares keep 8 of the 16.
    first = 16 if stage_type == "kto" else 8
    assert [(p.read, p.kept, p.cut) for p in report.parts] == [(first, 8, first - 8), (8, 8, 0)]
    if stage_type == "classify":
        assert inputs.names == ["a", "b"] and len(inputs.train_split.items) == 16
        return
    rows = inputs.train
    assert len(rows) == 16
    if stage_type == "grpo":
        assert [p.format for p in report.parts] == ["alpaca (auto)", "sharegpt (auto)"]
        assert all(p[-1]["role"] == "user" for p in rows["prompt"])


def test_data_level_format_needs_one_path(capsys, tmp_path):
    line = _bad(capsys, tmp_path, three_sources(tmp_path, n=5), format="alpaca")
    assert line.endswith(
        "`stages.sft.data`: `format` applies to a train or eval given as one path; set it on each source"
    )


def test_eval_takes_sources_too(tmp_path):
    specs = three_sources(tmp_path, n=10)
    evaluation = [{k: v for k, v in s.items() if k != "weight"} for s in specs[1:]]
    plan = pipeline.plan(recipe.load(_recipe(tmp_path, specs[0]["path"], eval=evaluation)))
    report = next(r for r in plan.inputs["sft"].report if r.split == "eval")
    assert [p.format for p in report.parts] == ["alpaca (auto)", "messages (auto)"]
    assert len(plan.inputs["sft"].eval) == 20 and report.kept == 20
