"""Reward functions with TRL's signature, `fn(completions, **columns) -> list[float | None]`, found by name.

`resolve("exact_match")` looks in REGISTRY; `resolve("my_pkg.my_module:fn")` (or a dotted path) imports a
user's function. `build(name, **arguments)` binds a recipe's arguments to a reward (checked against its
keyword-only parameters); `guarded(reward)` names the reward and the row when a reward fails.

The package imports nothing of `finetune`. `reward_model` (a trained reward stage as a reward) loads a
model, so `finetune` provides it and puts it in with `register`; until then its name is held by a
placeholder with the same arguments, which says so when called.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import numbers
from collections.abc import Callable
from typing import Any, Literal

from rewards.code import code_execution
from rewards.exact import exact_match, similarity
from rewards.format import format as format_reward
from rewards.length import length as length_reward
from rewards.math import math_accuracy

Reward = Callable[..., list[float | None]]


def reward_model(
    completions: list, prompts: list | None = None, *, stage: str, batch_size: int = 8, **kwargs
) -> list[float]:
    """A trained reward model's score of each prompt + completion (`stage`: a reward stage's folder,
    `RUN_DIR/STAGE`, or in a recipe an earlier `type: reward` stage). Provided by `finetune`
    (`finetune.stages.reward_model`, registered when a GRPO stage builds its rewards); this placeholder
    holds its name and arguments."""
    raise RuntimeError(
        "reward 'reward_model' is provided by finetune: call finetune.stages.reward_model.register() "
        "first (a GRPO stage does)"
    )


# format and length are imported under other names: binding those names here would hide the submodules
# rewards.format and rewards.length.
REGISTRY: dict[str, Reward] = {
    "exact_match": exact_match,
    "similarity": similarity,
    "math_accuracy": math_accuracy,
    "format": format_reward,
    "length": length_reward,
    "code_execution": code_execution,
    "reward_model": reward_model,
}

# What TRL passes to every reward besides the dataset's columns.
TRAINER_COLUMNS = {"completions", "prompts", "completion_ids", "trainer_state", "log_extra", "log_metric"}

logger = logging.getLogger(__name__)


def register(name: str, fn: Reward) -> None:
    """Make `fn` the reward called `name` (`resolve`, recipes' `rewards: [{name: ...}]`)."""
    REGISTRY[name] = fn


class RewardError(ValueError):
    """A reward failed or returned something TRL cannot use; the message names the reward (and the row)."""


def resolve(name: str) -> Reward:
    """A registered reward by name, or a function by import path (`pkg.module:fn` or `pkg.module.fn`)."""
    if name in REGISTRY:
        return REGISTRY[name]
    module_name, sep, attr = name.partition(":") if ":" in name else name.rpartition(".")
    if sep:
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            fn = None
        if callable(fn):
            return fn
    raise ValueError(
        f"cannot load reward function {name!r}: expected one of {sorted(REGISTRY)} or an import path "
        "like my_package.my_rewards:fn"
    )


class BoundReward:
    """A reward with a recipe's arguments bound; `__name__` is the recipe's name, which TRL logs it under.

    A class rather than a closure so that it pickles (by reference to the reward function).
    """

    def __init__(self, fn: Reward, name: str, arguments: dict[str, Any]):
        self.fn, self.__name__, self.arguments = fn, name, arguments
        self.__doc__ = fn.__doc__

    def __call__(self, completions: list, **columns) -> list[float | None]:
        # The recipe's arguments win over a dataset column of the same name.
        return self.fn(completions, **{**columns, **self.arguments})

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.arguments.items())
        return f"{self.__name__}({arguments})"


