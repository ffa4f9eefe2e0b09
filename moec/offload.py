"""Expert offloading at run time: a fixed-size cache of expert weights in fast memory, backed by a store.

`moec.compile(model, offload=moec.Offload(...))` appends the `offload_experts` pass: each proved block's
experts op becomes a call of `OffloadedExperts`, which reads each expert it needs from a `Pool` of slots:

    store  (disk: one safetensors file per block, read explicitly per expert; or host memory)
      |  load on a miss (the caller waits: stall time) or ahead of need (prefetch: a worker thread)
    pool   slots[C] of expert weights, C = the budget; one pool per expert shape, shared by every block
      |  policy picks the slot to reuse: lru, lfu, or "auto" (replays the routing seen so far and keeps the
      |  policy with the most hits)
    experts run one at a time from their slot (the torch backend's per-expert path, same numbers)

Prefetch: when block i runs, block i+1's router (its own route op, on its live weights) is applied to
block i's input, and the experts it picks are loaded by the worker while block i computes (the idea of
mixtral-offloading's speculative loading). A prefetch never evicts an expert in use and never changes
a number: experts always run from the slot their weights were copied into.

Budget: "25%" (of every expert of that shape, over all blocks), a fraction 0.25, an int (experts), or
bytes "1.5GB". The smallest budget is one expert: a call needing more experts than the pool holds runs
them in turns. Statistics: `moec.inspect(model).offload`.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.table import Table
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

POLICIES = ("lru", "lfu", "auto")


@dataclass(frozen=True)
class Offload:
    """How to offload the routed experts (see the module docstring).

    budget: "25%" / 0.25 (fraction of the experts), 12 (experts), "1.5GB" / "800MB" (bytes of expert weights).
    store: "disk" (a safetensors file per block under `path`; CPU models) or "host" (host memory: pinned
        when the model is on a GPU).
    path: the disk store's folder (default: a temporary folder, removed with the model).
    policy: "lru", "lfu" or "auto". prefetch: "router" (next block's router on this block's input) or None.
    """

    budget: str | float | int = "25%"
    store: str = "disk"
    path: str | None = None
    policy: str = "auto"
    prefetch: str | None = "router"

    def __post_init__(self):
        if self.store not in ("disk", "host"):
            raise ValueError(f"moec.Offload: store must be 'disk' or 'host', not {self.store!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"moec.Offload: policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.prefetch not in ("router", None):
            raise ValueError(f"moec.Offload: prefetch must be 'router' or None, not {self.prefetch!r}")
        _parse_budget(self.budget)  # a budget that does not parse fails here, with what to write

    def describe(self) -> str:
        return f"offload {self.budget} ({self.store}, {self.policy}, prefetch {self.prefetch})"


def _parse_budget(budget) -> tuple[str, float]:
    """("fraction", f) / ("experts", n) / ("bytes", b), or a ValueError that says what to write."""
    hint = f"moec.Offload: budget {budget!r}: write '25%', 0.25, 12 (experts) or '1.5GB'"
    if isinstance(budget, bool) or not isinstance(budget, (str, int, float)):
        raise ValueError(hint)
    if isinstance(budget, int):
        return "experts", budget
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(hint + " (a fraction is in (0, 1])")
        return "fraction", budget
    if m := re.fullmatch(r"\s*([\d.]+)\s*%\s*", budget):
        return "fraction", float(m[1]) / 100
    if m := re.fullmatch(r"\s*([\d.]+)\s*([kKmMgG]?)i?[bB]\s*", budget):
        return "bytes", float(m[1]) * 1024 ** " kmg".index(m[2].lower() or " ")
    raise ValueError(hint)


def slots_for(budget, n_experts: int, expert_bytes: int) -> int:
    """The pool's slots for `budget` over n experts of expert_bytes each (at least one, at most n)."""
    kind, v = _parse_budget(budget)
    n = {"experts": lambda: int(v), "fraction": lambda: math.floor(v * n_experts + 1e-9),
         "bytes": lambda: int(v) // expert_bytes}[kind]()
    if n < 1:
        raise ValueError(f"moec.Offload: budget {budget!r} holds no expert of {n_experts} (one takes {expert_bytes} "
                         f"bytes): give at least one expert")
    return min(n, n_experts)


# ---------------------------------------------------------------------------------------------- stores


class DiskStore:
    """Each block's experts in one safetensors file (`<block>.safetensors`, tensors `<role>.<e>`), written once
    at compile time and read one expert at a time."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self._files: dict[str, object] = {}

    def _file(self, block: str) -> str:
        return os.path.join(self.folder, (block or "model").replace("/", "_") + ".safetensors")

    def write(self, block: str, tensors: dict[str, torch.Tensor]) -> None:
        """tensors: role -> [E, ...]; stored per expert."""
        save_file({f"{r}.{e}": t[e].detach().cpu().contiguous() for r, t in tensors.items() for e in range(len(t))},
                  self._file(block))
        self._files.pop(block, None)

    def read(self, block: str, role: str, e: int) -> torch.Tensor:
        try:
            f = self._files.get(block)
            if f is None:
                f = self._files[block] = safe_open(self._file(block), framework="pt")
            return f.get_tensor(f"{role}.{e}")
        except Exception as err:  # noqa: BLE001  missing, truncated or overwritten file
            self._files.pop(block, None)
            raise RuntimeError(f"moec offload: cannot read expert {e} of block {block!r} from "
                               f"{self._file(block)} ({type(err).__name__}: {err}); the store was removed or "
                               f"damaged: compile the model again to rewrite it") from None


class HostStore:
    """Each expert's tensors in host memory (pinned when the model runs on a GPU: asynchronous copies)."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._t: dict[tuple[str, str, int], torch.Tensor] = {}

    def write(self, block: str, tensors: dict[str, torch.Tensor]) -> None:
        for r, t in tensors.items():
            for e in range(len(t)):
                c = t[e].detach().to("cpu", copy=True).contiguous()
                self._t[block, r, e] = c.pin_memory() if self.pin else c

    def read(self, block: str, role: str, e: int) -> torch.Tensor:
        return self._t[block, role, e]


# ---------------------------------------------------------------------------------------------- policies


def victim(policy: str, candidates: list, last_use: dict, uses: dict):
    """The slot key to evict among `candidates`: least recently used, or least used (then least recently)."""
    if policy == "lfu":
        return min(candidates, key=lambda k: (uses.get(k, 0), last_use.get(k, -1)))
    return min(candidates, key=lambda k: last_use.get(k, -1))


def simulate(trace: list[tuple[str, frozenset]], slots: int, policy: str) -> float:
    """Hit rate of `policy` with `slots` slots on a routing trace [(block, experts needed)], no prefetch."""
    resident, last_use, uses, hits, total, clock = set(), {}, collections.Counter(), 0, 0, 0
    for block, need in trace:
        for e in sorted(need):
            key, clock = (block, e), clock + 1
            total += 1
            if key in resident:
                hits += 1
            else:
                if len(resident) >= slots:
                    resident.discard(victim(policy, [k for k in resident if k[0] != block or k[1] not in need] or
                                            list(resident), last_use, uses))
                resident.add(key)
            last_use[key], uses[key] = clock, uses[key] + 1
    return hits / max(total, 1)


# ---------------------------------------------------------------------------------------------- the pool


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
                    "MB read", "stall s"):
            t.add_column(col)
        for name, s in [*self.blocks.items(), ("total", self.total())]:
            r = self.rates(s)
            t.add_row(name, str(s.calls), str(s.hits), str(s.misses), f"{r['hit_rate']:.1%}",
                      f"{r['prefetch_precision']:.1%}", f"{r['prefetch_recall']:.1%}", f"{s.bytes_read / 2**20:.1f}",
                      f"{s.stall_s:.3f}")
        return t

    def __str__(self) -> str:
        import io

        console = Console(width=160, file=io.StringIO())
        console.print(self)
        return console.file.getvalue()


