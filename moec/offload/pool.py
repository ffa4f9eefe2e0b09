"""The pool of expert slots shared by a model's offloaded blocks, its statistics, and the module each block's
graph calls in place of its experts op (see moec.offload)."""

from __future__ import annotations

import collections
import contextlib
import io
import math
import shutil
import tempfile
import threading
import time
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from moec.bindings import resolve
from moec.offload.config import Offload, slots_for
from moec.offload.policy import History, simulate, victim_index
from moec.offload.store import DiskStore, HostStore

NO_COPY = ("moec: a model with offloaded experts cannot be copied or pickled (its experts live in the offload store): "
           "compile a fresh copy of the original model instead")

@dataclass
class BlockStats:
    calls: int = 0
    hits: int = 0
    misses: int = 0
    predicted: int = 0  # experts the prefetch named for this block's calls
    predicted_used: int = 0  # of those, needed by the call
    needed_after_prediction: int = 0  # experts needed by calls that had a prediction
    bytes_read: int = 0
    stall_s: float = 0.0


@dataclass
class OffloadStats:
    """What the cache did (`moec.inspect(model).offload`): per block and in total."""

    policy: str
    slots: dict[str, int]  # pool (expert shape) -> slots
    blocks: dict[str, BlockStats] = field(default_factory=dict)
    # the routing seen, [(block, experts needed)] per call (the last 100k calls): what `simulate` replays
    trace: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100_000))

    def total(self) -> BlockStats:
        t = BlockStats()
        for s in self.blocks.values():
            for f in t.__dataclass_fields__:
                setattr(t, f, getattr(t, f) + getattr(s, f))
        return t

    @staticmethod
    def rates(s: BlockStats) -> dict[str, float]:
        return {"hit_rate": s.hits / max(s.hits + s.misses, 1),
                "prefetch_precision": s.predicted_used / max(s.predicted, 1),
                "prefetch_recall": s.predicted_used / max(s.needed_after_prediction, 1)}

    def __rich__(self) -> Table:
        t = Table(title=f"moec offload: policy {self.policy}, slots {self.slots}", title_justify="left")
        for col in ("block", "calls", "hits", "misses", "hit rate", "prefetch precision", "prefetch recall",
                    "MiB read", "stall s"):
            t.add_column(col)
        for name, s in [*self.blocks.items(), ("total", self.total())]:
            r = self.rates(s)
            predicted = s.predicted > 0  # no prediction made (prefetch off): no precision or recall to show
            t.add_row(name, str(s.calls), str(s.hits), str(s.misses), f"{r['hit_rate']:.1%}",
                      f"{r['prefetch_precision']:.1%}" if predicted else "-",
                      f"{r['prefetch_recall']:.1%}" if predicted else "-", f"{s.bytes_read / 2**20:.1f}",
                      f"{s.stall_s:.3f}")
        return t

    def __str__(self) -> str:
        console = Console(width=160, file=io.StringIO())
        console.print(self)
        return console.file.getvalue()


