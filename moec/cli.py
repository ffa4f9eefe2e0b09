"""moec's pass-debugging command line.

    moec run --model mixtral                         # compile a built-in tiny model, print the report
    moec run --model deepseek_v3 --passes detect_moe,fuse_gate --print-after-all
    moec run --model olmoe --dump moec_logs/ --timing
    moec run --model qwen2_moe --verify              # per-pass numeric error; names the pass that broke it
    moec list                                        # registered passes and built-in models
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:  # bad input: one line, what to do
        print(f"moec: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="moec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run a pass pipeline on a built-in model")
    run.add_argument("--model", default="mixtral", help="a family from `moec list` or 'demo' (default: mixtral)")
    run.add_argument("--passes", default=None, help="pipeline, e.g. detect_moe,fuse_gate,batch_experts")
    run.add_argument("--print-after-all", action="store_true", help="print each block's graph after every pass")
    run.add_argument("--dump", type=Path, help="write each stage to DIR/<block>/NNN_<pass>.py")
    run.add_argument("--timing", action="store_true", help="time each pass")
    run.add_argument("--verify", action="store_true", help="check numerics after each pass")
    sub.add_parser("list", help="registered passes and built-in models")
    args = ap.parse_args(argv)

    import moec
    from moec import models
    from moec.pass_manager import Instruments

    console = Console()
    if args.cmd == "list":
        console.print("passes:", ", ".join(sorted(moec.PASSES)), f"(default pipeline: {moec.DEFAULT_PIPELINE})")
        console.print("models:", ", ".join(("demo",) + models.FAMILIES))
        return 0

    model = models.demo_model() if args.model == "demo" else models.tiny_model(args.model)
    ins = Instruments(args.print_after_all, args.timing, args.verify, args.dump)
    from moec.api import _run
    from moec.passes.detect.proof import TOL

    report = _run(model, args.passes, ins, install_blocks=True, backend="torch")
    console.print(report)
    if args.verify:
        t = Table(title="numeric error after each pass (max relative, vs the original block)")
        t.add_column("block")
        names = report.pipeline.split(",")
        for n in names:
            t.add_column(n)
        bad = []
        for b in report.blocks:
            t.add_row(b.path, *(f"{r.max_rel_err:.1e}" for r in b.passes))
            first = next((r.name for r in b.passes if r.max_rel_err > TOL[next(model.parameters()).dtype]), None)
            if first:
                bad.append(f"{b.path}: numbers changed at pass {first!r}")
        console.print(t)
        for line in bad:
            console.print(f"[red]{line}")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
