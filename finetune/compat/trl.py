"""TRL internals: SFT's chunked LM head (replaced by ours under `model.kernels`), SFTTrainer's dataset
preparation (run for `validate`'s token counts), the reference adapter GRPO, DPO and KTO copy, the
preference trainers' reference precompute, GRPO's logged completions and its importance-sampling correction (vLLM's only upstream), and the reference-free
preference trainers of `trl.experimental` (ORPO, CPO / SimPO). Checked on TRL 1.16."""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from finetune.compat import Patch, Target, applying, declare, fail, resolve

CHECKED = "1.16"
_UTILS = "trl.trainer.utils"

CHUNKED_HEAD = declare(
    "trl.chunked_lm_head",
    "trl",
    CHECKED,
    "finds the chunked LM-head forward SFTTrainer puts on the model (`add_fused_lm_head`'s nested "
    "`_fused_forward`) and puts our head in its place while training, returning TRL's output type",
    Target(_UTILS, "add_fused_lm_head"),
    Target(_UTILS, "FusedCausalLMOutput"),
)
SFT_PREPARATION = declare(
    "trl.sft_dataset_preparation",
    "trl",
    CHECKED,
    "runs SFTTrainer's own `_prepare_dataset` (templating, EOS, tokenization, label masks) on a stand-in "
    "holding the attributes its __init__ sets, so `validate` counts tokens as training will",
    Target("trl.trainer.sft_trainer", "SFTTrainer._prepare_dataset"),
    Target("trl.chat_template_utils", "get_training_chat_template"),
    Target("trl.chat_template_utils", "has_generation_markers"),
)
GRPO_REFERENCE = declare(
    "trl.reference_adapter_copy",
    "trl",
    CHECKED,
    "builds a TRL trainer with its KL coefficient (GRPO's `beta`) at 0 so it copies no PEFT adapter into "
    "a frozen 'ref' adapter (the copy misses the routed-expert LoRA), then sets it back on the config "
    "and the trainer: TRL's reference pass then disables the adapter",
    Target("trl.trainer.grpo_trainer", "GRPOTrainer"),
    Target("trl.trainer.grpo_config", "GRPOConfig.beta"),
)
PREFERENCE_REFERENCE = declare(
    "trl.preference_reference",
    "trl",
    CHECKED,
    "builds DPOTrainer / KTOTrainer with `precompute_ref_log_probs` off, deletes the frozen 'ref' adapter "
    "their constructor copies from a PEFT model (it misses the routed-expert LoRA), so their reference "
    "pass disables the adapter (`model.reference`), then runs their own `_precompute_ref_logps` as the "
    "constructor would, with a cache key that names the reference",
    Target("trl.trainer.dpo_trainer", "DPOTrainer._precompute_ref_logps"),
    Target("trl.trainer.kto_trainer", "KTOTrainer._precompute_ref_logps"),
    Target("trl.trainer.dpo_config", "DPOConfig.precompute_ref_log_probs"),
    Target("trl.trainer.kto_config", "KTOConfig.precompute_ref_log_probs"),
    Target(_UTILS, "hash_module"),
)
GRPO_LOGS = declare(
    "trl.grpo_logged_completions",
    "trl",
    CHECKED,
    "reads the prompts, completions and per-reward values GRPOTrainer keeps for its own logging "
    "(`_logs`), to write samples.jsonl",
    Target("trl.trainer.grpo_trainer", "GRPOTrainer"),
)
SAMPLER_CORRECTION = declare(
    "trl.sampler_correction",
    "trl",
    CHECKED,
    "applies GRPOTrainer's importance-sampling correction (`vllm_importance_sampling_*`) to rollouts of "
    "the trainer's own `generate`, given our sampler log-probs: TRL computes it for vLLM rollouts only, "
    "behind its `use_vllm` flag in `_generate_and_score_completions` and `_compute_loss`; the flag reads "
    "true there (never while the trainer is built or `_generate` runs, where it would reach for vLLM)",
    Target("trl.trainer.grpo_trainer", "GRPOTrainer._generate"),
    Target("trl.trainer.grpo_trainer", "GRPOTrainer._generate_and_score_completions"),
    Target("trl.trainer.grpo_trainer", "GRPOTrainer._compute_loss"),
)
_CORRECTION_GATE = "self.use_vllm and self.vllm_importance_sampling_correction"
_ORPO = "trl.experimental.orpo"
_CPO = "trl.experimental.cpo"
ORPO = declare(
    "trl.experimental_orpo",
    "trl",
    CHECKED,
    "imports ORPOTrainer / ORPOConfig from `trl.experimental` (an unstable API: TRL may change or drop it "
    "in any release, and warns on import; the warning is silenced here) for `type: orpo`, which passes "
    "them an adapted PeftModel and no reference model",
    Target(_ORPO, "ORPOTrainer"),
    Target(_ORPO, "ORPOConfig"),
    Target(_ORPO, "ORPOConfig.beta"),
)
CPO = declare(
    "trl.experimental_cpo",
    "trl",
    CHECKED,
    "imports CPOTrainer / CPOConfig from `trl.experimental` (an unstable API: TRL may change or drop it in "
    "any release, and warns on import; the warning is silenced here) for `type: simpo`: its SimPO loss "
    "(`loss_type: simpo`, `cpo_alpha: 0`) on an adapted PeftModel, no reference model",
    Target(_CPO, "CPOTrainer"),
    Target(_CPO, "CPOConfig"),
    Target(_CPO, "CPOConfig.loss_type"),
    Target(_CPO, "CPOConfig.cpo_alpha"),
    Target(_CPO, "CPOConfig.simpo_gamma"),
)