class _Slots:
    """C slots of one expert shape: a tensor [C, ...] per role, which (block, expert) each holds, and per slot
    what the policy reads (arrays: a miss searches every slot for its victim in a few numpy calls). A role the
    blocks hold transposed (GPT-OSS's [E, H, N] read as [E, N, H]) keeps that layout: `raw` is the storage the
    store's bytes go into, `t` the view the kernels read, with the resident tensor's strides (the same GEMMs)."""

    def __init__(self, shapes: dict[str, tuple[torch.Size, torch.dtype]], n: int, device, transposed: frozenset):
        flip = lambda r, s: (*s[:-2], s[-1], s[-2]) if r in transposed else tuple(s)  # noqa: E731
        self.raw = {r: torch.empty((n, *flip(r, s)), dtype=d, device=device) for r, (s, d) in shapes.items()}
        self.t = {r: t.mT if r in transposed else t for r, t in self.raw.items()}
        self.dtypes = {r: d for r, (_, d) in shapes.items()}
        self.n = n
        self.where: dict[tuple[str, int], int] = {}  # (block, expert) -> slot
        self.owner: list[tuple[str, int] | None] = [None] * n
        self.loading: dict[int, Future] = {}  # slot -> the prefetch writing it
        self.pins = np.zeros(n, np.int64)  # calls holding each slot (not evicted meanwhile)
        self.freed: dict[int, torch.cuda.Event] = {}  # GPU: slot -> when the kernels queued on it by its last call end
        # the owner's block (its index in History.order; -1: empty), use count and last use (History's, kept here)
        self.block, self.uses, self.last = np.full(n, -1, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)

    def assign(self, slot: int, key: tuple[str, int], h: History) -> None:
        self.where[key], self.owner[slot] = slot, key
        self.block[slot], self.uses[slot], self.last[slot] = h.index[key[0]], h.uses.get(key, 0), h.last_use.get(key, -1)

    def clear(self, slot: int) -> None:
        self.where.pop(self.owner[slot], None)
        self.owner[slot], self.block[slot] = None, -1


