"""The reward package: lookup by name or import path, and each reward's documented behaviour."""

from __future__ import annotations

import doctest

import pytest

import rewards
import rewards.exact


def test_registry_and_import_path():
    assert rewards.resolve("exact_match") is rewards.exact.exact_match
    assert rewards.resolve("rewards.exact:exact_match") is rewards.exact.exact_match
    assert rewards.resolve("rewards.exact.exact_match") is rewards.exact.exact_match


def test_unknown_reward_names_the_choices():
    with pytest.raises(ValueError, match=r"cannot load reward function 'nope'.*\['exact_match'\]"):
        rewards.resolve("nope")


def test_doctests():
    assert doctest.testmod(rewards.exact).failed == 0
    assert doctest.testmod(rewards.exact).attempted >= 2
