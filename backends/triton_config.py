"""Tile configurations for the Triton expert GEMMs: tuned files first, a heuristic otherwise.

A tuned file is JSON written by `benchmarks/tune_triton.py`, one per device name
and Triton version, mapping a shape key "E,N1,H,k,dtype" (quantized weights: "E,N1,H,k,dtype-w8"
or "...-w4g128") to {tokens: config}; the entry with the nearest token count is used where it is within a
factor of 4 of the call's (tiles tuned for 1 token are no guide at 4096: the heuristic runs there). Files
are looked for in $MOEC_TRITON_CONFIGS (if set), then in `backends/triton_configs/` (shipped).
A missing file or shape falls back to `heuristic`, never to an error. `MOEC_LOGS=debug` logs which config ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from pathlib import Path

import torch
import triton

from moec.log import log

SHIPPED = Path(__file__).parent / "triton_configs"


@dataclasses.dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else device.type


def file_name(device: str) -> str:
    return f"{device}__triton-{triton.__version__}.json"


def shape_key(E: int, N1: int, H: int, k: int, dtype: torch.dtype, quant: str = "") -> str:
    """quant: "" (weights in the activation dtype), "w8" (int8) or "w4g<group>" (int4)."""
    return f"{E},{N1},{H},{k},{str(dtype).removeprefix('torch.')}" + (f"-{quant}" if quant else "")


@functools.cache
def _tuned(device: str) -> dict:
    for folder in (os.environ.get("MOEC_TRITON_CONFIGS"), SHIPPED):
        if folder and (path := Path(folder) / file_name(device)).is_file():
            log.debug("triton configs from %s", path)
            return json.loads(path.read_text())
    return {}


def heuristic(T: int, E: int, k: int, dtype: torch.dtype, device: torch.device) -> Config:
    """Tiles by rows per expert; quantized weights use the same (untuned) tiles as their activation dtype."""
    if device.type != "cuda":  # the interpreter: few, large programs (its cost is per program and k-step)
        return Config(16, 64, 64)
    wide = 64 if dtype == torch.float32 else 128  # K tile in elements: 128 B of fp32 or 256 B of bf16/fp16
    if T * k <= E * 2:  # decode: every expert sees few rows; small M tiles, stream the weights
        return Config(16, 64, wide, num_warps=4, num_stages=4)
    if T * k <= E * 64:
        return Config(32, 64, wide, num_warps=4, num_stages=3)
    return Config(64, 128, wide // 2, num_warps=8, num_stages=3)


_forced: list[Config] = []


@contextlib.contextmanager
def forced(cfg: Config):
    """Run the experts kernels with `cfg` (the tuner's hook)."""
    _forced.append(cfg)
    try:
        yield
    finally:
        _forced.pop()


def config_for(T: int, E: int, N1: int, H: int, k: int, dtype: torch.dtype, device: torch.device,
               quant: str = "") -> Config:
    key = shape_key(E, N1, H, k, dtype, quant)
    table = _tuned(device_name(device)).get(key)
    near = min(table, key=lambda t: abs(int(t) - T)) if table else None
    if _forced:
        cfg, source = _forced[-1], "forced"
    elif near is not None and max(int(near), T) <= 4 * min(int(near), T):
        cfg, source = Config(**table[near]), f"tuned for {near} tokens"
    else:
        cfg, source = heuristic(T, E, k, dtype, device), "heuristic"
    log.debug("triton experts T=%d %s: %s (%s)", T, key, cfg, source)
    return cfg
