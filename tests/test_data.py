"""Data loading (files, folders, Hub configs), row checks, and the validate report matching TRL's trainer."""

from __future__ import annotations

import csv
import json

import datasets
import pytest
from conftest import base_recipe, chat_rows, write_jsonl, write_recipe
from trl import SFTTrainer

from finetune import data, pipeline, recipe
from finetune.cli import main
from finetune.errors import UserError


def _plan(tmp_path, mutate=None, **train):
    d = base_recipe(tmp_path, **train)
    if mutate is not None:
        mutate(d)
    return pipeline.plan(recipe.load(write_recipe(tmp_path / "r.yaml", d)))


def _train_report(plan, split="train"):
    return next(r for r in plan.inputs["sft"].report if r.split == split)


def _set_train(spec, **more):
    def mutate(d):
        d["stages"]["sft"]["data"].update(train=str(spec), **more)

    return mutate


# ------------------------------------------------------------------------------------------ loaders


def test_is_local():
    for spec in (
        "data/x.jsonl",
        "x.arrow",
        "notes.txt",
        "./saved",
        "/abs/folder",
        "~/d",
        "a/b/c",
        "has space",
    ):
        assert data.is_local(spec), spec
    for spec in ("openai/gsm8k", "HuggingFaceH4/ultrachat_200k", "imdb"):
        assert not data.is_local(spec), spec


def test_save_to_disk_folder(tmp_path):
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(chat_rows(12)).save_to_disk(str(saved))
    plan = _plan(tmp_path, _set_train(saved))
    assert len(plan.inputs["sft"].train) == 12 and _train_report(plan).kept == 12


def test_save_to_disk_dataset_dict_split(tmp_path):
    saved = tmp_path / "saved_dict"
    rows = datasets.Dataset.from_list(chat_rows(12))
    datasets.DatasetDict({"train": rows, "dev": rows.select(range(5))}).save_to_disk(str(saved))
    plan = _plan(tmp_path, _set_train(saved, train_split="dev"))
    assert len(plan.inputs["sft"].train) == 5
    with pytest.raises(
        UserError, match=r"has no split 'test' \(`stages.sft.data.train_split`\); its splits: train, dev"
    ):
        _plan(tmp_path, _set_train(saved, train_split="test"))


@pytest.mark.parametrize("kind", ["folder", "txt", "arrow"])
def test_relative_local_paths_resolve_against_the_recipe(tmp_path, monkeypatch, kind):
    """`train: data/saved` beside the recipe is a local dataset, from any working directory."""
    saved = tmp_path / "recipes" / "data" / "saved"
    datasets.Dataset.from_list(chat_rows(9)).save_to_disk(str(saved))
    (saved.parent / "c.txt").write_text("one\ntwo\n")
    relative = {
        "folder": "data/saved",
        "txt": "data/c.txt",
        "arrow": str(next(saved.glob("*.arrow")).relative_to(saved.parent.parent)),
    }[kind]
    d = base_recipe(tmp_path)
    d["stages"]["sft"]["data"]["train"] = relative
    path = write_recipe(tmp_path / "recipes" / "r.yaml", d)
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    plan = pipeline.plan(recipe.load(path))
    assert len(plan.inputs["sft"].train) == {"folder": 9, "txt": 2, "arrow": 9}[kind]


def test_arrow_file(tmp_path):
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(chat_rows(7)).save_to_disk(str(saved))
    arrow = next(saved.glob("*.arrow"))
    plan = _plan(tmp_path, _set_train(arrow))
    assert len(plan.inputs["sft"].train) == 7


