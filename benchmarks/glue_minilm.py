"""LoRA vs full fine-tuning of the bundled MiniLM-L6 on a GLUE task (SST-2 by default), same steps and data.

Each configuration runs in its own process (so its peak RSS is its own) and reports dev accuracy,
trainable parameters, median step time and peak memory; the table goes to stdout as markdown and
every run is appended to a JSONL file. Run under the shared CPU lock:

    flock /tmp/lorakit-cpu.lock .venv/bin/python benchmarks/glue_minilm.py --runs lora:lr=1e-3 full:lr=1e-4
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


RUN_KEYS = ("lr", "alpha", "r", "ratio_b", "head", "target", "warmup", "schedule", "wd", "dropout", "init", "precision", "base_dropout", "clip",
            "bias")


def parse_run(spec: str) -> dict:
    """``method[:key=value,...]``, e.g. ``lora:lr=1e-3,alpha=32,init=gaussian,head=pooler+classifier,base_dropout=0``.

    An unknown method or key is an error (a typo would otherwise run the defaults under the probe's name)."""
    method, _, rest = spec.partition(":")
    if method not in ("lora", "full"):
        raise ValueError(f"run {spec!r}: method must be 'lora' or 'full', got {method!r}")
    run = {"method": method}
    for kv in filter(None, rest.split(",")):
        key, _, value = kv.partition("=")
        if key not in RUN_KEYS or not value:
            raise ValueError(f"run {spec!r}: {kv!r} is not key=value with a known key; keys: {', '.join(RUN_KEYS)}")
        run[key] = value
    return run


def child(args: argparse.Namespace) -> None:
    """One configuration: fine-tune, evaluate on the full dev set, print one JSON line."""
    import torch

    from lorakit.data import load_glue
    from lorakit.models import load_model
    from lorakit.training import TrainConfig, finetune

    torch.set_num_threads(args.threads)
    run = parse_run(args.child)
    task_dir = Path(args.data) / args.task
    train = load_glue(task_dir, "train")
    random.Random(args.seed).shuffle(train)
    train = train[: args.train_size]
    dev = load_glue(task_dir, "dev")
    model, tok = load_model("minilm-l6", "classification", num_labels=2)
    head = run.get("head", "classifier").split("+")
    cfg = TrainConfig(
        task="classification", method=run["method"], r=int(run.get("r", 8)), alpha=float(run.get("alpha", 16)),
        dropout=float(run.get("dropout", 0.0)), target_modules=run.get("target", "query+value").split("+"),
        lr=float(run.get("lr", 1e-3)), lr_ratio_b=float(run.get("ratio_b", 1.0)), steps=args.steps,
        batch_size=args.batch_size, max_length=args.max_length, warmup=float(run.get("warmup", 0.06)),
        schedule=run.get("schedule", "linear"), weight_decay=float(run.get("wd", 0.0)), init=run.get("init", "kaiming"), bias=run.get("bias", "none"), seed=args.seed, precision=run.get("precision", args.precision),
        eval_batch_size=128, modules_to_save=head if run["method"] == "lora" else None, log_every=1,
        max_grad_norm=float(run.get("clip", 1.0)),
    )
    if "base_dropout" in run:  # the encoder's own dropout (BERT: 0.1 on attention and hidden states)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = float(run["base_dropout"])
    t0 = time.perf_counter()
    result = finetune(model, tok, train, dev, cfg)
    steps = [h["step_s"] for h in result.history if "step_s" in h]
    norms = [h["grad_norm"] for h in result.history if "grad_norm" in h]
    print(json.dumps({
        "task": args.task, "run": args.child, "seed": args.seed, "steps": result.steps, "batch": args.batch_size,
        "train_examples": len(train), "accuracy": result.eval_metrics["eval_accuracy"],
        "mcc": result.eval_metrics["eval_mcc"], "trainable": result.trainable,
        "total": result.total, "precision": result.precision, "step_ms_median": 1e3 * statistics.median(steps[5:] or steps),
        "grad_norm_median": statistics.median(norms),
        "clipped": sum(n > cfg.max_grad_norm for n in norms) / len(norms) if cfg.max_grad_norm else 0.0,
        "seconds": time.perf_counter() - t0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="SST-2", choices=["SST-2", "CoLA", "RTE"])
    p.add_argument("--data", default=str(DATA), help="the glue_data folder")
    p.add_argument("--runs", nargs="+", default=["lora:lr=1e-3", "full:lr=1e-4"], help="method[:key=value,...] each")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-size", type=int, default=None, help="subsample the training set (default: all of it)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", default="benchmarks/results/glue_minilm.jsonl",
                   help="JSONL every run is appended to (the project's record; pass another path for trial runs)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    for run in args.runs:
        try:
            parse_run(run)
        except ValueError as e:
            p.error(str(e))
    if not (Path(args.data) / args.task / "train.tsv").is_file():
        p.error(f"no GLUE {args.task} data under {args.data}: pass --data <the glue folder of ../shared/data>")
    results = []
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        for seed in args.seeds:
            cmd = [sys.executable, __file__, "--child", run, "--seed", str(seed)] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k in ("task", "data", "steps", "batch_size", "max_length", "precision", "threads") and v is not None]
            if args.train_size:
                cmd.append(f"--train-size={args.train_size}")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:  # the child's own error (a bad run key, a missing data folder), not just its exit code
                sys.exit(f"run {run!r} seed {seed} failed:\n{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
            out = proc.stdout.strip().splitlines()[-1]
            record = json.loads(out)
            results.append(record)
            with open(args.results, "a") as f:
                f.write(out + "\n")
            print(f"{run} seed {seed}: accuracy {record['accuracy']:.4f} in {record['seconds']:.0f}s", file=sys.stderr)
    subset = f", {args.train_size:,} training examples" if args.train_size else ""
    print(f"\n{args.task}, {args.steps} steps × batch {args.batch_size}, max length {args.max_length}{subset}, full dev set\n")
    print("| run | seeds | dev accuracy | dev MCC | trainable params | step (ms, median) | peak RSS (MB) | precision |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        rs = [r for r in results if r["run"] == run]

        def mean_sd(key: str, rs=rs) -> str:
            v = [100 * r[key] for r in rs]
            return f"{statistics.mean(v):.1f}" + (f" ± {statistics.stdev(v):.1f}" if len(v) > 1 else "")

        print(f"| `{run}` | {len(rs)} | {mean_sd('accuracy')} % | {mean_sd('mcc')} | "
              f"{rs[0]['trainable']:,} ({100 * rs[0]['trainable'] / rs[0]['total']:.2f}%) "
              f"| {statistics.median(r['step_ms_median'] for r in rs):.0f} | {max(r['peak_rss_mb'] for r in rs):,.0f} "
              f"| {rs[0]['precision']} |")


if __name__ == "__main__":
    main()
