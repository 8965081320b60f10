"""Shared by the kernel benchmarks (nf4_gemm.py, nf4_decode.py, nf4_dequant.py): a skewed router, a timer,
the JSON's head, a failed measurement's record."""

from __future__ import annotations

import platform
import statistics
import time
import traceback
from collections.abc import Callable

import torch


def route(tokens: int, experts: int, top_k: int, gen: torch.Generator) -> torch.Tensor:
    """Expert ids [tokens, top_k]: top-k of noisy logits with a per-expert bias (load skew, as trained
    routers have: some experts hot, some cold)."""
    bias = torch.randn(experts, generator=gen) * 0.8
    logits = torch.randn(tokens, experts, generator=gen) + bias
    return logits.topk(top_k, dim=1).indices


def time_fn(fn: Callable[[], object], cuda: bool, iters: int, warmup: int, sleep_cycles: int = 0) -> dict:
    """Median / min ms of one call (CUDA events; with `sleep_cycles`, each call queued behind a GPU sleep
    so the host's launch cost is not counted) and the first call's seconds."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if sleep_cycles:
                torch.cuda._sleep(sleep_cycles)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {
        "median_ms": round(statistics.median(times), 4),
        "min_ms": round(min(times), 4),
        "first_call_s": round(first, 3),
    }


def results_head(args: object, device: str) -> dict:
    """The start of a kernel benchmark's JSON: where and with what it ran, and empty run/error lists."""
    import bitsandbytes
    import triton

    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "python": platform.python_version(),
        "args": vars(args),
        "runs": [],
        "errors": [],
    }


def record_error(results: dict, row: dict, err: Exception, cuda: bool) -> None:
    """Inside `except`: the error on its row and, with the traceback, in the run's error list (one
    failure must not lose the run); the device drained so the next measurement starts clean."""
    row["error"] = f"{type(err).__name__}: {err}"[:2000]
    results["errors"].append({**row, "traceback": traceback.format_exc()[-4000:]})
    if cuda:
        torch.cuda.synchronize()