def build(name: str, **arguments) -> BoundReward:
    """The reward `name` (see `resolve`) with `arguments` bound, checked now rather than at the first batch.

    A reward's arguments are its keyword-only parameters (those after `*`); its other parameters are
    dataset columns, passed by TRL. A reward may carry a `validate(**arguments)` function that raises
    ValueError for bad values (format's regex, length's buffer).

    >>> build("length", target=256)
    length(target=256)
    >>> build("length", targt=256)
    Traceback (most recent call last):
    ...
    ValueError: reward 'length': unknown argument 'targt' (arguments: buffer, target, unit)
    """
    fn = resolve(name)
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__):
        raise ValueError(f"reward {name!r}: async reward functions are not supported")
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        parameters = []  # no signature to check against (some builtins)
    allowed = {p.name: p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    for argument in arguments:
        if argument not in allowed:
            listed = ", ".join(sorted(allowed)) or "none"
            raise ValueError(f"reward {name!r}: unknown argument {argument!r} (arguments: {listed})")
    for argument, parameter in allowed.items():
        if parameter.default is inspect.Parameter.empty and argument not in arguments:
            raise ValueError(f"reward {name!r}: missing required argument {argument!r}")
    validate = getattr(fn, "validate", None)
    if callable(validate):
        try:
            validate(**arguments)
        except ValueError as e:
            raise ValueError(f"reward {name!r}: {e}") from None
    return BoundReward(fn, name, arguments)


def needed_columns(reward: BoundReward) -> list[str]:
    """The dataset columns a bound reward reads: its required positional parameters (exact_match's
    `answer`) and the column its `column` argument names (math_accuracy, code_execution)."""
    try:
        parameters = inspect.signature(reward.fn).parameters.values()
    except (TypeError, ValueError):
        return []
    needed = [
        p.name
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        and p.default is inspect.Parameter.empty
        and p.name not in TRAINER_COLUMNS
    ]
    column = {p.name: p for p in parameters}.get("column")
    if column is not None and column.kind is inspect.Parameter.KEYWORD_ONLY:
        needed.append(reward.arguments.get("column", column.default))
    return needed


def _row(columns: dict[str, Any], n: int, i: int) -> dict[str, Any]:
    # Per-row lists (columns, prompts, completion_ids) are cut to row i; anything else (trainer_state,
    # log_metric) is passed as it is.
    return {
        key: [value[i]] if isinstance(value, list | tuple) and len(value) == n else value
        for key, value in columns.items()
    }


def _checked(name: str, scores: Any, n: int) -> list[float | None]:
    if not isinstance(scores, list | tuple) or len(scores) != n:
        size = f"{len(scores)} scores" if isinstance(scores, list | tuple) else f"a {type(scores).__name__}"
        raise RewardError(f"reward {name!r} returned {size} for {n} completions (one score per completion)")
    for i, score in enumerate(scores):
        if score is not None and not isinstance(score, numbers.Real):
            raise RewardError(
                f"reward {name!r} returned {type(score).__name__} {score!r} on row {i} (expected a number or None)"
            )
    return [None if score is None else float(score) for score in scores]


class GuardedReward:
    """See `guarded`."""

    def __init__(self, fn: Reward, on_error: Literal["raise", "zero"], name: str):
        if on_error not in ("raise", "zero"):
            raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}")
        self.fn, self.on_error, self.__name__ = fn, on_error, name
        self.__doc__ = fn.__doc__

    def __call__(self, completions: list, **columns) -> list[float | None]:
        n = len(completions)
        try:
            scores = self.fn(completions, **columns)
        except Exception as batch_error:
            return self._row_by_row(completions, columns, batch_error)
        return _checked(self.__name__, scores, n)

    def _row_by_row(
        self, completions: list, columns: dict[str, Any], batch_error: Exception
    ) -> list[float | None]:
        # The batch failed: score each row alone to find which rows fail.
        n = len(completions)
        scores: list[float | None] = []
        failed: list[int] = []
        first: Exception | None = None
        for i in range(n):
            try:
                score = _checked(self.__name__, self.fn([completions[i]], **_row(columns, n, i)), 1)[0]
            except RewardError:
                raise
            except Exception as error:
                if self.on_error == "raise":
                    raise RewardError(
                        f"reward {self.__name__!r} failed on row {i}: {type(error).__name__}: {error}"
                    ) from error
                failed.append(i)
                first = first or error
                score = 0.0
            scores.append(score)
        if first is None:  # no single row fails: the batch as a whole does
            raise RewardError(
                f"reward {self.__name__!r} failed on a batch of {n} rows (each row alone passes): "
                f"{type(batch_error).__name__}: {batch_error}"
            ) from batch_error
        logger.warning(
            "reward %r failed on rows %s, scored 0.0: %s: %s",
            self.__name__,
            failed,
            type(first).__name__,
            first,
        )
        return scores

    def __repr__(self) -> str:
        return f"guarded({self.fn!r}, on_error={self.on_error!r})"


def guarded(
    fn: Reward, *, on_error: Literal["raise", "zero"] = "raise", name: str | None = None
) -> GuardedReward:
    """`fn` made to fail clearly: an exception becomes a RewardError naming the reward and the first failing row.

    With on_error="zero", failing rows score 0.0 (with a logged warning) and the others keep their scores.
    Either way, a wrong number of scores or a score that is not a number or None is a RewardError. `name`
    (default: `fn.__name__`) is used in messages and is the wrapper's `__name__`.

    >>> def inverse(completions, **kwargs):
    ...     return [1 / float(c) for c in completions]
    >>> guarded(inverse)(["2", "0"])
    Traceback (most recent call last):
    ...
    rewards.RewardError: reward 'inverse' failed on row 1: ZeroDivisionError: float division by zero
    >>> guarded(inverse, on_error="zero")(["2", "0", "4"])
    [0.5, 0.0, 0.25]
    """
    return GuardedReward(fn, on_error, name or getattr(fn, "__name__", type(fn).__name__))
