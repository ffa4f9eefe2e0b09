"""Conversion time: moec.export_genai against onnxruntime-genai's own builder, same weights, each in a fresh process.

    python benchmarks/bench_export.py [--layers 2 4 8 16] [--rounds 3] [--every-layer]

The model is a GPT-OSS of hidden 512 and 8 experts (bench_generate's "gpt_oss") with 2-16 layers, saved once as an
HF folder. Each round runs, one after the other, a fresh `python` that loads the folder and calls
moec.export_genai, and the builder (`python -m onnxruntime_genai.models.builder -p fp32 -e cpu`) on the same
folder. Wall time is the whole process (imports, loading, conversion, writing), which is what a user waits for;
moec's stages come from ExportReport.seconds. --every-layer adds, in the same rounds, moec with every layer traced
(moec.export_layers' plan turned off: how the export ran before it). Medians over the rounds. Not a test: never in CI.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(__file__))

CHILD = """
import json, sys
from transformers import AutoModelForCausalLM
import moec
from moec import examples, export_layers
if sys.argv[3] == "every-layer":
    export_layers.plan = lambda *args, **kwargs: None
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
report = moec.export_genai(model, examples.byte_tokenizer(), sys.argv[2])
print(json.dumps(report.seconds))
"""


def timed(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--every-layer", action="store_true", help="also moec with every layer traced (as before)")
    a = ap.parse_args()
    from bench_generate import GPT_OSS
    from moec import examples, models

    rows = []
    with tempfile.TemporaryDirectory() as work:
        for layers in a.layers:
            if layers % 2:
                raise SystemExit("--layers: even counts (GPT-OSS alternates sliding and full attention)")
            hf = os.path.join(work, f"hf-{layers}")
            cfg = dict(GPT_OSS, num_hidden_layers=layers, layer_types=GPT_OSS["layer_types"][:2] * (layers // 2))
            models.tiny_model("gpt_oss", **cfg).save_pretrained(hf)
            examples.byte_tokenizer().save_pretrained(hf)
            moec_wall, every_wall, builder_wall, stages = [], [], [], []
            for r in range(a.rounds):
                wall, out = timed([sys.executable, "-c", CHILD, hf, os.path.join(work, f"moec-{layers}-{r}"), "plan"])
                moec_wall.append(wall)
                stages.append(json.loads(out.strip().splitlines()[-1]))
                if a.every_layer:
                    every_wall.append(timed([sys.executable, "-c", CHILD, hf, os.path.join(work, f"all-{layers}-{r}"),
                                             "every-layer"])[0])
                wall, _ = timed([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o",
                                 os.path.join(work, f"builder-{layers}-{r}"), "-p", "fp32", "-e", "cpu"])
                builder_wall.append(wall)
                every = f", moec every layer traced {every_wall[-1]:.1f} s" if every_wall else ""
                print(f"layers {layers} round {r}: moec {moec_wall[-1]:.1f} s{every}, builder {builder_wall[-1]:.1f} s",
                      flush=True)
            med = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
            rows.append((layers, statistics.median(moec_wall), med,
                         statistics.median(every_wall) if every_wall else None, statistics.median(builder_wall)))

    table = Table(title=f"GPT-OSS (hidden 512, 8 experts) to an onnxruntime-genai folder, fp32: seconds, "
                        f"medians of {a.rounds} interleaved rounds")
    stage_names = list(rows[0][2])
    every = ["moec process, every layer traced"] if a.every_layer else []
    for c in ["layers", "moec process", *stage_names, *every, "builder process"]:
        table.add_column(c, justify="right")
    for layers, wall, med, every_wall, builder in rows:
        table.add_row(str(layers), f"{wall:.1f}", *(f"{med[k]:.1f}" for k in stage_names),
                      *([f"{every_wall:.1f}"] if a.every_layer else []), f"{builder:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
