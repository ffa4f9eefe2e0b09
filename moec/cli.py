"""moec's command line: the pass debugger, the report, routing statistics and export, on your own models.

MODEL is a Hugging Face folder (config.json + safetensors, read offline), a factory `package.module:function` or
`path/to/file.py:function` (returning a module, or (module, example_inputs)), or a built-in (`moec list`).

    moec inspect ./my-moe-checkpoint --json            # blocks found, what was read, rejections with reasons
    moec run mixtral --passes detect_moe,fuse_gate --print-after fuse_gate
    moec run fine_moe_lm --topk 4 --verify               # an approximation: its error, measured
    moec run fine_moe_lm --top-p 0.8                      # top-p routing (an approximation too)
    moec run ./my-moe-checkpoint --verify              # per-pass numeric error; names the pass that broke it
    moec run my_pkg.models:build --dump moec_logs/ --timing
    moec routing fine_moe_lm --text notes.txt --png routing.png     # expert load, top-j mass, entropy
    moec export ./my-moe-checkpoint out/ --quantize int4:g32 --genai
    moec bench ./my-moe-checkpoint --tokens 1 16 256 --quantize int8     # HF's experts implementations vs moec
    moec bisect ./my-moe-checkpoint --passes detect_moe,fuse_gate,my_pass --out repro/   # then: moec replay repro/block
    moec list                                          # registered passes and built-in models

Environment: MOEC_LOGS=print,timing,verify[,debug] and MOEC_DUMP_DIR=dir turn the instruments on for any
program using moec (like TORCH_LOGS); HF_HUB_OFFLINE=1 is set here (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DTYPES = ("float32", "bfloat16", "float16")


class UserCodeError(Exception):
    """An error raised inside the user's own code (a factory, a module it imports, a pass): its cause is shown with
    its traceback, exit status 1 (moec's own refusals of bad input are one line, exit status 2)."""


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except UserCodeError as e:
        import traceback

        traceback.print_exception(e.__cause__)
        print(f"moec: error: {e} (the traceback above)", file=sys.stderr)
        return 1
    except (ValueError, TypeError, NotImplementedError, RuntimeError, ImportError, AttributeError, KeyError,
            OSError, AssertionError) as e:
        print(f"moec: error: {str(e).splitlines()[0]}", file=sys.stderr)  # bad input: one line, what to do
        return 2


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def command(name: str, help: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=f"{help}.\n\nexample:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name != "list":
            p.add_argument("model", metavar="MODEL", help="HF folder, package.module:function, file.py:function or "
                                                          "a built-in name (moec list)")
            p.add_argument("--dtype", choices=DTYPES, default="float32", help="the model's dtype (default float32)")
            p.add_argument("--device", default="cpu", help="where the model runs (default cpu)")
        return p

    ins = command("inspect", "what moec finds in MODEL: MoE blocks, router, experts, rejections",
                  "moec inspect ./checkpoint --json")
    ins.add_argument("--json", action="store_true", help="print the report as JSON (for tools)")
    run = command("run", "run a pass pipeline on MODEL's blocks and print the report",
                  "moec run mixtral --passes detect_moe,fuse_gate --print-after fuse_gate --verify")
    run.add_argument("--passes", default=None, help="pipeline, e.g. detect_moe,fuse_gate,batch_experts")
    run.add_argument("--print-after-all", action="store_true", help="print each block's graph after every pass")
    run.add_argument("--print-after", metavar="PASS", help="print each block's graph after PASS")
    run.add_argument("--print-changed", action="store_true", help="print the graph after each pass that changed it")
    run.add_argument("--dump", type=Path, help="write each stage to DIR/<block>/NNN_<pass>.py")
    run.add_argument("--timing", action="store_true", help="time each pass")
    run.add_argument("--verify", action="store_true", help="check numerics after each pass")
    k = run.add_mutually_exclusive_group()
    k.add_argument("--topk", type=_positive, help="route to K experts (the reduce_topk pass: an approximation)")
    k.add_argument("--top-p", type=_fraction, metavar="P",
                   help="top-p routing: each token keeps its fewest heaviest experts holding P of its k experts' weight "
                        "(reduce_topk with moec.TopP: an approximation)")
    rt = command("routing", "per-block expert load, top-j router mass and entropy (moec.calibrate)",
                 "moec routing fine_moe_lm --text notes.txt --png routing.png")
    src = rt.add_mutually_exclusive_group()
    src.add_argument("--text", type=Path, help="a text file, tokenized by MODEL's tokenizer (bytes for built-ins)")
    src.add_argument("--random", type=_positive, metavar="N", default=None, help="N random tokens (default 512)")
    rt.add_argument("--png", type=Path, help="also write the expert-load heatmap here (needs matplotlib)")
    ex = command("export", "export MODEL to ONNX (with its KV cache) or to an onnxruntime-genai folder",
                 "moec export ./checkpoint out/ --quantize int4:g32 --genai")
    ex.add_argument("out", type=Path, help="the .onnx file, or the folder with --genai")
    ex.add_argument("--quantize", help="int8, or int4:gG (group size G, e.g. int4:g32): the experts' weights; "
                                       ":a8 (int8:a8, int4:g32:a8) also rounds their inputs to int8 (int8 dot products)")
    ex.add_argument("--genai", action="store_true", help="write a folder onnxruntime-genai runs (needs a tokenizer)")
    ex.add_argument("--expert-slices", type=int, default=None, metavar="S",
                    help="fp experts as S slices of their intermediate units (default 2 for ORT's CPU kernel; 1: whole)")
    bn = command("bench", "tokens/s of MODEL's forward: HF's experts implementations against moec's backends",
                  "moec bench ./checkpoint --tokens 1 16 256 --quantize int8 int4:g32")
    bn.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256], help="token counts (batch 1)")
    bn.add_argument("--quantize", nargs="*", default=[],
                    help="quantized moec variants too (torch backend): int8, int4:gG, either with :a8 (int8 activations)")
    bn.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    bis = command("bisect", "find the first pass (and block) that changes the numbers and write a reproducer",
                  "moec bisect ./checkpoint --passes detect_moe,fuse_gate,my_pass --out repro/")
    bis.add_argument("--passes", default=None, help="pipeline, e.g. detect_moe,fuse_gate,batch_experts")
    bis.add_argument("--out", type=Path, default=Path("moec_repro"), help="the reproducer folder (default moec_repro)")
    bis.add_argument("--dump-rejected", action="store_true", help="also write each rejected candidate, with its reason")
    rep = sub.add_parser("replay", help="replay a reproducer folder written by moec bisect",
                         description="replay a reproducer folder written by moec bisect.\n\nexample:\n  moec replay repro/",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    rep.add_argument("folder", type=Path, metavar="DIR")
    command("list", "registered passes and built-in models", "moec list")
    return ap


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return int(text)


def _fraction(text: str) -> float:
    try:
        p = float(text)
    except ValueError:
        p = -1.0
    if not 0 < p <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in (0, 1]")
    return p


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    import moec
    from moec import models

    console = Console(width=160)
    if args.cmd == "list":
        console.print("passes:", ", ".join(sorted(moec.PASSES)), f"(default pipeline: {moec.DEFAULT_PIPELINE})")
        console.print("models:", ", ".join(BUILTINS + models.FAMILIES))
        return 0
    if args.cmd == "replay":
        return _replay(args.folder, console)
    model, inputs, tokenizer = load_model(args.model, args.dtype, args.device)
    return {"inspect": _inspect, "run": _run_passes, "routing": _routing, "export": _export, "bench": _bench,
            "bisect": _bisect}[args.cmd](args, model, inputs, tokenizer, console)


# -- models


BUILTINS = ("demo", "tiny_moe_lm", "fine_moe_lm")


def load_model(spec: str, dtype: str = "float32", device: str = "cpu"):
    """MODEL -> (module in eval mode, example inputs {name: tensor} or None, tokenizer or folder or None)."""
    import torch

    from moec import examples, models

    dt = getattr(torch, dtype)
    path = Path(spec)
    tokenizer = None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{spec} has no config.json: give a Hugging Face model folder")
        import transformers

        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
        model = auto.from_pretrained(path, local_files_only=True, dtype=dt)
        inputs = None
        tokenizer = str(path) if any(path.glob("tokenizer*.json")) else None
    elif ":" in spec:
        module, _, fn = spec.rpartition(":")
        mod = _import(module)
        factory = getattr(mod, fn, None)
        if not callable(factory):
            raise AttributeError(f"{module} has no function {fn!r}" if factory is None else
                                 f"{module}:{fn} is not a function ({type(factory).__name__})")
        try:
            out = factory()
        except Exception as e:
            raise UserCodeError(f"{spec} raised {type(e).__name__}") from e
        model, inputs = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
        if not isinstance(model, torch.nn.Module) or not (inputs is None or isinstance(inputs, dict)):
            raise TypeError(f"{spec} must return a torch.nn.Module or (module, {{input name: tensor}}), not "
                            f"{type(out).__name__}")
        if next(model.parameters(), None) is None:
            raise ValueError(f"{spec} returned {type(model).__name__}, a module without parameters: no MoE to find")
        model = model.to(dt)
    elif spec in BUILTINS:
        model = {"demo": models.demo_model, "tiny_moe_lm": examples.tiny_moe_lm, "fine_moe_lm": examples.fine_moe_lm}[
            spec]().to(dt)
        inputs, tokenizer = None, (examples.byte_tokenizer() if spec != "demo" else None)
    elif spec in models.FAMILIES:
        model, inputs = models.tiny_model(spec, dtype=dt), None
    else:
        raise ValueError(f"MODEL {spec!r} is not a folder with config.json, a package.module:function or "
                         f"file.py:function factory, or a built-in ({', '.join(BUILTINS)} or a family: `moec list`)")
    model = model.to(device).eval()
    if inputs is None and hasattr(getattr(model, "config", None), "vocab_size"):
        inputs = models.example_inputs(model, batch=2, seq=8)
    return model, inputs, tokenizer


def _import(module: str):
    """`package.module` (importable, or from the working directory) or `path/to/file.py`."""
    if module.endswith(".py"):
        if not Path(module).is_file():
            raise FileNotFoundError(f"no factory file {module}")
        name = Path(module).stem
        spec = importlib.util.spec_from_file_location(name, module)
        mod = importlib.util.module_from_spec(spec)
        # importable by its name from now on, as `import name` would make it: the classes it defines pickle by
        # reference (moec bisect's block.pt); its folder on the path, as running it would put it (its imports)
        sys.modules.setdefault(name, mod)
        sys.path.insert(0, str(Path(module).resolve().parent))
        try:
            spec.loader.exec_module(mod)
        except Exception as e:
            if sys.modules.get(name) is mod:
                del sys.modules[name]  # not left half-run
            raise UserCodeError(f"importing {module} raised {type(e).__name__}") from e
        return mod
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module or module.startswith(f"{e.name}."):  # the factory's module itself: a wrong name
            raise
        raise UserCodeError(f"importing {module} raised {type(e).__name__}") from e
    except Exception as e:
        raise UserCodeError(f"importing {module} raised {type(e).__name__}") from e


# -- commands


def _inspect(args, model, inputs, tokenizer, console) -> int:
    import moec

    report = moec.inspect(model, **inputs) if inputs else moec.inspect(model)
    if args.json:
        print(json.dumps({
            "blocks": [{"path": b.path, "num_experts": b.num_experts, "top_k": b.top_k, "router": b.router,
                        "experts": b.experts, "shared": b.shared, "expert_load": b.expert_load} for b in report.blocks],
            "rejected": [{"path": r.path, "reason": r.reason} for r in report.rejected]}, indent=2))
    else:
        console.print(report)
    return 0


def _run_passes(args, model, inputs, tokenizer, console) -> int:
    from moec.api import RAISED, _run
    from moec.backends import pipeline_for
    from moec.pass_manager import PASSES, Instruments, parse_pipeline
    from moec.passes.detect.proof import TOL

    from moec.approx import TopP

    topk = TopP(args.top_p) if args.top_p is not None else args.topk
    passes = pipeline_for("torch", args.passes, topk=topk is not None)
    if args.print_after and args.print_after not in parse_pipeline(passes):
        raise ValueError(f"--print-after {args.print_after}: not a pass of the pipeline {passes}")
    ins = Instruments(args.print_after_all, args.timing, args.verify, args.dump, args.print_after, args.print_changed)
    report = _run(model, passes, ins, install_blocks=True, backend="torch", options={"topk": topk})
    console.print(report)
    if topk is not None and report.blocks and not any(b.approximate for b in report.blocks):
        asked = f"--top-p {args.top_p}" if args.top_p is not None else f"--topk {args.topk}"
        console.print(f"{asked}: at or above every block's own k, so every block is left exact")
    if not args.verify:
        return 0
    t = Table(title="numeric error after each pass (max relative, vs the original block, on random inputs of 1 and "
                    "7 tokens; an approximation's error in the report above is on the final proof's probes)")
    t.add_column("block")
    for n in report.pipeline.split(","):
        t.add_column(n)
    bad = []
    tol = TOL[next(model.parameters()).dtype]
    for b in [*report.blocks, *(r for r in report.rejected if r.passes)]:  # rejected: by the final proof
        t.add_row(b.path, *(f"{r.max_rel_err:.1e}" for r in b.passes))
        checked = []  # after an approximation, the error against the original is the approximation's
        for r in b.passes:
            if PASSES[r.name].approximate:
                break
            checked.append(r)
        first = next((r.name for r in checked if not r.max_rel_err <= tol), None)  # NaN included
        if first:
            bad.append(f"{b.path}: numbers changed at pass {first!r}")
    console.print(t)
    approx = [n for n in report.pipeline.split(",") if PASSES[n].approximate]
    if approx:
        console.print(f"{', '.join(approx)}: an approximation, its error expected; the passes after it are checked "
                      f"by the final proof, against the block at what the approximation promises")
    bad += [f"{r.path}: {r.reason}" for r in report.rejected if r.reason.startswith(RAISED)]  # a pass raised
    for line in bad:
        console.print(f"[red]{line}")
    return 1 if bad else 0


def _routing(args, model, inputs, tokenizer, console) -> int:
    import torch

    import moec

    config = getattr(model, "config", None)
    decoder_lm = hasattr(config, "vocab_size") and not getattr(config, "is_encoder_decoder", False)
    device = next(model.parameters()).device
    if args.text is not None or args.random is not None or decoder_lm:  # tokens (decoder LMs: 512 random by default)
        if not decoder_lm:
            raise ValueError("--text and --random run decoder LMs (a config.vocab_size); for this MODEL omit them: "
                             "its example inputs are used")
        if args.text:
            if tokenizer is None:
                raise ValueError("--text: this MODEL has no tokenizer files; use --random N")
            if isinstance(tokenizer, str):
                import transformers

                tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
            ids = torch.tensor(tokenizer(args.text.read_text())["input_ids"], dtype=torch.long)[None]
            if not ids.numel():
                raise ValueError(f"--text {args.text}: no tokens in it (an empty file?)")
            if int(ids.max()) >= config.vocab_size:
                raise ValueError(f"--text: the tokenizer gives ids up to {int(ids.max())}, past the model's "
                                 f"vocabulary of {config.vocab_size}: give the model's own tokenizer files")
        else:
            ids = torch.randint(0, config.vocab_size, (1, 512 if args.random is None else args.random), generator=torch.Generator().manual_seed(0))
        n = getattr(config, "max_position_embeddings", ids.shape[1])
        batches = [c.to(device) for c in ids.split(n, dim=1)]
    elif inputs is not None:
        batches = [inputs]
    else:
        raise ValueError("routing: this MODEL has no example inputs: return (module, inputs) from its factory")
    cal = moec.calibrate(model, batches)
    console.print(cal)
    if args.png:
        cal.plot(args.png)
        console.print(f"wrote {args.png}")
    return 0


def _pass_errors(module, passes: str | None, dump_dir: Path | None = None) -> tuple[dict, dict, dict]:
    """Run the pipeline on every candidate block of `module` with the numeric check after each pass (nothing is
    installed, even if the final proof would fail; each stage's graph written under dump_dir/<block>/ if given):
    ({block: [PassRecord]}, {rejected block: reason}, {block: (its MoESpec after the pipeline, the input ranks it
    was proved on)})."""
    from moec.api import _block_graph, _undo
    from moec.bindings import resolve
    from moec.pass_manager import PASSES, Instruments, PassManager, Rejected
    from moec.passes.detect_moe import find_candidates

    pm = PassManager(passes, Instruments(verify=True, dump_dir=dump_dir))
    records, rejected, specs = {}, {}, {}
    for cand in find_candidates(module):
        start = _block_graph(resolve(module, cand.path), cand, {})
        try:
            gm, records[cand.path] = pm.run(start, cand.path, resolve(module, cand.path))
            specs[cand.path] = gm.meta["moe_spec"], gm.meta.get("ranks", (3,))
        except Rejected as e:
            rejected[cand.path] = str(e)
        except Exception as e:
            name = getattr(e, "moec_pass", "")
            if name and not PASSES[name].__module__.startswith("moec."):
                raise UserCodeError(f"pass {name!r} raised {type(e).__name__} on block {cand.path!r}") from e
            raise
        finally:
            _undo(start.meta)
    return records, rejected, specs


def _first_change(records: dict, tol: float) -> tuple[str, str, float] | None:
    """(block, pass, error) of the first pass that changed a block's numbers (up to an approximating pass)."""
    from moec.pass_manager import PASSES

    for block, recs in records.items():
        for r in recs:
            if PASSES[r.name].approximate:
                break
            if not r.max_rel_err <= tol:
                return block, r.name, r.max_rel_err
    return None


def _bisect(args, model, inputs, tokenizer, console) -> int:
    import shutil

    import torch
    from safetensors.torch import save_file

    from moec.bindings import resolve
    from moec.pass_manager import PASSES, parse_pipeline
    from moec.passes.detect.proof import TOL

    passes = ",".join(parse_pipeline(args.passes))
    stages = Path(tempfile.mkdtemp(prefix="moec-bisect-"))
    records, rejected, specs = _pass_errors(model, passes, stages)
    dtype = next(model.parameters()).dtype
    bad = _first_change(records, TOL[dtype])
    if args.dump_rejected:
        for path, reason in rejected.items():
            d = args.out / "rejected" / (path or "root")
            d.mkdir(parents=True, exist_ok=True)
            torch.save(resolve(model, path), d / "block.pt")
            (d / "reason.txt").write_text(reason + "\n")
        console.print(f"wrote {len(rejected)} rejected candidate(s) under {args.out / 'rejected'}")
    if bad is None:
        shutil.rmtree(stages, ignore_errors=True)
        console.print(f"no pass of {passes} changed the numbers of {len(records)} block(s)")
        return 0
    block, name, err = bad
    shutil.rmtree(args.out / "block", ignore_errors=True)
    d = args.out / "block"
    d.mkdir(parents=True)
    module = resolve(model, block)
    torch.save(module, d / "block.pt")  # the module itself: replay needs no model code beyond its class
    # the user's own code, for replay in any directory, on any machine: the files (or top-level packages) that
    # define the block's classes, and the passes' files
    pass_files = sorted({PASSES[n].__code__.co_filename for n in passes.split(",")
                         if not PASSES[n].__module__.startswith("moec.")})
    for src in [*_own_sources(module), *pass_files]:
        (d / "code").mkdir(exist_ok=True)
        (shutil.copytree if Path(src).is_dir() else shutil.copy)(src, d / "code" / Path(src).name)
    save_file({k: v.detach().clone() for k, v in module.state_dict().items()}, d / "block.safetensors")
    (d / "spec.txt").write_text(f"{specs[block][0]!r}\n")  # the canonical spec the pipeline ended with
    gen = torch.Generator().manual_seed(2)  # the check after each pass runs on these (verify_graph)
    spec, ranks = specs[block]
    lead = (1,) if 3 in ranks else ()
    save_file({f"tokens_{T}": torch.randn(*lead, T, spec.experts.hidden, generator=gen) for T in (1, 7)},
              d / "inputs.safetensors")
    (d / "meta.json").write_text(json.dumps({"block": block, "pipeline": passes, "first_changed": name,
                                             "max_rel_err": err, "dtype": str(dtype),
                                             "pass_modules": [Path(f).name for f in pass_files]}, indent=2))
    shutil.copytree(stages / (block or "root"), d / "stages")  # each pass's graph: NNN_<pass>.py
    (d / "errors.txt").write_text("".join(f"{r.name}: max rel err {r.max_rel_err:.3e}\n" for r in records[block]))
    shutil.rmtree(stages, ignore_errors=True)
    console.print(f"[red]{block or '(model)'}: the numbers changed at pass {name!r} (max relative error {err:.2e}); "
                  f"reproducer in {d}: moec replay {d}")
    return 1


def _own_sources(module) -> list[str]:
    """The files, or top-level package folders, of the user's own code that defines `module`'s classes: not moec,
    not the standard library or installed packages (a factory file, a module or package in the working directory);
    torch.load imports them by name."""
    import sysconfig

    installed = [Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "purelib", "platlib")]
    found = set()
    for m in module.modules():
        top = type(m).__module__.split(".")[0]
        f = getattr(sys.modules.get(top), "__file__", None)
        if top in ("moec", "builtins", "__main__") or f is None or any(Path(f).resolve().is_relative_to(p) for p in installed):
            continue
        found.add(str(Path(f).parent) if Path(f).name == "__init__.py" else f)
    return sorted(found)


