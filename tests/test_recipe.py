"""The recipe schema: valid recipes load typed; every kind of bad input is a one-line UserError."""

from __future__ import annotations

import pytest
from conftest import REPO, base_recipe, write_recipe

from finetune import recipe
from finetune.errors import UserError


def _load(tmp_path, data, *overrides):
    return recipe.load(write_recipe(tmp_path / "r.yaml", data), overrides)


def _error(tmp_path, data, *overrides) -> str:
    with pytest.raises(UserError) as err:
        _load(tmp_path, data, *overrides)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_valid_recipe_is_typed_with_defaults(tmp_path):
    r = _load(tmp_path, base_recipe(tmp_path))
    assert r.model.preset == "tiny" and r.model.quantization == "nf4"
    assert r.adapter.r == 4 and r.adapter.dropout == 0.0
    assert r.stages["sft"].train["max_steps"] == 2
    args = recipe.train_arguments(r.stages["sft"], dtype="float32", cuda=False)
    assert args["report_to"] == "none" and args["bf16"] is False


def test_unknown_key_suggests_nearest(tmp_path):
    data = base_recipe(tmp_path)
    data["stages"]["sft"]["trian"] = {}
    msg = _error(tmp_path, data)
    assert "unknown key `stages.sft.trian`" in msg and "did you mean `train`?" in msg


def test_unknown_top_level_key(tmp_path):
    data = base_recipe(tmp_path)
    data["adaptor"] = {}
    assert "did you mean `adapter`?" in _error(tmp_path, data)


def test_unknown_trainer_argument_suggests(tmp_path):
    data = base_recipe(tmp_path, learning_rat=1e-4)
    msg = _error(tmp_path, data)
    assert "`stages.sft.train.learning_rat`" in msg and "did you mean `learning_rate`?" in msg


def test_wrong_type(tmp_path):
    data = base_recipe(tmp_path)
    data["adapter"]["r"] = "sixteen"
    msg = _error(tmp_path, data)
    assert "`adapter.r`" in msg and "'sixteen'" in msg


def test_wrong_trainer_argument_type(tmp_path):
    msg = _error(tmp_path, base_recipe(tmp_path, learning_rate="fast"))
    assert "`stages.sft.train.learning_rate`" in msg and "'fast'" in msg


def test_trainer_number_written_as_yaml_string_is_coerced(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string; the trainer schema makes it a float.
    r = _load(tmp_path, base_recipe(tmp_path, learning_rate="1e-4"))
    assert r.stages["sft"].train["learning_rate"] == pytest.approx(1e-4)


def test_owned_trainer_key_is_refused(tmp_path):
    msg = _error(tmp_path, base_recipe(tmp_path, output_dir="/tmp/x"))
    assert "`stages.sft.train.output_dir` cannot be set" in msg


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match=r"recipe not found: .*nope\.yaml"):
        recipe.load(tmp_path / "nope.yaml")


def test_model_needs_exactly_one_source(tmp_path):
    data = base_recipe(tmp_path)
    data["model"]["path"] = "/models/x"
    assert "exactly one of `preset`" in _error(tmp_path, data)


def test_extends_merges_and_child_wins(tmp_path):
    base = base_recipe(tmp_path)
    write_recipe(tmp_path / "base.yaml", base)
    child = {"extends": "base.yaml", "name": "child", "stages": {"sft": {"train": {"learning_rate": 0.5}}}}
    r = _load(tmp_path, child)
    assert r.name == "child"
    assert r.stages["sft"].train == {
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "learning_rate": 0.5,
    }


def test_extends_model_path_replaces_preset(tmp_path):
    write_recipe(tmp_path / "base.yaml", base_recipe(tmp_path))
    r = _load(tmp_path, {"extends": "base.yaml", "model": {"path": "org/model"}})
    assert r.model.path == "org/model" and r.model.preset is None
    assert r.model.dtype == "float32"


def test_extends_cycle(tmp_path):
    write_recipe(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write_recipe(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(UserError, match=r"`extends` cycle: a\.yaml → b\.yaml → a\.yaml"):
        recipe.load(tmp_path / "a.yaml")


def test_relative_data_paths_follow_the_recipe_file(tmp_path):
    data = base_recipe(tmp_path)
    data["stages"]["sft"]["data"]["train"] = "../data/train.jsonl"
    r = recipe.load(write_recipe(tmp_path / "sub" / "r.yaml", data))
    assert r.stages["sft"].data.train == str(tmp_path / "data" / "train.jsonl")


def test_overrides_are_typed(tmp_path):
    r = _load(
        tmp_path,
        base_recipe(tmp_path),
        "stages.sft.train.learning_rate=1e-4",
        "adapter.r=8",
        "model.path=org/name",
        "seed=3",
    )
    assert r.stages["sft"].train["learning_rate"] == pytest.approx(1e-4)
    assert r.adapter.r == 8 and r.seed == 3
    assert r.model.path == "org/name" and r.model.preset is None


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("stages.sft.trian.lr=1", "no key `trian` in stages.sft (did you mean `train`?)"),
        ("stages.sfx.train.learning_rate=1", "no stage `sfx` in stages (did you mean `sft`?)"),
        (
            "stages.sft.train.learnin_rate=1",
            "no trainer argument `learnin_rate` (did you mean `learning_rate`?)",
        ),
        ("modle.path=x", "no key `modle` in the recipe (did you mean `model`?)"),
        ("adapter.r.x=1", "`adapter.r` has no sub-keys"),
        ("adapter.r", "expected key=value"),
        ("adapter.experts.scor=gate", "no key `scor` in adapter.experts (did you mean `score`?)"),
    ],
)
def test_bad_override(tmp_path, override, expected):
    assert expected in _error(tmp_path, base_recipe(tmp_path), override)


def test_override_into_a_tagged_union():
    """`adapter.experts` is a union (all, ESFT, ids): a dotted override reaches ESFT's keys, as the tiny
    ESFT recipe's header tells users to do."""
    r = recipe.load(REPO / "recipes" / "tiny" / "esft.yaml", ["adapter.experts.score=gate"])
    assert r.adapter.experts.score == "gate" and r.adapter.experts.threshold == pytest.approx(0.1)


def test_override_type_error(tmp_path):
    assert "`adapter.r`" in _error(tmp_path, base_recipe(tmp_path), "adapter.r=abc")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        recipe.load(path)


def test_yaml_bool_words_follow_the_schema(tmp_path):
    # YAML 1.1 reads `no` as False: a string field gets the word, a bool field the boolean.
    r = _load(tmp_path, base_recipe(tmp_path), "stages.sft.train.eval_strategy=no", "model.double_quant=no")
    assert r.stages["sft"].train["eval_strategy"] == "no" and r.model.double_quant is False


def test_duplicate_key_names_key_and_line(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", base_recipe(tmp_path))
    path.write_text(path.read_text() + "name: again\n")
    with pytest.raises(UserError, match=r"r\.yaml: line \d+: duplicate key `name` \(first at line 1\)"):
        recipe.load(path)


@pytest.mark.parametrize("key", sorted(recipe.TRAIN_BOUNDS))
def test_trainer_bounds_table_names_real_arguments(key):
    assert key in recipe._trainer_fields("sft")