def test_txt_file_gives_text_rows(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("first line\nsecond line\n\n   \nfourth line\n")
    plan = _plan(tmp_path, _set_train(txt))
    train = plan.inputs["sft"].train
    assert train.column_names == ["text"] and train["text"] == ["first line", "second line", "fourth line"]


def test_csv_with_json_string_messages(tmp_path):
    path = tmp_path / "chat.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["messages", "source"])
        for row in chat_rows(6):
            writer.writerow([json.dumps(row["messages"]), "x, y"])
    plan = _plan(tmp_path, _set_train(path))
    train = plan.inputs["sft"].train
    assert train.column_names == ["prompt", "completion"]
    assert train[0]["prompt"] == [{"role": "user", "content": "reverse: abcd"}]
    assert train[0]["completion"] == [{"role": "assistant", "content": "dcba"}]


def _hub_layout_folder(tmp_path):
    """A local copy of a Hub dataset repository with two configs (like openai/gsm8k's main / socratic)."""
    repo = tmp_path / "gsm8k_copy"
    write_jsonl(repo / "main" / "train.jsonl", chat_rows(3))
    write_jsonl(repo / "socratic" / "train.jsonl", chat_rows(5))
    configs = "".join(
        f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {name}/train.jsonl\n"
        for name in ("main", "socratic")
    )
    (repo / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    return repo


def test_config_name_is_passed_to_load_dataset(tmp_path):
    repo = _hub_layout_folder(tmp_path)
    assert len(_plan(tmp_path, _set_train(repo, config="socratic")).inputs["sft"].train) == 5
    assert len(_plan(tmp_path, _set_train(repo, config="main")).inputs["sft"].train) == 3
    with pytest.raises(UserError, match=r"Config name is missing.*set `stages.sft.data.config`"):
        _plan(tmp_path, _set_train(repo))


def test_eval_config_defaults_to_config(tmp_path):
    repo = _hub_layout_folder(tmp_path)
    plan = _plan(tmp_path, _set_train(repo, config="socratic", eval=str(repo), eval_split="train"))
    assert len(plan.inputs["sft"].eval) == 5
    plan = _plan(
        tmp_path, _set_train(repo, config="socratic", eval=str(repo), eval_split="train", eval_config="main")
    )
    assert len(plan.inputs["sft"].eval) == 3


def test_hub_dataset_with_config_offline_is_one_line(tmp_path):
    # validate accepts a Hub name without the network; a run (fetch) names the config it asked for.
    mutate = _set_train("openai/gsm8k", config="main")
    plan = _plan(tmp_path, mutate)
    assert plan.inputs["sft"].train is None and "loaded when a run starts" in _train_report(plan).note
    d = base_recipe(tmp_path)
    mutate(d)
    with pytest.raises(UserError, match=r"cannot load Hub dataset 'openai/gsm8k' \(config 'main'"):
        pipeline.plan(recipe.load(write_recipe(tmp_path / "r.yaml", d)), fetch=True)


def test_folder_of_data_files(tmp_path):
    folder = tmp_path / "files"
    write_jsonl(folder / "train.jsonl", chat_rows(4))
    write_jsonl(folder / "test.jsonl", chat_rows(2))
    plan = _plan(tmp_path, _set_train(folder, eval=str(folder)))
    assert len(plan.inputs["sft"].train) == 4 and len(plan.inputs["sft"].eval) == 2


# ------------------------------------------------------------------ report = what the trainer trains on


def _long_rows(n: int) -> list[dict]:
    """Prompts of very different lengths (6 to ~250 tokens) with short answers."""
    return [
        {
            "messages": [
                {"role": "user", "content": "how many clips? " + "Natalia sold clips. " * (i % 13)},
                {"role": "assistant", "content": f"{i} clips"},
            ]
        }
        for i in range(n)
    ]


def _as(fmt: str, rows: list[dict]) -> list[dict]:
    if fmt == "messages":
        return rows
    if fmt == "prompt_completion":
        return [
            {"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"]} for r in rows
        ]
    return [{"text": r["messages"][0]["content"] + " " + r["messages"][1]["content"]} for r in rows]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("model")
    return _plan(tmp).context.adapted_model()


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion", "text"])
@pytest.mark.parametrize("max_length", [None, 120])
def test_report_matches_trainer_processed_data(tmp_path, model, fmt, max_length):
    path = write_jsonl(tmp_path / "rows.jsonl", _as(fmt, _long_rows(40)))
    plan = _plan(tmp_path, _set_train(path), max_length=max_length)
    inputs, ctx = plan.inputs["sft"], plan.context
    report = _train_report(plan)
    trainer = SFTTrainer(
        model=model, args=inputs.args, train_dataset=inputs.train, processing_class=ctx.tokenizer()
    )
    seen = sorted(len(ids) for ids in trainer.train_dataset["input_ids"])
    assert report.rows == 40 and report.kept == len(seen)
    full = data.tokenize_like_trainer(
        inputs.train, tokenizer=ctx.tokenizer(), args=inputs.args, split="train"
    )
    lengths = sorted(len(ids) for ids in full["input_ids"])
    assert (report.p50, report.p95, report.max) == (
        data.percentile(lengths, 0.5),
        data.percentile(lengths, 0.95),
        lengths[-1],
    )
    if max_length is None:
        assert seen == lengths and report.cut == 0  # the trainer's own tokens, row for row
    else:
        # The trainer keeps the rows with a trainable token within max_length, truncated to it.
        limit = max_length
        expected = sorted(
            min(len(ids), limit)
            for ids, labels in zip(full["input_ids"], full["labels"], strict=True)
            if any(t != -100 for t in labels[:limit])
        )
        assert seen == expected and report.cut > 0
        assert report.kept < 40 if fmt != "text" else report.kept == 40


def test_eval_report_matches_trainer(tmp_path, model):
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    ev = write_jsonl(tmp_path / "eval.jsonl", _long_rows(20))
    plan = _plan(tmp_path, _set_train(train, eval=str(ev)), max_length=120, eval_strategy="steps")
    inputs = plan.inputs["sft"]
    trainer = SFTTrainer(
        model=model,
        args=inputs.args,
        train_dataset=inputs.train,
        eval_dataset=inputs.eval,
        processing_class=plan.context.tokenizer(),
    )
    assert _train_report(plan, "eval").kept == len(trainer.eval_dataset)


def test_validate_prints_the_report(capsys, tmp_path):
    d = base_recipe(tmp_path)
    d["stages"]["sft"]["heldout"] = {"data": d["stages"]["sft"]["data"]["train"], "max_samples": 5}
    d["stages"]["sft"]["data"]["max_samples"] = 10
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", d))]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.split()[:1] == ["split"] and "p95 tok" in line for line in lines)
    train = next(line.split() for line in lines if line.split()[:1] == ["train"])
    heldout = next(line.split() for line in lines if line.split()[:1] == ["heldout"])
    assert train[1:4] == ["10", "10", "0"] and heldout[1:3] == ["5", "5"]
    assert "first 10 of 16 rows (max_samples)" in out


def test_hub_model_skips_token_counts(capsys, tmp_path):
    d = base_recipe(tmp_path)
    d["model"] = {"path": "no-such-org/no-such-model"}
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", d))]) == 0
    out = capsys.readouterr().out
    assert "16 training rows" in out and "token counts skipped" in out


# ---------------------------------------------------------------------------- truncation warning


def _cut_recipe(tmp_path, long_rows: int, total: int = 40) -> str:
    """`long_rows` of `total` rows have a completion longer than max_length 64; none loses every token."""
    rows = chat_rows(total)
    for row in rows[:long_rows]:
        row["messages"][1]["content"] = "x" * 80
    path = write_jsonl(tmp_path / "cut.jsonl", rows)
    d = base_recipe(tmp_path, max_length=64, max_steps=1)
    d["stages"]["sft"]["data"]["train"] = str(path)
    return str(write_recipe(tmp_path / "r.yaml", d))


def test_truncation_warning_above_share(capsys, tmp_path):
    path = _cut_recipe(tmp_path, long_rows=4)  # 10 % > 5 %
    assert main(["validate", path]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "max_length 64 cuts trainable tokens of 4 of 40 rows (10.0%" in warning[0]
    assert "stages.sft.train.max_length=" in warning[0]


def test_truncation_warning_in_run(capsys, tmp_path):
    path = _cut_recipe(tmp_path, long_rows=4)
    assert main(["run", path]) == 0
    err = capsys.readouterr().err
    assert (
        sum(line.startswith("warning: stages.sft.data.train: max_length 64") for line in err.splitlines())
        == 1
    )


def test_no_truncation_warning_below_share(capsys, tmp_path):
    path = _cut_recipe(tmp_path, long_rows=2)  # 5 %: not over
    assert main(["validate", path]) == 0
    captured = capsys.readouterr()
    assert "warning:" not in captured.err
    train = next(line.split() for line in captured.out.splitlines() if line.split()[:1] == ["train"])
    assert train[1:4] == ["40", "40", "2"]


# ----------------------------------------------------------- roles, contents and empty assistant turns

# A template that renders tool turns (after an assistant's tool call), like DeepSeek-V2.5's and Qwen's.
TOOL_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}"
    "{% for call in m.get('tool_calls') or [] %}call {{ call['function']['name'] }}{% endfor %}"
    "{{ eos_token }}{% endgeneration %}"
    "{% elif m['role'] in ['system', 'user'] %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% elif m['role'] == 'tool' %}<|user|>result: {{ m['content'] }}"
    "{% else %}{{ raise_exception('no role ' + m['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# DeepSeek-V2-Chat's template: a role it does not know is dropped without a word.
DEEPSEEK_V2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _tool_rows(n: int) -> list[dict]:
    rows = []
    for row in chat_rows(n):
        user, answer = row["messages"]
        call = {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "reverse", "arguments": {}}}],
        }
        tool = {"role": "tool", "content": answer["content"]}
        rows.append({"messages": [{"role": "system", "content": "Be brief."}, user, call, tool, answer]})
    return rows