class Pool:
    """The cache of one compiled model: a _Slots per expert shape, the store, the policy, the statistics."""

    AUTO_AFTER = 64  # calls recorded before "auto" replays them to choose a policy

    def __init__(self, cfg: Offload, device: torch.device):
        self.cfg, self.device = cfg, torch.device(device)
        folder = cfg.path or tempfile.mkdtemp(prefix="moec-offload-")
        if cfg.store == "disk":
            self.store = DiskStore(folder)
            if cfg.path is None:
                weakref.finalize(self, shutil.rmtree, folder, True)
        else:
            self.store = HostStore(pin=self.device.type == "cuda")
        self.blocks: dict[str, dict] = {}  # block -> {"shapes", "E", "bytes", "router": next-block prefetch or None}
        self.policy = "routing" if cfg.policy == "auto" else cfg.policy
        self.stats = OffloadStats(cfg.policy, {})
        self._slots: dict[tuple, _Slots] = {}
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        prefetch = cfg.prefetch if cfg.prefetch != "auto" else "router" if self.device.type == "cuda" else None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="moec-prefetch") if prefetch else None
        self._h = History([])
        self._predicted: dict[str, frozenset] = {}
        self.late: list = []  # moec.offload.prefetch.LatePrefetch per block (set up by compile)

    # -- registration (compile time)
    def register(self, block: str, tensors: dict[str, torch.Tensor], quantized: bool = False) -> None:
        """Write a block's experts (role -> [E, ...]) to the store, each in the layout the block holds it (a
        transposed one stored as such); the pool is sized anew at the next call."""
        shapes = {r: (t.shape[1:], t.dtype) for r, t in tensors.items()}
        transposed = frozenset(r for r, t in tensors.items()
                               if t.dim() >= 3 and not t[0].is_contiguous() and t[0].mT.is_contiguous())
        E = len(next(iter(tensors.values())))
        nbytes = sum(t[0].numel() * t.element_size() for t in tensors.values())
        slots_for(self.cfg.budget, E, nbytes)  # a budget smaller than one expert fails before anything is written
        self.store.write(block, {r: t.mT if r in transposed else t for r, t in tensors.items()})
        self.blocks[block] = {"shapes": shapes, "E": E, "bytes": nbytes, "router": None, "quantized": quantized,
                              "transposed": transposed, "dtypes": {r: d for r, (_, d) in shapes.items()}, "casts": []}
        self.blocks[block]["key"] = self._key(self.blocks[block])
        self.stats.blocks[block] = BlockStats()
        self.reset()

    def unregister(self, block: str) -> None:
        self.blocks.pop(block, None)
        self.stats.blocks.pop(block, None)
        self.reset()

    def reset(self) -> None:
        """Empty the cache (sized again at the next call) and the statistics."""
        self._drain()
        with self._lock:
            self._slots.clear()
            self._h = History(list(self.blocks))
            self._predicted.clear()
            self.stats.trace.clear()
            self.policy = "routing" if self.cfg.policy == "auto" else self.cfg.policy
            self.stats.blocks = {b: BlockStats() for b in self.blocks}
            self.stats.policy = self.cfg.policy

    def follow(self, block: str, device: torch.device, dtypes: dict[str, torch.dtype]) -> None:
        """The model moved, or the block's (released) expert tensors changed dtype since compile (model.half(); a
        quantized block's scales follow .to() too): the slots follow them (emptied and sized anew; a block whose
        dtypes differ from another's of the same shape gets slots of its own). Loads then cast the stored experts
        through every dtype the block's tensors went through, rounding as those casts did (fp32 -> bf16 ->
        fp32). dtypes: role -> the dtype the block's tensor for it has now (its floating roles)."""
        info = self.blocks[block]
        dtypes = {**info["dtypes"], **dtypes}
        if device == self.device and dtypes == info["dtypes"]:
            return
        self._drain()
        with self._lock:
            self.device = device
            if dtypes != info["dtypes"]:
                info["casts"].append(dtypes)
                info["dtypes"] = dtypes
                info["key"] = self._key(info)
            self._slots.clear()  # every pool's share of the budget is sized again

    def __deepcopy__(self, memo):
        raise TypeError(NO_COPY)

    def __reduce_ex__(self, protocol):
        raise TypeError(NO_COPY)

    def _drain(self) -> None:
        for s in list(self._slots.values()):
            for f in list(s.loading.values()):
                f.result()

    @staticmethod
    def _key(info: dict) -> tuple:
        """Blocks with equal keys share slots: the same shapes, layout and dtypes now."""
        return (tuple(sorted((r, tuple(s), str(info["dtypes"][r])) for r, (s, _) in info["shapes"].items())),
                info["transposed"])

    def _pool(self, block: str) -> _Slots:
        """The slots of `block`'s expert shape, made at the first call after compile (or after reset/follow)."""
        info = self.blocks[block]
        key = info["key"]
        with self._lock:
            return self._slots[key] if key in self._slots else self._make_slots(key, info)

    def _make_slots(self, key: tuple, info: dict) -> _Slots:
        """The budget's share for this expert shape (over every block of that shape, in proportion to its experts
        or bytes where blocks differ in shape: one budget for the pool), in the dtypes the block's tensors have."""
        shapes = {r: (shape, info["dtypes"][r]) for r, (shape, _) in info["shapes"].items()}
        nbytes = sum(math.prod(s) * d.itemsize for s, d in shapes.values())  # one expert as the slots hold it
        count = lambda blocks: sum(i["E"] for i in blocks)  # noqa: E731
        size = lambda blocks: sum(i["E"] * i["bytes"] for i in blocks)  # noqa: E731
        same, every = [i for i in self.blocks.values() if i["key"] == key], list(self.blocks.values())
        n = slots_for(self.cfg.budget, count(same), nbytes, share=(count(same) / count(every), size(same) / size(every)))
        self._slots[key] = _Slots(shapes, n, self.device, info["transposed"])
        self.stats.slots = {" ".join(f"{r}{list(s)}" for r, s, _ in k): v.n for (k, _), v in self._slots.items()}
        return self._slots[key]

    def next_block(self, block: str) -> str | None:
        order = list(self.blocks)
        i = order.index(block)
        return order[i + 1] if i + 1 < len(order) else None

    # -- the cache
    def _load(self, slots: _Slots, slot: int, block: str, e: int, side: bool = False) -> None:
        """Copy expert e of `block` from the store into `slot` (on a GPU: a side stream for prefetches, waited
        for before the load counts as done; the caller's stream otherwise, which orders it before the compute)."""
        nbytes = 0
        stream = self._side_stream() if side else None
        if stream is not None and slot in slots.freed:  # the last kernels reading this slot may still be queued
            stream.wait_event(slots.freed[slot])
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            casts = self.blocks[block]["casts"]
            for r, t in slots.raw.items():
                # the slot itself where it can take the bytes as they are
                src, n = self.store.read_into(block, r, e, None if casts else t[slot])
                for dtypes in casts:
                    src = src.to(dtypes[r])
                if src.data_ptr() != t[slot].data_ptr():
                    t[slot].copy_(src, non_blocking=src.is_pinned())
                nbytes += n
        if stream is not None:
            stream.synchronize()
        with self._lock:
            self.stats.blocks[block].bytes_read += nbytes

    def _side_stream(self):
        if self.device.type != "cuda":
            return None
        if getattr(self, "_stream", None) is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def _free_slot(self, slots: _Slots, keep: frozenset = frozenset(), mine: set[int] = frozenset()) -> int | None:
        """An empty slot, else the policy's victim among the slots no call holds, no prefetch writes and that do
        not hold a (block, expert) in `keep` (None if there is none). mine: the caller's held slots, of which an
        empty one is free to it (a prefetch it pinned failed and emptied it)."""
        free = slots.pins == 0
        free[[i for i in mine if slots.owner[i] is None]] = True
        free[list(slots.loading)] = False
        free[[slots.where[k] for k in keep if k in slots.where]] = False
        empty = free & (slots.block < 0)
        if empty.any():
            return int(empty.argmax())
        free = np.flatnonzero(free)
        if not len(free):
            return None
        i = int(free[victim_index(self.policy, slots.block[free], slots.uses[free], slots.last[free], self._h)])
        slots.clear(i)
        return i

    def pin(self, block: str, need: list[int]) -> set[int]:
        """Hold the slots of the needed experts already in the pool (until the call ran them); returns them."""
        slots = self._pool(block)
        with self._lock:
            held = {slots.where[block, e] for e in need if (block, e) in slots.where}
            slots.pins[list(held)] += 1
            return held

    def release(self, block: str, held: set[int], slot: int | None = None) -> None:
        """Let go of `slot` (or of every slot in `held`)."""
        slots = self._pool(block)
        with self._cond:
            for i in [slot] if slot is not None else list(held):
                if i in held:
                    held.discard(i)
                    slots.pins[i] -= 1
                    if self.device.type == "cuda":  # a prefetch's copy into the slot waits for the queued kernels
                        slots.freed[i] = torch.cuda.Event()
                        slots.freed[i].record(torch.cuda.current_stream(self.device))
            self._cond.notify_all()

    def acquire(self, block: str, e: int, held: set[int], wait: bool = True) -> tuple[_Slots, int] | None:
        """The slot holding expert e of `block`, held by the caller: a hit, or a miss loaded now into a free slot
        (waiting for one while other calls hold them all; None instead if not `wait`)."""
        slots, st = self._pool(block), self.stats.blocks[block]
        t0 = time.perf_counter()
        while True:
            with self._cond:
                slot = slots.where.get((block, e))
                pending = slots.loading.get(slot) if slot is not None else None
                if pending is None:
                    if slot is None:
                        slot = self._free_slot(slots, mine=held)
                        if slot is None:  # every slot held by a call or being written: wait for one
                            if not wait:
                                return None
                            self._cond.wait(0.05)
                            continue
                        slots.assign(slot, (block, e), self._h)
                        slots.loading[slot] = miss = Future()  # other calls needing it wait for this load
                        st.misses += 1
                    else:
                        st.hits += 1
                        miss = None
                    self._h.use(block, e)
                    slots.uses[slot], slots.last[slot] = self._h.uses[block, e], self._h.clock
                    if slot not in held:
                        slots.pins[slot] += 1
                        held.add(slot)
                    break
            pending.result()  # a prefetch or another call is writing this expert: wait for it
        if miss is not None:
            try:
                self._load(slots, slot, block, e)
            except BaseException:
                with self._cond:
                    slots.clear(slot)
                    self.release(block, held, slot)
                raise
            finally:
                with self._cond:
                    slots.loading.pop(slot, None)
                    miss.set_result(None)
                    self._cond.notify_all()
        st.stall_s += time.perf_counter() - t0
        return slots, slot

    def note_call(self, block: str, need: frozenset) -> None:
        st = self.stats.blocks[block]
        st.calls += 1
        with self._lock:
            self._h.call(block)
        pred = self._predicted.pop(block, None)
        if pred is not None:
            st.predicted += len(pred)
            st.predicted_used += len(pred & need)
            st.needed_after_prediction += len(need)
        self.stats.trace.append((block, need))
        if self.cfg.policy == "auto" and len(self.stats.trace) == self.AUTO_AFTER:
            slots = min(s.n for s in [self._pool(block), *self._slots.values()])
            rate = {p: simulate(list(self.stats.trace), slots, p) for p in ("routing", "lru", "lfu")}
            best = max(rate, key=rate.get)  # replayed without prefetch: leave routing only for a clear win
            self.policy = best if rate[best] > rate["routing"] + 0.05 else "routing"
            self.stats.policy = f"auto: {self.policy}"

    def prefetch(self, block: str, experts: list[int] | None, reserve: int) -> None:
        """Load `experts` of `block` in the worker, into free slots but `reserve` (the running call's misses);
        None: no prediction."""
        if self._worker is None or block not in self.blocks or experts is None:
            return
        slots = self._pool(block)
        self._predicted[block] = frozenset(experts)
        with self._lock:
            room = slots.n - np.count_nonzero(slots.pins) - len(slots.loading) - reserve
            keep = frozenset((block, e) for e in experts)  # a prediction does not evict its own experts
            for e in [e for e in dict.fromkeys(experts) if (block, e) not in slots.where][:max(room, 0)]:
                slot = self._free_slot(slots, keep)
                if slot is None:
                    return
                self._h.last_use[block, e] = self._h.clock  # loaded now: not the first to go
                slots.assign(slot, (block, e), self._h)
                slots.loading[slot] = self._worker.submit(self._prefetch_one, slots, slot, block, e)

    def _prefetch_one(self, slots: _Slots, slot: int, block: str, e: int) -> None:
        try:
            self._load(slots, slot, block, e, side=True)
        except BaseException:  # noqa: BLE001  the call that needs it loads it itself (and raises, if it must)
            with self._lock:
                slots.clear(slot)
        finally:
            with self._cond:
                slots.loading.pop(slot, None)
                self._cond.notify_all()


