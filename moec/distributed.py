"""Expert parallelism on torch.distributed: each rank holds E/N experts of every block, tokens travel to them.

    # torchrun --nproc-per-node 4 serve.py        (gloo on CPUs, NCCL on GPUs: torch.distributed's transports)
    torch.distributed.init_process_group("gloo")
    model = moec.compile(model, expert_parallel=moec.ExpertParallel())      # default: the world group
    model.generate(my_requests, synced_gpus=True)  # every rank steps together until all are done

Each rank runs the whole model on its own tokens (data-parallel attention, router and shared experts, all
replicated); only the routed experts are sharded, rank r owning experts [lo_r, hi_r) (E % N handled: the first
E % N ranks own one more). In every block, per forward:

    pairs  = the T*k (token, slot) pairs sorted by expert (hence by owner rank)    # [P] (P = T*k)
    counts = pairs per expert                                                      # [E]
    all_to_all(counts[lo_r:hi_r] -> rank r)      -> rows each rank sends me, per expert of mine   # [N, E_me]
    all_to_all(x[pair tokens] -> owners)         -> rows I run, by source rank then expert        # [R, H]
    y = the block's experts op on my experts (the same kernels as one process: fp, int8, int4)    # [R, H]
    all_to_all(y -> back to the sources)         -> each pair's expert output, in my sorted order # [P, H]
    out[t] = sum over t's k slots of weight * y (fp32, slot order, as the one-process op combines)

Tensor parallelism is out of scope: a model whose non-expert layers do not fit one rank is not served.
A compiled block's proof runs in one process before anything is exchanged: the sharded op replays the exchange
locally (every rank's shard from the full weights, as if the other ranks sent nothing; load_sharded, which reads
only this rank's experts, gives stand-ins for the others': `shard_reader`) on the proof's probes;
then compile checks that every rank compiled the same blocks the same way, and the full experts are released.
A rank that dies or stops answering makes the others raise within `timeout` seconds, naming the block.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import zlib
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class ExpertParallel:
    """Shard the routed experts over a torch.distributed group (None: the world), gloo or NCCL. timeout: seconds a
    rank waits for the others in one exchange before it raises. replicas (with calibration, a moec.calibrate result
    of the same model): extra experts each rank holds in every calibrated block, copies of the busiest experts
    placed to even out the ranks' loads (`placement`); a pair of a copied expert goes to one of its copies, by
    token."""

    group: object = None
    timeout: float = 60.0
    replicas: int = 0
    calibration: object = field(default=None, hash=False)

    def __post_init__(self):
        from moec.calibrate import Calibration

        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ValueError(f"moec.ExpertParallel: timeout must be seconds > 0, not {self.timeout!r}")
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 0:
            raise ValueError(f"moec.ExpertParallel: replicas must be an int >= 0 (extra experts per rank), "
                             f"not {self.replicas!r}")
        if self.replicas and not isinstance(self.calibration, Calibration):
            raise ValueError("moec.ExpertParallel: replicas= copies the busiest experts of a calibration run: give "
                             "calibration=moec.calibrate(model, batches)")

    def loads(self, path: str, E: int) -> list[int] | None:
        """The calibrated pairs per expert of block `path` when it gets replicas, else None."""
        blocks = [] if not self.replicas else [b for b in self.calibration.blocks if b.path == path]
        return blocks[0].load if blocks and len(blocks[0].load) == E else None


def shards(E: int, world: int) -> list[tuple[int, int]]:
    """[lo_r, hi_r) of each rank's experts: E // world each, the first E % world ranks one more."""
    out, lo = [], 0
    for r in range(world):
        n = E // world + (r < E % world)
        out.append((lo, lo + n))
        lo += n
    return out


