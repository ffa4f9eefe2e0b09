"""Routing statistics from a calibration run, and the per-block k schedule they suggest.

    cal = moec.calibrate(model, batches)        # batches: input_ids tensors, dicts of keyword or tuples of
                                                #   positional inputs (one tensor: one batch)
    print(cal)                                  # per block: load, top-j weight mass, entropy (+ a load heat row)
    cal.plot("routing.png")                     # expert-load heatmap [blocks x experts] (matplotlib)
    schedule = moec.topk_schedule(cal, average=3.3)
    moec.compile(model, topk=schedule, approximate=True)
    schedule = moec.topk_search(model, average=3.3, loss=lambda m: my_eval_loss(m))   # by measured loss instead
    plan = moec.expert_plan(cal, keep=48, mode="prune")      # or "merge"; keep: n, a fraction, {block: n}
    moec.compile(model, experts=plan, approximate=True)

Per block (found by moec as compile does, its router read from the graph):
  load [E]           (token, slot) pairs routed to each expert (pairs of weight 0, which top-p routing drops, are
                     not counted)
  pairs              mean pairs a token is routed to (its k; fewer under top-p routing)
  mass [k]           mean share of a token's router probability held by its top-1 .. top-k experts
                     (probabilities: softmax of the logits; sigmoid scores normalised to sum 1)
  entropy            mean entropy of a token's router probabilities (nats; log E when uniform)
  coactivation [E,E] tokens routed to both experts i and j (diagonal: tokens routed to i)
The model's state is left as it was (the blocks' routers run beside it, on each block's input); the result is
kept with it: `moec.inspect(model).calibration`, and in the file `moec.save` writes.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from moec.approx import ExpertPlan


@dataclass
class BlockRouting:
    path: str
    num_experts: int
    top_k: int
    tokens: int
    load: list[int]
    mass: list[float]
    entropy: float
    coactivation: list[list[int]]
    pairs: float = 0.0


@dataclass
class Calibration:
    blocks: list[BlockRouting]

    def to_json(self) -> list[dict]:
        return [asdict(b) for b in self.blocks]

    @classmethod
    def from_json(cls, data: list[dict]) -> "Calibration":
        return cls([BlockRouting(**b) for b in data])

    def __rich__(self) -> Table:
        k = max((b.top_k for b in self.blocks), default=0)
        t = Table(title=f"moec routing: {len(self.blocks)} block(s), {self.blocks[0].tokens if self.blocks else 0} "
                        f"tokens", title_justify="left")
        for col in ("block", "E", "k", "pairs/token", "load min/max", *[f"top-{j} mass" for j in range(1, k + 1)],
                    "entropy", "load (darker: more)"):
            t.add_column(col)
        shades = " ░▒▓█"
        for b in self.blocks:
            hi = max(b.load) or 1
            row = "".join(shades[min(4, math.ceil(4 * n / hi))] for n in b.load)
            mass = [f"{m:.2f}" for m in b.mass] + [""] * (k - len(b.mass))
            t.add_row(b.path, str(b.num_experts), str(b.top_k), f"{b.pairs:.2f}", f"{min(b.load)}/{max(b.load)}",
                      *mass, f"{b.entropy:.2f} / {math.log(b.num_experts):.2f}", row)
        return t

    def __str__(self) -> str:
        console = Console(width=200, file=io.StringIO())
        console.print(self)
        return console.file.getvalue()

    def plot(self, path: str) -> None:
        """The expert-load heatmap, one row per block (each row's share of its pairs), as a PNG at `path`."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("Calibration.plot needs matplotlib: pip install matplotlib") from None
        E = max(b.num_experts for b in self.blocks)
        share = torch.zeros(len(self.blocks), E)
        for i, b in enumerate(self.blocks):
            load = torch.tensor(b.load, dtype=torch.float64)
            share[i, :len(load)] = (load / load.sum().clamp_min(1)).float()
        fig, ax = plt.subplots(figsize=(max(6.0, E / 6), 1.0 + 0.4 * len(self.blocks)))
        im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(self.blocks)), [b.path for b in self.blocks], fontsize=7)
        ax.set_xlabel("expert")
        ax.set_title(f"expert load (share of each block's (token, slot) pairs), {self.blocks[0].tokens} tokens")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def calibrate(model: nn.Module, batches) -> Calibration:
    """Run `model` on each batch (an input_ids tensor, or a dict of keyword inputs) and collect each MoE
    block's routing statistics (see the module docstring). A dict's `attention_mask` [B, S] leaves the padding out
    of a decoder-only model's counts (each block routes the B * S tokens in order)."""
    from moec.api import _check_module, _spec_of, block_route, inspect
    from moec.bindings import resolve
    from moec.capture import untouched

    _check_module(model, "calibrate")
    report = inspect(model)
    if report.backend.startswith("onnxruntime"):
        raise NotImplementedError("moec.calibrate: the model runs in an ONNX Runtime session (backend='onnxruntime'), "
                                  "whose blocks moec cannot watch: calibrate the model before compiling it")
    if isinstance(batches, torch.Tensor):  # one batch of input_ids
        batches = [batches]
    if not report.blocks:
        raise ValueError("moec.calibrate: no MoE block found in the model (see moec.inspect(model).rejected)")
    stats: dict[str, dict] = {}
    real = [None]  # the batch's attention_mask as [B * S] bools (decoder-only models)

    def hook(path, spec, roles):
        E, k = spec.router_width, spec.router.top_k  # (zero-compute experts counted too)

        def fn(mod, args, kwargs):
            logits, ids, w = block_route(mod, spec, roles, args[0] if args else next(iter(kwargs.values())))
            s = logits.float()
            probs = s.sigmoid() / s.sigmoid().sum(-1, keepdim=True) if spec.router.scoring == "sigmoid" \
                else s.softmax(-1)  # [T, E]
            ids, probs, used = ids.long().cpu(), probs.cpu(), (w != 0).cpu()  # used: the pairs top-p keeps
            if real[0] is not None and len(real[0]) == len(ids):  # the batch's tokens, not its padding
                ids, probs, used = ids[real[0]], probs[real[0]], used[real[0]]
            onehot = torch.zeros(len(ids), E).scatter_reduce_(1, ids, used.float(), "amax")  # [T, E]
            st = stats.setdefault(path, {"tokens": 0, "load": torch.zeros(E, dtype=torch.long),
                                         "mass": torch.zeros(k, dtype=torch.float64), "entropy": 0.0,
                                         "co": torch.zeros(E, E, dtype=torch.long), "k": k, "E": E, "pairs": 0})
            st["tokens"] += len(ids)
            st["pairs"] += int(used.sum())
            st["load"] += torch.bincount(ids[used], minlength=E)
            st["mass"] += probs.sort(-1, descending=True).values[:, :k].cumsum(-1).sum(0).double()
            st["entropy"] += float(-(probs * probs.clamp_min(1e-30).log()).sum())
            st["co"] += (onehot.T @ onehot).long()
        return fn

    hooks = []
    for b in report.blocks:
        spec, roles = _spec_of(model, b.path)
        if "router_weight" in roles:
            hooks.append(resolve(model, b.path).register_forward_pre_hook(hook(b.path, spec, roles), with_kwargs=True))
    try:
        with torch.no_grad(), untouched(model):
            for batch in batches:  # input_ids, a dict of keyword inputs, or a tuple of positional ones
                mask = batch.get("attention_mask") if isinstance(batch, dict) else None
                decoder_only = not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
                real[0] = mask.reshape(-1).bool().cpu() if mask is not None and mask.dim() == 2 and decoder_only \
                    else None
                model(**batch) if isinstance(batch, dict) else model(*batch) if isinstance(batch, tuple) else model(batch)
    finally:
        for h in hooks:
            h.remove()
    if not stats:
        raise ValueError("moec.calibrate: the model's blocks saw no tokens (empty batches?)")
    cal = Calibration([BlockRouting(p, s["E"], s["k"], s["tokens"], s["load"].tolist(),
                                     (s["mass"] / s["tokens"]).tolist(), s["entropy"] / s["tokens"], s["co"].tolist(),
                                     s["pairs"] / s["tokens"])
                        for p, s in stats.items()])
    model.__dict__["_moec_calibration"] = cal  # moec.inspect(model).calibration; moec.save keeps it
    return cal


