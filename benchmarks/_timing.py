"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import warnings

import torch
from transformers.utils import logging as hf_logging

from lorakit.precision import base_dtype_choice

hf_logging.disable_progress_bar()  # the scripts load models between tables: no "Loading weights" bars in the output
# PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing`: its FutureWarning is not ours to fix
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def paired_ratio(times: list[float], ref: list[float]) -> float:
    """Median over rounds of ``times[i] / ref[i]``: each round runs every configuration back to back, so
    pairing within a round cancels the slow drift of a shared machine that skews a ratio of medians."""
    return statistics.median(t / r for t, r in zip(times, ref, strict=True))


def rotated(items: list, i: int) -> list:
    """`items` started at position ``i % len(items)``: round i's order, so no configuration always runs first."""
    k = i % len(items)
    return items[k:] + items[:k]


def fast_bf16() -> tuple[bool, str]:
    """(whether this CPU multiplies bf16 fast, why): without AMX or AVX512-BF16 bf16 is emulated, many times slower
    than fp32, so the scripts' defaults leave it out (as the trainer's ``precision="auto"`` does)."""
    dtype, reason = base_dtype_choice("cpu")
    return dtype == torch.bfloat16, reason
