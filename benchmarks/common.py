"""Timing and memory helpers shared by the benchmarks.

Timings interleave the candidates round by round, in a fresh random order each round, and
report the best round of each: on a shared, noisy machine the minimum is the most repeatable
estimate of what the code costs (medians of two identical candidates differed by 25% here),
and a machine that slows down mid-run slows every candidate alike.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from pathlib import Path
from typing import Callable

import torch

__all__ = ["device_name", "interleaved_best_ms", "peak_memory_mb", "write_json"]


def device_name(device: torch.device) -> str:
    """Human-readable name of the device (GPU model or CPU with its thread count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_best_ms(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Best (minimum) wall time in ms of each callable over ``repeats`` interleaved rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    rng = random.Random(0)
    order = list(fns)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: min(ts) for name, ts in times.items()}


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory allocated by torch while ``fn`` runs, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the running sum of the allocation events
    the profiler records, so only tensors allocated inside ``fn`` count.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # allocation (+) and free (-) records, in time order
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak / 2**20


def write_json(path: os.PathLike | str, payload: dict) -> Path:
    """Write ``payload`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
    return path
