"""The GRPO stage's trainer: TRL's GRPOTrainer with what RL on our 4-bit MoE adds around it.

- `MoETrainerMixin`: the expert-balance loss of a trainable router in the GRPO loss, no copied "ref"
  adapter (the KL's reference is the starting policy or the base), a samples log.
- Sampler log-probs: every rollout's tokens with their log-probs under the distribution the sampler
  drew them from (`finetune.model.sampler`, on every decode path: plain, compiled, CUDA-graphed), handed
  to TRL as the vLLM path hands its own, so TRL's importance-sampling correction
  (`vllm_importance_sampling_*`, `compat.trl.SamplerCorrection`) reweights the sampler/trainer mismatch.
- Mismatch metrics (`sampler.Mismatch`) from each rollout's sampler and old-policy log-probs.
- Routing replay (`finetune.model.replay`) told which passes compute the reference policy.
- Under `model.kernels: auto` the training passes run through the compiled regions and LM head
  (`finetune.fast.fusion`), which are taken off while `generate` runs its own compiled decode step.
"""

from __future__ import annotations

from typing import Any

from trl import GRPOTrainer

from finetune.compat import trl as compat_trl
from finetune.fast import fusion
from finetune.model import replay, sampler
from finetune.stages.moe_trainer import MoETrainerMixin


class Trainer(compat_trl.SamplerCorrection, MoETrainerMixin, GRPOTrainer):
    """See the module. Keyword arguments beside `MoETrainerMixin`'s: `replayer` (the model's
    `RoutingReplay`), `mismatch` (the meter fed each rollout, or None)."""

    ref_copy_field = "beta"

    def __init__(
        self,
        *args: Any,
        replayer: replay.RoutingReplay | None = None,
        mismatch: sampler.Mismatch | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self._mismatch = mismatch
        if replayer is not None:
            replayer.is_reference = lambda: self.reference is not None and self.reference.in_use
        compat_trl.correct_sampling(self, bool(self.args.vllm_importance_sampling_correction))

    def _generate_single_turn(self, prompt_ids: list, *args: Any, **kwargs: Any) -> tuple[list, Any]:
        # The compiled decode step traces the modules' own forwards: training's regions off meanwhile.
        with fusion.suspended(self.model), sampler.recording(self.model) as recorded:
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        taken = recorded.take()
        if logprobs is None and taken is not None:
            rows = taken.tolist()
            logprobs = [row[: len(ids)] for row, ids in zip(rows, completion_ids, strict=True)]
        return completion_ids, logprobs

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        old, sampled = out.get("old_per_token_logps"), out.get("sampling_per_token_logps")
        if self._mismatch is not None and old is not None and sampled is not None:
            mask = out["completion_mask"]
            if "tool_mask" in out:
                mask = mask * out["tool_mask"]
            self._mismatch.add(old, sampled, mask)
        return out

    def _sample_rows(self) -> list[dict[str, Any]]:
        # The deques hold the latest generation batch's completions.
        logs = compat_trl.logged(self)
        rows = list(zip(logs["prompt"], logs["completion"], strict=False))[-self._samples_per_log :]
        names = list(logs["rewards"])
        per_reward = {n: list(logs["rewards"][n])[-len(rows) :] for n in names} if rows else {}
        return [
            {"prompt": prompt, "completion": completion, "rewards": {n: per_reward[n][i] for n in names}}
            for i, (prompt, completion) in enumerate(rows)
        ]
