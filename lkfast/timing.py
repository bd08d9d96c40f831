"""The project's two timers: every benchmark script and ``python -m lkfast.bench`` time through these.

    time_interleaved(runs, rounds, warmup=1)   CPU: wall-clock seconds of several callables, taken in
                                               turn round by round (ratios from the same rounds)
    gpu_time_ms(fn, ...)                       GPU: milliseconds per call from CUDA events around
                                               many back-to-back calls (warm-up and autotuning excluded)
    time_ms(fn, device)                        the right one of the two for a device
    median(values)

Why these and not simpler ones. On a shared CPU whose speed drifts by tens of percent over seconds,
timing implementations side by side, round by round, keeps their ratios honest where back-to-back
blocks would not. On a GPU a single call between two events measures launch latency and event
overhead as much as the kernel; many calls between one pair of events measure the throughput a
model sees (launches overlap the previous kernel), and the median over several such samples
discards the odd slow one.
"""
from __future__ import annotations

import math
import random
import time
from typing import Callable

import torch


def median(values: list[float]) -> float:
    """The median of a non-empty list (mean of the two middle values for an even count)."""
    if not values:
        raise ValueError("median of no values: time at least one round")
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def time_interleaved(runs: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of every callable, ``rounds`` times, taking them in turn, after ``warmup`` untimed
    rounds. Each round takes them in a new order (a shuffle seeded the same way every time, so a
    measurement is repeatable): what runs just before a call can change its time (caches, the
    thread pool's state), and a fixed or merely rotated order puts the same neighbour before the
    same callable in most rounds.

    Returns {name: [seconds of round 0, round 1, ...]}: round r of every name comes from the same
    stretch of time, so per-round ratios compare like with like. ``clock`` is wall-clock time by
    default (``time.process_time`` counts this process's CPU time instead). For CPU work: CUDA
    calls return before the GPU is done, so use ``gpu_time_ms`` for them.
    """
    if rounds < 1:
        raise ValueError(f"time_interleaved: rounds must be at least 1, got {rounds}")
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(0x1CF)
    for _ in range(rounds):
        names = names[:]
        order.shuffle(names)
        for name in names:
            start = clock()
            runs[name]()
            times[name].append(clock() - start)
    return times


def gpu_time_ms(fn: Callable[[], object], *, warmup: int = 3, samples: int = 7, sample_ms: float = 25.0,
                min_calls: int = 2, max_calls: int = 2000) -> float:
    """Median milliseconds per call of ``fn`` on the current CUDA device.

    ``warmup`` untimed calls first (Triton autotuning, cuDNN's benchmark search, allocator growth
    happen there and are not counted). Then ``samples`` samples, each one pair of CUDA events around
    as many back-to-back calls as fill about ``sample_ms`` (``min_calls`` to ``max_calls``); a
    sample's time is its elapsed time divided by its calls. Calls slower than ``sample_ms`` get 3
    samples at most (their launch overhead is negligible and the run stays short). ``fn`` must not
    synchronize (that would time the host). Refuses (RuntimeError) when CUDA is not available.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("gpu_time_ms needs a CUDA device; on the CPU use time_interleaved (or time_ms)")
    for _ in range(max(warmup, 1)):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probe_calls = 3
    start.record()
    for _ in range(probe_calls):
        fn()
    end.record()
    end.synchronize()
    per_call = max(start.elapsed_time(end) / probe_calls, 1e-4)
    calls = int(min(max_calls, max(min_calls, math.ceil(sample_ms / per_call))))
    if per_call > sample_ms:
        samples = min(samples, 3)
    times = []
    for _ in range(samples):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return median(times)


def time_ms(fn: Callable[[], object], device, rounds: int = 5) -> float:
    """Milliseconds per call of ``fn`` on ``device``: ``gpu_time_ms`` on a CUDA device, else the
    median wall-clock time of ``rounds`` rounds of ``time_interleaved`` (after one warm-up call)."""
    if torch.device(device).type == "cuda":
        return gpu_time_ms(fn)
    return median(time_interleaved({"fn": fn}, rounds)["fn"]) * 1e3


__all__ = ["median", "time_interleaved", "gpu_time_ms", "time_ms"]
