"""Every bad data or trainer input is caught before a run: one line naming the key (and file, row or line),
exit code 2 from `validate` and from `run`, no traceback, and no run folder."""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest
import torch
from conftest import base_recipe, chat_rows, fails, write_jsonl, write_recipe


@dataclass
class Case:
    id: str
    setup: Callable[[Path, dict], None]  # writes the bad input under tmp_path and points the recipe at it
    error: str  # expected substring of the one-line error
    verbs: tuple[str, ...] = ("validate", "run")
    skip: Callable[[], str | None] = lambda: None  # a reason when the case cannot fail on this machine


def _data(**values) -> Callable[[Path, dict], None]:
    def setup(tmp: Path, recipe: dict) -> None:
        recipe["stages"]["sft"]["data"].update(values)

    return setup


def _train(**values) -> Callable[[Path, dict], None]:
    def setup(tmp: Path, recipe: dict) -> None:
        recipe["stages"]["sft"]["train"].update(values)

    return setup


def _file(name: str, text: str, key: str = "train", **more) -> Callable[[Path, dict], None]:
    """A data file with `text`; `key` is train, eval or heldout."""

    def setup(tmp: Path, recipe: dict) -> None:
        path = tmp / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        stage = recipe["stages"]["sft"]
        if key == "heldout":
            stage["heldout"] = {"data": str(path)}
        else:
            stage["data"][key] = str(path)
        stage["train"].update(more)

    return setup


