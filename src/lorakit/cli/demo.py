"""``lorakit demo``: the paper's claims on the bundled SmolLM2-135M in a few minutes on a CPU (logic in `lorakit.demo`)."""

from __future__ import annotations

import argparse

from ._args import bounded


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="fine-tune SmolLM2-135M with LoRA on two generated tasks: score, memory, merge, swap")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="lorakit-demo", help="folder for report.md, loss.png and the two adapters")
    p.add_argument("--steps", type=bounded(int, 1), default=None,
                   help="training steps per adapter (batch 8); default 16 with a bf16 base, 12 in fp32")
    p.add_argument("--seed", type=bounded(int, 0, 2**32 - 1), default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from lorakit.demo import check_out_dir, run_demo
    from lorakit.models import resolve_model_path

    check_out_dir(args.out)  # before minutes of work
    resolve_model_path(args.model)  # the one-time GGUF conversion shows its progress bars
    hf_logging.disable_progress_bar()  # the demo's later loads would print "Loading weights" bars into the report
    run_demo(args.model, args.out, steps=args.steps, seed=args.seed, emit=print)
    return 0
