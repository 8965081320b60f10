"""Labels of a classifier: reading them from rows, the name↔id map, class weights, decisions from
logits, and the metrics (scikit-learn) and confusion-matrix plot. The classify stage, `finetune predict`
and the eval harness all use these, so their figures agree."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from finetune import data
from finetune.errors import UserError
from finetune.rundir import save_figure


@dataclass
class Where:
    """The recipe keys a label error names."""

    stage: str
    declared: list[str] | None  # `stages.<stage>.labels`
    num_labels: int | None  # `stages.<stage>.num_labels`
    multi_label: bool

    def key(self, field: str) -> str:
        return f"stages.{self.stage}.{field}"


def _input_column(columns: set[str]) -> str | None:
    return "text" if "text" in columns else "messages" if "messages" in columns else None


def class_names(dataset: Dataset) -> list[str] | None:
    """The names a Hub dataset gives its integer labels (a `ClassLabel` column), e.g. ag_news' World, ..."""
    feature = dataset.features.get("label")
    return list(feature.names) if type(feature).__name__ == "ClassLabel" else None


def rows(dataset: Dataset, *, key: str, need_label: bool = True) -> tuple[list, list]:
    """(texts or conversations, label values) of a `text`/`messages` + `label` dataset."""
    columns = set(dataset.column_names)
    column = _input_column(columns)
    missing = [] if column else ["text (or messages)"]
    if need_label and "label" not in columns:
        missing.append("label")
    if missing:
        raise UserError(
            f"{key}: a classifier needs a `text` or `messages` column and a `label` column; missing "
            f"{', '.join(missing)} (found: {', '.join(sorted(columns))})"
        )
    assert column is not None
    items = dataset[column]
    for i, item in enumerate(items, 1):
        if column == "text" and not isinstance(item, str):
            raise UserError(f"{key}: row {i}: `text` must be a string, got {item!r:.40}")
        problem = data.conversation_problem(item) if column == "messages" else None
        if problem is not None:
            raise UserError(f"{key}: row {i}: {problem}")
    return items, dataset["label"] if "label" in columns else [None] * len(items)


def _flat(values: list, where: Where, key: str) -> list:
    """Every label value (each element of a multi-label list), checked for type."""
    out = []
    for i, value in enumerate(values, 1):
        if where.multi_label:
            if not isinstance(value, list):
                raise UserError(
                    f"{key}: row {i}: with {where.key('multi_label')} a label is a list of names or ids, "
                    f"got {value!r:.40}"
                )
            group = value
        else:
            if isinstance(value, list):
                raise UserError(
                    f"{key}: row {i}: label {value!r:.40} is a list; set {where.key('multi_label')}: true "
                    "for several labels per row"
                )
            group = [value]
        for v in group:
            if isinstance(v, bool) or not isinstance(v, str | int):
                raise UserError(
                    f"{key}: row {i}: a label is a name (string) or an id (integer), got {v!r:.40}"
                )
            out.append(v)
    if {type(v) for v in out} == {str, int}:
        raise UserError(f"{key}: labels mix names and integer ids; use one or the other")
    return out


def names(values: list, where: Where, key: str, named_ids: list[str] | None = None) -> list[str]:
    """The label names in id order: `labels` when the recipe lists them, else the names found in the
    train rows (sorted), or for integer ids the dataset's names for them (`named_ids`) or `0..n-1`
    (n: `num_labels`, else the largest id + 1)."""
    flat = _flat(values, where, key)
    declared = where.declared
    if declared is None and named_ids is not None and flat and isinstance(flat[0], int):
        if where.num_labels is not None and where.num_labels != len(named_ids):
            raise UserError(
                f"{where.key('num_labels')}: {where.num_labels} disagrees with the {len(named_ids)} classes "
                f"{key} names ({', '.join(named_ids)}); drop num_labels"
            )
        where = Where(where.stage, None, len(named_ids), where.multi_label)
        ids(values, named_ids, where, key)
        if len(set(flat)) < 2:
            raise UserError(f"{key}: every row has label {flat[0]!r}; a classifier needs at least 2 classes")
        return list(named_ids)
    if declared is not None and len(set(declared)) != len(declared):
        twice = next(n for n, c in Counter(declared).items() if c > 1)
        raise UserError(f"{where.key('labels')}: {twice!r} is listed twice")
    if declared is not None and where.num_labels is not None and where.num_labels != len(declared):
        raise UserError(
            f"{where.key('num_labels')}: {where.num_labels} disagrees with {where.key('labels')} "
            f"({len(declared)} names); drop num_labels or make them agree"
        )
    ints = bool(flat) and isinstance(flat[0], int)
    if declared is not None:
        found = declared
    elif ints:
        found = [str(i) for i in range(where.num_labels or max(flat) + 1)]  # `ids` refuses negative ids
    else:
        found = sorted(set(flat))
        if where.num_labels is not None and where.num_labels != len(found):
            raise UserError(
                f"{where.key('num_labels')}: {where.num_labels} disagrees with the {len(found)} labels of "
                f"{key} ({', '.join(found)}); drop num_labels or fix the data"
            )
    ids(values, found, where, key)  # every value inside the set
    distinct = set(flat)
    if len(distinct) < 2:
        raise UserError(
            f"{key}: every row has label {next(iter(distinct), None)!r}; a classifier needs at least 2 classes"
        )
    return found


