"""The paper's baselines side by side on one task, same trainer: trainable params, step time, peak memory, accuracy.

MiniLM-L6 on GLUE SST-2 (a fixed 4,000-example train sample, the full dev set), each method in its own child
process, whose peak RSS (whole process, model included) is counted from after loading (the kernel's peak
counter is reset there). Sizes: LoRA r=8 on Wq,Wv; adapters with bottleneck 8; prefix length 8.

    flock /tmp/lorakit-cpu.lock .venv/bin/python benchmarks/paper/baselines_compare.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import torch

GLUE = Path(__file__).resolve().parents[3] / "shared" / "data" / "glue"
METHODS = ["lora", "full", "bitfit", "adapter-h", "adapter-l", "prefix", "lora+prefix"]


def peak_rss_mb() -> float:
    """This process's peak resident set since the last reset (Linux /proc), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(method: str, steps: int) -> dict:
    from lorakit.data import load_glue
    from lorakit.models import load_model
    from lorakit.training import TrainConfig, finetune

    torch.set_num_threads(2)
    train = random.Random(0).sample(load_glue(GLUE / "SST-2", "train"), 4000)
    dev = load_glue(GLUE / "SST-2", "dev")
    model, tok = load_model("minilm-l6", "classification", num_labels=2)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    lr = 5e-5 if method == "full" else 1e-3
    cfg = TrainConfig(task="classification", method=method, r=8, alpha=16, dropout=0.0, lr=lr, steps=steps,
                      batch_size=16, max_length=64, target_modules=["query", "value"], eval_batch_size=128,
                      modules_to_save=["classifier", "pooler"])
    res = finetune(model, tok, train, dev, cfg)
    steps_s = [h["step_s"] for h in res.history if "step_s" in h]
    steps_s = sorted(steps_s[len(steps_s) // 10:])  # drop warm-up steps
    return {"method": method, "trainable": res.trainable, "total": res.total, "lr": lr,
            "step_ms": 1e3 * steps_s[len(steps_s) // 2], "peak_rss_mb": peak_rss_mb(),
            "dev_acc": res.eval_metrics["eval_accuracy"], "precision": res.precision}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 methods, 20 steps (CI)")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    methods, steps = (["lora", "bitfit", "adapter-h"], 20) if args.quick else (METHODS, args.steps)
    rows = []
    for m in methods:
        out = subprocess.run([sys.executable, __file__, "--child", m, "--steps", str(steps)], capture_output=True,
                             text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    precisions = ", ".join(sorted({r["precision"] for r in rows}))  # what the trainer chose on this machine
    print(f"\nMiniLM-L6 on SST-2, {steps} steps × batch 16, frozen base in {precisions}\n")
    print("| method | trainable params | % of model | median step (ms) | peak RSS, whole process (MiB) | SST-2 dev acc |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.2f} | {r['step_ms']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {100 * r['dev_acc']:.1f} |")


if __name__ == "__main__":
    main()
