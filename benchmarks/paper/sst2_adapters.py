"""Train the four adapters Figure 3/4 and Table 7 compare, cheaply: MiniLM-L6 on SST-2, LoRA on Wq, Wv.

r=4, r=8, r=64 (seed 0) and r=8 (seed 1), same settings otherwise (250 steps × batch 16, lr 1e-3, alpha 16,
classifier and pooler trained too), saved as runs/sst2-r{r}-s{seed}; then run
``figure3_table7.py --prefix sst2 --model minilm-l6``. About 1 minute per adapter on 2 cores.

    flock /tmp/lorakit-cpu.lock .venv/bin/python benchmarks/paper/sst2_adapters.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from lorakit.data import load_glue
from lorakit.models import load_model
from lorakit.training import TrainConfig, finetune

GLUE = Path(__file__).resolve().parents[3] / "shared" / "data" / "glue"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 steps (CI)")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--runs", default="runs")
    args = parser.parse_args()
    torch.set_num_threads(2)
    steps = 30 if args.quick else args.steps
    train = random.Random(0).sample(load_glue(GLUE / "SST-2", "train"), 8000)
    dev = load_glue(GLUE / "SST-2", "dev")
    for r, seed in ((8, 0), (64, 0), (4, 0), (8, 1)):
        model, tok = load_model("minilm-l6", "classification", num_labels=2)
        cfg = TrainConfig(task="classification", r=r, alpha=16, dropout=0.0, lr=1e-3, steps=steps, batch_size=16,
                          max_length=64, seed=seed, target_modules=["query", "value"],
                          modules_to_save=["classifier", "pooler"], eval_batch_size=128)
        res = finetune(model, tok, train, dev, cfg, out_dir=Path(args.runs) / f"sst2-r{r}-s{seed}")
        print(json.dumps({"r": r, "seed": seed, "steps": steps, "dev_acc": res.eval_metrics["eval_accuracy"],
                          "seconds": round(res.seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
