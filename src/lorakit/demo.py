"""The demo of the paper's claims on a small pretrained model, on two tasks it generates itself.

Task "describe": a restaurant record (E2E style) → one sentence in a house style. Task "parse": a
sentence in another style → the record. On held-out records it shows (1) the base model failing,
(2) LoRA's trainable share, memory and file size, (3) the fine-tuned model succeeding, (4) the
merged model running at the base model's latency, (5) one base model serving both tasks by
swapping adapters. It writes ``report.md`` and ``loss.png`` to the output folder.
"""

from __future__ import annotations

import random
import resource
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import adapters, merging
from .checkpoint import atomic_write_bytes
from .config import LoraConfig
from .data import encode_prompt, format_prompt, special_prefix
from .injection import inject
from .training import TrainConfig, choose_precision, finetune

NAMES_A = ["Golden", "Blue", "Red", "Silver", "Green", "Old", "Little", "Royal", "Hidden", "Lucky", "Black", "Wild",
           "Crooked", "Happy", "Iron", "Velvet", "Copper", "Rusty", "Jolly", "Quiet"]
NAMES_B = ["Fork", "Lantern", "Oak", "Anchor", "Spoon", "Kettle", "Harbour", "Garden", "Crown", "Mill", "Bell", "Barrel",
           "Fox", "Table", "Bridge", "Pepper", "Olive", "Lemon", "Swan", "Candle"]
FOODS = ["Thai", "Italian", "French", "Indian", "Chinese", "Japanese", "Mexican", "English", "Greek", "Spanish"]
AREAS = ["city centre", "riverside", "old town", "harbour", "market square", "university quarter"]
PRICES = ["cheap", "moderately priced", "expensive"]
SLOTS = ("name", "food", "area", "price", "rating")


def make_records(n: int, seed: int, held_out: bool) -> list[dict[str, str]]:
    """`n` random restaurant records; held-out ones use name halves never seen in training."""
    rng = random.Random(seed)
    first, second = (NAMES_A[15:], NAMES_B[15:]) if held_out else (NAMES_A[:15], NAMES_B[:15])
    return [{"name": f"The {rng.choice(first)} {rng.choice(second)}", "food": rng.choice(FOODS),
             "area": rng.choice(AREAS), "price": rng.choice(PRICES), "rating": str(rng.randint(1, 5))}
            for _ in range(n)]


def describe_example(rec: dict[str, str]) -> dict[str, str]:
    """Record → one sentence in the house style."""
    mr = ", ".join(f"{k}[{rec[k]}]" for k in SLOTS)
    return {"prompt": f"Describe this restaurant in one sentence: {mr}",
            "completion": f"{rec['name']} is a {rec['price']} {rec['food']} restaurant in the {rec['area']}, "
                          f"rated {rec['rating']} out of 5."}


def parse_example(rec: dict[str, str]) -> dict[str, str]:
    """A sentence in another style → the record as ``key: value | …``."""
    text = (f"Come to {rec['name']} in the {rec['area']} for {rec['food']} food; it is {rec['price']} "
            f"and guests give it {rec['rating']} stars.")
    return {"prompt": f"Extract the restaurant's fields: {text}",
            "completion": " | ".join(f"{k}: {rec[k]}" for k in SLOTS)}


@dataclass
class Task:
    """A generated task: how a record becomes an example, and its train and held-out examples."""

    name: str
    make: Callable[[dict[str, str]], dict[str, str]]
    train: list[dict[str, str]]
    test: list[dict[str, str]]
    test_records: list[dict[str, str]]


def build_task(name: str, make: Callable, n_train: int, n_test: int, seed: int) -> Task:
    recs = make_records(n_test, seed + 1, held_out=True)
    return Task(name, make, [make(r) for r in make_records(n_train, seed, held_out=False)], [make(r) for r in recs], recs)


def score(preds: list[str], task: Task) -> tuple[float, float]:
    """(exact-match rate, slot accuracy = share of the record's values present in the answer)."""
    exact = sum(p.strip() == ex["completion"] for p, ex in zip(preds, task.test)) / len(preds)
    slots = [rec[k].lower() in p.lower() for p, rec in zip(preds, task.test_records) for k in SLOTS]
    return exact, sum(slots) / len(slots)


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int = 40) -> list[str]:
    """Greedy answers for `prompts` in one left-padded batch, through the chat template."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        prefix = special_prefix(tokenizer)
        ids = [encode_prompt(tokenizer, format_prompt(tokenizer, p), prefix) for p in prompts]  # as training saw them
        enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        model.eval()
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    finally:
        tokenizer.padding_side = side
    return [tokenizer.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]


@torch.no_grad()
def forward_latency(model: nn.Module, ids: torch.Tensor, repeats: int = 15) -> float:
    """Median seconds of one forward pass on `ids`."""
    model.eval()
    model(ids)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(ids)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _interleaved_latency(plain: nn.Module, model: nn.Module, ids: torch.Tensor,
                         rounds: int = 9) -> tuple[float, float, float, float]:
    """(base, merged, unmerged latency, merged/base ratio), the models alternating round by round; leaves `model` merged.

    The ratio is the median over rounds of merged / base within the round, so a machine that slows
    down or speeds up between rounds does not show up as a difference between the models.
    """
    base, merged, unmerged = [], [], []
    for _ in range(rounds):
        base.append(forward_latency(plain, ids, repeats=4))
        merging.merge(model)
        merged.append(forward_latency(model, ids, repeats=4))
        merging.unmerge(model)
        unmerged.append(forward_latency(model, ids, repeats=4))
    merging.merge(model)
    ratio = statistics.median(m / b for m, b in zip(merged, base))
    return statistics.median(base), statistics.median(merged), statistics.median(unmerged), ratio


def _peak_rss_mb() -> float:
    """Peak RSS of the process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


