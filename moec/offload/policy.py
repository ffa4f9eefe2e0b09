"""Which expert leaves the pool (lru, lfu, routing) and a replay of a routing trace (`simulate`)."""

from __future__ import annotations

import collections

import numpy as np


class History:
    """What the policies read: each (block, expert)'s last use (a clock) and use count, calls per block (an array
    in the order the blocks run in) and the block running now."""

    def __init__(self, order: list[str]):
        self.order, self.index, self.now = order, {b: i for i, b in enumerate(order)}, None
        self.clock, self.last_use, self.uses = 0, {}, collections.Counter()
        self.calls = np.zeros(len(order), np.int64)

    def call(self, block: str) -> None:
        """`block` runs now."""
        self.now = block
        self.calls[self.index[block]] += 1

    def use(self, block: str, e: int) -> None:
        self.clock += 1
        self.last_use[block, e], self.uses[block, e] = self.clock, self.uses[block, e] + 1

    def distance(self) -> np.ndarray:
        """Per block (in `order`), blocks until it runs again (1: next; len(order): the one running now)."""
        n = len(self.order)
        if self.now not in self.index:
            return np.ones(n, np.int64)
        return (np.arange(n) - self.index[self.now] - 1) % n + 1


def victim_index(policy: str, blocks: np.ndarray, uses: np.ndarray, last: np.ndarray, h: History) -> int:
    """The position of the expert to evict among candidates given as arrays (block index in h.order, use count,
    last use; -1: never):
    lru      least recently used;
    lfu      least used (then least recently);
    routing  least value per slot held: the chance the expert is used when its block next runs (its share
             of that block's calls) over the blocks until then (decode visits the blocks in turn, so an
             expert of the block that just ran is needed last), then least recently.
    Vectorised: the pool runs this at every miss, over every slot it may evict."""
    if policy == "lru":
        return int(np.argmin(last))
    value = uses if policy == "lfu" else (uses + 1) * (1 / ((h.calls + 2) * h.distance()))[blocks]
    tied = np.flatnonzero(value == value.min())
    return int(tied[np.argmin(last[tied])])


def victim(policy: str, candidates: list, h: History):
    """The (block, expert) among `candidates` that `victim_index` evicts."""
    blocks = np.fromiter((h.index[b] for b, _ in candidates), np.int64, len(candidates))
    uses = np.fromiter((h.uses.get(k, 0) for k in candidates), np.int64, len(candidates))
    last = np.fromiter((h.last_use.get(k, -1) for k in candidates), np.int64, len(candidates))
    return candidates[victim_index(policy, blocks, uses, last, h)]


def simulate(trace: list[tuple[str, frozenset]], slots: int, policy: str) -> float:
    """Hit rate of `policy` with `slots` slots on a routing trace [(block, experts needed)], no prefetch."""
    h = History(list(dict.fromkeys(b for b, _ in trace)))
    resident, hits, total = set(), 0, 0
    for block, need in trace:
        h.call(block)
        for e in sorted(need):
            total += 1
            if (block, e) in resident:
                hits += 1
            else:
                if len(resident) >= slots:
                    resident.discard(victim(policy, [k for k in resident if k[0] != block or k[1] not in need] or
                                            list(resident), h))
                resident.add((block, e))
            h.use(block, e)
    return hits / max(total, 1)


def optimal(trace: list[tuple[str, frozenset]], slots: int) -> float:
    """The best hit rate any policy can reach on `trace` without prefetch (Belady: evict the expert needed
    furthest in the future); a bound for the policies above, not one that can run (it reads the future)."""
    uses = [((block, e), i) for i, (block, need) in enumerate(trace) for e in sorted(need)]
    after, nxt = [0] * len(uses), {}
    for j in range(len(uses) - 1, -1, -1):  # the call that next needs each use's expert
        after[j] = nxt.get(uses[j][0], len(trace))
        nxt[uses[j][0]] = uses[j][1]
    resident, hits = {}, 0  # (block, expert) -> the call that needs it next
    for (key, call), then in zip(uses, after):
        if key in resident:
            hits += 1
        elif len(resident) >= slots:
            evictable = [k for k, c in resident.items() if c != call] or list(resident)  # not this call's experts
            del resident[max(evictable, key=resident.get)]
        resident[key] = then
    return hits / max(len(uses), 1)
