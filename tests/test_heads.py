"""Model heads as a plain argument: `seq_cls` (DeepseekV2ForSequenceClassification) through loading in
4-bit, the meta skeleton, attach, the router monitor and inspect — what reward and classify stages use."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from finetune.model import adapters, routing
from finetune.model.experts import NF4Experts
from finetune.model.inspect import report
from finetune.model.load import load_model, load_tokenizer, model_skeleton, resolve_source

SOURCE = resolve_source("tiny", None)


def _classifier(num_labels: int = 3, targets=("mla", "routed_experts")):
    pad = load_tokenizer(SOURCE).pad_token_id
    model = load_model(
        SOURCE, quantization="nf4", dtype="float32", head="seq_cls", num_labels=num_labels, pad_token_id=pad
    )
    torch.manual_seed(0)
    return adapters.attach(model, r=4, alpha=8, dropout=0.0, targets=list(targets), head="seq_cls"), pad


def test_seq_cls_head_loads_in_4bit_with_a_score_head():
    model, pad = _classifier()
    inner = model.base_model.model
    assert type(inner).__name__ == "DeepseekV2ForSequenceClassification"
    assert inner.config.num_labels == 3 and inner.config.pad_token_id == pad
    assert isinstance(inner.model.layers[1].self_attn.o_proj.base_layer, bnb.nn.Linear4bit)
    assert (
        isinstance(inner.model.layers[1].mlp.experts, NF4Experts)
        and inner.model.layers[1].mlp.experts.has_lora
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".score.modules_to_save." in n for n in trainable)  # the new head trains in full
    assert not any(".gate." in n for n in trainable)  # the router stays frozen
    skeleton = model_skeleton(SOURCE, head="seq_cls", num_labels=3)
    assert skeleton.score.out_features == 3 and skeleton.score.weight.is_meta


def test_last_real_token_is_pooled_with_left_and_right_padding():
    model, pad = _classifier()
    model.eval()
    ids = torch.tensor([5, 40, 41, 42, 43, 6])
    right = torch.tensor([[*ids.tolist(), pad, pad], [*ids.tolist(), 50, 51]])
    left = torch.tensor([[pad, pad, *ids.tolist()], [*ids.tolist(), 50, 51]])
    with torch.no_grad():
        alone = model(input_ids=ids[None]).logits
        padded_right = model(input_ids=right, attention_mask=(right != pad).long()).logits
        padded_left = model(input_ids=left, attention_mask=(left != pad).long()).logits
    assert padded_right.shape == (2, 3)
    torch.testing.assert_close(padded_right[0], alone[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded_left[0], alone[0], rtol=1e-4, atol=1e-4)


def test_classifier_trains_head_and_adapter_not_the_base():
    model, _ = _classifier()
    monitor = routing.RouterMonitor(model, aux_loss_coef=0.0)  # hooks the classifier, not only causal LMs
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(7, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 1])
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    assert monitor.report()["expert_load/layer1/max_over_mean"] >= 1.0
    monitor.remove()
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n].detach(), v) for n, v in frozen.items())
    changed = {n for n, v in trained.items() if not torch.equal(now[n].detach(), v)}
    assert changed == set(trained)  # every LoRA factor, expert LoRA and the score head moved


@pytest.mark.parametrize("targets", [("mla",), ("mla", "routed_experts")])
def test_inspect_reports_the_score_head(targets):
    model, _ = _classifier(num_labels=2, targets=targets)
    rows = report(model)
    assert rows["score"]["trainable_params"] == 2 * 64  # num_labels x hidden, trained in full
    assert "lm_head" not in rows  # no language-model head, tied or not


def test_classifier_adapter_exports_to_a_plain_classifier(tmp_path):
    """`finetune export` of a SEQ_CLS adapter: the base without lm_head plus the trained `score`, loadable
    by AutoModelForSequenceClassification and computing what the adapted 4-bit model computes."""
    from conftest import base_recipe, write_recipe
    from transformers import AutoModelForSequenceClassification

    from finetune import recipe, rundir
    from finetune.cli import main

    run = tmp_path / "run"
    run.mkdir()
    rundir.write_recipe(recipe.load(write_recipe(tmp_path / "r.yaml", base_recipe(tmp_path))), run)
    model, pad = _classifier()
    with torch.no_grad():  # a trained-looking adapter: nonzero B everywhere, a moved head
        for name, param in model.named_parameters():
            if param.requires_grad and ("lora_B" in name or "score" in name):
                param.normal_(std=0.05)
    adapters.save_adapter(model, run / "cls" / "adapter")
    load_tokenizer(SOURCE).save_pretrained(run / "cls" / "adapter")

    out = tmp_path / "exported"
    assert (
        main(["export", str(run / "cls"), "--out", str(out), "--base", "quantized", "--dtype", "float32"])
        == 0
    )
    plain = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert plain.config.num_labels == 3 and plain.config.pad_token_id == pad
    ids = torch.tensor([[5, 40, 41, 42, 43, 6], [5, 50, 51, 52, 53, 6]])
    model.eval()
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, plain(input_ids=ids).logits
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    # A classifier's head.json names its labels: single-label problem type and the names; a reward
    # model's (no labels) leaves both to transformers' defaults.
    import json

    for head, problem in (
        ({"type": "classify", "labels": ["x", "y", "z"]}, "single_label_classification"),
        ({"type": "reward"}, None),
    ):
        (run / "cls" / "adapter" / adapters.HEAD_FILE).write_text(json.dumps(head))
        again = tmp_path / f"again-{head['type']}"
        assert main(["export", str(run / "cls"), "--out", str(again)]) == 0
        config = json.loads((again / "config.json").read_text())
        assert config.get("problem_type") == problem
        assert (list(config["id2label"].values()) == ["x", "y", "z"]) == (problem is not None)
