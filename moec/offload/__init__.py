"""Expert offloading at run time: a fixed-size cache of expert weights in fast memory, backed by a store.

`moec.compile(model, offload=moec.Offload(...))` appends the `offload_experts` pass: each proved block's
experts op becomes a call of `OffloadedExperts`, which reads each expert it needs from a `Pool` of slots:

    store  (disk: one safetensors file per block, read explicitly per expert; or host memory)
      |  load on a miss (the caller waits: stall time) or ahead of need (prefetch: a worker thread)
    pool   slots[C] of expert weights, C = the budget; one pool per expert shape (the budget split between them),
      |  shared by every block of that shape
      |  policy picks the slot to reuse: lru, lfu, routing (usage over blocks until next use), or "auto"
      |  (replays the routing of the first calls and keeps the policy with the most hits)
    experts run from their slots, as many at once as the pool holds (the torch backend's per-expert path or
    its quantized kernels, or the Triton kernels on the slots: the resident numbers; with quantize= the store and
    the slots hold the quantized experts)

Prefetch (moec.offload.prefetch): each block's own router (its route op, on its live weights) names the top
`prefetch_width * k` experts ahead of the block, and the worker loads them: as the block's layer starts, on
the residual stream through the block's norm (found on the first call), or, in models without that shape, as
the previous block starts, on that block's input (mixtral-offloading's speculative loading). A prefetch never
evicts an expert in use and never changes a number: experts always run from the slot their weights were
copied into. `fit_prefetch(model, batches)` fits the residual-stream predictor to each block's actual router
input on calibration text (ridge regression towards the router's weight): it recovers part of what the attention
in between changes.

Budget: "25%" (of every expert of that shape, over all blocks), a fraction 0.25, an int (experts), or
bytes "1.5GB". The smallest budget is one expert: a call needing more experts than the pool holds runs
them in turns. Statistics: `moec.inspect(model).offload`.
"""

from moec.offload.config import Offload, slots_for
from moec.offload.load import load_offloaded
from moec.offload.policy import History, optimal, simulate, victim
from moec.offload.pool import OffloadedExperts, OffloadStats, Pool
from moec.offload.prefetch import fit_prefetch

__all__ = ["History", "Offload", "OffloadStats", "OffloadedExperts", "Pool", "fit_prefetch", "optimal", "simulate",
           "slots_for", "victim"]
