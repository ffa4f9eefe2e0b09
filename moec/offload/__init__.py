"""Expert offloading at run time: a fixed-size cache of expert weights in fast memory, backed by a store.

`moec.compile(model, offload=moec.Offload(...))` appends the `offload_experts` pass: each proved block's
experts op becomes a call of `OffloadedExperts`, which reads each expert it needs from a `Pool` of slots:

    store  (disk: one safetensors file per block, read explicitly per expert; or host memory)
      |  load on a miss (the caller waits: stall time) or ahead of need (prefetch: a worker thread)
    pool   slots[C] of expert weights, C = the budget; one pool per expert shape, shared by every block
      |  policy picks the slot to reuse: lru, lfu, routing (usage over blocks until next use), or "auto"
      |  (replays the routing of the first calls and keeps the policy with the most hits)
    experts run from their slots, as many at once as the pool holds (the torch backend's per-expert path or
    its quantized kernels, same numbers; with quantize= the store and the slots hold the quantized experts)

Prefetch: when block i runs, block i+1's router (its own route op, on its live weights) is applied to
block i's input, and the experts it picks are loaded by the worker while block i computes (the idea of
mixtral-offloading's speculative loading). A prefetch never evicts an expert in use and never changes
a number: experts always run from the slot their weights were copied into.

Budget: "25%" (of every expert of that shape, over all blocks), a fraction 0.25, an int (experts), or
bytes "1.5GB". The smallest budget is one expert: a call needing more experts than the pool holds runs
them in turns. Statistics: `moec.inspect(model).offload`.
"""

from moec.offload.config import Offload, slots_for
from moec.offload.load import load_offloaded
from moec.offload.policy import History, simulate, victim
from moec.offload.pool import OffloadedExperts, OffloadStats, Pool

__all__ = ["History", "Offload", "OffloadStats", "OffloadedExperts", "Pool", "simulate", "slots_for", "victim"]