def _lines(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _chat(user: str = "reverse: abcd", answer: str = "dcba") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def _csv(rows: list[list[str]]) -> str:
    import io

    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue()


def _folder(tmp: Path, recipe: dict) -> None:
    folder = tmp / "data" / "notes"
    folder.mkdir(parents=True)
    (folder / "notes.md").write_text("not data")
    recipe["stages"]["sft"]["data"]["train"] = str(folder)


def _saved_dict(tmp: Path, recipe: dict) -> None:
    folder = tmp / "data" / "saved"
    rows = datasets.Dataset.from_list(chat_rows(4))
    datasets.DatasetDict({"train": rows}).save_to_disk(str(folder))
    recipe["stages"]["sft"]["data"].update(train=str(folder), train_split="validation")


def _configs_folder(tmp: Path, recipe: dict) -> None:
    repo = tmp / "data" / "gsm8k_copy"
    for name in ("main", "socratic"):
        write_jsonl(repo / name / "train.jsonl", chat_rows(2))
    configs = "".join(
        f"- config_name: {n}\n  data_files:\n  - split: train\n    path: {n}/train.jsonl\n"
        for n in ("main", "socratic")
    )
    (repo / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    recipe["stages"]["sft"]["data"]["train"] = str(repo)


def _long_prompts(key: str = "train", **train) -> Callable[[Path, dict], None]:
    """GSM8K-like rows: prompts far longer than max_length, so truncation leaves no answer token."""
    question = "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many? "

    def setup(tmp: Path, recipe: dict) -> None:
        path = write_jsonl(tmp / "data" / f"{key}_long.jsonl", [_chat(question, "72") for _ in range(20)])
        recipe["stages"]["sft"]["data"][key] = str(path)
        recipe["stages"]["sft"]["train"].update(max_length=64, **train)

    return setup


def _installed(module: str) -> Callable[[], str | None]:
    return lambda: f"{module} is installed here" if importlib.util.find_spec(module) else None


def _saved_arrow_junk(tmp: Path, recipe: dict) -> None:
    path = tmp / "data" / "rows.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not an arrow stream")
    recipe["stages"]["sft"]["data"]["train"] = str(path)


CASES = [
    # max_length that drops every row (the trainer would fail on an empty dataset after creating the run)
    Case(
        "max_length_drops_all",
        _long_prompts(),
        "stages.sft.train.max_length: 64 drops every row of stages.sft.data.train",
    ),
    Case(
        "max_length_drops_all_eval",
        _long_prompts("eval", eval_strategy="steps"),
        "stages.sft.train.max_length: 64 drops every row of stages.sft.data.eval",
    ),
    # trainer settings that TRL's config accepts and the trainer refuses
    Case(
        "eval_strategy_without_eval", _train(eval_strategy="steps"), "stages.sft.train.eval_strategy: 'steps'"
    ),
    Case("eval_on_start_without_eval", _train(eval_on_start=True), "stages.sft.train.eval_on_start"),
    Case(
        "report_to_tensorboard_missing",
        _train(report_to="tensorboard"),
        "stages.sft.train.report_to: 'tensorboard' is not installed",
        skip=_installed("tensorboard"),
    ),
    Case(
        "report_to_wandb_missing",
        _train(report_to=["wandb"]),
        "stages.sft.train.report_to: 'wandb' is not installed",
        skip=_installed("wandb"),
    ),
    Case(
        "report_to_unknown",
        _train(report_to="nonsense"),
        "stages.sft.train.report_to: unknown integration 'nonsense'",
    ),
    Case(
        "bf16_on_cpu_float32_model",
        _train(bf16=True, use_cpu=True),
        "stages.sft.train.bf16: bf16 autocast on the CPU (use_cpu: true) fails on a model.dtype float32",
    ),
    Case(
        "bf16_without_gpu",
        _train(bf16=True),
        "stages.sft.train.bf16: bf16 needs a CUDA GPU",
        skip=lambda: (
            "a GPU is here" if torch.cuda.is_available() or torch.backends.mps.is_available() else None
        ),
    ),
    # local paths: folders, Arrow files, unsupported files
    Case("folder_not_a_dataset", _folder, "stages.sft.data.train: "),
    Case(
        "folder_not_a_dataset_says_what",
        _folder,
        "is a folder, but neither a dataset written by `Dataset.save_to_disk`",
    ),
    Case(
        "saved_dict_missing_split",
        _saved_dict,
        "has no split 'validation' (`stages.sft.data.train_split`); its splits: train",
    ),
    Case("arrow_not_arrow", _saved_arrow_junk, "stages.sft.data.train: cannot read"),
    Case("unsupported_suffix", _file("rows.tsv", "a\tb\n"), "unsupported file type '.tsv'"),
    Case(
        "missing_file",
        _data(train="/no/such/dir/rows.jsonl"),
        "stages.sft.data.train: data file not found: /no/such/dir/rows.jsonl",
    ),
    Case("empty_txt", _file("empty.txt", ""), "stages.sft.data.train: dataset is empty"),
    # Hub configs (a local copy of a Hub dataset repository with two configs)
    Case("config_missing", _configs_folder, "Config name is missing"),
    Case(
        "config_unknown",
        lambda t, r: (_configs_folder(t, r), r["stages"]["sft"]["data"].update(config="nope")),
        "'nope' not found",
    ),
    Case(
        "hub_dataset_unreachable",
        _data(train="no-such-org/no-such-data", config="main"),
        "stages.sft.data.train: cannot load Hub dataset 'no-such-org/no-such-data' (config 'main'",
        verbs=("run",),  # validate accepts Hub names without the network
    ),
    # malformed rows: `messages`
    Case(
        "csv_messages_not_json",
        _file("chat.csv", _csv([["messages"], [json.dumps(_chat()["messages"])], ["hello there"]])),
        "chat.csv: row 2: `messages` is a string that is not a JSON list of messages",
    ),
    Case(
        "messages_string",
        _file("s.jsonl", _lines({"messages": "hi"}, {"messages": "there"})),
        "row 1: `messages` is a string",
    ),
    Case(
        "messages_string_in_one_row",
        _file("mixed.jsonl", _lines(_chat(), _chat(), {"messages": "hi"})),
        "mixed.jsonl: row 3: `messages` is a string",
    ),
    Case(
        "messages_int",
        _file("i.jsonl", _lines({"messages": 1}, {"messages": 2})),
        "row 1: `messages` must be a list of {role, content} messages, got a number",
    ),
    Case(
        "messages_list_of_strings",
        _file("l.jsonl", _lines({"messages": ["hi", "there"]})),
        "`messages` item 1 is a string 'hi', not a {role, content} message",
    ),
    Case(
        "messages_no_role",
        _file(
            "r.jsonl",
            _lines(_chat(), {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}),
        ),
        "row 2: `messages` item 1 has no `role`",
    ),
    Case(
        "messages_empty",
        _file("e.jsonl", _lines(_chat(), {"messages": []})),
        "row 2: `messages` is empty",
    ),
    Case(
        "messages_end_with_user",
        _file("u.jsonl", _lines({"messages": [{"role": "user", "content": "hi"}]})),
        "row 1: `messages` must end with an assistant turn (the last is 'user')",
    ),
    Case(
        "row_numbers_skip_blank_lines",
        _file("b.jsonl", _lines(_chat(), "", _chat(), {"messages": [{"role": "user", "content": "x"}]})),
        "row 3 (line 4): `messages` must end with an assistant turn",
    ),
    # roles and contents the chat template cannot render, answers it renders as nothing
    Case(
        "role_robot",
        _file(
            "robot.jsonl",
            _lines(
                _chat(),
                _chat(),
                {"messages": [{"role": "robot", "content": "beep"}, *_chat()["messages"]]},
            ),
        ),
        "robot.jsonl: row 3: role 'robot' is not one the chat template renders "
        "(it renders: system, user, assistant)",
    ),
    Case(
        "role_robot_heldout",
        _file(
            "h.jsonl",
            _lines({"messages": [{"role": "robot", "content": "x"}, *_chat()["messages"]]}),
            key="heldout",
        ),
        "data/h.jsonl: row 1: role 'robot' is not one the chat template renders",
    ),
    Case(
        "content_number_in_one_row",
        _file("n.jsonl", _lines(_chat(), _chat("reverse: wxyz", 5), _chat())),
        "n.jsonl: row 2: `messages` item 2 (assistant): `content` is a number 5, not text",
    ),
    Case(
        "content_multimodal",
        _file(
            "mm.jsonl",
            _lines(
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                        _chat()["messages"][1],
                    ]
                }
            ),
        ),
        "mm.jsonl: row 1: `messages` item 1 (user): `content` is a list of objects: multimodal content "
        "(a list of parts) is not supported; give the text as a string",
    ),
    Case(
        "content_number_prompt_completion",
        _file(
            "pcn.jsonl",
            _lines(
                {
                    "prompt": [{"role": "user", "content": 1}],
                    "completion": [{"role": "assistant", "content": "x"}],
                }
            ),
        ),
        "pcn.jsonl: row 1: `prompt` item 1 (user): `content` is a number 1, not text",
    ),
    Case(
        "every_content_empty",
        _file("empty.jsonl", _lines(_chat("", ""), _chat("", ""), _chat("", ""))),
        "empty.jsonl: the assistant turn of every row (1 to 3) is empty after the chat template; "
        "training would learn nothing but end-of-turn tokens",
    ),
    Case(
        "every_completion_blank",
        _file("blank.jsonl", _lines({"prompt": "a", "completion": " "}, {"prompt": "b", "completion": "\n"})),
        "blank.jsonl: the assistant turn of every row (1 to 2) is empty after the chat template",
    ),
    # malformed files: JSON Lines with a bad line (datasets' reader names none)
    Case(
        "jsonl_bad_line",
        _file("bad.jsonl", _lines(_chat(), _chat(), '{"messages": [oops]}', _chat())),
        "bad.jsonl: line 3: not valid JSON",
    ),
    Case(
        "jsonl_line_not_object",
        _file("arr.jsonl", _lines(_chat(), [1, 2])),
        "arr.jsonl: line 2: a JSON list of numbers, not an object",
    ),
    Case(
        "json_array_bad",
        _file("bad.json", '[\n{"text": "a"},\n{"text": }\n]\n'),
        "bad.json: line 3: not valid JSON",
    ),
    Case(
        "eval_jsonl_bad_line",
        _file("ev.jsonl", _lines(_chat(), "{nope"), key="eval"),
        "stages.sft.data.eval: ",
    ),
    Case(
        "heldout_jsonl_bad_line",
        _file("h.jsonl", _lines("{nope"), key="heldout"),
        "stages.sft.heldout.data: ",
    ),
    # other columns
    Case(
        "prompt_string_completion_list",
        _file("pc.jsonl", _lines({"prompt": "hi", "completion": [{"role": "assistant", "content": "x"}]})),
        "row 1: `prompt` and `completion` must both be strings or both message lists",
    ),
    Case(
        "text_number",
        _file("t.jsonl", _lines({"text": "a"}, {"text": 5})),
        "row 2: `text` is a number, not a string",
    ),
    Case("text_empty", _file("t.jsonl", _lines({"text": "a"}, {"text": ""})), "row 2: `text` is empty"),
    Case(
        "no_usable_columns",
        _file("q.jsonl", _lines({"question": "q", "answer": "a"})),
        "needs a `messages` column",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, case):
    reason = case.skip()
    if reason:
        pytest.skip(reason)
    recipe = base_recipe(tmp_path)
    case.setup(tmp_path, recipe)
    path = str(write_recipe(tmp_path / "r.yaml", recipe))
    for verb in case.verbs:
        message = fails(capsys, tmp_path, [verb, path])
        assert case.error in message, f"{verb}: {message}"
        assert "stages.sft." in message, f"{verb}: the error names no key: {message}"
