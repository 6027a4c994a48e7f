"""Many adapters on one SmolLM2-135M: mixed-batch prefill, merged swaps and adapter loading, lorakit vs PEFT.

    flock /tmp/lorakit-cpu.lock .venv/bin/python benchmarks/mixed_batch.py

Prefill of B rows with random adapter ids out of N adapters (r=8; q,v and all-linear), wall time
relative to the plain base model (median over rounds of the time / the same round's base time):
- lorakit `mixed_batch` (per-row gathered A/B, two bmm per layer; the time includes entering the
  context, i.e. stacking the adapters of this batch),
- (a) one forward per adapter group (`set_adapter`, rows of that adapter),
- (b) PEFT's ``model(..., adapter_names=rows)`` on the same adapter files (adapters kept in the
  model's dtype, PEFT's fastest setting),
- (c) the base model alone (1.00), and a second, separately loaded copy of it: an A/A ratio that
  shows how far this run's noise alone moves a ratio.
The last columns compare lorakit's logits with PEFT's: in fp32 they agree to ~1e-4; in bf16 each side
rounds its own way and SmolLM2 amplifies round-off on these random-token rows (the base model alone, bf16
vs fp32, differs by up to ~37 in a logit on some rows), so there max |Δlogits| is large and the share of
positions with the same top-1 token is the readable figure.
Then greedy generation through the mixed batch (prefill + decode with a KV cache, what `lorakit serve`
runs), lorakit's cost from 1 to 64 adapters, merged swap time and load-from-disk time per adapter.
All variants run interleaved, repetition by repetition, so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _timing import fast_bf16, paired_ratio, rotated

import lorakit
from lorakit.adapters import randomize_adapters
from lorakit.models import load_model

TARGETS = {"q,v": ["q_proj", "v_proj"], "all-linear": "all-linear"}


def round_times(fns: dict[str, callable], reps: int) -> dict[str, list[float]]:
    """Seconds of each fn in each of `reps` rounds (every fn once per round, after one warm-up each).

    The order rotates from round to round: on this machine whichever runs first in a round can be a few
    percent faster or slower (an A/A test of two identical base models gave 1.02-1.03x), so no variant
    is always first.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for i in range(reps):
            for k in rotated(list(fns), i):
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t0)
    return times


def lorakit_model(dtype: torch.dtype, targets, n: int, seed: int = 0):
    model, _ = load_model("smollm2-135m", dtype=dtype)
    for i in range(n):
        lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=targets), adapter=f"t{i}")
    randomize_adapters(model, std=0.02, seed=seed)
    return model.eval()


def peft_from_files(dtype: torch.dtype, folders: list[Path]):
    """PEFT model with the same adapters, loaded from lorakit's files; returns (model, seconds per load)."""
    from peft import PeftModel

    base, _ = load_model("smollm2-135m", dtype=dtype)
    model = PeftModel.from_pretrained(base, folders[0], adapter_name="t0", autocast_adapter_dtype=False)
    t0 = time.perf_counter()
    for i, folder in enumerate(folders[1:], start=1):
        model.load_adapter(folder, adapter_name=f"t{i}", autocast_adapter_dtype=False)
    per_load = (time.perf_counter() - t0) / max(1, len(folders) - 1)
    return model.eval(), per_load