def ids(values: list, label_names: list[str], where: Where, key: str) -> list:
    """Label ids of every row (a sorted list of ids per row with multi-label); a value outside the label
    set is an error naming the row."""
    index = {n: i for i, n in enumerate(label_names)}
    source = f"{where.key('labels')} ({', '.join(label_names)})" if where.declared else "the train labels"

    def one(v: Any, row: int) -> int:
        if isinstance(v, bool) or not isinstance(v, str | int):
            raise UserError(f"{key}: row {row}: a label is a name (string) or an id (integer), got {v!r:.40}")
        if isinstance(v, int):
            if not 0 <= v < len(label_names):
                raise UserError(
                    f"{key}: row {row}: label id {v} is outside 0..{len(label_names) - 1} ({source})"
                )
            return v
        if v not in index:
            raise UserError(f"{key}: row {row}: label {v!r} is not one of {source}")
        return index[v]

    out = []
    for i, value in enumerate(values, 1):
        if where.multi_label:
            if not isinstance(value, list):
                raise UserError(
                    f"{key}: row {i}: with {where.key('multi_label')} a label is a list, got {value!r:.40}"
                )
            out.append(sorted({one(v, i) for v in value}))
        else:
            if value is None or isinstance(value, list):
                raise UserError(f"{key}: row {i}: needs one label, got {value!r:.40}")
            out.append(one(value, i))
    return out


def as_targets(label_ids: list, n: int, multi_label: bool) -> list:
    """What the loss takes: the id, or a 0/1 vector over the labels with multi-label."""
    if not multi_label:
        return label_ids
    return [[1.0 if j in row else 0.0 for j in range(n)] for row in label_ids]


def class_weights(spec: Any, label_names: list[str], train_ids: list, where: Where) -> torch.Tensor | None:
    """One weight per label: `balanced` (n_rows / (n_labels * rows of the label), scikit-learn's rule;
    with multi-label, the positive weight negatives / positives of each label) or as the recipe lists
    them (labels it leaves out weigh 1)."""
    if spec is None:
        return None
    key = where.key("class_weights")
    if isinstance(spec, dict):
        unknown = [k for k in spec if k not in label_names]
        if unknown:
            raise UserError(f"{key}: {unknown[0]!r} is not a label ({', '.join(label_names)})")
        bad = [k for k, v in spec.items() if not v > 0]
        if bad:
            raise UserError(f"{key}.{bad[0]}: a weight must be > 0, got {spec[bad[0]]}")
        return torch.tensor([float(spec.get(n, 1.0)) for n in label_names])
    n = len(label_names)
    if where.multi_label:
        positives = torch.tensor([sum(j in row for row in train_ids) for j in range(n)], dtype=torch.float)
        missing = [label_names[j] for j in range(n) if positives[j] == 0]
        if missing:
            raise UserError(
                f"{key}: balanced weights need every label in the train data; {missing[0]!r} has no row"
            )
        return (len(train_ids) - positives) / positives
    import numpy as np
    from sklearn.utils.class_weight import compute_class_weight

    present = sorted(set(train_ids))
    if len(present) < n:
        absent = next(label_names[j] for j in range(n) if j not in present)
        raise UserError(f"{key}: balanced weights need every label in the train data; {absent!r} has no row")
    weights = compute_class_weight("balanced", classes=np.arange(n), y=np.asarray(train_ids))
    return torch.tensor(weights, dtype=torch.float)


def probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)


def decide(logits: torch.Tensor, multi_label: bool) -> list:
    """The predicted id per row (multi-label: the ids whose probability exceeds 0.5)."""
    if multi_label:
        return [torch.nonzero(row > 0).flatten().tolist() for row in logits]
    return logits.argmax(dim=-1).tolist()


def _indicator(rows: list, n: int) -> Any:
    import numpy as np

    out = np.zeros((len(rows), n), dtype=int)
    for i, row in enumerate(rows):
        out[i, row] = 1
    return out


def metrics(targets: list, predicted: list, label_names: list[str], multi_label: bool) -> dict[str, Any]:
    """Accuracy (multi-label: every label of a row right), macro-F1, per-label precision / recall / F1 /
    support, and the accuracy of always answering the most common label (chance)."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    n = len(label_names)
    y_true, y_pred = (
        (_indicator(targets, n), _indicator(predicted, n)) if multi_label else (targets, predicted)
    )
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(n)), zero_division=0
    )
    if multi_label:
        majority = max(Counter(tuple(t) for t in targets).values()) / len(targets)
    else:
        majority = max(Counter(targets).values()) / len(targets)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "per_class": {
            name: {
                "precision": float(precision[j]),
                "recall": float(recall[j]),
                "f1": float(f1[j]),
                "support": int(support[j]),
            }
            for j, name in enumerate(label_names)
        },
        "majority_accuracy": majority,
        "rows": len(targets),
    }


def plot_confusion(
    targets: list, predicted: list, label_names: list[str], multi_label: bool, path: Path, title: str
) -> None:
    """The confusion matrix (rows: true label, columns: predicted); with multi-label one 2×2 matrix per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import confusion_matrix, multilabel_confusion_matrix

    n = len(label_names)
    if multi_label:
        matrices = multilabel_confusion_matrix(_indicator(targets, n), _indicator(predicted, n))
        panels = [(m, ["no", "yes"], name) for m, name in zip(matrices, label_names, strict=True)]
    else:
        panels = [(confusion_matrix(targets, predicted, labels=list(range(n))), label_names, title)]
    side = max(3.0, 0.5 * len(panels[0][1]) + 2)
    fig, axes = plt.subplots(1, len(panels), figsize=(side * len(panels), side), dpi=100, squeeze=False)
    for ax, (matrix, ticks, name) in zip(axes[0], panels, strict=True):
        ax.imshow(matrix, cmap="Blues")
        dark = matrix.max() / 2
        ax.set_xticks(range(len(ticks)), ticks, rotation=45, ha="right")
        ax.set_yticks(range(len(ticks)), ticks)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name)
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > dark else "black")
    if multi_label:
        fig.suptitle(title)
    save_figure(fig, path)