@functools.cache
def _head_code() -> types.CodeType:
    add = resolve(CHUNKED_HEAD, CHUNKED_HEAD.targets[0])
    found = [
        c for c in add.__code__.co_consts if isinstance(c, types.CodeType) and c.co_name == "_fused_forward"
    ]
    if len(found) != 1:
        raise fail(
            CHUNKED_HEAD, "add_fused_lm_head defines no `_fused_forward` (the chunked head was renamed)"
        )
    return found[0]


def is_chunked_head(forward: Any) -> bool:
    """Whether a module's instance `forward` is TRL's chunked LM head."""
    applying(CHUNKED_HEAD)
    code = getattr(getattr(forward, "__func__", None), "__code__", None)
    return code is _head_code()


def chunked_head_output(**fields: Any) -> Any:
    """TRL's output type of the chunked head (loss, log_probs, entropy, ...)."""
    applying(CHUNKED_HEAD)
    return resolve(CHUNKED_HEAD, CHUNKED_HEAD.targets[1])(**fields)


def prepare_sft_dataset(rows: Any, tokenizer: Any, args: Any, split: str) -> Any:
    """SFTTrainer's preparation of `rows` under `args`, without building a trainer."""
    applying(SFT_PREPARATION)
    trainer = resolve(SFT_PREPARATION, Target("trl.trainer.sft_trainer", "SFTTrainer"))
    templates = resolve(SFT_PREPARATION, Target("trl.chat_template_utils"))
    sample = rows[0]
    # As SFTTrainer.__init__ does before preparing: the tokenizer then hashes the same, so the trainer's
    # own preparation of a file-backed dataset is a datasets cache hit instead of a second tokenization.
    tokenizer.pad_token = getattr(args, "pad_token", None) or tokenizer.pad_token or tokenizer.eos_token
    template = None
    if args.assistant_only_loss and not templates.has_generation_markers(tokenizer.chat_template):
        template = templates.get_training_chat_template(tokenizer)
    completion_only = args.completion_only_loss
    if completion_only is None:
        completion_only = "prompt" in sample and "completion" in sample
    view = types.SimpleNamespace(
        _tokenizer=tokenizer, chat_template=template, completion_only_loss=completion_only
    )
    try:
        return trainer._prepare_dataset(view, rows, tokenizer, args, False, None, split)
    except AttributeError as err:
        if "SimpleNamespace" not in str(err):
            raise
        raise fail(
            SFT_PREPARATION, f"_prepare_dataset reads a trainer attribute set nowhere here ({err})"
        ) from None


@contextlib.contextmanager
def no_reference_copy(config: Any, field: str = "beta") -> Iterator[Callable[[Any], None]]:
    """While inside, `config.<field>` is 0 (the trainer's constructor copies no 'ref' adapter); yields a
    function that gives the built trainer the field's value back."""
    applying(GRPO_REFERENCE)
    if not hasattr(config, field):
        raise fail(GRPO_REFERENCE, f"{type(config).__name__} has no `{field}`")
    value = getattr(config, field)
    setattr(config, field, 0.0)

    def restore(trainer: Any) -> None:
        setattr(trainer, field, value)

    try:
        yield restore
    finally:
        setattr(config, field, value)


def drop_reference_copy(model: Any) -> None:
    """Delete the 'ref' adapter a preference trainer's constructor copied from the policy's, if any."""
    applying(PREFERENCE_REFERENCE)
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")  # the policy's adapter active and trainable, as before the copy