class _Slots:
    """C slots of one expert shape: a tensor [C, ...] per role, and which (block, expert) each holds."""

    def __init__(self, shapes: dict[str, tuple[torch.Size, torch.dtype]], n: int, device):
        self.t = {r: torch.empty((n, *s), dtype=d, device=device) for r, (s, d) in shapes.items()}
        self.n = n
        self.where: dict[tuple[str, int], int] = {}  # (block, expert) -> slot
        self.owner: list[tuple[str, int] | None] = [None] * n
        self.loading: dict[int, Future] = {}  # slot -> the prefetch writing it


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
        self.blocks: dict[str, dict] = {}  # block -> {"shapes", "E", "order", "router": callable or None}
        self.policy = "lru" if cfg.policy == "auto" else cfg.policy
        self.stats = OffloadStats(cfg.policy, {})
        self._slots: dict[tuple, _Slots] = {}
        self._lock = threading.RLock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="moec-prefetch") if cfg.prefetch else None
        self._clock = 0
        self._last_use: dict[tuple[str, int], int] = {}
        self._uses: collections.Counter = collections.Counter()
        self._predicted: dict[str, frozenset] = {}
        self._trace: list[tuple[str, frozenset]] = []

    # -- registration (compile time)
    def register(self, block: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write a block's experts (role -> [E, ...]) to the store; the pool is sized anew at the next call."""
        self.store.write(block, tensors)
        shapes = {r: (t.shape[1:], t.dtype) for r, t in tensors.items()}
        E = len(next(iter(tensors.values())))
        nbytes = sum(t[0].numel() * t.element_size() for t in tensors.values())
        self.blocks[block] = {"shapes": shapes, "E": E, "bytes": nbytes, "router": None}
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
            self._last_use.clear()
            self._uses.clear()
            self._predicted.clear()
            self._trace.clear()
            self.policy = "lru" if self.cfg.policy == "auto" else self.cfg.policy
            self.stats.blocks = {b: BlockStats() for b in self.blocks}
            self.stats.policy = self.cfg.policy

    def _drain(self) -> None:
        for s in list(self._slots.values()):
            for f in list(s.loading.values()):
                f.result()

    @staticmethod
    def _key(shapes) -> tuple:
        return tuple(sorted((r, tuple(s), str(d)) for r, (s, d) in shapes.items()))

    def _pool(self, block: str) -> _Slots:
        info = self.blocks[block]
        key = self._key(info["shapes"])
        if key not in self._slots:
            same = [b for b, i in self.blocks.items() if self._key(i["shapes"]) == key]
            n = slots_for(self.cfg.budget, sum(self.blocks[b]["E"] for b in same), info["bytes"])
            self._slots[key] = _Slots(info["shapes"], n, self.device)
            self.stats.slots = {" ".join(f"{r}{list(s)}" for r, s, _ in k): v.n for k, v in self._slots.items()}
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
        with torch.cuda.stream(stream) if stream is not None else _nothing():
            for r, t in slots.t.items():
                src = self.store.read(block, r, e)
                t[slot].copy_(src, non_blocking=src.is_pinned())
                nbytes += src.numel() * src.element_size()
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

    def _free_slot(self, slots: _Slots, busy: set[int]) -> int | None:
        """An empty slot, else the policy's victim among the slots neither busy nor loading (None if none)."""
        for i, o in enumerate(slots.owner):
            if o is None and i not in busy and i not in slots.loading:
                return i
        free = [o for i, o in enumerate(slots.owner) if i not in busy and i not in slots.loading]
        if not free:
            return None
        v = victim(self.policy, free, self._last_use, self._uses)
        i = slots.where.pop(v)
        slots.owner[i] = None
        return i

    def pin(self, block: str, need: list[int]) -> set[int]:
        """The slots of the needed experts already in the pool: busy until the call has run them."""
        slots = self._pool(block)
        with self._lock:
            return {slots.where[block, e] for e in need if (block, e) in slots.where}

    def acquire(self, block: str, e: int, busy: set[int]) -> tuple[_Slots, int]:
        """The slot holding expert e of `block` (loaded now on a miss, into a slot not busy), marked busy."""
        slots, st = self._pool(block), self.stats.blocks[block]
        t0 = time.perf_counter()
        while True:
            with self._lock:
                slot = slots.where.get((block, e))
                pending = slots.loading.get(slot) if slot is not None else None
                if pending is None:
                    self._clock += 1
                    self._last_use[block, e], self._uses[block, e] = self._clock, self._uses[block, e] + 1
                    if slot is not None:
                        st.hits += 1
                        busy.add(slot)
                        st.stall_s += time.perf_counter() - t0
                        return slots, slot
                    slot = self._free_slot(slots, busy)
                    if slot is not None:
                        slots.where[block, e], slots.owner[slot] = slot, (block, e)
                        busy.add(slot)
                        st.misses += 1
                        break
                    pending = next(iter(slots.loading.values()), None)
                    if pending is None:
                        raise RuntimeError("moec offload: no slot to load into (a moec defect: please report it)")
            pending.result()  # a prefetch is writing this expert, or every free slot: wait for it
        try:
            self._load(slots, slot, block, e)
        except BaseException:
            with self._lock:
                slots.where.pop((block, e), None)
                slots.owner[slot] = None
            raise
        st.stall_s += time.perf_counter() - t0
        return slots, slot

    def note_call(self, block: str, need: frozenset) -> None:
        st = self.stats.blocks[block]
        st.calls += 1
        pred = self._predicted.pop(block, None)
        if pred is not None:
            st.predicted += len(pred)
            st.predicted_used += len(pred & need)
            st.needed_after_prediction += len(need)
        if self.cfg.policy == "auto":
            self._trace.append((block, need))
            if len(self._trace) == self.AUTO_AFTER:
                slots = min(s.n for s in self._slots.values())
                self.policy = max(("lru", "lfu"), key=lambda p: simulate(self._trace, slots, p))
                self.stats.policy = f"auto: {self.policy}"

    def prefetch(self, block: str, experts: list[int], busy: set[int], reserve: int) -> None:
        """Load `experts` of `block` in the worker, into slots neither busy nor needed by the running call's
        `reserve` misses."""
        if self._worker is None or block not in self.blocks:
            return
        slots = self._pool(block)
        self._predicted[block] = frozenset(experts)
        with self._lock:
            room = slots.n - len(busy) - len(slots.loading) - reserve
            for e in [e for e in experts if (block, e) not in slots.where][:max(room, 0)]:
                slot = self._free_slot(slots, busy)
                if slot is None:
                    return
                slots.where[block, e], slots.owner[slot] = slot, (block, e)
                self._last_use[block, e] = self._clock  # loaded now: not the first to go
                slots.loading[slot] = self._worker.submit(self._prefetch_one, slots, slot, block, e)

    def _prefetch_one(self, slots: _Slots, slot: int, block: str, e: int) -> None:
        try:
            self._load(slots, slot, block, e, side=True)
        except BaseException:  # noqa: BLE001  the call that needs it loads it itself (and raises, if it must)
            with self._lock:
                slots.where.pop((block, e), None)
                slots.owner[slot] = None
        finally:
            with self._lock:
                slots.loading.pop(slot, None)


@contextlib.contextmanager
def _nothing():
    yield


class OffloadedExperts(nn.Module):
    """The experts op of one block with its weights in the pool: (x [T, H], ids [T, k], weights [T, k],
    b13?, b2?) -> [T, H], the torch backend's per-expert path on each expert's slot. Biases stay resident."""

    def __init__(self, pool: Pool, block: str, act: tuple):
        super().__init__()
        self.pool, self.block, self.act = pool, block, act

    def forward(self, x, ids, weights, b13=None, b2=None):
        from moec.backends.torch_backend import _combine, _expert_ffn, _sort

        pool, block = self.pool, self.block
        activation, gated, alpha, limit, weight_on_input, gate_up = self.act
        _, order, counts, xs, ws = _sort(x, ids, weights, pool.blocks[block]["E"], weight_on_input)
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        need = [e for e, n in enumerate(counts) if n]
        pool.note_call(block, frozenset(need))
        busy = pool.pin(block, need)  # the needed experts in the pool stay until they ran
        self._prefetch_next(x, busy, reserve=len(need) - len(busy))
        where = pool._pool(block).where
        need.sort(key=lambda e: (block, e) not in where)  # the resident ones first
        ys = torch.empty_like(xs)
        for e in need:
            slots, s = pool.acquire(block, e, busy)
            t, rows = slots.t, slice(starts[e], starts[e + 1])
            ys[rows] = _expert_ffn(xs[rows], t["w13"][s], None if b13 is None else b13[e], t["w2"][s],
                                   None if b2 is None else b2[e], activation, gated, alpha, limit, gate_up)
            busy.discard(s)
        return _combine(ys, order, ws, ids, weight_on_input, x.dtype)

    def _prefetch_next(self, x, busy: set[int], reserve: int) -> None:
        nxt = self.pool.next_block(self.block)
        router = self.pool.blocks.get(nxt, {}).get("router") if nxt else None
        if router is None:
            return
        with torch.no_grad():
            ids = router(x)
        if ids is not None:
            self.pool.prefetch(nxt, ids.unique().tolist(), busy, reserve)