def _replay(folder: Path, console) -> int:
    import torch

    from moec.passes.detect.proof import TOL

    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"{folder} is not a reproducer folder (no meta.json): give the folder moec bisect wrote")
    meta = json.loads((folder / "meta.json").read_text())
    if (folder / "code").is_dir():  # the files that define the block's classes (bisect copied them)
        sys.path.insert(0, str(folder / "code"))
    for name in meta["pass_modules"]:  # the passes the pipeline names that are not moec's own (copied to code/)
        _import(str(folder / "code" / name))
    block = torch.load(folder / "block.pt", weights_only=False).eval()
    records, rejected, _ = _pass_errors(block, meta["pipeline"])
    t = Table(title=f"replay of {meta['block'] or '(model)'}: numeric error after each pass")
    for r in next(iter(records.values()), []):
        t.add_column(r.name)
    for recs in records.values():
        t.add_row(*(f"{r.max_rel_err:.1e}" for r in recs))
    console.print(t)
    bad = _first_change(records, TOL[next(block.parameters()).dtype])
    if bad is None:
        console.print(f"no pass changed the numbers{' (rejected: ' + str(rejected) + ')' if rejected else ''}")
        return 0
    console.print(f"[red]the numbers changed at pass {bad[1]!r} (max relative error {bad[2]:.2e})")
    return 1


