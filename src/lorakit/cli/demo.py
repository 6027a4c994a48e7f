"""``lorakit demo``: inject LoRA into the bundled SmolLM2-135M and show what it adds.

(The fine-tuning demo of the paper's claims replaces this once the trainer lands.)
"""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="LoRA on the bundled SmolLM2-135M: inject, summarise, merge")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("-r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import lorakit
    from lorakit.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s")
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        base = model(ids).logits
    lorakit.inject(model, lorakit.LoraConfig(r=args.r, alpha=args.alpha, target_modules=["q_proj", "v_proj"]))
    print(lorakit.summary(model))
    with torch.no_grad():
        same = model(ids).logits
        print(f"at init (B = 0) the adapted model equals the base: max |Δlogits| = {(same - base).abs().max():.2e}")
        lorakit.adapters.randomize_adapters(model, std=0.02)
        unmerged = model(ids).logits
        lorakit.merge(model)
        merged = model(ids).logits
        print(f"random adapter, merged vs unmerged: max |Δlogits| = {(merged - unmerged).abs().max():.2e}")
    return 0
