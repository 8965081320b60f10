"""Routing health during training: the statistics `RouterMonitor` reports, the alarms, and routing.png.

Every training stage gets a `RoutingHealth` callback (`stages.common.fit`). At each logging step it reads
the monitor's report (per MoE layer and their mean: load entropy, max expert share, dead experts;
definitions in `finetune.model.routing`), computed once per log by `rundir.RouterFields`, which puts
it into the trackers' log and metrics.jsonl, and prints one warning per (layer, condition) and stage
when a layer's load crosses a threshold of the recipe's `routing:` section, or when the sampler/trainer
KL that GRPO logs as `mismatch/kl` does.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback

from finetune import rundir
from finetune.distributed import is_primary
from finetune.model import routing

KL_KEY = "mismatch/kl"  # GRPO's k3 estimate of KL(sampler || trainer) per token, when it logs one
_LAYER = "/layer"
STATS = ("entropy", "max_share", "dead_experts")  # routing/<stat>[/layer<i>] in metrics.jsonl


@dataclass(frozen=True)
class Thresholds:
    """The recipe's `routing:` section as plain values. The defaults are the recipe's (one place:
    `schema.RoutingConfig` takes them from here); docs/recipes.md says why each is what it is."""

    min_entropy: float = 0.5  # a layer's normalized load entropy below this warns
    max_share: float = 0.9  # a layer whose busiest expert is selected by more than this share of tokens warns
    dead_after_steps: int = 50  # an expert with no tokens for this many optimizer steps counts as dead
    max_sampler_kl: float = 0.01  # GRPO's sampler/trainer KL (k3, per token) above this warns


class RoutingHealth(TrainerCallback):
    """Checks each log's routing statistics (computed once per log by `fields`, `rundir.RouterFields`,
    which puts them into the trackers' log and metrics.jsonl) and counts optimizer steps for the
    dead-expert window."""

    def __init__(
        self,
        monitor: routing.RouterMonitor,
        stage: str,
        thresholds: Thresholds,
        fields: rundir.RouterFields,
    ):
        self.monitor, self.stage, self.thresholds, self.fields = monitor, stage, thresholds, fields
        self.warned: set[tuple[str, int | None]] = set()  # (condition, layer): warned once per stage

    def on_train_begin(self, args, state, control, **kwargs):
        self.monitor.start(state.global_step)  # a resumed run: windows start at its checkpoint's step

    def on_step_end(self, args, state, control, **kwargs):
        self.monitor.end_step(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and is_primary():
            for line in self.check({**logs, **self.fields.fields}):
                # Through tqdm: printed above the trainer's progress bar, not glued to its line.
                tqdm.write(f"warning: {line}", file=sys.stderr)

    def check(self, row: dict[str, Any]) -> list[str]:
        """The warning lines `row` (a metrics row) calls for that this stage has not printed yet."""
        t, lines = self.thresholds, []
        for key, value in row.items():
            if not key.startswith("routing/") or _LAYER not in key:
                continue
            stat, layer = key.removeprefix("routing/").split(_LAYER)
            if stat == "entropy" and value < t.min_entropy:
                lines += self._once(
                    ("entropy", int(layer)),
                    f"stage {self.stage}: MoE layer {layer}: expert load entropy {value:.3f} is below "
                    f"routing.min_entropy {t.min_entropy:g}: the router sends most tokens to a few experts "
                    "(see routing.png; lower routing.min_entropy if this load is expected)",
                )
            elif stat == "max_share" and value > t.max_share:
                lines += self._once(
                    ("max_share", int(layer)),
                    f"stage {self.stage}: MoE layer {layer}: {value:.1%} of tokens select one expert, above "
                    f"routing.max_share {t.max_share:g}: the routing is collapsing onto that expert "
                    "(see routing.png; raise routing.max_share if this load is expected)",
                )
        kl = row.get(KL_KEY)
        if isinstance(kl, int | float) and not math.isnan(kl) and kl > t.max_sampler_kl:
            lines += self._once(
                ("kl", None),
                f"stage {self.stage}: sampler/trainer KL ({KL_KEY}) {kl:.4g} is above routing.max_sampler_kl "
                f"{t.max_sampler_kl:g}: rollouts come from a policy the trainer no longer computes "
                "(see metrics.jsonl; raise routing.max_sampler_kl if this is expected)",
            )
        return lines

    def _once(self, condition: tuple[str, int | None], line: str) -> list[str]:
        if condition in self.warned:
            return []
        self.warned.add(condition)
        return [line]


def layer_series(metrics: list[dict[str, Any]], stat: str) -> dict[int, list[tuple[int, float]]]:
    """Layer → (step, value) of `routing/<stat>/layer<i>` over a run's training log rows."""
    series: dict[int, list[tuple[int, float]]] = {}
    prefix = f"routing/{stat}{_LAYER}"
    for row in metrics:
        if any(key.startswith("eval_") for key in row):
            continue  # an evaluation's routing: in metrics.jsonl, not on the training curve
        for key, value in row.items():
            if key.startswith(prefix) and "step" in row:
                series.setdefault(int(key.removeprefix(prefix)), []).append((row["step"], value))
    return dict(sorted(series.items()))


# Above this many MoE layers the panels are heatmaps (layer x step) instead of one line per layer.
MAX_LINES = 8


def plot_routing(metrics: list[dict[str, Any]], path: Path, title: str, thresholds: Thresholds) -> bool:
    """routing.png: entropy, max share and dead experts per MoE layer over training; False if none logged."""
    panels = [
        ("entropy", "load entropy (1 = even)", thresholds.min_entropy, (0.0, 1.0)),
        ("max_share", "max expert share", thresholds.max_share, (0.0, 1.0)),
        ("dead_experts", f"dead experts ({thresholds.dead_after_steps} steps)", None, None),
    ]
    data = {stat: layer_series(metrics, stat) for stat, *_ in panels}
    if not data["entropy"]:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = len(data["entropy"])
    heat = layers > MAX_LINES
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), dpi=100, sharex=True)
    for ax, (stat, label, threshold, limits) in zip(axes, panels, strict=True):
        series = data[stat]
        if heat and series:
            steps = sorted({s for points in series.values() for s, _ in points})
            grid = [[dict(points).get(s, math.nan) for s in steps] for points in series.values()]
            # A column spans the window its log covers: from the previous logged step to its own.
            edges = [steps[0] - (steps[1] - steps[0] if len(steps) > 1 else 1), *steps]
            mesh = ax.pcolormesh(edges, range(len(series) + 1), grid, shading="flat", cmap="viridis")
            if limits:
                mesh.set_clim(*limits)
            fig.colorbar(mesh, ax=ax, label=label)
            ticks = list(range(0, len(series), max(1, len(series) // 8)))
            ax.set_yticks([t + 0.5 for t in ticks], [str(list(series)[t]) for t in ticks])
            ax.set_ylabel("layer")
        else:
            for layer, points in series.items():
                ax.plot(*zip(*points, strict=True), label=f"layer {layer}", linewidth=1)
            if threshold is not None:
                ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label="alarm")
            if limits:
                ax.set_ylim(limits[0], limits[1] * 1.05)
            else:  # a count of experts
                ax.set_ylim(bottom=0, top=max([v for p in series.values() for _, v in p] + [1]) * 1.1)
                ax.yaxis.get_major_locator().set_params(integer=True)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if stat == "entropy":
                ax.legend(fontsize=7, ncol=2)
    axes[0].set_title(title)
    axes[-1].set_xlabel("step")
    rundir.save_figure(fig, path)
    return True
