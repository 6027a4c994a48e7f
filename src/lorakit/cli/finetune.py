"""``lorakit finetune``: fine-tune a model with LoRA on a dataset, with a progress bar, checkpoints and resume."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lorakit.cli._args import bounded


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model with LoRA (causal LM or sequence classification)")
    p.add_argument("--model", required=True, help="bundled short name (smollm2-135m, minilm-l6), hub id or local folder")
    p.add_argument("--data", required=True, help="train data: .jsonl/.json/.csv/.tsv, an E2E csv, a GLUE task folder, or hf:<name>[:<config>]")
    p.add_argument("--eval-data", help="eval data (same forms; a GLUE folder or hf: source here uses its dev/validation "
                   "split). Default: the dev split of a GLUE --data folder that has one, else no evaluation")
    p.add_argument("--eval-split", default=None, help="split of a folder/hf: source for evaluation (default: dev for GLUE, validation for hf:)")
    p.add_argument("--task", choices=["causal-lm", "classification"], default="causal-lm")
    p.add_argument("--method", default="lora", help="lora (default), full, bitfit, adapter-h, adapter-l, prefix or "
                   "lora+prefix; -r is the adapter bottleneck / prefix length for the baselines (lora+prefix: -r is LoRA's rank, "
                   "its prefix length is 10; lorakit.baselines.prepare(prefix_length=) sets it)")
    p.add_argument("--num-labels", type=bounded(int, 1), default=None,
                   help="classes of the classification head (default: the checkpoint's head, else --label-names' count, else 2)")
    p.add_argument("--label-names", default=None,
                   help="comma-separated class names in class-id order: string labels map through them (neg,pos: neg = 0), class ids get them as names; they become the head's id2label (a GLUE task: its own names by default)")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--completion-field", default="completion")
    p.add_argument("--text-field", default="text")
    p.add_argument("--text-pair-field", default=None)
    p.add_argument("--label-field", default="label")
    p.add_argument("--limit", type=bounded(int, 1), default=None, help="use only the first N training examples")
    p.add_argument("--eval-limit", type=bounded(int, 1), default=None, help="use only the first N eval examples")
    p.add_argument("--target", default=None, help="comma-separated module names (default: the architecture's q,v), or all-linear")
    p.add_argument("-r", type=bounded(int, 1), default=8)
    p.add_argument("--alpha", type=bounded(float, 0, open_low=True), default=16)
    p.add_argument("--dropout", type=bounded(float, 0, 1, open_high=True), default=0.05)
    p.add_argument("--bias", choices=["none", "all", "lora_only"], default="none",
                   help="also train the base model's biases: all of them, or those of the adapted layers (PEFT's bias=)")
    p.add_argument("--lr", type=bounded(float, 0, open_low=True), default=2e-4)
    p.add_argument("--lr-ratio-b", type=bounded(float, 0, open_low=True), default=1.0, help="LoRA+: learning rate of B = lr × this")
    p.add_argument("--epochs", type=bounded(float, 0, open_low=True), default=1.0)
    p.add_argument("--steps", type=bounded(int, 1), default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=bounded(int, 1), default=8)
    p.add_argument("--grad-accum", type=bounded(int, 1), default=1)
    p.add_argument("--max-length", type=bounded(int, 1), default=256)
    p.add_argument("--warmup", type=bounded(float, 0), default=0.06, help="warm-up steps (or a fraction of the steps if < 1)")
    p.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear",
                   help="learning rate after the warm-up: linear or cosine decay to 0, or constant")
    p.add_argument("--weight-decay", type=bounded(float, 0), default=0.0)
    p.add_argument("--max-grad-norm", type=bounded(float, 0), default=1.0)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="of the frozen base (adapters stay fp32)")
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts raw even if the tokenizer has a chat template (raw prompt and completion are joined "
                   "as given: put a separator, e.g. a leading space, in the completions)")
    p.add_argument("--eval-every", type=bounded(int, 0), default=0)
    p.add_argument("--save-every", type=bounded(int, 0), default=0)
    p.add_argument("--seed", type=bounded(int, 0, 2**32 - 1), default=0)
    p.add_argument("--out", required=True, help="output folder: adapter, checkpoints, metrics.jsonl, loss.png")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lorakit.data import default_label_names, load_data
    from lorakit.models import load_model
    from lorakit.training import TrainConfig, TrainingError, finetune, latest_checkpoint

    _check_out(args.out)
    target = args.target if args.target in (None, "all-linear") else [t.strip() for t in args.target.split(",") if t.strip()]
    if target == []:
        raise ValueError(f"--target {args.target!r} names no module: give names such as q_proj,v_proj, or all-linear")
    label_names = [n.strip() for n in args.label_names.split(",")] if args.label_names is not None else None
    if label_names is not None and (not all(label_names) or len(set(label_names)) != len(label_names)):
        raise ValueError(f"--label-names {args.label_names!r}: give distinct, non-empty names separated by commas")
    fields = dict(prompt_field=args.prompt_field, completion_field=args.completion_field, text_field=args.text_field,
                  text_pair_field=args.text_pair_field, label_field=args.label_field, labels=label_names)
    train = load_data(args.data, args.task, "train", **fields)[: args.limit]
    eval_data = None
    if args.eval_data or args.eval_split or (Path(args.data) / "dev.tsv").is_file():  # a GLUE folder: its dev split
        source = str(args.eval_data or args.data)
        split = args.eval_split or ("validation" if source.startswith("hf:") else "dev" if Path(source).is_dir() else "train")
        eval_data = load_data(source, args.task, split, **fields)[: args.eval_limit]
    cfg = TrainConfig(
        task=args.task, method=args.method, r=args.r, alpha=args.alpha, dropout=args.dropout, target_modules=target, bias=args.bias,
        lr=args.lr, lr_ratio_b=args.lr_ratio_b, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_length=args.max_length, warmup=args.warmup, schedule=args.schedule, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, grad_checkpointing=args.grad_checkpointing, eval_every=args.eval_every,
        save_every=args.save_every, seed=args.seed, precision=args.precision,
        use_chat_template=False if args.no_chat_template else None,
    )
    task_names = default_label_names(args.data) if label_names is None and args.task == "classification" else None
    if task_names and args.num_labels in (None, len(task_names)):
        label_names = task_names  # a GLUE task's class names become the head's id2label
    model, tokenizer = load_model(args.model, args.task, num_labels=args.num_labels, label_names=label_names,
                                  seed=args.seed)  # seeds a new head
    bar = None

    def progress(event: dict) -> None:
        nonlocal bar
        if event["event"] == "start":
            weights = (f"all weights trainable in fp32, {event['compute'].replace('_', ' ')} compute" if event["frozen"] == 0
                       else f"frozen base in {event['precision']}, trainable weights fp32")
            print(f"{event['examples']:,} examples, {event['total']} steps, {weights} "
                  f"({event['precision_reason']}), trainable {event['trainable']:,} / {event['total_params']:,} "
                  f"({100 * event['trainable'] / event['total_params']:.3f}%)")
            bar = tqdm(total=event["total"], initial=event["step"], unit="step", dynamic_ncols=True)
        elif event["event"] == "step":
            bar.set_postfix(loss=f"{event['loss']:.4f}", lr=f"{event['lr']:.2e}", tok_s=f"{event['tokens_per_s']:.0f}")
            bar.update(1)
        elif event["event"] == "eval":
            bar.write("step {step}: ".format(**event) + ", ".join(f"{k} {v:.4f}" for k, v in event.items() if k.startswith("eval_")))
        elif event["event"] == "save":
            bar.write(f"step {event['step']}: checkpoint {event['path']}")
        elif event["event"] == "end":
            bar.close()

    try:
        result = finetune(model, tokenizer, train, eval_data, cfg, out_dir=args.out, resume=args.resume, callback=progress)
    except TrainingError as e:
        if bar is not None:
            bar.close()
        print(f"lorakit finetune: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        last = latest_checkpoint(Path(args.out))
        where = f"the last good checkpoint is {last}: the same command with --resume continues from it" if last else (
            f"no checkpoint was written yet (the first comes at step {args.save_every})" if args.save_every else
            "no checkpoint was written (--save-every N writes them)")
        print(f"lorakit finetune: interrupted at step {bar.n if bar is not None else 0}; {where}", file=sys.stderr)
        return 130
    ran = (f"steps {result.start_step} → {result.steps} ({result.steps - result.start_step} this run)" if result.start_step
           else f"{result.steps} steps")
    print(f"done ({args.method}): {ran} in {result.seconds:.0f}s, {1e3 * result.median_step_s:.0f} ms/step (median), "
          f"trainable {result.trainable:,} ({100 * result.trainable / result.total:.3f}%), "
          f"peak memory {result.peak_memory_mb:,.0f} MiB ({result.peak_memory_kind}), "
          f"last train loss {result.train_loss:.4f}" + "".join(f", {k} {v:.4f}" for k, v in result.eval_metrics.items()))
    artefact = "adapter (adapter_config.json + adapter_model.safetensors)" if args.method == "lora" else "trained weights"
    print(f"wrote {args.out}: {artefact}, metrics.jsonl, loss.png")
    return 0


def _check_out(text: str) -> None:
    """Refuse an --out that cannot become a folder before any data or model is loaded (nothing is created)."""
    if not text.strip():
        raise ValueError("--out is empty: name the output folder (it is created if missing)")
    out = Path(text).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder: choose another path")
    parent = next(p for p in [out, *out.parents] if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(out)!r} cannot be written ({str(parent)!r} is not writable): choose another path")
