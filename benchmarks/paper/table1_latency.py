"""Table 1 of the paper: inference latency of adapters vs LoRA, on the bundled SmolLM2-135M (2 threads; bf16 where the CPU multiplies it fast, else fp32).

Configurations: the base model, LoRA r=8 on q,v merged into W (`lorakit.merge`, and `merge_and_unload`),
LoRA unmerged (for reference), AdapterH (Houlsby: 2 adapters per block) and AdapterL (Lin: 1 per block),
bottleneck 8. Shapes: prefill of 128 tokens at batch 1 and 8, and one decoding step (one new token per
sequence on a 128-token KV cache). All configurations run interleaved (round-robin) in one process;
medians over `--repeats`, and the overhead vs the base.

    flock /tmp/lorakit-cpu.lock .venv/bin/python benchmarks/paper/table1_latency.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import lorakit
from lorakit import baselines
from lorakit.models import load_model
from lorakit.precision import base_dtype_choice

PAPER = ("paper, GPT-2 M, batch 1, seq 128, fp32 V100 (Table 1): base/LoRA 19.8 ms, AdapterL 23.9 ms (+20.7%), "
         "AdapterH 25.8 ms (+30.3%); batch 16, seq 256: +5.0% / +8.4%")


def build(base: torch.nn.Module, bottleneck: int) -> dict[str, torch.nn.Module]:
    """The configurations, each a deep copy of the base (in its dtype) with random (non-zero) adapter weights."""
    models = {"base": base}
    for name in ("LoRA merged", "LoRA merge_and_unload", "LoRA unmerged"):
        m = copy.deepcopy(base)
        lorakit.inject(m, lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
        lorakit.adapters.randomize_adapters(m, std=0.02)
        if name == "LoRA merged":
            lorakit.merge(m)
        elif name == "LoRA merge_and_unload":
            m = lorakit.merge_and_unload(m)
        models[name] = m
    for name, method in (("AdapterH", "adapter-h"), ("AdapterL", "adapter-l")):
        m = copy.deepcopy(base)
        baselines.prepare(m, method, size=bottleneck)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if ".up." in n:
                    p.normal_(std=0.02)
        models[name] = m
    for m in models.values():
        m.to(base.dtype).eval()
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 only, 3 repeats (CI)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--bottleneck", type=int, default=8)
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="base dtype; auto: bf16 where the CPU multiplies it fast (AMX, AVX512-BF16), else fp32")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype) or base_dtype_choice("cpu")[0]
    base, _ = load_model("smollm2-135m", dtype=dtype)
    print(f"base dtype {str(dtype).removeprefix('torch.')}")
    models = build(base, args.bottleneck)
    batches = [1] if args.quick else [1, 8]
    repeats = 3 if args.quick else args.repeats
    vocab = base.config.vocab_size
    n_params = {k: sum(p.numel() for n, p in m.named_parameters() if "lorakit_adapter" in n) for k, m in models.items()}
    print(f"adapter bottleneck {args.bottleneck}: AdapterH {n_params['AdapterH'] / 1e6:.2f}M, "
          f"AdapterL {n_params['AdapterL'] / 1e6:.2f}M params; LoRA r=8 q,v")
    times: dict[tuple[str, str], list[float]] = {}
    with torch.inference_mode():
        for batch in batches:
            ids = torch.randint(10, vocab, (batch, 128), generator=torch.Generator().manual_seed(batch))
            nxt = torch.randint(10, vocab, (batch, 1), generator=torch.Generator().manual_seed(7))
            caches = {k: m(ids, use_cache=True).cache for k, m in models.items()}
            for m in models.values():  # warm-up
                m(ids, use_cache=False)
            for _ in range(repeats):
                for name, m in models.items():
                    t0 = time.perf_counter()
                    m(ids, use_cache=False)
                    times.setdefault((name, f"prefill b={batch}"), []).append(time.perf_counter() - t0)
                    cache = caches[name]
                    t0 = time.perf_counter()
                    m(nxt, cache=cache, use_cache=True)
                    times.setdefault((name, f"decode b={batch}"), []).append(time.perf_counter() - t0)
                    cache.crop(-1)  # back to the 128-token prompt
    shapes = list(dict.fromkeys(s for _, s in times))
    for label, stat in (("median", statistics.median), ("minimum", min)):
        print(f"\n{label} ms over {repeats} interleaved repeats (overhead vs base)\n")
        print("| configuration | " + " | ".join(shapes) + " |")
        print("|---|" + "---|" * len(shapes))
        for name in models:
            cells = []
            for s in shapes:
                t, t0 = stat(times[(name, s)]), stat(times[("base", s)])
                cells.append(f"{1e3 * t:.1f}" + ("" if name == "base" else f" ({100 * (t / t0 - 1):+.1f}%)"))
            print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n{PAPER}")


if __name__ == "__main__":
    main()