#: Training steps per adapter by the base's precision (fp32 steps cost 2–3× bf16's where bf16 is fast): the loss
#: is below ~0.02 by step 12 and both tasks reach 100 % exact match, so more steps only cost time.
DEFAULT_STEPS = {"bf16": 16, "fp32": 12}


#: What a demo writes into its folder; a re-run replaces them, and refuses a folder that holds anything else.
DEMO_FILES = ("describe", "parse", "report.md", "loss.png")


def check_out_dir(out_dir: str | Path) -> None:
    """Refuse an output folder that holds more than an earlier demo's files (those the run replaces)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder: choose another path")
    other = sorted(p.name for p in out.iterdir() if p.name not in DEMO_FILES) if out.is_dir() else []
    if other:
        raise ValueError(f"--out {str(out)!r} holds files that are not a lorakit demo's ({other[:5]}): choose another folder")


def run_demo(
    model_name: str = "smollm2-135m",
    out_dir: str | Path = "lorakit-demo",
    steps: int | None = None,
    n_test: int = 12,
    seed: int = 0,
    emit: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Run the five parts, `emit` each printed line, write report.md and loss.png to `out_dir`; returns the figures.

    `steps` per adapter defaults to 16 with a bf16 base and to 12 in fp32 (a CPU without fast bf16
    trains 2–3× slower), so the demo stays within about five minutes on 2 cores either way.
    """
    from .models import load_model, resolve_model_path

    t_start = time.perf_counter()
    check_out_dir(out_dir)
    out = Path(out_dir)
    for name in ("describe", "parse"):  # an earlier demo's runs: this one trains them again
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def say(line: str = "") -> None:
        lines.append(line)
        emit(line)

    model, tok = load_model(model_name)
    precision, why = choose_precision("auto")
    if precision == "bf16":
        model.to(torch.bfloat16)
    total_params = sum(p.numel() for p in model.parameters())
    say(f"# lorakit demo: LoRA on {model_name} ({total_params / 1e6:.0f}M parameters, frozen base in {precision}: {why})")
    say(f"loaded in {time.perf_counter() - t_start:.1f}s")
    if steps is None:
        steps = DEFAULT_STEPS.get(precision, DEFAULT_STEPS["fp32"])
        say(f"{steps} training steps per adapter (the default for a {precision} base; --steps sets it)")
    describe = build_task("describe", describe_example, n_train=steps * 8, n_test=n_test, seed=seed)
    parse = build_task("parse", parse_example, n_train=steps * 8, n_test=n_test, seed=seed + 10)
    ids = torch.tensor([encode_prompt(tok, format_prompt(tok, describe.test[0]["prompt"]))])

    say("\n## 1. The base model on held-out records (task: record → one sentence in the house style)")
    base_preds = {t.name: generate(model, tok, [ex["prompt"] for ex in t.test]) for t in (describe, parse)}
    base_scores = {name: score(p, t) for (name, p), t in zip(base_preds.items(), (describe, parse))}
    _show(say, describe, base_preds["describe"], base_scores["describe"])

    say("\n## 2. LoRA fine-tuning (r=8, alpha=16, on q_proj and v_proj)")
    lora_cfg = LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    train_cfg = TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup=0.1, max_length=96, precision=precision, seed=seed)
    inject(model, lora_cfg, adapter="describe")
    rss_before = _peak_rss_mb()
    result = finetune(model, tok, describe.train, None, train_cfg, out_dir=out / "describe")
    rss_peak = _peak_rss_mb()
    trainable = result.trainable
    dense = total_params * 4
    model_file = Path(resolve_model_path(model_name)) / "model.safetensors"
    say(f"trained {steps} steps × 8 examples in {result.seconds:.0f}s, loss {result.history[0]['loss']:.3f} → {result.train_loss:.3f}")
    say(f"trainable parameters: {trainable:,} = {100 * trainable / total_params:.3f}% of the base model's {total_params:,}")
    say(f"peak memory (measured, process RSS): {rss_peak:,.0f} MiB (before training {rss_before:,.0f} MiB, including the fp32 load)")
    say(f"full fine-tuning needs (computed): fp32 weights + grads + AdamW moments = 4 × {dense / 2**20:,.0f} MiB = "
        f"{4 * dense / 2**20:,.0f} MiB before activations (the measured peak above includes them); "
        f"LoRA's grads + moments: {3 * trainable * 4 / 2**20:.1f} MiB")
    adapter_mb = (out / "describe" / "adapter_model.safetensors").stat().st_size / 2**20
    model_mb = model_file.stat().st_size / 2**20 if model_file.is_file() else dense / 2**20
    say(f"adapter file: {adapter_mb:.2f} MiB vs the model's {model_mb:,.0f} MiB ({model_mb / adapter_mb:,.0f}× smaller)")

    say("\n## 3. The fine-tuned model on the same held-out records")
    tuned = generate(model, tok, [ex["prompt"] for ex in describe.test])
    tuned_score = score(tuned, describe)
    _show(say, describe, tuned, tuned_score)

    say("\n## 4. Merge: W = W0 + (alpha/r)·B·A, no extra inference latency")
    plain = load_model(model_name)[0].to(torch.bfloat16 if precision == "bf16" else torch.float32)  # the untouched base
    base_latency, merged_latency, unmerged_latency, merged_ratio = _interleaved_latency(plain, model, ids)
    del plain
    merged_same = generate(model, tok, [ex["prompt"] for ex in describe.test[:4]]) == tuned[:4]
    say(f"forward latency ({ids.shape[1]} tokens, 9 interleaved rounds × 4): base {1e3 * base_latency:.1f} ms, "
        f"merged {1e3 * merged_latency:.1f} ms ({merged_ratio:.2f}× the base, median of the rounds' ratios), "
        f"unmerged adapter {1e3 * unmerged_latency:.1f} ms")
    say(f"merged answers equal the unmerged ones: {merged_same}")
    merging.unmerge(model)

    say("\n## 5. Task switching: a second adapter (sentence → record) on the same base model")
    inject(model, lora_cfg, adapter="parse")
    result2 = finetune(model, tok, parse.train, None, train_cfg, out_dir=out / "parse")
    say(f"trained adapter 'parse' {steps} steps in {result2.seconds:.0f}s, loss {result2.history[0]['loss']:.3f} → {result2.train_loss:.3f}")
    answers, swaps = {}, {}
    for task in (describe, parse, describe):
        t0 = time.perf_counter()
        adapters.set_adapter(model, task.name)
        swaps.setdefault(task.name, time.perf_counter() - t0)
        answers[task.name] = generate(model, tok, [ex["prompt"] for ex in task.test])
    merging.merge(model)
    t0 = time.perf_counter()
    adapters.set_adapter(model, "parse")
    merged_swap = time.perf_counter() - t0
    parse_score = score(answers["parse"], parse)
    _show(say, parse, answers["parse"], parse_score, base=base_scores["parse"])
    say(f"'describe' after swapping back: exact match {score(answers['describe'], describe)[0]:.0%}")
    say(f"swap time: set_adapter {1e3 * max(swaps.values()):.2f} ms (unmerged); on a merged model "
        f"(unmerge old + merge new) {1e3 * merged_swap:.0f} ms")

    total = time.perf_counter() - t_start
    shutil.copyfile(out / "describe" / "loss.png", out / "loss.png")
    say(f"\ntotal time {total:.0f}s; report: {out / 'report.md'}, loss curve: {out / 'loss.png'}")
    atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n\n![training loss of the 'describe' adapter](loss.png)\n").encode())
    return {"base": base_scores, "tuned": {"describe": tuned_score, "parse": parse_score}, "trainable": trainable,
            "total_params": total_params, "peak_rss_mb": rss_peak, "adapter_mb": adapter_mb, "model_mb": model_mb,
            "latency": {"base": base_latency, "merged": merged_latency, "unmerged": unmerged_latency,
                        "merged_ratio": merged_ratio},
            "swap_s": max(swaps.values()), "merged_swap_s": merged_swap, "seconds": total}


def _show(say: Callable[[str], None], task: Task, preds: list[str], scores: tuple[float, float],
          base: tuple[float, float] | None = None) -> None:
    for ex, pred in list(zip(task.test, preds))[:3]:
        say(f"- prompt:   {ex['prompt']}")
        say(f"  expected: {ex['completion']}")
        say(f"  answer:   {pred[:160]}")
    note = f" (base model: {base[0]:.0%}, {base[1]:.0%})" if base else ""
    say(f"**exact match {scores[0]:.0%}, slot accuracy {scores[1]:.0%}** on {len(preds)} held-out records{note}")