@contextlib.contextmanager
def deferred_precompute(config: Any) -> Iterator[Callable[[Any, str], None]]:
    """While inside, the preference trainer's constructor precomputes no reference log-probs; yields
    `precompute(trainer, reference)`, which restores the setting and, when the config asked, runs the
    trainer's own precompute through the reference now installed, cached under `reference`'s name."""
    applying(PREFERENCE_REFERENCE)
    if not hasattr(config, "precompute_ref_log_probs"):
        raise fail(PREFERENCE_REFERENCE, f"{type(config).__name__} has no `precompute_ref_log_probs`")
    wanted = bool(config.precompute_ref_log_probs)
    config.precompute_ref_log_probs = False

    def precompute(trainer: Any, reference: str) -> None:
        config.precompute_ref_log_probs = wanted
        trainer.precompute_ref_logps = wanted
        if not wanted:
            return
        run = getattr(trainer, "_precompute_ref_logps", None)
        if run is None:
            raise fail(PREFERENCE_REFERENCE, f"{type(trainer).__name__} has no `_precompute_ref_logps`")
        digest = resolve(PREFERENCE_REFERENCE, PREFERENCE_REFERENCE.targets[-1])(trainer.model)
        trainer._precompute_model_hash = f"{digest}:{reference}"  # a base and an init reference differ
        size = config.precompute_ref_batch_size
        trainer.train_dataset = run(
            trainer.train_dataset, "train", size or config.per_device_train_batch_size
        )
        evaluation, eval_size = trainer.eval_dataset, size or config.per_device_eval_batch_size
        if isinstance(evaluation, dict):
            trainer.eval_dataset = {k: run(v, k, eval_size) for k, v in evaluation.items()}
        elif evaluation is not None:
            trainer.eval_dataset = run(evaluation, "eval", eval_size)

    try:
        yield precompute
    finally:
        config.precompute_ref_log_probs = wanted


def logged(trainer: Any) -> dict[str, Any]:
    """The trainer's own log of this logging window: `prompt`, `completion` and `rewards` (name → values)."""
    applying(GRPO_LOGS)
    logs = getattr(trainer, "_logs", None)
    if not isinstance(logs, dict) or not {"prompt", "completion", "rewards"} <= set(logs):
        raise fail(GRPO_LOGS, "GRPOTrainer keeps no `_logs` with prompt, completion and rewards")
    return logs


class SamplerCorrection:
    """Put before `GRPOTrainer`: `use_vllm` reads `correct_sampling(trainer, on)`'s setting, except
    while `_generate` runs (see `SAMPLER_CORRECTION`). vLLM itself is not used (refused at validate)."""

    _correction = False
    _generating = False

    @property
    def use_vllm(self) -> bool:
        return self._correction and not self._generating

    @use_vllm.setter
    def use_vllm(self, value: bool) -> None:  # GRPOTrainer's constructor sets `args.use_vllm`
        if value:
            raise ValueError("use_vllm: finetune's GRPO stage generates with the model itself")

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        self._generating = True
        try:
            return super()._generate(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._generating = False


def correct_sampling(trainer: SamplerCorrection, on: bool) -> None:
    """TRL's importance-sampling correction runs on `trainer`'s rollouts (their sampler log-probs)."""
    applying(SAMPLER_CORRECTION)
    for target in SAMPLER_CORRECTION.targets[1:]:
        if _CORRECTION_GATE not in inspect.getsource(resolve(SAMPLER_CORRECTION, target)):
            raise fail(SAMPLER_CORRECTION, f"{target} no longer gates the correction on `use_vllm`")
    trainer._correction = on


def _experimental(patch: Patch, index: int) -> type:
    """A class of `trl.experimental`, imported without the warning its first import gives (the use is
    declared here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"You are importing from 'trl\.experimental'")
        applying(patch)
        return resolve(patch, patch.targets[index])


def orpo_trainer() -> type:
    """TRL's ORPOTrainer (`trl.experimental.orpo`)."""
    return _experimental(ORPO, 0)


def orpo_config() -> type:
    """TRL's ORPOConfig (`trl.experimental.orpo`)."""
    return _experimental(ORPO, 1)


def cpo_trainer() -> type:
    """TRL's CPOTrainer (`trl.experimental.cpo`): CPO, and SimPO with `loss_type="simpo"`, `cpo_alpha=0`."""
    return _experimental(CPO, 0)


def cpo_config() -> type:
    """TRL's CPOConfig (`trl.experimental.cpo`)."""
    return _experimental(CPO, 1)
