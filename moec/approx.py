"""What the approximating passes are asked for (compile(..., approximate=True)): the configs and their JSON form.

    topk=4 | {block path: k} | TopP(0.9, min_k=1, max_k=None)      passes/reduce_topk.py
    experts=ExpertPlan("prune" | "merge", keep={block path: ids})  passes/reduce_experts.py (moec.expert_plan)

moec.save writes them (to_json) and moec.load compiles the loaded model the same way (from_json).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TopP:
    """Top-p routing: each token keeps the fewest of its heaviest experts whose combine weights hold at least
    `p` of the weight of all the experts it would use (its max_k best; the block's k if None), and never fewer
    than min_k. The kept weights then follow the router's own rule (renormalised if the router renormalises)."""

    p: float
    min_k: int = 1
    max_k: int | None = None

    def __post_init__(self):
        if not (isinstance(self.p, (int, float)) and 0 < self.p <= 1):
            raise ValueError(f"moec.TopP: p must be in (0, 1], not {self.p!r}")
        for name in ("min_k", "max_k"):
            v = getattr(self, name)
            if not (v is None and name == "max_k") and not (type(v) is int and v >= 1):
                raise ValueError(f"moec.TopP: {name} must be an int >= 1, not {v!r}")
        if self.max_k is not None and self.min_k > self.max_k:
            raise ValueError(f"moec.TopP: min_k={self.min_k} is above max_k={self.max_k}")

    def describe(self, k: int) -> str:
        return f"top-p {self.p:g} (k {min(self.min_k, k)}..{k})"


MODES = ("prune", "merge")


@dataclass(frozen=True)
class ExpertPlan:
    """Fewer experts per block. keep: {block path: the expert ids kept}. usage: {block path: each expert's load
    in a calibration run} (merge's averaging weights). Blocks not named keep all their experts.
      prune: the dropped experts leave the router too (their logits become -inf): tokens route among the rest.
      merge: each dropped expert is averaged (weighted by usage) into the kept expert whose weights are the most
             similar (cosine), and the router is unchanged: a token routed to it runs the merged expert."""

    mode: str
    keep: dict = field(default_factory=dict)
    usage: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"moec.ExpertPlan: mode must be one of {MODES}, not {self.mode!r}")
        for name in ("keep", "usage"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"moec.ExpertPlan: {name} must be a dict {{block path: list}}, not "
                                f"{getattr(self, name)!r}")
        for path, ids in self.keep.items():
            if not (isinstance(path, str) and isinstance(ids, (list, tuple)) and ids
                    and all(type(i) is int and i >= 0 for i in ids) and len(set(ids)) == len(ids)):
                raise ValueError(f"moec.ExpertPlan: keep[{path!r}] must be a list of distinct expert ids (ints >= 0), "
                                 f"not {ids!r}")
        for path, load in self.usage.items():
            if not (isinstance(load, (list, tuple)) and all(isinstance(u, (int, float)) and u >= 0 for u in load)):
                raise ValueError(f"moec.ExpertPlan: usage[{path!r}] must be a list of per-expert loads >= 0 (as "
                                 f"moec.calibrate counts them), not {load!r}")
        object.__setattr__(self, "keep", {p: tuple(sorted(ids)) for p, ids in self.keep.items()})
        object.__setattr__(self, "usage", {p: tuple(u) for p, u in self.usage.items()})

    def __hash__(self):
        return hash((self.mode, tuple(self.keep.items())))

    def describe(self, path: str, num_experts: int) -> str:
        return f"{len(self.keep[path])} of {num_experts} experts ({self.mode}d)"


def to_json(option):
    """A topk= or experts= value as JSON (moec.save's metadata)."""
    if isinstance(option, TopP):
        return {"top_p": [option.p, option.min_k, option.max_k]}
    if isinstance(option, ExpertPlan):
        return {"expert_plan": [option.mode, option.keep, option.usage]}
    if isinstance(option, dict):
        return {"per_block": {p: to_json(v) for p, v in option.items()}}
    return option


def from_json(data):
    if isinstance(data, dict) and "top_p" in data:
        return TopP(*data["top_p"])
    if isinstance(data, dict) and "expert_plan" in data:
        return ExpertPlan(*data["expert_plan"])
    if isinstance(data, dict) and "per_block" in data:
        return {p: from_json(v) for p, v in data["per_block"].items()}
    return data  # an int, None, or {block path: k} (files of earlier versions)