class OffloadedExperts(nn.Module):
    """The experts op of one block with its weights in the pool: (x [T, H], ids [T, k], weights [T, k],
    b13?, b2?) -> [T, H]. Runs the torch backend's path on each expert's slot, fp (moec.experts: per expert, or
    the numba kernels where the resident op takes them) or quantized (moec.experts_int8/int4: `quantized` names
    the format; `act` ends with the op's int8_activations flag where it has one), or the Triton kernels on the
    slots (`triton`, set by lower_triton: the int4 group size, 0 otherwise). Biases stay resident."""

    def __init__(self, pool: Pool, block: str, act: tuple, quantized: str | None = None, like: dict | None = None):
        super().__init__()
        self.pool, self.block, self.act, self.quantized = pool, block, act[:6], quantized
        self.int8_activations = len(act) > 6 and bool(act[6])
        self.triton: int | None = None
        self.like = {r: p for r, p in (like or {}).items() if p}  # floating role -> the block's tensor it came from
        self._owner = None  # the installed block (a weak reference): where `like` points

    def installed(self, block: nn.Module) -> None:
        self._owner = weakref.ref(block)

    def _dtypes(self) -> dict[str, torch.dtype]:
        """The dtypes the block's (released, empty) expert tensors have now: .to() casts them as it would have
        cast the experts (a quantized block's scales too), and the slots follow."""
        block = self._owner() if self._owner is not None else None
        return {} if block is None else {r: resolve(block, p).dtype for r, p in self.like.items()}

    @torch.compiler.disable  # the pool's Python (locks, reads, numpy) runs eagerly inside a torch.compile'd model
    def forward(self, x, ids, weights, b13=None, b2=None):
        self.pool.follow(self.block, x.device, self._dtypes())
        run = self._triton if self.triton is not None else self._quantized if self.quantized else self._fp
        return run(x, ids, weights, b13, b2)

    def _triton(self, x, ids, weights, b13, b2):
        """The Triton kernels on the slots, each pair's expert id mapped to its slot, with the tiles the resident
        kernel picks for this block's (T, E, k): every pair's numbers are the resident kernel's. A group holding
        fewer than the call's experts runs only its pairs (one row of x per pair)."""
        from moec.backends.triton_experts import expert_pairs

        E, (T, k) = self.pool.blocks[self.block]["E"], ids.shape
        flat = ids.reshape(-1)  # [T*k]
        need = flat.unique().tolist()
        y = torch.empty(T * k, x.shape[1], dtype=torch.float32, device=x.device)  # each pair's weighted output
        quant = {None: {}, "int8": {"quant": 8}, "int4": {"quant": 4, "group": self.triton}}[self.quantized]

        def run(slots, group):
            experts = torch.tensor(list(group), device=x.device)
            at = torch.tensor(list(group.values()), device=x.device)
            slot_ids = torch.full((E,), -1, dtype=torch.int64, device=x.device).index_copy_(0, experts, at)[flat]
            by_slot = lambda b: None if b is None else b.new_zeros(slots.n, *b.shape[1:]).index_copy_(0, at, b[experts])  # noqa: E731
            t = slots.t
            if self.quantized:
                w = {"s13": t["s13"].float(), "z13": t.get("z13"), "s2": t["s2"].float(), "z2": t.get("z2")}
                w13, w2 = t["q13"], t["q2"]
            else:
                w, w13, w2 = {}, t["w13"], t["w2"]
            if len(group) == len(need):
                pairs, rows = (x, slot_ids.view(T, k), weights), slice(None)
            else:
                rows = (slot_ids >= 0).nonzero().squeeze(1)  # this group's pairs
                pairs = (x[rows // k], slot_ids[rows].view(-1, 1), weights.reshape(-1)[rows].view(-1, 1))
            y[rows] = expert_pairs(*pairs, w13, by_slot(b13), w2, by_slot(b2), *self.act, **quant, **w,
                                   shape=(T, E, k))

        self._in_groups(x, need, run)
        return y.view(T, k, -1).sum(dim=1).to(x.dtype)  # [T, H]: over the k slots in token order, as the resident op

    def _fp(self, x, ids, weights, b13, b2):
        """The resident op's routes (moec.experts), on the slots: the numba kernels at few rows, one grouped GEMM
        pair over the group's experts at many rows per expert (their rows in slot order), else per expert."""
        from moec.backends.torch_backend import (GROUPED_MIN_ROWS, _combine, _expert_ffn, _grouped_ffn,
                                                 _grouped_mm_takes, _numba_route, _sort)

        activation, gated, alpha, limit, weight_on_input, gate_up = self.act
        info = self.pool.blocks[self.block]
        dtype = info["dtypes"]["w13"]
        if (dtype == info["dtypes"]["w2"] and not info["transposed"]
                and _numba_route(x, ids, info["E"], dtype, weights, b13, b2)):
            return self._quantized(x, ids, weights, b13, b2)  # the resident op's route: the same numbers
        flat, order, counts, xs, ws = _sort(x, ids, weights, info["E"], weight_on_input)
        starts = np.cumsum([0, *counts]).tolist()
        need = [e for e, n in enumerate(counts) if n]
        grouped = flat.numel() >= GROUPED_MIN_ROWS * len(need)
        row_expert = flat[order]
        ys = torch.empty_like(xs)

        def run(slots, group):
            t = slots.t
            if grouped and _grouped_mm_takes(xs, t["w13"], t["w2"]):
                in_slots = sorted(group, key=group.get)
                rows = torch.cat([torch.arange(starts[e], starts[e + 1]) for e in in_slots])
                per_slot = [0] * slots.n
                for e, s in group.items():
                    per_slot[s] = counts[e]
                ys[rows] = _grouped_ffn(xs[rows], per_slot, None if b13 is None and b2 is None else row_expert[rows],
                                        t["w13"], b13, t["w2"], b2, activation, gated, alpha, limit, gate_up)
                return
            for e, s in group.items():
                rows = slice(starts[e], starts[e + 1])
                ys[rows] = _expert_ffn(xs[rows], t["w13"][s], None if b13 is None else b13[e], t["w2"][s],
                                       None if b2 is None else b2[e], activation, gated, alpha, limit, gate_up)

        self._in_groups(x, need, run)
        return _combine(ys, order, ws, ids, weight_on_input, x.dtype)

    def _quantized(self, x, ids, weights, b13, b2):
        from moec.backends.torch_backend import min_rows, quantized_combine, quantized_group, quantized_plan
        from moec.quant import weight_only_active

        activation, gated, alpha, limit, weight_on_input, gate_up = self.act
        a8 = self.int8_activations and not weight_only_active()  # as the resident op (see _quantized_experts)
        inv, counts, rows, row_expert, xs = quantized_plan(x, ids, weights, self.pool.blocks[self.block]["E"],
                                                           weight_on_input, min_rows(self.quantized == "int4", a8))
        y = torch.empty_like(xs)  # [T*k, H] fp32

        def run(slots, group):
            t13, t2 = ([slots.t[r] for r in (f"w{w}", f"q{w}", f"s{w}", f"z{w}") if r in slots.t] for w in ("13", "2"))
            quantized_group(xs, y, counts, rows, row_expert, list(group), t13, b13, t2, b2, activation, gated, alpha,
                            limit, gate_up, slot=group, a8=a8)

        self._in_groups(x, [int(e) for e in np.flatnonzero(counts)], run)
        return quantized_combine(y, inv, weights, weight_on_input, x.dtype)

    def _in_groups(self, x, need: list[int], run) -> None:
        """run(slots, {expert: slot}) on groups of the needed experts, each group held in the pool while it runs:
        the ones already in the pool first, then as many misses as there are free slots (at least one)."""
        pool, block = self.pool, self.block
        pool.note_call(block, frozenset(need))
        held = pool.pin(block, need)  # the needed experts in the pool stay until they ran
        where = pool._pool(block).where
        need = sorted(need, key=lambda e: (block, e) not in where)
        try:
            self._prefetch_next(x, reserve=len(need) - len(held))
            i = 0
            while i < len(need):
                group = {}
                while i < len(need) and (got := pool.acquire(block, need[i], held, wait=not group)) is not None:
                    slots, group[need[i]] = got
                    i += 1
                run(slots, group)
                for s in group.values():
                    pool.release(block, held, s)
        finally:
            pool.release(block, held)

    def _prefetch_next(self, x, reserve: int) -> None:
        """The early guess for the next block (moec.offload.prefetch), unless its late predictor took over."""
        nxt = self.pool.next_block(self.block)
        predict = self.pool.blocks.get(nxt, {}).get("router") if nxt else None
        if predict is None:
            return
        try:
            guess = predict(x)
        except Exception as e:  # noqa: BLE001  a guess that cannot run is no guess (outputs never depend on it)
            warnings.warn(f"moec offload: the prefetch for block {nxt!r} could not run ({type(e).__name__}: {e}); "
                          f"it is turned off for that block (outputs are unchanged)", stacklevel=2)
            self.pool.blocks[nxt]["router"] = None
            return
        self.pool.prefetch(nxt, guess, reserve)