def _quant(text: str | None):
    """--quantize int8[:a8] | int4:gG[:a8] -> the moec config (None for None); a8: int8 activations (ONNX Runtime
    and the torch backend)."""
    import moec

    if text is None:
        return None
    spec, a8, rest = text.partition(":a8")
    activations = "int8" if a8 else "fp32"
    kind, _, group = spec.partition(":g")
    if kind == "int8" and not group and not rest:
        return moec.Int8Experts(activations=activations)
    if kind == "int4" and group.isascii() and group.isdigit() and not rest:
        return moec.Int4Experts(int(group), activations=activations)
    raise ValueError(f"--quantize {text}: write int8, int4:gG, or either with :a8 (e.g. int4:g32, int4:g32:a8)")


def _bench(args, model, inputs, tokenizer, console) -> int:
    import copy
    import statistics
    import time

    import torch
    from rich.progress import Progress

    import moec
    import moec.hf  # noqa: F401  registers the "moec" experts implementation

    if not hasattr(getattr(model, "config", None), "vocab_size"):
        raise ValueError("bench runs models with a config.vocab_size (HF-style LMs): give an HF folder or built-in")
    systems = {}
    impls = ["eager", "grouped_mm", "batched_mm", "moec"] if hasattr(model, "set_experts_implementation") else []
    for impl in impls:
        m = copy.deepcopy(model)
        try:
            m.set_experts_implementation(impl)
        except (ValueError, KeyError, RuntimeError):
            continue
        systems[f"HF experts_implementation={impl!r}"] = m
    systems["original" if not impls else "HF as loaded"] = model
    systems["moec.compile"] = moec.compile(copy.deepcopy(model))
    other = "triton" if next(model.parameters()).is_cuda else "onnxruntime"  # moec's other backend on this device
    try:
        systems[f"moec.compile backend={other!r}"] = moec.compile(copy.deepcopy(model), backend=other)
    except (ImportError, NotImplementedError, ValueError) as e:  # not installed, or this model does not export
        console.print(f"moec bench: backend {other!r} left out ({str(e).splitlines()[0]})")
    for q in args.quantize:
        try:
            systems[f"moec.compile quantize={q}"] = moec.compile(copy.deepcopy(model), quantize=_quant(q))
        except NotImplementedError as e:  # e.g. a8 on a GPU model (the triton backend runs no int8 activations)
            console.print(f"moec bench: quantize={q} left out ({str(e).splitlines()[0]})")
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    ids = {T: torch.randint(0, model.config.vocab_size, (1, T), generator=gen).to(device) for T in args.tokens}
    speed = {(s, T): [] for s in systems for T in args.tokens}
    with Progress(console=console, transient=True) as progress, torch.no_grad():
        task = progress.add_task("moec bench", total=(args.rounds + 1) * len(speed))
        order = list(speed)
        for rnd in range(args.rounds + 1):  # round 0 warms up; each round starts at another system
            for (name, T) in order[rnd % len(order):] + order[:rnd % len(order)]:
                t = time.perf_counter()
                systems[name](input_ids=ids[T], use_cache=False)
                if rnd:
                    speed[name, T].append(T / (time.perf_counter() - t))
                progress.advance(task)
    t = Table(title=f"forward tokens/s, batch 1, median of {args.rounds} interleaved rounds ({torch.get_num_threads()} "
                    f"threads, {device})")
    t.add_column("system")
    for T in args.tokens:
        t.add_column(f"{T} token(s)")
    for name in systems:
        t.add_row(name, *(f"{statistics.median(speed[name, T]):.1f}" for T in args.tokens))
    console.print(t)
    return 0


def _export(args, model, inputs, tokenizer, console) -> int:
    import moec

    quantize = _quant(args.quantize)
    if args.genai:
        if tokenizer is None:
            raise ValueError("--genai needs a tokenizer: give an HF folder with its tokenizer files")
        report = moec.export_genai(model, tokenizer, args.out, quantize=quantize, expert_slices=args.expert_slices)
    else:
        if inputs is None:
            raise ValueError("export: this MODEL has no example inputs: return (module, inputs) from its factory")
        report = moec.export_onnx(model, inputs, args.out, quantize=quantize, expert_slices=args.expert_slices)
    console.print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
