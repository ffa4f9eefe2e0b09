"""Timing helper shared by the demo and the benchmarks."""

import time

import torch


def median_time(fn, reps: int) -> float:
    """Median seconds of fn() over reps runs, after two warm-up runs, without autograd."""
    with torch.no_grad():
        for _ in range(2):
            fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]
