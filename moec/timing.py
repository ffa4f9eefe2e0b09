"""Timing helpers shared by the demo and the benchmarks."""

import time

import torch


def median_time(fn, reps: int) -> float:
    """Median seconds of fn() over reps runs, after two warm-up runs, without autograd."""
    return median_times({None: fn}, reps)[None]


def median_times(fns: dict, reps: int, round_robin: bool = False) -> dict:
    """label -> median seconds of fns[label]() over reps runs, after two warm-up runs each, without
    autograd; or the exception a function raised. Each function runs its reps back to back (its weights
    stay in the caches between calls, as in a loop over one layer), or with `round_robin` one call per
    function per round (each call finds the caches filled by the others, as a layer of a deep model
    does, and a slow spell of a shared machine lands on all functions alike)."""
    out, ts = {}, {label: [] for label in fns}
    with torch.no_grad():
        for label, fn in fns.items():
            try:
                fn(), fn()
            except Exception as e:  # e.g. a model torch.export cannot export: the caller reports it
                out[label] = e
        live = [(label, fn) for label, fn in fns.items() if label not in out]
        order = [[item] * reps for item in live] if not round_robin else [live] * reps
        for label, fn in (item for batch in order for item in batch):
            t0 = time.perf_counter()
            fn()
            ts[label].append(time.perf_counter() - t0)
    return {label: out[label] if label in out else sorted(ts[label])[len(ts[label]) // 2] for label in fns}