def prefill_table(args, dtype, base, base_copy, label, targets, configs) -> tuple:
    """Print the lorakit / loop / PEFT / base rows for (N adapters, batch B) pairs.

    Returns (the generation row, lorakit and PEFT seconds per adapter load, the lorakit model)."""
    n_max = max(n for n, _ in configs)
    model = lorakit_model(dtype, targets, n_max)
    with tempfile.TemporaryDirectory() as tmp:
        folders = [lorakit.save_adapter(model, Path(tmp) / f"t{i}", adapter=f"t{i}") for i in range(n_max)]
        probe, _ = load_model("smollm2-135m", dtype=dtype)
        lorakit.load_adapter(probe, folders[0], adapter="t0")
        t0 = time.perf_counter()
        for i, folder in enumerate(folders[1:], start=1):
            lorakit.load_adapter(probe, folder, adapter=f"t{i}")
        lk_load = (time.perf_counter() - t0) / max(1, n_max - 1)
        del probe
        peft, peft_load = peft_from_files(dtype, folders)
    gen = torch.Generator().manual_seed(0)
    for n, b in configs:
        ids = torch.randint(10, 40000, (b, args.seq), generator=gen)
        rows = [f"t{i}" for i in torch.randint(0, n, (b,), generator=gen).tolist()]

        def mixed(ids=ids, rows=rows):
            with lorakit.mixed_batch(model, rows):
                return model(ids).logits

        def loop(ids=ids, rows=rows):
            for name in dict.fromkeys(rows):
                lorakit.set_adapter(model, name)
                model(ids[[i for i, r in enumerate(rows) if r == name]])

        fns = {
            "base": lambda ids=ids: base(ids),
            "lorakit mixed": mixed,
            "(a) loop per adapter": loop,
            "(b) PEFT adapter_names": lambda ids=ids, rows=rows: peft(ids, adapter_names=rows),
            "(c) base copy": lambda ids=ids: base_copy(ids),
        }
        t = round_times(fns, args.reps)
        ratio = {k: paired_ratio(v, t["base"]) for k, v in t.items()}
        with torch.no_grad():
            ours, theirs = mixed().float(), peft(ids, adapter_names=rows).logits.float()
        diff = (ours - theirs).abs().max().item()
        agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
        print(f"| {label} | {n} × {b} | {statistics.median(t['base']) * 1e3:.0f} ms | **{ratio['lorakit mixed']:.3f}×** "
              f"| {ratio['(a) loop per adapter']:.2f}× | {ratio['(b) PEFT adapter_names']:.3f}× "
              f"| {ratio['(c) base copy']:.3f}× | {len(set(rows))} | {diff:.1e} | {agree:.1%} |", flush=True)
    return generate_row(args, base, label, model, peft), lk_load, peft_load, model


def generate_row(args, base, label, model, peft) -> str:
    """Greedy generation (the serving path: prefill + decode steps with a KV cache), 16 rows over 16 adapters."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 40000, (16, args.gen_prompt), generator=gen)
    rows = [f"t{i}" for i in torch.randint(0, 16, (16,), generator=gen).tolist()]
    kw = dict(max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, do_sample=False,
              attention_mask=torch.ones_like(ids), pad_token_id=0)

    def mixed():
        with lorakit.mixed_batch(model, rows):
            return model.generate(ids, **kw)

    t = round_times({"base": lambda: base.generate(ids, **kw), "lorakit mixed": mixed,
                     "PEFT": lambda: peft.generate(input_ids=ids, adapter_names=rows, **kw)}, max(3, args.reps // 2))
    return (f"| {label} | {statistics.median(t['base']) * 1e3:.0f} ms | **{paired_ratio(t['lorakit mixed'], t['base']):.3f}×** "
            f"| {paired_ratio(t['PEFT'], t['base']):.3f}× |")


def scaling_row(args, base, label, targets, model) -> None:
    """Print lorakit's mixed batch of 16 rows over 1..64 adapters relative to the base model."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 40000, (16, args.seq), generator=gen)
    have = len(lorakit.list_adapters(model))
    for i in range(have, 64):
        lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=targets), adapter=f"t{i}")
    randomize_adapters(model, std=0.02, seed=2)
    fns = {"base": lambda: base(ids)}
    for n in (1, 4, 16, 64):
        rows = [f"t{i}" for i in torch.randint(0, n, (16,), generator=gen).tolist()]

        def mixed(rows=rows):
            with lorakit.mixed_batch(model, rows):
                return model(ids)

        fns[n] = mixed
    t = round_times(fns, args.reps)
    print(f"| {label} | " + " | ".join(f"{paired_ratio(t[n], t['base']):.3f}×" for n in (1, 4, 16, 64)) + " |", flush=True)


