"""Which expert leaves the pool (lru, lfu, routing) and a replay of a routing trace (`simulate`)."""

from __future__ import annotations

import collections


class History:
    """What the policies read: each (block, expert)'s last use (a clock) and use count, calls per block, the
    order the blocks run in and the block running now."""

    def __init__(self, order: list[str]):
        self.order, self.now = order, None
        self.clock, self.last_use, self.uses, self.calls = 0, {}, collections.Counter(), collections.Counter()

    def use(self, block: str, e: int) -> None:
        self.clock += 1
        self.last_use[block, e], self.uses[block, e] = self.clock, self.uses[block, e] + 1

    def distance(self, block: str) -> int:
        """Blocks until `block` runs again (1: next; len(order): the one running now)."""
        if self.now is None or block not in self.order or self.now not in self.order:
            return 1
        return (self.order.index(block) - self.order.index(self.now) - 1) % len(self.order) + 1


def victim(policy: str, candidates: list, h: History):
    """The (block, expert) to evict among `candidates`:
    lru      least recently used;
    lfu      least used (then least recently);
    routing  least value per slot held: the chance the expert is used when its block next runs (its share
             of that block's calls) over the blocks until then (decode visits the blocks in turn, so an
             expert of the block that just ran is needed last)."""
    uses, last = h.uses.get, h.last_use.get  # (bound once: this runs at every miss over every slot)
    if policy == "lfu":
        keys = [(uses(k, 0), last(k, -1)) for k in candidates]
    elif policy == "routing":
        per_block = {b: 1 / ((h.calls.get(b, 0) + 2) * h.distance(b)) for b in {k[0] for k in candidates}}
        keys = [((uses(k, 0) + 1) * per_block[k[0]], last(k, -1)) for k in candidates]
    else:
        keys = [last(k, -1) for k in candidates]
    return candidates[min(range(len(keys)), key=keys.__getitem__)]


def simulate(trace: list[tuple[str, frozenset]], slots: int, policy: str) -> float:
    """Hit rate of `policy` with `slots` slots on a routing trace [(block, experts needed)], no prefetch."""
    h = History(list(dict.fromkeys(b for b, _ in trace)))
    resident, hits, total = set(), 0, 0
    for block, need in trace:
        h.now = block
        h.calls[block] += 1
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
