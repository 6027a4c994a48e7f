"""Section 4.2's GPT-3 175B arithmetic, computed on GPT-3-shaped models built on the meta device (no memory used).

LoRA r=4 on Wq and Wv of the fused attention projection (loralib's MergedLinear, as the paper's GPT-3
runs): trainable parameters, the fp16 checkpoint size, and the Adam optimizer state saved vs full
fine-tuning. Prints the paper's figures beside ours. The checkpoint is given twice: the trainable parameters in
fp16 (what loralib's state dict holds, the paper's figure) and the tensors lorakit's adapter file holds (the PEFT
format stores a fused layer's q and v slices as one dense rank-2r LoRA whose B has zero rows for k: 2x as large).

    .venv/bin/python benchmarks/paper/gpt3_arithmetic.py [--quick]
"""

from __future__ import annotations

import argparse

import torch
import transformers

import lorakit

#: GPT-3 family shapes (Brown et al. 2020, Table 2.1): layers, d_model, heads. (Table 2.1 lists 13B with
#: d_model 5140 and XL with 24 heads on d_model 2048, which do not divide; 5120 and 16 heads are used —
#: the head count does not change any parameter count.)
SHAPES = {"GPT-3 175B": (96, 12288, 96), "GPT-3 13B": (40, 5120, 40), "GPT-3 XL 1.3B": (24, 2048, 16)}


def gpt3_on_meta(layers: int, d_model: int, heads: int) -> torch.nn.Module:
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=d_model, n_head=heads, n_positions=2048, vocab_size=50257)
    with torch.device("meta"):
        return transformers.GPT2LMHeadModel(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only GPT-3 XL (CI)")
    parser.add_argument("-r", type=int, default=4)
    args = parser.parse_args()
    names = ["GPT-3 XL 1.3B"] if args.quick else list(SHAPES)
    print(f"LoRA r={args.r} on Wq, Wv (c_attn slices q and v), fp16 checkpoint, Adam with fp32 m and v\n")
    print("| model | total params | LoRA params | % | fp16 full ckpt | fp16 LoRA params | lorakit file (fp16) | ratio | "
          "Adam state full | Adam state LoRA | saved |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        model = gpt3_on_meta(*SHAPES[name])
        cfg = lorakit.LoraConfig(r=args.r, alpha=args.r, target_modules=["c_attn"], enable_lora={"c_attn": [True, False, True]})
        lorakit.inject(model, cfg)
        trainable, total = lorakit.trainable_parameters(model)
        base = total - trainable
        full_ckpt, lora_ckpt = 2 * base, 2 * trainable
        file_bytes = 2 * sum(t.numel() for t in lorakit.adapter_state_dict(model).values())  # shapes only (meta)
        adam_full, adam_lora = 8 * base, 8 * trainable  # m and v, fp32 each
        print(f"| {name} | {base / 1e9:.1f} B | {trainable / 1e6:.2f} M | {100 * trainable / base:.4f} | "
              f"{full_ckpt / 1e9:.0f} GB | {lora_ckpt / 2**20:.1f} MiB | {file_bytes / 2**20:.1f} MiB | {full_ckpt / lora_ckpt:,.0f}× | "
              f"{adam_full / 1e12:.2f} TB | {adam_lora / 2**20:.0f} MiB | {(adam_full - adam_lora) / 1e12:.2f} TB |")
    print("\npaper (GPT-3 175B): Sec. 4.2 'r = 4 and only Wq, Wv adapted: checkpoint 350 GB -> 35 MB (~10,000×), "
          "training VRAM 1.2 TB -> 350 GB'; Sec. 7.1 '18M parameters' for r=4 on Wq, Wv; Table 4: 4.7M (r=1), 37.7M (r=8)")


if __name__ == "__main__":
    main()