def swap_times(dtype, targets, reps: int = 20) -> tuple[float, float]:
    """(lorakit, PEFT) seconds of one merged swap between two adapters."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    model = lorakit_model(dtype, targets, 2)
    lorakit.set_adapter(model, "t0")
    lorakit.merge(model)
    base, _ = load_model("smollm2-135m", dtype=dtype)
    peft_cfg = PeftConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    peft = get_peft_model(base, peft_cfg, adapter_name="t0")
    peft.add_adapter("t1", peft_cfg)
    peft.base_model.merge_adapter(["t0"])
    names = ["t1", "t0"]

    def lk_swap(state=[0]):  # noqa: B006 - counter
        state[0] += 1
        lorakit.set_adapter(model, names[state[0] % 2])

    def peft_swap(state=[0]):  # noqa: B006 - counter
        state[0] += 1
        peft.base_model.unmerge_adapter()
        peft.base_model.set_adapter(names[state[0] % 2])
        peft.base_model.merge_adapter()

    t = round_times({"lk": lk_swap, "peft": peft_swap}, reps)
    return statistics.median(t["lk"]), statistics.median(t["peft"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="base dtype; auto: bf16 where the CPU multiplies it fast (AMX, AVX512-BF16), else fp32")
    parser.add_argument("--seq", type=int, default=64, help="prompt length of every row")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--gen-prompt", type=int, default=16, help="prompt length of the generation rows")
    parser.add_argument("--gen-tokens", type=int, default=32, help="new tokens of the generation rows")
    args = parser.parse_args()
    if min(args.seq, args.reps, args.gen_prompt, args.gen_tokens) < 1:
        parser.error("--seq, --reps, --gen-prompt and --gen-tokens must be at least 1")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if args.dtype == "auto":
        fast, why = fast_bf16()
        args.dtype = "bf16" if fast else "fp32"
        print(f"base dtype {args.dtype} ({why}; --dtype sets it)")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    base, _ = load_model("smollm2-135m", dtype=dtype)
    base.eval()
    base_copy = load_model("smollm2-135m", dtype=dtype)[0].eval()
    print(f"SmolLM2-135M, {args.dtype}, prefill of {args.seq} tokens per row, r=8, median of {args.reps}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    head = ("| targets | adapters × batch | base | lorakit mixed | (a) loop per adapter | (b) PEFT mixed "
            "| (c) base copy (A/A) | adapters used | max |Δlogits| vs PEFT | top-1 = PEFT's |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    print(head)
    loads, models, gen_rows = {}, {}, []
    for label, targets in TARGETS.items():
        gen_row, lk_load, peft_load, model = prefill_table(args, dtype, base, base_copy, label, targets, [(4, 8), (16, 16)])
        gen_rows.append(gen_row)
        loads[label] = (lk_load, peft_load)
        models[label] = model
    print(f"\ngeneration, 16 rows over 16 adapters, {args.gen_prompt}-token prompts, {args.gen_tokens} new tokens "
          "(greedy, KV cache), relative to the base model:\n")
    print("| targets | base | lorakit mixed | PEFT adapter_names |\n|---|---|---|---|")
    print("\n".join(gen_rows))
    print("\nlorakit mixed batch of 16 rows, cost relative to the base model, by number of adapters:\n")
    print("| targets | 1 | 4 | 16 | 64 |\n|---|---|---|---|---|")
    for label, targets in TARGETS.items():
        scaling_row(args, base, label, targets, models.pop(label))
    print("\nmerged swap (unmerge old + merge new) and load-from-disk per adapter:\n")
    print("| targets | lorakit swap | PEFT swap | speed-up | lorakit load | PEFT load |\n|---|---|---|---|---|---|")
    for label, targets in TARGETS.items():
        lk, pf = swap_times(dtype, targets)
        lk_load, peft_load = loads[label]
        print(f"| {label} | {lk * 1e3:.1f} ms | {pf * 1e3:.1f} ms | {pf / lk:.2f}× | {lk_load * 1e3:.0f} ms "
              f"| {peft_load * 1e3:.0f} ms |", flush=True)


if __name__ == "__main__":
    main()
