"""Passes, the pass registry, and the pass manager with its instruments.

A pass is `GraphModule -> PassResult` registered under a name; a pipeline is text that
round-trips: "detect_moe,fuse_gate,batch_experts". The manager runs a pipeline on one
block's graph and applies the instruments that are on:

    print    print the graph after each pass
    dump     write each stage to <dir>/<block>/NNN_<pass>.py
    timing   time each pass
    verify   run the graph after each pass against the original block and report the
             max relative error (finds the pass that changed the numbers)

`MOEC_LOGS=print,timing,verify[,debug]` turns instruments (and debug logging) on from the environment and
`MOEC_DUMP_DIR=dir` turns on dumping (like TORCH_LOGS / TORCH_COMPILE_DEBUG).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.fx as fx

from moec.log import log

PASSES: dict[str, Callable[[fx.GraphModule], "PassResult"]] = {}
DEFAULT_PIPELINE = "detect_moe,fuse_gate,batch_experts"


class Rejected(Exception):
    """A candidate block that moec leaves as it was; the message is the reason."""


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    stats: dict[str, int] = field(default_factory=dict)


def register_pass(name: str):
    def deco(fn):
        PASSES[name] = fn
        fn.pass_name = name
        return fn

    return deco


def parse_pipeline(text: str | list[str] | None) -> list[str]:
    names = [p.strip() for p in (text or DEFAULT_PIPELINE).split(",")] if not isinstance(text, list) else text
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise ValueError(f"unknown pass(es) {unknown}; registered: {sorted(PASSES)}")
    if names[0] != "detect_moe":
        raise ValueError("a pipeline starts with detect_moe (it turns a block into moec's canonical graph)")
    return names


@dataclass
class Instruments:
    print_graph: bool = False
    timing: bool = False
    verify: bool = False
    dump_dir: Path | None = None

    @classmethod
    def from_env(cls) -> "Instruments":
        logs = {s.strip() for s in os.environ.get("MOEC_LOGS", "").split(",") if s.strip()}
        dump = os.environ.get("MOEC_DUMP_DIR")
        return cls("print" in logs, "timing" in logs, "verify" in logs, Path(dump) if dump else None)


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    max_rel_err: float | None = None


class PassManager:
    def __init__(self, pipeline: str | list[str] | None = None, instruments: Instruments | None = None):
        self.names = parse_pipeline(pipeline)
        self.instruments = instruments or Instruments.from_env()
        self.stats: Counter[str] = Counter()

    @property
    def pipeline(self) -> str:
        return ",".join(self.names)

    def run(self, gm: fx.GraphModule, block_path: str, reference: torch.nn.Module) -> tuple[fx.GraphModule, list[PassRecord]]:
        ins, records = self.instruments, []
        for i, name in enumerate(self.names):
            t0 = time.perf_counter()
            try:
                res = PASSES[name](gm)
            except Exception as e:
                if not isinstance(e, Rejected):
                    e.add_note(f"moec: pass {name!r} failed on block {block_path!r} (pipeline so far: "
                               f"{','.join(self.names[:i + 1])})")
                raise
            res.graph_module.recompile()
            gm = res.graph_module
            rec = PassRecord(name, time.perf_counter() - t0, res.modified)
            self.stats.update({f"{name}.{k}": v for k, v in res.stats.items()})
            if ins.verify:
                rec.max_rel_err = verify_graph(gm, reference)
            records.append(rec)
            if ins.timing or ins.verify:
                err = "" if rec.max_rel_err is None else f"  max rel err {rec.max_rel_err:.2e}"
                log.info(f"[{block_path}] {name}: {rec.seconds * 1e3:.1f} ms{err}")
            if ins.print_graph:
                log.info(f"[{block_path}] graph after {name}:\n{gm.code}")
            if ins.dump_dir:
                d = ins.dump_dir / (block_path or "root")
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{i:03d}_{name}.py").write_text(f"# moec pipeline: {self.pipeline}\n{gm.code}")
        return gm, records


def verify_graph(gm: fx.GraphModule, reference: torch.nn.Module, tokens: tuple[int, ...] = (1, 7)) -> float:
    """Max relative error of gm against the original block's forward on random inputs."""
    spec = gm.meta["moe_spec"]
    original = reference.__dict__.get("_moec_original_forward", reference.forward)
    p = next(reference.parameters())
    worst = 0.0
    gen = torch.Generator().manual_seed(2)
    for T in tokens:
        x = torch.randn(1, T, spec.experts.hidden, generator=gen, device="cpu").to(p.device, p.dtype)
        with torch.no_grad():
            ref = original(x)
            got = gm(x)[0]
        ref = ref[0] if isinstance(ref, tuple) else ref
        worst = max(worst, ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item())
    return worst
