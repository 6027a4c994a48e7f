"""Table 3 at small scale: E2E NLG with SmolLM2-135M and LoRA (or a baseline), BLEU over all references per MR.

Trains with `lorakit.finetune` (bf16 frozen base, and bf16 decoding, where the CPU multiplies bf16 fast) on E2E train pairs, greedy-decodes the first
`--test-mrs` test MRs, scores BLEU with sacrebleu against all their references, and the slot coverage
(share of the MR's slot values found in the output; the human references' own coverage beside it).
Saves the adapter in `--out` (reused by figure3_table7.py).

    flock /tmp/lorakit-cpu.lock .venv/bin/python benchmarks/paper/e2e.py -r 8 --steps 400 --out runs/e2e-r8-s0
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import time
from pathlib import Path

import sacrebleu
import torch

from lorakit.models import load_model
from lorakit.precision import base_dtype_choice
from lorakit.training import TrainConfig, finetune

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "e2e"
PAPER = "paper Table 3, GPT-2 M + LoRA (0.35M), whole test set: BLEU 70.4; GPT-2 M fine-tuned: 68.2; AdapterL 66.3-68.9"
#: Slots whose values a good description states literally (familyFriendly is paraphrased, so it is left out).
LITERAL_SLOTS = ("name", "eatType", "food", "area", "near", "priceRange", "customer rating")


def prompt(mr: str) -> str:
    return f"Restaurant: {mr}\nDescription:"


def read_pairs(file: Path) -> list[tuple[str, str]]:
    with file.open(encoding="utf-8", newline="") as f:
        return [(r["mr"], r["ref"]) for r in csv.DictReader(f)]


def test_set(n: int) -> list[tuple[str, list[str]]]:
    """The first `n` distinct test MRs (file order) with all their references."""
    refs: dict[str, list[str]] = {}
    for mr, ref in read_pairs(DATA / "testset_w_refs.csv"):
        refs.setdefault(mr, []).append(ref)
    return list(refs.items())[:n]


def slot_coverage(mr: str, text: str) -> float:
    values = [v for k, v in re.findall(r"([\w ]+)\[([^\]]*)\]", mr) if k.strip() in LITERAL_SLOTS]
    return sum(v.lower() in text.lower() for v in values) / len(values) if values else 1.0


@torch.inference_mode()
def generate(model, tok, mrs: list[str], batch: int = 25, max_new_tokens: int = 64) -> list[str]:
    tok.padding_side = "left"
    model.eval()
    outs = []
    for i in range(0, len(mrs), batch):
        enc = tok([prompt(m) for m in mrs[i:i + batch]], return_tensors="pt", padding=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=base_dtype_choice("cpu")[0] == torch.bfloat16):
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        for row in gen[:, enc["input_ids"].shape[1]:]:
            outs.append(tok.decode(row, skip_special_tokens=True).split("\n")[0].strip())
    return outs


def score(tests: list[tuple[str, list[str]]], hyps: list[str]) -> dict[str, float]:
    width = max(len(r) for _, r in tests)
    streams = [[refs[k] if k < len(refs) else None for _, refs in tests] for k in range(width)]
    human = [slot_coverage(mr, ref) for mr, refs in tests for ref in refs]
    return {"bleu": sacrebleu.corpus_bleu(hyps, streams).score,
            "slot_coverage": sum(slot_coverage(mr, h) for (mr, _), h in zip(tests, hyps)) / len(hyps),
            "human_slot_coverage": sum(human) / len(human)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora")
    parser.add_argument("-r", type=int, default=8, help="LoRA rank (adapter bottleneck / prefix length for baselines)")
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-mrs", type=int, default=100)
    parser.add_argument("--zero-shot", action="store_true", help="also score the untrained model")
    parser.add_argument("--quick", action="store_true", help="20 steps, 10 test MRs (CI)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.test_mrs = 20, 10
    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m")
    tests = test_set(args.test_mrs)
    result: dict = {"method": args.method, "r": args.r, "alpha": args.alpha, "targets": args.targets,
                    "steps": args.steps, "seed": args.seed, "lr": args.lr, "test_mrs": len(tests)}
    if args.zero_shot:
        result["zero_shot"] = score(tests, generate(model, tok, [m for m, _ in tests]))
    pairs = random.Random(0).sample(read_pairs(DATA / "trainset.csv"), args.steps * 8)  # one epoch of `steps` batches
    train = [{"prompt": prompt(mr), "completion": " " + ref} for mr, ref in pairs]
    cfg = TrainConfig(method=args.method, r=args.r, alpha=args.alpha, dropout=0.05, target_modules=args.targets.split(","),
                      lr=args.lr, steps=args.steps, batch_size=8, max_length=96, warmup=0.06, seed=args.seed,
                      use_chat_template=False, log_every=50)
    t0 = time.perf_counter()
    res = finetune(model, tok, train, None, cfg, out_dir=args.out)
    result.update(train_s=round(time.perf_counter() - t0, 1), step_s=round(res.seconds / res.steps, 3),
                  trainable=res.trainable, train_loss=round(res.train_loss, 4), precision=res.precision)
    t0 = time.perf_counter()
    hyps = generate(model, tok, [m for m, _ in tests])
    result.update(score(tests, hyps), gen_s=round(time.perf_counter() - t0, 1), example=hyps[0])
    Path(args.out, "e2e_result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    print(PAPER)


if __name__ == "__main__":
    main()