def placement(E: int, world: int, load: list[int] | None = None, replicas: int = 0) -> list[list[int]]:
    """The experts each rank holds: its shard (`shards`), then `replicas` copies of busy experts (with `load`, the
    calibrated pairs per expert). Greedy, after DeepSeek's EPLB: the busiest rank's expert with the most load per
    copy gets a copy on the least loaded rank with a free slot and no copy of it, while that lowers the ranks'
    expected loads sorted from the busiest (a copied expert's pairs split evenly over its copies); then the copies
    without which the busiest rank's load stays the same are dropped."""
    held = [list(range(lo, hi)) for lo, hi in shards(E, world)]
    if not replicas or load is None or world < 2:
        return held
    copies, extra = [1] * E, [0] * world

    def rank_loads():
        return [sum(load[e] / copies[e] for e in h) for h in held]

    for _ in range(replicas * world):
        per = rank_loads()
        busiest = max(range(world), key=lambda r: (per[r], -r))
        e = max(held[busiest], key=lambda i: (load[i] / copies[i], -i), default=None)
        free = [r for r in range(world) if extra[r] < replicas and e not in held[r]]
        if e is None or not free or load[e] == 0:
            break
        r = min(free, key=lambda i: (per[i], i))
        copies[e], extra[r] = copies[e] + 1, extra[r] + 1
        held[r].append(e)
        if sorted(rank_loads(), reverse=True) >= sorted(per, reverse=True):  # no gain (ties counted): undone, stop
            copies[e], extra[r] = copies[e] - 1, extra[r] - 1
            held[r].pop()
            break
    busiest = max(rank_loads())
    for r in range(world):  # copies the busiest rank's load does not need (they only evened out a tie): dropped
        for e in reversed(held[r][len(range(*shards(E, world)[r])):]):
            held[r].remove(e)
            copies[e] -= 1
            if max(rank_loads()) > busiest:
                held[r].append(e)
                copies[e] += 1
    return held


@dataclass
class ExchangeStats:
    """What one rank's sharded blocks exchanged since compile (moec.inspect(model).expert_parallel)."""

    rank: int
    world: int
    calls: int = 0
    rows_received: int = 0  # (token, slot) rows this rank's experts ran for all ranks
    rows_sent: int = 0  # rows this rank's tokens sent (to itself included)
    bytes_sent: int = 0  # rows' and results' bytes to the other ranks (counts not included)
    per_block: dict = field(default_factory=dict)  # block path -> rows received

    def __str__(self) -> str:
        return (f"expert parallel: rank {self.rank}/{self.world}, {self.calls} exchanges, {self.rows_received} rows "
                f"run here, {self.rows_sent} rows sent, {self.bytes_sent / 2**20:.2f} MiB to other ranks")


class Group:
    """The process group moec exchanges in (its own, with the asked timeout), its rank and size."""

    def __init__(self, cfg: ExpertParallel):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("moec: expert_parallel= needs torch.distributed initialised on every rank: launch with "
                               "torchrun and call torch.distributed.init_process_group('gloo' or 'nccl') first")
        parent = cfg.group or dist.group.WORLD
        ranks = dist.get_process_group_ranks(parent)
        self.timeout = cfg.timeout
        self.pg = dist.new_group(ranks, timeout=datetime.timedelta(seconds=cfg.timeout),
                                 backend=dist.get_backend(parent))
        self.rank, self.world = dist.get_rank(self.pg), dist.get_world_size(self.pg)
        self.stats = ExchangeStats(self.rank, self.world)
        self.cfg = cfg

    def __getstate__(self):  # deepcopy / pickle of a model with sharded experts
        raise TypeError("moec: a model with sharded experts (expert_parallel=) cannot be copied or pickled: each rank "
                        "holds its shard and exchanges in a process group; build and compile another model instead")

    def placement(self, path: str, E: int) -> list[list[int]]:
        """The experts each rank holds in block `path` (`placement`, with the calibrated loads if it gets copies)."""
        return placement(E, self.world, self.cfg.loads(path, E), self.cfg.replicas)

    def agree(self, what: str, value,
              fix: str = "every rank must build the same model and compile it with the same options") -> None:
        """Every rank compares `value` (JSON-able) with the others'; all raise the same error if they differ."""
        import torch.distributed as dist

        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
        gathered = [None] * self.world
        dist.all_gather_object(gathered, digest, group=self.pg)
        if len(set(gathered)) > 1:
            differ = [r for r, d in enumerate(gathered) if d != gathered[0]]
            raise ValueError(f"moec expert parallel: the ranks disagree on {what} (rank(s) {differ} differ from rank 0):"
                             f" {fix}")


