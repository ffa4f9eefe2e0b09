"""Passes, the pass registry, and the pass manager with its instruments.

A pass is `GraphModule -> PassResult` registered under a name with the passes it needs to have
run before it (`requires`); a pipeline is text that round-trips: "detect_moe,fuse_gate,batch_experts"
(or a list of names), refused when a pass's requirement is missing. The manager runs a pipeline
on one block's graph and applies the instruments that are on:

    print    print the graph after each pass (or after one pass: print_after; or when it changed: print_changed)
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


def register_pass(name: str, requires: tuple[str, ...] = (), proof_tokens=None, approximate: bool = False):
    """Register a pass under `name`; `requires`: passes that must run before it in any pipeline;
    `proof_tokens(spec) -> [T, ...]`: token counts at which the kernels it installs change path (the
    final proof runs there); `approximate`: the pass changes the block's outputs on purpose (asked for by name;
    its error against the original is measured, not a failure)."""
    def deco(fn):
        PASSES[name] = fn
        fn.pass_name, fn.requires, fn.proof_tokens, fn.approximate = name, requires, proof_tokens, approximate
        return fn

    return deco


def parse_pipeline(text: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """"detect_moe,fuse_gate" or ["detect_moe", "fuse_gate"] -> the pass names, checked."""
    if text is None:
        text = DEFAULT_PIPELINE
    if isinstance(text, str):
        names = [p.strip() for p in text.split(",") if p.strip()]
    elif isinstance(text, (list, tuple)) and all(isinstance(n, str) for n in text):
        names = [n.strip() for n in text]
    else:
        raise TypeError(f"passes must be a string like {DEFAULT_PIPELINE!r} or a list of pass names, not {text!r}")
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise ValueError(f"unknown pass(es) {unknown}; registered: {sorted(PASSES)}")
    if not names or names[0] != "detect_moe":
        raise ValueError("a pipeline starts with detect_moe (it turns a block into moec's canonical graph)")
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"pass {name!r} appears twice in the pipeline {','.join(names)}")
        missing = [r for r in PASSES[name].requires if r not in names[:i]]
        if missing:
            raise ValueError(f"pass {name!r} needs {', '.join(map(repr, missing))} to run before it "
                             f"(pipeline {','.join(names)})")
    return names


@dataclass
class Instruments:
    print_graph: bool = False
    timing: bool = False
    verify: bool = False
    dump_dir: Path | None = None
    print_after: str | None = None  # print the graph after this pass only
    print_changed: bool = False  # print the graph after each pass that changed it

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
                    e.moec_pass = name  # which pass raised (the CLI shows a user pass's traceback)
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
            if ins.print_graph or ins.print_after == name or (ins.print_changed and res.modified):
                log.info(f"[{block_path}] graph after {name}:\n{gm.code}")
            if ins.dump_dir:
                d = ins.dump_dir / (block_path or "root")
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{i:03d}_{name}.py").write_text(f"# moec pipeline: {self.pipeline}\n{gm.code}")
        return gm, records


def verify_graph(gm: fx.GraphModule, reference: torch.nn.Module, tokens: tuple[int, ...] = (1, 7)) -> float:
    """Max relative error of gm against the original block's forward on random inputs (the block's
    state is left as it was: moec.capture.untouched)."""
    from moec.canonical import call, original_forward
    from moec.capture import untouched
    from moec.passes.detect.proof import rel_err

    spec = gm.meta["moe_spec"]
    p = next(reference.parameters())
    worst = 0.0
    gen = torch.Generator().manual_seed(2)
    lead = (1,) if 3 in gm.meta.get("ranks", (3,)) else ()  # [1, T, H], or [T, H] for a block proved on those only
    for T in tokens:
        x = torch.randn(*lead, T, spec.experts.hidden, generator=gen, device="cpu").to(p.device, p.dtype)
        with torch.no_grad(), untouched(reference):
            ref = original_forward(reference)(x)
            got = call(gm, reference, x)[0]
        ref = ref[0] if isinstance(ref, tuple) else ref
        worst = max(worst, rel_err(got.reshape(ref.shape), ref))  # inf where NaNs or infs appear that the block
        # does not give (reshaped: a block may return [T, H] or [T*H], as ERNIE-4.5-VL's)
    return worst
