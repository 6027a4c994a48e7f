"""Tables 5 and 6 at small scale: which weight types to adapt under a fixed budget, and which rank is enough.

MiniLM-L6 (BERT, 6 layers, d=384) fine-tuned on GLUE SST-2 with `lorakit.finetune` (classifier and
pooler trained too), dev accuracy, mean ± std over seeds. Table 5: budget r × (number of weight types)
= 8, as the paper's 18M-parameter budget (r=8 one type, r=4 two, r=2 all four). Table 6: Wq,Wv with
r ∈ {1, 2, 4, 8, 64}. alpha is fixed (16) across r, as in the paper (Sec. 4.1).

    flock /tmp/lorakit-cpu.lock .venv/bin/python benchmarks/paper/tables5_6.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from lorakit.data import load_glue
from lorakit.models import load_model
from lorakit.training import TrainConfig, finetune

GLUE = Path(__file__).resolve().parents[3] / "shared" / "data" / "glue"
TYPES = {"Wq": "query", "Wk": "key", "Wv": "value", "Wo": "attention.output.dense"}
TABLE5 = [("Wq", 8), ("Wk", 8), ("Wv", 8), ("Wo", 8), ("Wq,Wk", 4), ("Wq,Wv", 4), ("Wq,Wk,Wv,Wo", 2)]
TABLE6 = [("Wq,Wv", r) for r in (1, 2, 4, 8, 64)]
#: The paper's GPT-3 175B numbers (WikiSQL acc / MultiNLI acc), Tables 5 and 6.
PAPER = {("Wq", 8): "70.4 / 91.0", ("Wk", 8): "70.0 / 90.8", ("Wv", 8): "73.0 / 91.0", ("Wo", 8): "73.2 / 91.3",
         ("Wq,Wk", 4): "71.4 / 91.3", ("Wq,Wv", 4): "73.7 / 91.3", ("Wq,Wk,Wv,Wo", 2): "73.7 / 91.7",
         ("Wq,Wv", 1): "73.4 / 91.3", ("Wq,Wv", 2): "73.3 / 91.4", ("Wq,Wv", 8): "73.8 / 91.6",
         ("Wq,Wv", 64): "73.5 / 91.4"}


def run(types: str, r: int, seed: int, train: list, dev: list, steps: int) -> tuple[float, int]:
    model, tok = load_model("minilm-l6", "classification", num_labels=2)
    cfg = TrainConfig(task="classification", r=r, alpha=16, dropout=0.0, lr=1e-3, steps=steps, batch_size=16,
                      max_length=64, seed=seed, target_modules=[TYPES[t] for t in types.split(",")],
                      modules_to_save=["classifier", "pooler"], eval_batch_size=128)
    res = finetune(model, tok, train, dev, cfg)
    return res.eval_metrics["eval_accuracy"], res.trainable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 configs, 1 seed, 30 steps (CI)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--train-size", type=int, default=8000)
    parser.add_argument("--out", default="runs/tables5_6.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(2)
    configs = list(dict.fromkeys(TABLE5 + TABLE6))
    seeds, steps = range(args.seeds), args.steps
    if args.quick:
        configs, seeds, steps = [("Wq", 8), ("Wq,Wv", 4)], range(1), 30
    train = load_glue(GLUE / "SST-2", "train")
    train = random.Random(0).sample(train, min(args.train_size, len(train)))
    dev = load_glue(GLUE / "SST-2", "dev")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    acc: dict[tuple[str, int], list[float]] = {}
    params: dict[tuple[str, int], int] = {}
    for seed in seeds:  # seeds outermost: a cut run still has every config at least once
        for types, r in configs:
            t0 = time.perf_counter()
            a, n = run(types, r, seed, train, dev, steps)
            acc.setdefault((types, r), []).append(a)
            params[(types, r)] = n
            rec = {"types": types, "r": r, "seed": seed, "dev_acc": a, "trainable": n, "s": round(time.perf_counter() - t0, 1)}
            print(json.dumps(rec), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
    for title, rows in (("Table 5 (budget r × types = 8)", TABLE5), ("Table 6 (Wq,Wv, rank r)", TABLE6)):
        print(f"\n{title}: SST-2 dev accuracy (%), MiniLM-L6, {len(seeds)} seeds, {steps} steps\n")
        print("| weight types | r | trainable (incl. head) | seeds | ours: mean ± std (min–max) | paper GPT-3 (WikiSQL / MNLI) |")
        print("|---|---|---|---|---|---|")
        for key in rows:
            if key in acc:
                v = [100 * x for x in acc[key]]
                spread = f" ± {statistics.stdev(v):.2f} ({min(v):.1f}–{max(v):.1f})" if len(v) > 1 else " (one seed: no spread)"
                print(f"| {key[0]} | {key[1]} | {params[key]:,} | {len(v)} | {statistics.mean(v):.2f}{spread} | {PAPER[key]} |")


if __name__ == "__main__":
    main()
