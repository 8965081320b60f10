"""lm-evaluation-harness on a model loaded by our loader (4-bit, NF4 experts, adapters): its `HFLM`
takes a model object and a tokenizer, so any of its tasks — or local task YAMLs — run offline on it.
`lm-eval` is an optional extra (`pip install finetune[eval]`)."""

from __future__ import annotations

from typing import Any

from finetune.errors import UserError


def available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def evaluate(
    tasks: list[str],
    model: Any,
    tokenizer: Any,
    *,
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` results for `tasks` (task names, or ones defined in `include_path`)."""
    if not available():
        raise UserError(
            "lm-evaluation-harness is not installed: pip install 'finetune[eval]' (or pip install lm-eval)"
        )
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"lm-eval: unknown task {unknown[0]!r} (local task YAMLs: --lm-eval-include DIR)")
    return simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=False)
