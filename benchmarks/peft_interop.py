"""PEFT interop on the bundled SmolLM2-135M: the same adapter through lorakit and through PEFT.

    flock /tmp/lorakit-cpu.lock .venv/bin/python benchmarks/peft_interop.py

For a few configurations (random, non-trivial adapter weights, fp32) it prints max |Δlogits| for
(a) a PEFT adapter folder loaded by `lorakit.load_adapter` vs `PeftModel`, (b) that adapter saved by
lorakit and loaded by `PeftModel.from_pretrained` vs the original `PeftModel` (the round trip's weights), (c) lorakit's `merge_and_unload` vs the unmerged
adapter (fp32 rounding of W0 + ΔW), (d) that merged model saved with transformers' `save_pretrained`
and reloaded by plain `from_pretrained` vs the merged model in memory, (e) max |ΔW| between lorakit's
and PEFT's merged weights; then the load time of one adapter folder in lorakit and in PEFT (median
of 5), and the sizes `lorakit convert --dtype` gives. SmolLM2 ties its output head to the input
embeddings, so the embedding case unties them before merging (lorakit refuses to merge otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig as PeftConfig
from peft import PeftModel, get_peft_model

import lorakit
from lorakit.convert import convert_adapter
from lorakit.models import load_model

CONFIGS = {
    "q,v r=8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all-linear r=16 rslora": dict(r=16, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    "embed+q,v, rank/alpha pattern": dict(
        r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj", "v_proj"], rank_pattern={"v_proj": 4}, alpha_pattern={"q_proj": 32}
    ),
}


def randomize(params, std: float = 0.02, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def fresh():
    model, _ = load_model("smollm2-135m")
    return model.eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] + " (about 2 minutes on 2 cores)")
    p.add_argument("--threads", type=int, default=2)
    torch.set_num_threads(p.parse_args().threads)
    _, tok = load_model("smollm2-135m")
    ids = tok(["The quick brown fox jumps over the lazy dog.", "LoRA adapters are small: only A and B train."],
              return_tensors="pt", padding=True).input_ids
    base = logits(fresh(), ids)
    print(f"SmolLM2-135M, fp32, {tuple(ids.shape)} tokens; max |logits| of the base = {base.abs().max():.1f}\n")
    print("| config | adapter's effect | (a) PEFT→lorakit | (b) lorakit→PEFT | (c) merged vs unmerged "
          "| (d) saved merged vs in memory | (e) merged W, lorakit vs PEFT |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, kw in CONFIGS.items():
            pm = get_peft_model(fresh(), PeftConfig(**kw))
            randomize([p for p in pm.parameters() if p.requires_grad])
            pm.eval().save_pretrained(tmp / "peft")
            want = logits(pm, ids)
            ours = lorakit.load_adapter(fresh(), tmp / "peft")
            a = (logits(ours, ids) - want).abs().max().item()
            lorakit.save_adapter(ours, tmp / "lorakit")
            theirs = PeftModel.from_pretrained(fresh(), tmp / "lorakit").eval()
            b = (logits(theirs, ids) - want).abs().max().item()
            for m in (ours, theirs.base_model.model):
                if "embed_tokens" in kw["target_modules"]:  # untie, as lorakit's merge error says
                    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())
                    m.config.tie_word_embeddings = False
            in_memory = logits(lorakit.merge_and_unload(ours), ids)
            c = (in_memory - want).abs().max().item()
            ours.save_pretrained(tmp / "merged")
            merged = type(ours).from_pretrained(tmp / "merged").eval()
            d = (logits(merged, ids) - in_memory).abs().max().item()
            w_ours, w_peft = merged.state_dict(), theirs.merge_and_unload().state_dict()
            e = max((w_ours[k] - w_peft[k]).abs().max().item() for k in w_ours)
            effect = (want - base).abs().max().item()
            print(f"| {name} | {effect:.2f} | {a:.1e} | {b:.1e} | {c:.1e} | {d:.1e} | {e:.1e} |")
            del pm, ours, theirs, merged

        folder = tmp / "peft"
        load_times: dict[str, list[float]] = {"lorakit.load_adapter": [], "PeftModel.from_pretrained": []}
        for _ in range(5):
            for label, load in (("lorakit.load_adapter", lorakit.load_adapter), ("PeftModel.from_pretrained", PeftModel.from_pretrained)):
                model = fresh()
                t0 = time.perf_counter()
                load(model, folder)
                load_times[label].append(time.perf_counter() - t0)
        print(f"\nload of the last adapter folder ({name}), median of 5:")
        for label, times in load_times.items():
            print(f"  {label:28s} {statistics.median(times) * 1000:7.1f} ms")

        print("\nlorakit convert (all-linear r=16 adapter):")
        pm = get_peft_model(fresh(), PeftConfig(**CONFIGS["all-linear r=16 rslora"]))
        pm.save_pretrained(tmp / "all", safe_serialization=False)
        sizes = {"fp32 .bin (PEFT, legacy)": (tmp / "all" / "adapter_model.bin").stat().st_size}
        for dtype in (None, "fp16", "bf16"):
            out = convert_adapter(tmp / "all", tmp / f"all-{dtype}", dtype=dtype)
            sizes[f"{dtype or 'fp32'} safetensors"] = (out / "adapter_model.safetensors").stat().st_size
        for label, size in sizes.items():
            print(f"  {label:26s} {size / 2**20:6.2f} MiB")


if __name__ == "__main__":
    main()