def topk_schedule(cal: Calibration, average: float) -> dict[str, int]:
    """A k per block whose mean is at most `average`: from each block's own k, lower one block's k at a time,
    the block whose next expert dropped holds the least router mass (calibration's top-j mass)."""
    ks = {b.path: b.top_k for b in cal.blocks}
    mass = {b.path: b.mass for b in cal.blocks}
    if not ks:
        raise ValueError("moec.topk_schedule: the calibration has no block")
    if not 1 <= average:
        raise ValueError(f"moec.topk_schedule: average must be >= 1, not {average}")
    while sum(ks.values()) / len(ks) > average + 1e-9:
        p = min((p for p in ks if ks[p] > 1), key=lambda p: mass[p][ks[p] - 1] - mass[p][ks[p] - 2])
        ks[p] -= 1
    return ks


def expert_plan(cal: Calibration, keep, mode: str = "prune") -> ExpertPlan:
    """Which experts each block keeps: its `keep` most loaded ones in the calibration (ties: the lower id).
    keep: a count for every block, a fraction of each block's experts (0 < keep < 1), or {block path: count}
    (blocks not named keep all theirs). mode: "prune" or "merge" (moec.ExpertPlan)."""
    if not cal.blocks:
        raise ValueError("moec.expert_plan: the calibration has no block")
    plan_keep, usage = {}, {}
    for b in cal.blocks:
        n = keep.get(b.path) if isinstance(keep, dict) else keep
        if n is None:
            continue
        if isinstance(n, float) and 0 < n < 1:
            n = max(1, round(n * b.num_experts))
        if type(n) is not int or not 1 <= n <= b.num_experts:
            raise ValueError(f"moec.expert_plan: keep for {b.path!r} must be a count in 1..{b.num_experts} or a "
                             f"fraction in (0, 1), not {n!r}")
        order = sorted(range(b.num_experts), key=lambda e: (-b.load[e], e))
        plan_keep[b.path], usage[b.path] = order[:n], b.load
    if isinstance(keep, dict) and (unknown := sorted(set(keep) - {b.path for b in cal.blocks})):
        raise ValueError(f"moec.expert_plan: keep names no calibrated block at {unknown}")
    return ExpertPlan(mode, plan_keep, usage)


