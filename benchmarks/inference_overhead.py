"""Prefill latency of the bundled SmolLM2-135M with LoRA: base vs unmerged vs merged, lorakit beside PEFT.

One forward pass (``torch.inference_mode``) over a (batch × seq) prompt, the base model's own dtype.
Configurations: the base model; lorakit and PEFT adapters (r=8, B random so the update is not zero) on
q,v and on all 7 linear layers, each unmerged and merged (merging toggled outside the timed region).
All run interleaved (round-robin) in one process; the table reports medians, minima and the ratio of
each to the base model: the median over rounds of its time / the base model's in the same round. The paper's claim: merged costs nothing; unmerged adds the B·A·x path.

    flock /tmp/lorakit-cpu.lock .venv/bin/python benchmarks/inference_overhead.py --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from _timing import paired_ratio

import lorakit
from lorakit.adapters import randomize_adapters
from lorakit.models import load_model

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"qv": ["q_proj", "v_proj"], "all": ALL_LINEAR}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def lorakit_model(args: argparse.Namespace, target: str) -> tuple[torch.nn.Module, Callable, Callable]:
    """(model, merge, unmerge) with a lorakit adapter on `target`."""
    model, _ = load_model(args.model, dtype=DTYPES[args.dtype])
    lorakit.inject(model, lorakit.LoraConfig(r=args.r, alpha=2 * args.r, target_modules=TARGETS[target]))
    randomize_adapters(model, std=0.02)
    return model.eval(), lambda: lorakit.merge(model), lambda: lorakit.unmerge(model)


def peft_model(args: argparse.Namespace, target: str) -> tuple[torch.nn.Module, Callable, Callable]:
    """(model, merge, unmerge) with a PEFT adapter on `target` (B random as for lorakit)."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(args.model, dtype=DTYPES[args.dtype])
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS[target]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval(), model.merge_adapter, model.unmerge_adapter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("-r", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20, help="timed forwards per configuration (round-robin)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype of the base model")
    p.add_argument("--targets", nargs="+", default=["qv", "all"], choices=list(TARGETS))
    p.add_argument("--no-peft", dest="peft", action="store_false", help="leave PEFT out")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Already (un)?merged")  # PEFT's note when toggling twice

    base, _ = load_model(args.model, dtype=DTYPES[args.dtype])
    base.eval()
    noop = lambda: None  # noqa: E731
    # (name, model, prepare): prepare puts the model in the state to time (merged or not)
    configs: list[tuple[str, torch.nn.Module, Callable]] = [("base", base, noop)]
    builders = [("lorakit", lorakit_model)] + ([("peft", peft_model)] if args.peft else [])
    for target in args.targets:
        for kind, build in builders:
            model, merge, unmerge = build(args, target)
            configs.append((f"{kind}-{target} unmerged", model, unmerge))
            configs.append((f"{kind}-{target} merged", model, merge))

    print(f"# prefill latency: {args.model} ({args.dtype}), {args.seq} tokens, r={args.r}, {args.threads} threads, "
          f"torch {torch.__version__}, {args.repeats} repeats per configuration, interleaved")
    for bs in args.batch:
        ids = torch.randint(10, 49152 if args.model == "smollm2-135m" else 1000, (bs, args.seq),
                            generator=torch.Generator().manual_seed(bs))
        times: dict[str, list[float]] = {name: [] for name, _, _ in configs}
        with torch.inference_mode():
            for i in range(args.warmup + args.repeats):
                k = i % len(configs)
                for name, model, prepare in configs[k:] + configs[:k]:  # rotate: no config always first
                    prepare()
                    t0 = time.perf_counter()
                    model(ids)
                    if i >= args.warmup:
                        times[name].append(time.perf_counter() - t0)
        print(f"\n## batch {bs} x {args.seq} tokens")
        print("| configuration | median (ms) | min (ms) | / base (paired) |")
        print("|---|---|---|---|")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"| {name} | {med * 1e3:.1f} | {min(ts) * 1e3:.1f} | {paired_ratio(ts, times['base']):.3f} |")
        for target in args.targets:
            row = [f"{kind}: {paired_ratio(times[f'{kind}-{target} unmerged'], times['base']) - 1:+.1%}"
                   for kind, _ in builders]
            print(f"\nunmerged overhead, {target}: " + ", ".join(row))


if __name__ == "__main__":
    main()