def test_system_user_assistant_trains(capsys, tmp_path):
    rows = chat_rows(8)
    for row in rows:
        row["messages"].insert(0, {"role": "system", "content": "Reverse the word."})
    path = write_jsonl(tmp_path / "sys.jsonl", rows)
    d = base_recipe(tmp_path, max_steps=1)
    d["stages"]["sft"]["data"]["train"] = str(path)
    d["routing"] = {"max_share": 1.0, "min_entropy": 0.0}  # the tiny random router's load is no data warning
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", d))]) == 0
    assert "warning" not in capsys.readouterr().err
    assert (tmp_path / "run" / "sft" / "summary.json").is_file()


def test_tool_roles_train_where_the_template_renders_them(capsys, tmp_path):
    path = write_jsonl(tmp_path / "tools.jsonl", _tool_rows(8))
    d = base_recipe(tmp_path, max_steps=1)
    d["stages"]["sft"]["data"]["train"] = str(path)
    # The embedded template has no tool role: refused, naming the roles it has.
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", d))]) == 2
    err = capsys.readouterr().err
    assert f"{path}: row 1: role 'tool' is not one the chat template renders " in err
    assert "(it renders: system, user, assistant)" in err
    # A template with a tool role (`chat_template_path`, as TRL's SFTTrainer reads it) trains on them.
    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    d["stages"]["sft"]["train"]["chat_template_path"] = str(template)
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", d))]) == 0
    assert (tmp_path / "run" / "sft" / "summary.json").is_file()


