"""One sampling step between two decode steps: HF's (its top-k warper, softmax, torch.multinomial) against moec's
generate loop on backend="onnxruntime" (csrc/greedy.c: the warper, softmax, draw and the loop's own step as one call
where torch's softmax runs on 16 lanes; else the warper and draw in C around torch's softmax), by vocabulary.

    python benchmarks/bench_sampling.py [--vocab 256 1024 32000 152064] [--batch 1] [--top-k 50] [--rounds 5]
                                        [--steps 200]

Each step reads 64 MiB first, as a decode step's weights go through the caches before the loop samples (the small
Python and torch operations cost several times what they do warm). Both systems draw from torch's generator from
the same seed and must pick the same tokens (asserted). µs a step, median of the steps of each round, then the
median of the interleaved rounds; each round's wall time is printed.
"""

import argparse
import statistics
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from transformers.generation.logits_process import TopKLogitsWarper

from moec.backends import ort_generate


def hf_step(scores: torch.Tensor, warper) -> np.ndarray:
    """HF's sampling step: the warper, softmax, multinomial"""
    return torch.multinomial(torch.softmax(warper(None, scores), -1), num_samples=1)[:, 0].numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[256, 1024, 32000, 152064])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    if args.top_k < 1:
        ap.error("--top-k: HF's top-k warper takes k >= 1")
    native = ort_generate._native()
    if native is None or native.draw is None:
        print("bench_sampling: skipped, moec's C library is not built here (or its draw is not this torch's)")
        return
    torch.set_num_threads(2)
    weights = np.ones(64 << 17)  # 64 MiB
    table = Table(title=f"one sampling step (top-k {args.top_k}, batch {args.batch}), µs, caches cold, median of "
                        f"{args.rounds} rounds")
    for col in ("vocabulary", "HF (torch ops)", "moec loop (C)", "speed-up"):
        table.add_column(col, justify="right")
    for V in args.vocab:
        logits = torch.randn(args.steps, args.batch, V, generator=torch.Generator().manual_seed(V)) * 3
        warper = TopKLogitsWarper(args.top_k)
        times = {"hf": [], "moec": []}
        for r in range(args.rounds):
            start, tokens = time.perf_counter(), {}
            for name in times:  # interleaved: each system a pass over the same steps, from the same seed
                torch.manual_seed(r)
                per, out = [], []
                steady = np.empty((args.batch, V), np.float32)  # the loop's logits buffer
                seq, none = np.zeros((args.batch, 1 + args.steps), np.int64), np.zeros(0, np.int64)
                steps = ort_generate._Steps(native, steady, False, none, 0, none, np.zeros(args.batch, bool), 0, seq,
                                            1, *(np.zeros((args.batch, 1), np.int64) for _ in range(3)), args.top_k)
                steps.address(steady)
                draw = ort_generate._Draws(True, steps.given)
                for step in range(args.steps):
                    scores = logits[step].clone()
                    np.copyto(steady, scores.numpy())
                    weights.sum()
                    t = time.perf_counter()
                    if name == "hf":
                        out.append(hf_step(scores, warper))
                    elif native.sample is not None:  # as the loop runs it
                        draw.sample(steps)
                        out.append(steps.given.copy())
                    else:
                        steps.prepare()
                        draw(torch.softmax(steps.tensor, -1))
                        steps.next(True)
                        out.append(steps.given.copy())
                    per.append(time.perf_counter() - t)
                tokens[name] = np.stack(out)
                times[name].append(statistics.median(per) * 1e6)
            assert np.array_equal(tokens["hf"], tokens["moec"]), f"vocabulary {V}: the tokens differ"
            print(f"vocabulary {V} round {r}: {time.perf_counter() - start:.1f} s wall")
        hf, moec = statistics.median(times["hf"]), statistics.median(times["moec"])
        table.add_row(str(V), f"{hf:.0f}", f"{moec:.0f}", f"{hf / moec:.1f}x")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
