"""Train moec's small byte-level MoE language models (`moec.examples.tiny_moe_lm`, `--model fine`:
`moec.examples.fine_moe_lm`) on CPU.

Corpus: the Python stdlib's `*.py` sources as raw bytes (split and model: `moec/examples.py`).
Writes `<out>/model.safetensors`, `config.json` and `train_log.json`.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python examples/train_tiny_moe.py            # ~6 min budget
    HF_HUB_OFFLINE=1 .venv/bin/python examples/train_tiny_moe.py --steps 561    # re-run the shipped weights
    HF_HUB_OFFLINE=1 .venv/bin/python examples/train_tiny_moe.py --model fine --steps N   # fine_moe_lm (its log)

With `--steps` unset the step count is fitted to `--minutes` from the speed of the first
steps (the log records it); pass it back as `--steps` to reproduce a run exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moec import examples as ex

WARMUP = 100  # linear warm-up steps; the total is fixed (from --steps or timing) before warm-up ends
TIMING_STEPS = 30  # steps timed to fit the total into the budget


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < WARMUP:
        return peak * (step + 1) / WARMUP
    t = min(1.0, (step - WARMUP) / max(1, total - WARMUP))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=6.0, help="wall-clock budget for training (default 6)")
    ap.add_argument("--steps", type=int, default=None, help="exact step count (overrides --minutes)")
    ap.add_argument("--model", choices=("tiny", "fine"), default="tiny",
                    help="tiny: Mixtral-style 8 experts (fp32 on disk); fine: Qwen2-MoE-style 64 experts (bf16)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: the model's in moec/data)")
    ap.add_argument("--seed", type=int, default=ex.SEED)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, heldout = ex.corpus("train"), ex.corpus("heldout")
    print(f"corpus: {len(train):,} train bytes, {len(heldout):,} held-out bytes")

    fine = args.model == "fine"
    out_dir = args.out or (ex.FINE_DATA_DIR if fine else ex.DATA_DIR)
    config = ex.fine_moe_config() if fine else ex.tiny_moe_config()
    config._experts_implementation = "eager"  # fastest for training on CPU
    num_experts = config.num_experts if fine else config.num_local_experts
    model = (transformers.Qwen2MoeForCausalLM if fine else transformers.MixtralForCausalLM)(config).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} params")

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)  # batch sampling

    total = args.steps if args.steps is not None else WARMUP  # refitted after TIMING_STEPS when unset
    budget = args.minutes * 60
    start, lm_losses = time.time(), []
    columns = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("loss {task.fields[loss]:.3f}  aux {task.fields[aux]:.3f}"))
    with Progress(*columns) as progress:
        task = progress.add_task("train", total=total, loss=float("nan"), aux=float("nan"))
        step = 0
        while step < total:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, args.lr)
            ids = ex.windows(train, torch.randint(0, len(train) - args.seq_len, (args.batch_size,), generator=gen),
                             args.seq_len)
            out = model(input_ids=ids, output_router_logits=True)
            lm_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1))
            # HF's aux loss pools all layers' router logits (balances experts summed over layers only);
            # average the load-balancing loss of each layer instead so every layer uses all its experts.
            aux = torch.stack([load_balancing_loss_func((logits,), num_experts, config.num_experts_per_tok)
                               for logits in out.router_logits]).mean()
            (lm_loss + config.router_aux_loss_coef * aux).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            lm_losses.append(lm_loss.item())
            step += 1
            if args.steps is None and step == TIMING_STEPS:  # fit the step count to the budget
                per_step = (time.time() - start) / step
                total = max(WARMUP + 1, int(budget * 0.97 / per_step))
                progress.update(task, total=total)
            progress.update(task, advance=1, loss=lm_losses[-1], aux=aux.item())
    train_time = time.time() - start

    model.eval()
    if fine:  # evaluate the weights as shipped (bf16)
        model = model.to(torch.bfloat16).float()
    eval_batches = dict(seq_len=args.seq_len, n_batches=16, batch_size=16)
    heldout_b = ex.evenly_spaced_batches(heldout, **eval_batches)
    train_b = ex.evenly_spaced_batches(train, **eval_batches)
    heldout_loss, train_loss = ex.mean_nll(model, heldout_b), ex.mean_nll(model, train_b)
    # unigram baseline: train byte frequencies (add-one), scored on the same held-out targets
    freq = torch.bincount(train.long(), minlength=256).double() + 1
    targets = torch.cat([b[:, 1:].reshape(-1) for b in heldout_b])
    unigram_loss = -(freq / freq.sum()).log()[targets].mean().item()
    load = ex.expert_load(model, heldout_b)

    out_dir.mkdir(parents=True, exist_ok=True)
    config._experts_implementation = None  # load with transformers' default
    (model.to(torch.bfloat16) if fine else model).save_pretrained(out_dir, safe_serialization=True)
    log = dict(
        steps=total, seed=args.seed, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        threads=args.threads, params=n_params, train_seconds=round(train_time, 1),
        final_train_loss_last50=round(sum(lm_losses[-50:]) / len(lm_losses[-50:]), 4),
        train_loss=round(train_loss, 4), heldout_loss=round(heldout_loss, 4),
        heldout_perplexity=round(math.exp(heldout_loss), 4),
        unigram_heldout_perplexity=round(math.exp(unigram_loss), 4),
        eval=eval_batches, expert_load_heldout=[[round(x, 4) for x in row] for row in load.tolist()],
        train_bytes=len(train), heldout_bytes=len(heldout), python=platform.python_version(),
        torch=torch.__version__, transformers=transformers.__version__,
    )
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps(log, indent=1))
    print(f"reproduce: examples/train_tiny_moe.py --model {args.model} --steps {total} --seed {args.seed}")


if __name__ == "__main__":
    main()