def test_a_role_the_template_drops_is_refused():
    """DeepSeek-V2-Chat's template renders a `tool` turn as nothing: the check sees that it drops it."""
    from finetune.model.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = DEEPSEEK_V2_TEMPLATE
    assert [r for r in data.KNOWN_ROLES if data.renders_role(tokenizer, r)] == ["system", "user", "assistant"]
    rows = [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]] * 2
    data.check_roles(rows, tokenizer, key="k")
    with pytest.raises(UserError, match=r"^k: row 2: role 'tool' is not one the chat template renders \(it "):
        data.check_roles([rows[0], [*rows[1], {"role": "tool", "content": "c"}]], tokenizer, key="k")


def test_empty_assistant_turns_over_the_share_warn(capsys, tmp_path):
    rows = chat_rows(20)
    for row in rows[:2]:  # 10 % > 5 %
        row["messages"][1]["content"] = ""
    path = write_jsonl(tmp_path / "some_empty.jsonl", rows)
    d = base_recipe(tmp_path)
    d["stages"]["sft"]["data"]["train"] = str(path)
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", d))]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        f"warning: stages.sft.data.train: {path}: rows 1, 2 (2 of 20, 10.0%, over 5%) have an empty "
        "assistant turn after the chat template; they train only end-of-turn tokens"
    ]
    rows[1]["messages"][1]["content"] = "ok"  # 1 of 20: 5 %, not over
    write_jsonl(path, rows)
    assert main(["validate", str(tmp_path / "r.yaml")]) == 0
    assert "warning" not in capsys.readouterr().err
