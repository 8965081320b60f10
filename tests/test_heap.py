"""The training heap is frozen after the first step (finetune.heap) and thawed when training ends."""

from __future__ import annotations

import gc

import pytest
from conftest import base_recipe, write_recipe
from transformers import TrainerCallback

from finetune import heap, pipeline, recipe
from finetune.stages import common


def test_the_callback_freezes_once_after_the_first_step_and_thaws_at_the_end():
    assert gc.get_freeze_count() == 0
    callback = heap.FreezeHeapAfterFirstStep()
    kept = [object() for _ in range(10)]  # alive now: frozen with the rest
    try:
        callback.on_step_end(None, None, None)
        frozen = gc.get_freeze_count()
        assert frozen >= len(kept)
        fresh = [[] for _ in range(1000)]  # alive after the first step: a second freeze would take them
        callback.on_step_end(None, None, None)  # later steps freeze nothing more
        # (a frozen object freed by its reference count leaves the frozen generation: the count may drop)
        assert gc.get_freeze_count() <= frozen, len(fresh)
    finally:
        callback.on_train_end(None, None, None)
    assert gc.get_freeze_count() == 0


class FreezeProbe(TrainerCallback):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.seen.append(gc.get_freeze_count())


@pytest.mark.parametrize("fail", [False, True])
def test_a_stage_trains_on_a_frozen_heap_from_its_second_step_and_leaves_it_thawed(
    tmp_path, monkeypatch, fail
):
    probe = FreezeProbe()
    stage_callbacks = common.callbacks
    monkeypatch.setattr(common, "callbacks", lambda *a: [*stage_callbacks(*a), probe])
    if fail:  # a run that stops with an error never reaches on_train_end: the stage thaws anyway

        def stop(self, *args, **kwargs):
            if len(probe.seen) == 3:
                raise RuntimeError("stopped")

        monkeypatch.setattr(FreezeProbe, "on_step_end", stop)
    r = recipe.load(write_recipe(tmp_path / "r.yaml", base_recipe(tmp_path, max_steps=3)))
    if fail:
        with pytest.raises(RuntimeError, match="stopped"):
            pipeline.run(r)
    else:
        pipeline.run(r)
    assert len(probe.seen) == 3
    # (a frozen object freed by its reference count leaves the frozen generation: the count may drop)
    assert probe.seen[0] == 0 and probe.seen[1] > 0 and probe.seen[2] > 0
    assert gc.get_freeze_count() == 0
