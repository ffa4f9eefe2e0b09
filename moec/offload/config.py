"""moec.Offload: what to offload and how (budget, store, policy, prefetch); the budget in slots."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

POLICIES = ("lru", "lfu", "routing", "auto")


@dataclass(frozen=True)
class Offload:
    """How to offload the routed experts (see the module docstring).

    budget: "25%" / 0.25 (fraction of the experts), 12 (experts), "1.5GB" / "800MB" (bytes of expert weights).
    store: "disk" (a safetensors file per block under `path`; CPU models) or "host" (host memory: pinned
        when the model is on a GPU).
    path: the disk store's folder (default: a temporary folder, removed with the model).
    policy: "lru", "lfu", "routing" (see `victim`) or "auto" (the best of them on the first calls' routing, replayed).
    prefetch: "router" (each block's router applied ahead of it, loaded by a worker thread: see
        moec.offload.prefetch), None, or "auto": router on a GPU (the copies run on a side stream beside the
        compute), None on a CPU (there the worker competes with the compute for the cores: measured slower,
        docs/offload.md).
    prefetch_width: how many experts a prediction names, in multiples of the block's k (its top width*k):
        more hits for more bytes read (docs/offload.md).
    """

    budget: str | float | int = "25%"
    store: str = "disk"
    path: str | None = None
    policy: str = "auto"
    prefetch: str | None = "auto"
    prefetch_width: int = 2

    def __post_init__(self):
        if self.store not in ("disk", "host"):
            raise ValueError(f"moec.Offload: store must be 'disk' or 'host', not {self.store!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"moec.Offload: policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.prefetch not in ("router", "auto", None):
            raise ValueError(f"moec.Offload: prefetch must be 'router', 'auto' or None, not {self.prefetch!r}")
        if isinstance(self.prefetch_width, bool) or not isinstance(self.prefetch_width, int) or self.prefetch_width < 1:
            raise ValueError(f"moec.Offload: prefetch_width must be an int >= 1 (multiples of k), not {self.prefetch_width!r}")
        _parse_budget(self.budget)  # a budget that does not parse fails here, with what to write

    def describe(self) -> str:
        return f"offload {self.budget} ({self.store}, {self.policy}, prefetch {self.prefetch})"


def _parse_budget(budget) -> tuple[str, float]:
    """("fraction", f) / ("experts", n) / ("bytes", b), or a ValueError that says what to write."""
    hint = f"moec.Offload: budget {budget!r}: write '25%', 0.25, 12 (experts) or '1.5GB'"
    if isinstance(budget, bool) or not isinstance(budget, (str, int, float)):
        raise TypeError(hint)
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(hint + " (a number of experts is at least 1)")
        return "experts", budget
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(hint + " (a fraction is in (0, 1])")
        return "fraction", budget
    number = r"\s*(\d+(?:\.\d*)?|\.\d+)\s*"
    if (m := re.fullmatch(number + "%\\s*", budget)) and 0 < float(m[1]) <= 100:
        return "fraction", float(m[1]) / 100
    if (m := re.fullmatch(number + r"([kKmMgG]?)i?[bB]\s*", budget)) and float(m[1]) > 0:
        return "bytes", float(m[1]) * 1024 ** " kmg".index(m[2].lower() or " ")
    raise ValueError(hint)


def slots_for(budget, n_experts: int, expert_bytes: int, share: tuple[float, float] = (1.0, 1.0)) -> int:
    """The pool's slots for `budget` over n experts of expert_bytes each: at most n, and at least one (a budget
    in bytes smaller than one expert is refused; blocks of several expert shapes get one slot each at least, which
    a budget under one expert of each exceeds). share: this expert
    shape's share of the model's experts (by count, by bytes) when the pool has several shapes: a budget in
    experts or bytes is split between them in that proportion (a fraction applies to each)."""
    kind, v = _parse_budget(budget)
    if kind == "bytes" and v < expert_bytes:
        raise ValueError(f"moec.Offload: budget {budget!r} is smaller than one expert ({expert_bytes} bytes)")
    n = {"experts": lambda: int(v * share[0] + 1e-9), "fraction": lambda: math.floor(v * n_experts + 1e-9),
         "bytes": lambda: int(v * share[1]) // expert_bytes}[kind]()
    return min(max(n, 1), n_experts)