def fingerprint(t: torch.Tensor) -> list:
    """A tensor's shape, dtype and, where it holds numbers (not on the meta device), a digest of its bytes: ranks
    that built different weights (another seed, another checkpoint, experts in another order) disagree."""
    sig = [list(t.shape), str(t.dtype)]
    if not t.is_meta:
        raw = t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy()
        sig.append(hashlib.blake2b(raw, digest_size=16).hexdigest())
    return sig


class ShardedExperts(nn.Module):
    """One block's experts op over the group: (x [T, H], ids [T, k], weights [T, k], *my shard) -> [T, H].
    `op` is the block's experts op (moec.experts / experts_int8 / experts_int4) and `args` its tensor arguments
    after (x, ids, weights) as this rank holds them (its experts `held[rank]` only, in that order; None for an
    absent bias). held (`placement`): the experts of each rank; numbered rank by rank, they are the exchange's
    slots (V of them: E, plus the copies), and a pair of an expert with several copies goes to copy
    (token + rank) % copies."""

    def __init__(self, group: Group, path: str, op, E: int, act: tuple, full: list | None, held: list[list[int]]):
        super().__init__()
        self.group, self.path, self.op, self.E, self.act, self.held = group, path, op, E, tuple(act), held
        self.extra = ()  # arguments of `op` between the tensors and `act` (lower_triton: int4's group size)
        sizes = [len(h) for h in held]
        self.bounds = [(sum(sizes[:r]), sum(sizes[:r + 1])) for r in range(len(held))]  # slots of each rank
        slots = [[v for v, e in enumerate(e for h in held for e in h) if e == i] for i in range(E)]
        self.copies = torch.tensor([len(c) for c in slots])  # [E]
        self.slot = torch.tensor([c + [c[0]] * (max(self.copies) - len(c)) for c in slots])  # [E, max copies]
        self.replicated = bool(self.copies.max() > 1)
        self.full = full  # the full tensors [E, ...], for the proof's local replay only (dropped at install)

    def installed(self) -> None:
        self.full = None

    def forward(self, x, ids, weights, *mine):
        T, k = ids.shape
        weight_on_input = self.act[4]
        flat = ids.reshape(-1)
        if self.replicated:  # each pair to one copy of its expert: [P] expert -> slot
            token = torch.arange(T * k, device=flat.device) // k
            flat = self.slot.to(flat.device)[flat, (token + self.group.rank) % self.copies.to(flat.device)[flat]]
        order = torch.argsort(flat, stable=True)  # [P] pairs by slot, hence by owner rank
        counts = torch.bincount(flat, minlength=self.bounds[-1][1])  # [V]
        xs = x.index_select(0, order // k)  # [P, H]
        ws = weights.reshape(-1, 1).float()  # [P, 1] in (token, slot) order
        if weight_on_input:  # the expert takes the weighted input (Llama 4): weighted here, combined with 1
            xs = (xs * ws[order]).to(x.dtype)
        ys = self._exchange(xs, counts, mine) if self.full is None else self._replay(xs, counts, mine)  # [P, H]
        unsorted = torch.empty_like(ys)
        unsorted[order] = ys  # back to (token, slot) order
        y = unsorted.float() if weight_on_input else unsorted * ws
        return y.view(T, k, x.shape[1]).sum(dim=1).to(x.dtype)  # [T, H] (T = 0: a rank with no tokens)

    def _run(self, xr, runs, n_experts: int, tensors):
        """Experts of one shard on rows xr [R, H] that come in runs of runs[i] rows, run i for its expert
        i % n_experts (runs by source rank, then expert)."""
        if not len(xr):
            return xr
        local = torch.repeat_interleave(torch.arange(len(runs), device=xr.device) % n_experts, runs)  # [R]
        ones = torch.ones(len(xr), 1, dtype=torch.float32, device=xr.device)
        return self.op(xr, local[:, None], ones, *tensors, *self.extra, *self.act)

    def _replay(self, xs, counts, mine):
        """The exchange replayed in this process (the proof): each owner's rows run on its shard of the full
        weights, mine on the tensors the graph gives (what will run)."""
        ys = torch.empty_like(xs)
        start = 0
        for r, (lo, hi) in enumerate(self.bounds):
            n = int(counts[lo:hi].sum())
            held = torch.tensor(self.held[r], dtype=torch.long)
            tensors = mine if r == self.group.rank else [None if t is None else t[held] for t in self.full]
            ys[start:start + n] = self._run(xs[start:start + n], counts[lo:hi], hi - lo, tensors)
            start += n
        return ys

    def _exchange(self, xs, counts, mine):
        import torch.distributed as dist

        g, (lo, hi) = self.group, self.bounds[self.group.rank]
        sizes = [b - a for a, b in self.bounds]
        try:
            got = counts.new_empty(g.world * (hi - lo))  # [N * E_me]: per source, per expert of mine
            dist.all_to_all_single(got, counts, output_split_sizes=[hi - lo] * g.world, input_split_sizes=sizes,
                                   group=g.pg)
            send = [int(counts[a:b].sum()) for a, b in self.bounds]
            recv = got.view(g.world, hi - lo).sum(1).tolist()
            xr = xs.new_empty((sum(recv), xs.shape[1]))
            dist.all_to_all_single(xr, xs, output_split_sizes=recv, input_split_sizes=send, group=g.pg)
            yr = self._run(xr, got, hi - lo, mine).to(xs.dtype)  # [R, H]
            ys = xs.new_empty(xs.shape)
            dist.all_to_all_single(ys, yr, output_split_sizes=send, input_split_sizes=recv, group=g.pg)
        except RuntimeError as e:
            raise RuntimeError(f"moec expert parallel: rank {g.rank}, block {self.path!r}: the exchange with the other "
                               f"ranks failed ({str(e).splitlines()[0]}); a rank died, stopped answering for "
                               f"{g.timeout:g} s, or ran a different number of forward calls (generate with "
                               f"synced_gpus=True)") from None
        s = g.stats
        s.calls += 1
        s.rows_received += len(xr)
        s.rows_sent += len(xs)
        others = (len(xs) - send[g.rank]) + (len(xr) - recv[g.rank])  # rows and results that left this rank
        s.bytes_sent += others * xs.shape[1] * xs.element_size()
        s.per_block[self.path] = s.per_block.get(self.path, 0) + len(xr)
        return ys


def _stand_in(name: str, like: torch.Tensor, rms: float) -> torch.Tensor:
    """Seeded normal values shaped as `like`, at the root mean square of the real experts beside them."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(like.shape, generator=g, dtype=like.dtype).mul_(rms)


def _runs(held: list[int]) -> list[tuple[int, int]]:
    """Sorted expert indices -> their maximal contiguous ranges [lo, hi)."""
    runs: list[tuple[int, int]] = []
    for e in held:
        runs = runs[:-1] + [(runs[-1][0], e + 1)] if runs and runs[-1][1] == e else runs + [(e, e + 1)]
    return runs


def shard_reader(mine):
    """How load_sharded reads a block's experts (moec.offload.load.fill_and_compile's expert_reader): only the
    experts `mine(path, E)` lists (this rank's shard and copies), as slices of the stacked [E, ...] tensors or as
    their own tensors (experts in a ModuleList); the other ranks' experts are stand-ins, seeded normal values at
    the scale of this rank's. Only the proof reads them (it replays every rank's shard in this process; they go
    with the block's full experts), so each rank proves its own experts on their real weights and the exchange
    on the stand-ins; a block that is not compiled gets its experts read again, whole (fill_and_compile).
    Read whole: experts stored in another layout (DBRX's [E*n, D] matrices), and a block none of whose experts
    this rank holds (E < ranks)."""
    from moec.bindings import resolve
    from moec.passes.detect.candidates import member_names

    def reader(c, ckpt):
        held = sorted(set(mine(c.path, c.num_experts)))
        if not held:
            return None
        pre = f"{c.path}." if c.path else ""
        members = {} if not c.container else {
            f"{pre}{c.container}.{n}.": i for i, n in enumerate(member_names(resolve(c.module, c.container)))}
        first = next((m for m, i in members.items() if i == held[0]), None)  # this rank's first expert module
        rms = {}  # tensor name in an expert module -> the scale of this rank's first expert's

        def read(name, like):
            if not like.is_floating_point():
                return ckpt.read(name, like)
            if not members and (like.dim() < 3 or like.shape[0] != c.num_experts):  # e.g. DBRX's [E*n, D]: whole
                return ckpt.read(name, like)
            if not members:  # a stacked [E, ...] tensor: this rank's rows, in contiguous slices
                parts = {r: ckpt.read(name, like, rows=r) for r in _runs(held)}
                real = torch.cat(list(parts.values()))
                out = _stand_in(name, like, real.float().square().mean().sqrt().item())
                for (lo, hi), part in parts.items():
                    out[lo:hi] = part
                return out
            member = next(m for m in members if name.startswith(m))
            if members[member] in held:
                return ckpt.read(name, like)
            p = name[len(member):]
            if p not in rms:
                rms[p] = ckpt.read(first + p, like).float().square().mean().sqrt().item()
            return _stand_in(name, like, rms[p])
        return read
    return reader


def load_sharded(model: nn.Module, checkpoint, expert_parallel: ExpertParallel, *, quantize=None, passes=None,
                 verify: bool = False, decode_linears: bool = True) -> nn.Module:
    """Fill `model` (built on the meta device, the same on every rank) from a safetensors `checkpoint` and compile it
    with sharded experts, one block at a time: a rank reads the non-expert weights and only its own experts of each
    block (sliced reads; the other ranks' experts are stand-ins for the proof, see `shard_reader`), and holds the
    non-expert weights, its shard of every block, and while one block compiles, that block's full-size experts.
    No rank reads or holds the whole model. Before any block compiles, the ranks compare what they read (the
    files' tensor names, shapes and dtypes, and a digest of every value but the routed experts') and all raise if
    one read other files. Checkpoint names: the model's state_dict keys (see moec.load_offloaded). Returns the
    model in eval mode (it holds a shard of the experts: it cannot train).
    decode_linears: as in moec.compile."""
    from moec.api import _expert_parallel_group, _warn_if_empty, install_decode_linears, settle
    from moec.backends import pipeline_for
    from moec.offload.load import fill_and_compile
    from moec.quant import Int4Experts, Int8Experts

    if quantize is not None and not isinstance(quantize, (Int8Experts, Int4Experts)):
        raise TypeError(f"moec.load_sharded: quantize must be moec.Int8Experts() or moec.Int4Experts(...), "
                        f"not {quantize!r}")
    group = _expert_parallel_group(model, expert_parallel, "torch", None, [passes, quantize])
    pipeline = pipeline_for("torch", passes, quantize=quantize is not None, sharded=True)
    report = fill_and_compile(
        model, checkpoint, pipeline, {"quantize": quantize, "expert_parallel": group}, verify=verify,
        who="moec.load_sharded", before_install=lambda r: group.agree("the blocks compiled", compiled_blocks(r)),
        expert_reader=shard_reader(lambda path, E: group.placement(path, E)[group.rank]),
        filled=lambda m, ckpt: group.agree(
            "the checkpoint (its tensors' names, shapes and dtypes, or the values of all but the routed experts)",
            [ckpt.header(), {n: fingerprint(t) for n, t in m.state_dict().items()}],
            fix="every rank must read the same checkpoint files"))
    _warn_if_empty(model, report)
    report.quantize, report.expert_parallel = quantize, group.stats
    install_decode_linears(model, report, decode_linears)
    settle(model, report)
    model.__dict__["_moec_report"] = report
    return model.eval()


def compiled_blocks(report) -> list:
    """What every rank must have compiled the same way (the experts' description without this rank's shard)."""
    return [(b.path, b.router, b.experts.split(" [")[0]) for b in report.blocks]
