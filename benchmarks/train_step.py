"""Speed and peak memory of one LoRA training step on the bundled SmolLM2-135M: lorakit vs PEFT vs the floor.

A step is forward + ``loss.backward()`` on a (batch × seq) causal-LM batch (no optimizer). The *floor* is
the frozen base model's own forward + backward to the input activations only: every base parameter has
``requires_grad=False`` and the embedding output has ``requires_grad=True``; no LoRA step can be cheaper.
Configurations (floor, lorakit, PEFT; r=8 on q,v and on all 7 linear layers) run interleaved
(round-robin) in one process; the table reports medians and each configuration's ratio to the floor, the
median over rounds of its step time / the floor's in the same round (robust to drift on a shared machine).
``floor-copy`` is a second, separately loaded floor: its ratio (an A/A test) shows the run's own noise.
Peak memory: each configuration runs alone in a child process of this script (``--child``), which
resets the kernel's peak-RSS counter after loading the model and reports the step's peak RSS.

    flock /tmp/lorakit-cpu.lock .venv/bin/python benchmarks/train_step.py --repeats 15
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _timing import fast_bf16, paired_ratio, rotated

import lorakit
from lorakit.models import load_model

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"qv": ["q_proj", "v_proj"], "all": ALL_LINEAR}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Setup:
    """One configuration ready to step: the model and whether the embedding output needs grad."""

    name: str
    model: torch.nn.Module
    embed_grad: bool


def build(kind: str, target: str | None, dtype: str, model_name: str, r: int) -> Setup:
    """Load the base model in `dtype` (frozen) and add `kind`'s LoRA (fp32 adapter weights) on `target`."""
    model, _ = load_model(model_name, dtype=DTYPES[dtype])
    model.requires_grad_(False)
    if kind == "lorakit":
        lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2 * r, target_modules=TARGETS[target]))
    elif kind == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS[target]))
    model.train()
    return Setup(f"{kind}-{target}" if target else kind, model, embed_grad=kind == "floor")


def batch(model_name: str, batch_size: int, seq: int) -> torch.Tensor:
    """Fixed random token ids (seeded), the same for every configuration."""
    vocab = 49152 if model_name == "smollm2-135m" else 1000
    return torch.randint(10, vocab, (batch_size, seq), generator=torch.Generator().manual_seed(0))


def step(setup: Setup, ids: torch.Tensor) -> float:
    """One forward + backward; returns its wall time in seconds."""
    model = setup.model
    for p in model.parameters():
        p.grad = None
    t0 = time.perf_counter()
    emb = model.get_input_embeddings()(ids)
    if setup.embed_grad:
        emb = emb.detach().requires_grad_(True)
    loss = model(inputs_embeds=emb, labels=ids).loss
    loss.backward()
    return time.perf_counter() - t0


CONFIGS = [("floor", None), ("floor", "copy"), ("lorakit", "qv"), ("peft", "qv"), ("lorakit", "all"), ("peft", "all")]


def configs(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    return [(k, t) for k, t in CONFIGS if (k != "peft" or args.peft) and (t in (None, "copy") or t in args.targets)]


def _peak_rss_mib() -> float:
    """Peak RSS of this process since the last reset, in MiB (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> None:
    """Run one configuration alone and print its memory as JSON (used through ``--child``)."""
    kind, _, target = args.child.partition("-")
    setup = build(kind, target or None, args.dtype[0], args.model, args.r)
    ids = batch(args.model, args.batch, args.seq)
    gc.collect()
    loaded = _current_rss_mib()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (Linux ≥ 4.0)
    for _ in range(3):
        step(setup, ids)
    print(json.dumps({"loaded_mib": loaded, "peak_mib": _peak_rss_mib()}))


def memory(args: argparse.Namespace, dtype: str) -> dict[str, dict[str, float]]:
    """Peak RSS of each configuration, each in its own child process."""
    out = {}
    for kind, target in configs(args):
        name = f"{kind}-{target}" if target else kind
        cmd = [sys.executable, __file__, "--child", name, "--dtype", dtype, "--model", args.model,
               "--batch", str(args.batch), "--seq", str(args.seq), "-r", str(args.r), "--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def timing(args: argparse.Namespace, dtype: str) -> dict[str, list[float]]:
    """Round-robin repeats over all configurations of one base dtype; returns every step time."""
    setups = [build(k, t, dtype, args.model, args.r) for k, t in configs(args)]
    ids = batch(args.model, args.batch, args.seq)
    for s in setups:
        for _ in range(args.warmup):
            step(s, ids)
    times: dict[str, list[float]] = {s.name: [] for s in setups}
    for i in range(args.repeats):
        for s in rotated(setups, i):
            times[s.name].append(step(s, ids))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("-r", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15, help="timed steps per configuration (round-robin)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES),
                   help="frozen base dtype(s); default fp32, and bf16 too where the CPU multiplies bf16 fast")
    p.add_argument("--targets", nargs="+", default=["qv", "all"], choices=list(TARGETS))
    p.add_argument("--no-peft", dest="peft", action="store_false", help="leave PEFT out")
    p.add_argument("--no-memory", dest="mem", action="store_false", help="skip the per-process peak-RSS runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)

    print(f"# train step: {args.model}, batch {args.batch} x {args.seq} tokens, r={args.r}, "
          f"{args.threads} threads, torch {torch.__version__}, {args.repeats} repeats (medians)")
    print("# step = forward + loss.backward(); floor = frozen model, grad to the input activations only")
    if args.dtype is None:
        fast, why = fast_bf16()
        args.dtype = ["fp32", "bf16"] if fast else ["fp32"]
        if not fast:
            print(f"# bf16 left out: {why}; --dtype bf16 measures it anyway")
    for dtype in args.dtype:
        times = timing(args, dtype)
        mem = memory(args, dtype) if args.mem else {}
        floor_m = mem.get("floor", {}).get("peak_mib")
        print(f"\n## base {dtype}, adapters fp32")
        print("| configuration | median step (ms) | min (ms) | / floor (paired) | peak RSS (MiB) | / floor | step memory above loaded model (MiB) |")
        print("|---|---|---|---|---|---|---|")
        for name, ts in times.items():
            med = statistics.median(ts)
            m = mem.get(name)
            mcols = (f"{m['peak_mib']:.0f} | {m['peak_mib'] / floor_m:.3f} | {m['peak_mib'] - m['loaded_mib']:.0f}"
                     if m else "– | – | –")
            print(f"| {name} | {med * 1e3:.1f} | {min(ts) * 1e3:.1f} | {paired_ratio(ts, times['floor']):.3f} | {mcols} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
