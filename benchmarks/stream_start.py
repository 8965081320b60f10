"""Streaming a large local JSON Lines file (`data.streaming: true`): time to the first training step and
peak host memory, against the same stage on a small file read whole (the model's own footprint).

Writes a JSON Lines file of `messages` rows (default 1 GB, kept for the next run) and runs
`python -m finetune run` in a fresh process per variant on the embedded tiny model (CPU), polling
`metrics.jsonl` for the first logged step and sampling the resident set size of the process tree:
  small      a 2,000-row copy of the same rows, read whole (not streamed)
  streamed   the large file, streamed
and, for scale, the seconds a fresh interpreter takes to import the stage (`imports_s`).

    python benchmarks/stream_start.py [--gb 1.0] [--dir /tmp/stream-bench] [--out stream_start.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
FILLER = "lorem ipsum dolor sit amet " * 30  # ~800 characters per user turn


def write_rows(path: Path, target_bytes: int) -> int:
    """Rows `{"messages": [user, assistant]}` until the file holds `target_bytes`; returns the row count."""
    rows, written = 0, 0
    with path.open("w") as f:
        while written < target_bytes:
            line = json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"{rows}: {FILLER}"},
                        {"role": "assistant", "content": f"answer {rows}"},
                    ]
                }
            )
            f.write(line + "\n")
            written += len(line) + 1
            rows += 1
    return rows


def recipe(folder: Path, data: Path, streaming: bool, steps: int) -> Path:
    spec = {
        "name": "stream-start",
        "output_dir": str(folder / ("run-streamed" if streaming else "run-small")),
        "seed": 0,
        "model": {"preset": "tiny", "dtype": "float32"},
        "adapter": {"r": 4, "alpha": 8},
        "stages": {
            "sft": {
                "type": "sft",
                "data": {"train": str(data), "streaming": streaming},
                "train": {
                    "max_steps": steps,
                    "per_device_train_batch_size": 4,
                    "max_length": 1024,
                    "logging_steps": 1,
                    "save_strategy": "no",
                    "use_cpu": True,
                },
            }
        },
    }
    path = folder / f"{'streamed' if streaming else 'small'}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def measure(recipe_path: Path, run_dir: Path) -> dict:
    """Launch `finetune run`; seconds to the first logged step, peak RSS (MiB) of the process tree."""
    metrics = run_dir / "sft" / "metrics.jsonl"
    shutil.rmtree(run_dir, ignore_errors=True)  # an earlier run's metrics.jsonl would read as this one's
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune", "run", str(recipe_path), "--overwrite"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    watched = psutil.Process(proc.pid)
    peak, first_step = 0, None
    while proc.poll() is None:
        try:
            tree = [watched, *watched.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        if first_step is None and metrics.is_file() and '"loss"' in metrics.read_text():
            first_step = time.monotonic() - start
        time.sleep(0.05)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{recipe_path}: exit {proc.returncode}\n{err[-2000:]}")
    return {
        "first_step_s": round(first_step, 2) if first_step is not None else None,
        "total_s": round(time.monotonic() - start, 2),
        "peak_rss_mib": round(peak / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the streamed file")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/stream-bench"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("stream_start.json"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    big = args.dir / f"rows-{args.gb:g}gb.jsonl"
    target = int(args.gb * 2**30)
    if not big.is_file() or big.stat().st_size < target:
        began = time.monotonic()
        count = write_rows(big, target)
        print(f"wrote {big} ({count} rows) in {time.monotonic() - began:.1f} s", file=sys.stderr)
    small = args.dir / "small.jsonl"
    with big.open() as src, small.open("w") as dst:
        for _, line in zip(range(2000), src, strict=False):
            dst.write(line)
    result = {"file": str(big), "file_bytes": big.stat().st_size, "steps": args.steps, "cpu": True}
    # What any run pays before it reads data: the interpreter and the libraries a stage imports.
    began = time.monotonic()
    subprocess.run(
        [sys.executable, "-c", "import finetune.pipeline, finetune.stages.sft"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    )
    result["imports_s"] = round(time.monotonic() - began, 2)
    for name, data, streaming in (("small", small, False), ("streamed", big, True)):
        path = recipe(args.dir, data, streaming, args.steps)
        result[name] = measure(path, args.dir / f"run-{name}")
        print(name, result[name], file=sys.stderr)
    result["extra_rss_mib"] = result["streamed"]["peak_rss_mib"] - result["small"]["peak_rss_mib"]
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