def topk_search(model: nn.Module, average: float, loss) -> dict[str, int]:
    """A k per block whose mean is at most `average`, by measured loss: from each block's own k, lower one block's
    k at a time, the block whose lowering raises `loss(model)` (a float, lower is better: e.g. perplexity on
    calibration text, never the text you report) the least. Runs on a copy of `model`; each step recompiles
    only the block it tries (len(blocks) loss evaluations per step)."""
    import copy

    from moec.api import compile, inspect

    report = inspect(model)
    if report.quantize is not None or report.offload is not None or report.expert_parallel is not None:
        raise NotImplementedError("moec.topk_search recompiles the blocks with each k it tries, which a model with "
                                  "quantized, offloaded or sharded experts cannot (their fp weights were released): "
                                  "search on the model before compiling it, then compile it with the k found")
    work = copy.deepcopy(model)
    ks = {b.path: b.top_k for b in inspect(work).blocks}
    if not ks:
        raise ValueError("moec.topk_search: no MoE block found in the model (see moec.inspect(model).rejected)")
    if not 1 <= average:
        raise ValueError(f"moec.topk_search: average must be >= 1, not {average}")

    def tried(schedule: dict) -> float:
        compile(work, topk=schedule, approximate=True)
        return float(loss(work))

    while sum(ks.values()) / len(ks) > average + 1e-9:
        scores = {p: tried(ks | {p: ks[p] - 1}) for p in ks if ks[p] > 1}
        ks[min(scores, key=scores.get)] -= 1
    return ks
