"""moec's demo: compile a built-in small Mixtral-style model, show what was found, measure it.

    python examples/demo.py [--tokens 1 16 128] [--layers 4]

The model is built from a config with random weights (no downloads).
"""

import argparse
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import moec  # noqa: E402
from moec import models  # noqa: E402
from moec.timing import median_time  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128])
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    console = Console()

    console.print(f"building the demo model (Mixtral-style, hidden 512, 8 experts x 1792, top-2, {args.layers} layers)")
    original = models.demo_model(num_hidden_layers=args.layers)
    model = moec.compile(copy.deepcopy(original))
    console.print(moec.inspect(model, **models.example_inputs(model, seq=64)))

    t = Table(title="whole-model forward, CPU, fp32 (median)")
    for col in ("tokens", "HF (grouped_mm, default)", "moec", "speed-up", "max |diff| of logits"):
        t.add_column(col, justify="right")
    for n in args.tokens:
        inputs = models.example_inputs(model, seq=n)
        with torch.no_grad():
            diff = (model(**inputs).logits - original(**inputs).logits).abs().max().item()
        reps = 20 if n <= 16 else 5
        hf, mc = median_time(lambda: original(**inputs), reps), median_time(lambda: model(**inputs), reps)
        t.add_row(str(n), f"{hf * 1e3:.2f} ms", f"{mc * 1e3:.2f} ms", f"{hf / mc:.2f}x", f"{diff:.1e}")
    console.print(t)

    inputs = models.example_inputs(model, seq=8)
    same = torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=False),
                       original.generate(**inputs, max_new_tokens=8, do_sample=False))
    console.print(f"greedy generation gives the same tokens as the original: {same}")
    console.print("per-block benchmarks against every HF experts implementation and torch.compile: "
                  "python benchmarks/bench_moe.py (results in docs/benchmarks.md)")


if __name__ == "__main__":
    main()
