"""Log-probabilities of the sampled tokens under the distribution `generate` drew them from.

RL's importance-sampling correction needs pi_sampler(token): the probability the sampler actually used,
after temperature, top-k / top-p and every other processor, in fp32, from the logits of the decode step
that produced the token (compiled and CUDA-graphed, or plain). transformers can return every step's
processed scores (`output_scores`), but that keeps a [batch, vocabulary] fp32 tensor per new token
(6.7 GB for 64 rows × 256 tokens of V2-Lite's 102,400-token vocabulary). Here one processor, run after
all of generate's own (`compat.transformers.last_logits_processors`), keeps the latest step's
log-softmax and reads the token sampled from it when the next step (or the end) shows it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from finetune import family
from finetune.compat import transformers as compat_transformers
from finetune.distributed import all_reduce_max, all_reduce_sum


class SamplerLogprobs:
    """A logits processor for one `generate` call (see the module); `finish` gives [batch, new tokens]."""

    def __init__(self) -> None:
        self._last: torch.Tensor | None = None
        self._taken: list[torch.Tensor] = []
        self._prompt: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._last is None:
            self._prompt = input_ids.shape[1]
        else:  # the token the previous step sampled is the last one fed now
            self._taken.append(self._last.gather(1, input_ids[:, -1:]).squeeze(1))
        self._last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """Log-probs of `sequences`' new tokens (a step transformers undid at the end is dropped)."""
        if self._last is None or self._prompt is None:
            return sequences.new_zeros((sequences.shape[0], 0), dtype=torch.float32)
        new = sequences.shape[1] - self._prompt
        taken = self._taken[:new]
        if len(taken) < new:
            last = sequences[:, self._prompt + len(taken)].unsqueeze(1)
            taken.append(self._last.gather(1, last.to(self._last.device)).squeeze(1))
        self._last = None
        return torch.stack(taken, dim=1)


class Recorded:
    """What `recording` collected: per `generate` call inside it, the [batch, new tokens] log-probs."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def take(self) -> torch.Tensor | None:
        """The latest call's log-probs, forgetting every call (None: no call since)."""
        latest = self.calls[-1] if self.calls else None
        self.calls = []
        return latest


def _top(model: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in model.modules() if isinstance(m, family.PreTrainedModel))


@contextlib.contextmanager
def recording(model: torch.nn.Module) -> Iterator[Recorded]:
    """Every `generate` of `model` (through PEFT wrappers too) records its sampled tokens' log-probs."""
    top = _top(model)
    recorded = Recorded()
    own = top.__dict__.get("generate")  # another wrapper's (routing replay's), kept under this one
    generate = top.generate

    def recorded_generate(*args: Any, **kwargs: Any) -> Any:
        processor = SamplerLogprobs()
        with compat_transformers.last_logits_processors(top, processor):
            out = generate(*args, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        recorded.calls.append(processor.finish(sequences))
        return out

    top.generate = recorded_generate
    try:
        yield recorded
    finally:
        if own is None:
            del top.generate
        else:
            top.generate = own


class Mismatch:
    """Sampler vs trainer over the completion tokens of each rollout, reported per logging step:
    `mismatch/kl` (KL(sampler || trainer) by the k3 estimator, r - 1 - log r with r = p_trainer /
    p_sampler, mean per token), `mismatch/ratio_mean` / `mismatch/ratio_max` (per-token r), and
    `mismatch/corrected_share` (tokens whose ratio, per token or per sequence as `mode` says, falls
    outside [clip_min, clip_max]: truncated or masked by the correction)."""

    def __init__(self, mode: str, clip_min: float | None, clip_max: float | None):
        self.sequence = mode.startswith("sequence")
        self.low = -math.inf if clip_min is None else clip_min
        self.high = math.inf if clip_max is None else clip_max
        self._sums = torch.zeros(4, dtype=torch.float64)  # tokens, k3, ratio, corrected
        self._max = 0.0

    def add(self, trainer: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor) -> None:
        """[batch, tokens] log-probs of the same tokens, and the mask of the tokens that count."""
        with torch.no_grad():
            mask = mask.bool() & ~torch.isnan(sampler)
            log_ratio = torch.where(mask, trainer.double() - sampler.double(), 0.0)
            ratio = log_ratio.exp()
            k3 = ratio - 1 - log_ratio
            judged = log_ratio.sum(-1, keepdim=True).exp() if self.sequence else ratio
            outside = ((judged < self.low) | (judged > self.high)).expand_as(mask) & mask
            self._sums += torch.stack([mask.sum(), k3[mask].sum(), ratio[mask].sum(), outside.sum()]).cpu()
            if mask.any():
                self._max = max(self._max, float(ratio[mask].max()))

    def report(self) -> dict[str, float]:
        sums = all_reduce_sum(self._sums.clone())
        peak = float(all_reduce_max(torch.tensor([self._max], dtype=torch.float64)))
        tokens, k3, ratio, outside = sums.tolist()
        self._sums.zero_()
        self._max = 0.0
        if not tokens:
            return {}
        return {
            "mismatch/kl": k3 / tokens,
            "mismatch/ratio_mean": ratio / tokens,
            "mismatch/ratio_max": peak,
            "mismatch/corrected_share": outside / tokens,
        }
