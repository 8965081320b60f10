"""Shared fixtures: an isolated cache for the embedded model, small data files, recipe writing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
# Before any test module imports huggingface_hub, which reads these once: tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _cpu_kernels():
    # The test session is an entry point like the CLI: bitsandbytes' CPU 4-bit ops are ours throughout,
    # also for tests that quantize without a loader (the loaders install them themselves).
    from finetune.compat import bitsandbytes

    bitsandbytes.install_cpu_kernels()


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    # The embedded model is written once per test session, never into the user's cache.
    os.environ["FINETUNE_CACHE"] = str(tmp_path_factory.mktemp("finetune-cache"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows(n: int) -> list[dict]:
    words = ["abcd", "wxyz", "hijk", "mnop", "qrst", "efgh", "uvwx", "ijkl"]
    return [
        {
            "messages": [
                {"role": "user", "content": f"reverse: {words[i % len(words)]}"},
                {"role": "assistant", "content": words[i % len(words)][::-1]},
            ]
        }
        for i in range(n)
    ]


def base_recipe(tmp_path: Path, **stage_train) -> dict:
    data = write_jsonl(tmp_path / "data" / "train.jsonl", chat_rows(16))
    return {
        "name": "t",
        "output_dir": str(tmp_path / "run"),
        "seed": 1,
        "model": {"preset": "tiny", "quantization": "nf4", "dtype": "float32"},
        "adapter": {"r": 4, "alpha": 8, "targets": ["mla"]},
        "stages": {
            "sft": {
                "type": "sft",
                "data": {"train": str(data)},
                "train": {
                    "max_steps": 2,
                    "per_device_train_batch_size": 4,
                    "logging_steps": 1,
                    **stage_train,
                },
            }
        },
    }


def write_recipe(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def one_error_line(err: str) -> str:
    """The CLI's contract for bad input: exactly one `error: ...` line, last on stderr, no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    assert "Traceback" not in err
    return errors[0]


def fails(capsys, tmp_path: Path, argv: list[str]) -> str:
    """Run the CLI on bad input: exit 2, one error line, and no run directory left behind."""
    from finetune.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    line = one_error_line(err)
    assert not (tmp_path / "run").exists(), "a failed run must not leave a run directory"
    return line


def train_sft_keeping_before(r, tmp: Path):
    """Plan `r`, snapshot every parameter and buffer of its adapted model, train its `sft` stage in place:
    (plan, trained model, snapshot) for tests that compare what changed."""
    from finetune import pipeline
    from finetune.stages import sft

    plan = pipeline.plan(r)
    model = plan.context.adapted_model()
    before = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    (tmp / "run").mkdir()
    sft.run("sft", r.stages["sft"], plan.inputs["sft"], plan.context, model=model)
    return plan, model, before
