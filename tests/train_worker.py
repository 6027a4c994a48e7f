"""A tiny-LLaMA LoRA training run in its own process, for the SIGKILL-and-resume test.

usage: python train_worker.py OUT [--resume] [--sleep SECONDS]
"""

from __future__ import annotations

import sys
import time

import torch

from conftest import tiny_llama
from lorakit.training import TrainConfig, finetune
from toy_tokenizer import ByteTokenizer

STEPS = 12
SAVE_EVERY = 4


def examples() -> list[dict[str, str]]:
    """Twenty prompt/completion pairs with a learnable pattern."""
    return [{"prompt": f"n={i}", "completion": f"{i}{i}{i}"} for i in range(20)]


def config() -> TrainConfig:
    return TrainConfig(steps=STEPS, save_every=SAVE_EVERY, lr=5e-3, batch_size=4, dropout=0.1, precision="fp32", warmup=2)


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, resume = sys.argv[1], "--resume" in sys.argv
    pause = float(sys.argv[sys.argv.index("--sleep") + 1]) if "--sleep" in sys.argv else 0.0
    finetune(tiny_llama(), ByteTokenizer(), examples(), None, config(), out_dir=out, resume=resume,
             callback=lambda e: time.sleep(pause) if e["event"] == "step" else None)
