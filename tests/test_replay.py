"""Routing replay's modes, pass by pass: which experts the old-policy, reference and policy passes over a
rollout used (rollout: the rollout's; old_policy: the first non-reference pass's; off: their own), and
the per-layer mismatch counts."""

from __future__ import annotations

import pytest
import torch

from finetune.model import replay, routing
from finetune.model.load import load_model, resolve_source


@pytest.fixture(scope="module")
def model():
    return load_model(resolve_source("tiny", None), dtype="float32").eval()


def _passes(model, mode: str) -> dict:
    """A rollout, then an old-policy pass, a reference pass and a policy pass as TRL runs them (left-padded
    prompts, completion mask), the router weights moved before each so its own picks change."""
    routers = routing.routers(model)
    saved = {i: r.weight.detach().clone() for i, r in routers.items()}
    in_reference = [False]
    replayer = replay.RoutingReplay(model, mode=mode, eos_token_ids=[], is_reference=lambda: in_reference[0])
    used: dict[int, torch.Tensor] = {}
    own: dict[int, torch.Tensor] = {}

    def capture(i):
        def hook(module, args, output):  # after replay's hook: what the layer used
            used[i] = output[2].detach().clone()

        return hook

    def own_pick(i):
        def hook(module, args, output):  # before replay's hook: the router's own choice
            own[i] = output[2].detach().clone()

        return hook

    handles = [r.register_forward_hook(capture(i)) for i, r in routers.items()]
    handles += [r.register_forward_hook(own_pick(i), prepend=True) for i, r in routers.items()]
    try:
        torch.manual_seed(0)
        prompt = torch.randint(3, model.config.vocab_size, (3, 5))
        pmask = torch.ones_like(prompt)
        prompt[0, :2], pmask[0, :2] = 0, 0  # a left-padded row
        with torch.no_grad():
            sequences = model.generate(
                input_ids=prompt, attention_mask=pmask, max_new_tokens=6, do_sample=True, pad_token_id=0
            )
        mask = torch.cat([pmask, torch.ones_like(sequences[:, 5:])], dim=1)
        key = lambda b: tuple(sequences[b, mask[b].bool()].tolist())  # noqa: E731
        rollout = {b: replayer.records[key(b)] for b in range(3)}
        result = {"rollout": rollout, "passes": {}}
        for name, scale in (("old", 1.0), ("reference", 3.0), ("policy", -2.0)):
            with torch.no_grad():
                for i, r in routers.items():
                    r.weight.copy_(saved[i] * scale)
                in_reference[0] = name == "reference"
                model(input_ids=sequences, attention_mask=mask)
            result["passes"][name] = ({i: u.view(3, -1, u.shape[-1]) for i, u in used.items()}, dict(own))
        result["old_records"] = {b: replayer.old_records.get(key(b)) for b in range(3)}
        result["mask"] = mask
        result["report"] = replayer.report()
        return result
    finally:
        replayer.remove()
        for h in handles:
            h.remove()
        for i, r in routers.items():
            with torch.no_grad():
                r.weight.copy_(saved[i])


def _recorded(used: dict, records: dict, mask: torch.Tensor, layers: list[int]) -> bool:
    """Every recorded position of every row used the record's experts (sets compared)."""
    for b, record in records.items():
        positions = mask[b].bool().nonzero().flatten()[: record.shape[0]]
        for j, layer in enumerate(layers):
            got = used[layer][b, positions].sort(-1).values
            if not torch.equal(got, record[:, j].long().sort(-1).values):
                return False
    return True


def _own(passes: tuple) -> bool:
    used, own = passes
    return all(torch.equal(used[i].flatten(0, 1), own[i]) for i in used)


def test_rollout_mode_replays_the_rollout_in_every_pass(model):
    r = _passes(model, "rollout")
    layers = sorted(routing.routers(model))
    for name in ("old", "reference", "policy"):
        assert _recorded(r["passes"][name][0], r["rollout"], r["mask"], layers), name
    assert r["report"]["routing/mismatch"] == 0.0
    assert r["report"]["routing/router_mismatch"] > 0.05  # the routers' own picks moved
    assert all(r["report"][f"routing/mismatch/layer{i}"] == 0.0 for i in layers)


def test_old_policy_mode_replays_the_old_pass(model):
    r = _passes(model, "old_policy")
    layers = sorted(routing.routers(model))
    old = r["old_records"]
    assert all(v is not None for v in old.values())
    assert _own(r["passes"]["old"])  # the old pass routes itself, and is recorded
    assert _recorded(r["passes"]["old"][0], old, r["mask"], layers)
    for name in ("reference", "policy"):
        assert _recorded(r["passes"][name][0], old, r["mask"], layers), name
        assert not _own(r["passes"][name])  # the moved routers would have picked otherwise
    assert r["report"]["routing/mismatch"] == 0.0


def test_a_reference_pass_first_records_nothing_in_old_policy_mode(model):
    """Without an old-policy pass (no correction, one iteration) the reference pass comes first: it
    routes itself and the policy pass that follows is the one recorded."""
    routers = routing.routers(model)
    in_reference = [True]
    replayer = replay.RoutingReplay(
        model, mode="old_policy", eos_token_ids=[], is_reference=lambda: in_reference[0]
    )
    try:
        ids = torch.randint(3, model.config.vocab_size, (2, 5))
        with torch.no_grad():
            seq = model.generate(input_ids=ids, max_new_tokens=4, do_sample=True, pad_token_id=0)
            model(input_ids=seq)
            assert not replayer.old_records
            in_reference[0] = False
            model(input_ids=seq)
        assert len(replayer.old_records) == len({tuple(s.tolist()) for s in seq})
    finally:
        replayer.remove()
    assert routers


def test_off_routes_every_pass_itself_and_counts_against_the_rollout(model):
    r = _passes(model, "off")
    for name in ("old", "reference", "policy"):
        assert _own(r["passes"][name]), name
    report = r["report"]
    assert report["routing/mismatch"] == report["routing/router_mismatch"] > 0.05
    assert "routing/compared_tokens" in report and "routing/replayed_tokens" not in report


def test_an_unknown_mode_is_refused(model):
    with pytest.raises(ValueError, match="routing replay mode must be one of"):
        replay.RoutingReplay(model, mode="on", eos_token_ids=[])
