"""Precision of the frozen base: pick bf16 where the hardware multiplies it fast, cast the base, keep adapters fp32.

LoRA trains only A and B, so the frozen W0 can live in bf16 (half the memory, and on CPUs with
AMX or AVX512-BF16 a bf16 matmul is several times faster than fp32) while A and B stay fp32
master weights. The LoRA layers cast the tiny A, B to the activation dtype in the forward, so
their gradients flow back to fp32 through that cast.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .layers import LoraLayer
from .saved import wrappers
from .state import check_module

log = logging.getLogger(__name__)


def _cpu_fast_bf16() -> str | None:
    """Name of the CPU feature that makes bf16 matmuls fast, or None."""
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


def base_dtype_choice(device: torch.device | str = "cpu") -> tuple[torch.dtype, str]:
    """(dtype, reason) for the frozen base on `device`: bf16 where the hardware runs it fast, else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16, "CUDA device supports bf16"
        return torch.float32, "CUDA device without bf16 support"
    if device.type == "cpu":
        feature = _cpu_fast_bf16()
        if feature:
            return torch.bfloat16, f"CPU has {feature} (fast bf16 matmul)"
        return torch.float32, "CPU has neither AMX nor AVX512-BF16 (bf16 would be emulated, slower than fp32)"
    return torch.float32, f"no bf16 fast path known for device type {device.type!r}"


def pick_base_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bf16 if `device` multiplies bf16 fast (CPU AMX / AVX512-BF16, CUDA bf16), else fp32; logs why."""
    dtype, reason = base_dtype_choice(device)
    log.info("frozen base dtype %s: %s", str(dtype).removeprefix("torch."), reason)
    return dtype


def _adapter_stores(model: nn.Module) -> set[int]:
    return {
        id(store)
        for m in model.modules()
        if isinstance(m, LoraLayer)
        for store in (m.lora_A, m.lora_B, m.lora_B_bias)
    }


def _to_dtype_hooks(module: nn.Module, model_dtype: torch.dtype) -> None:
    """Run a module that keeps fp32 trainable weights inside a bf16 model: inputs in, output back out (to the
    input's dtype, or to `model_dtype` when the input holds no floats: an embedding's token ids)."""
    dtype = next(module.parameters(recurse=False)).dtype

    def cast_in(_mod: nn.Module, args: tuple) -> tuple:
        _mod._lorakit_in_dtype = next((a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()), model_dtype)
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def cast_out(_mod: nn.Module, _args: tuple, out: object) -> object:
        back = _mod.__dict__.pop("_lorakit_in_dtype", None)
        if back is not None and torch.is_tensor(out) and out.is_floating_point():
            return out.to(back)
        return out

    module.register_forward_pre_hook(cast_in)
    module.register_forward_hook(cast_out)


def cast_base(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Cast the frozen floating-point parameters to `dtype` in place; adapters and trainable weights stay as they are.

    Buffers (rotary frequencies, norms' running stats) keep their dtype. A module whose own
    weights train (a ``modules_to_save`` head, a trained bias) stays in its dtype and gets hooks
    that cast its inputs to it and its output back. Returns the same model.
    """
    check_module(model)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype such as torch.bfloat16, got {dtype!r}")
    skip = _adapter_stores(model)
    copies = {id(m) for head in wrappers(model) for m in head.modules_to_save.modules()}  # trained even while inactive
    for module in model.modules():
        if id(module) in skip:
            continue
        own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
        if not own:
            continue
        if id(module) in copies or any(p.requires_grad for p in own):
            if own[0].dtype != dtype and not module.__dict__.get("_lorakit_cast_hooks"):
                _to_dtype_hooks(module, dtype)
                module._lorakit_cast_hooks = True
            continue
        for p in own:
            p.data = p.data.to(dtype)
    return model


def describe_precision(model: nn.Module) -> str:
    """One line saying which dtypes the frozen and the trainable parameters have, e.g. for a trainer's log."""
    check_module(model)
    frozen: dict[str, int] = {}
    trained: dict[str, int] = {}
    for p in model.parameters():
        bucket = trained if p.requires_grad else frozen
        key = str(p.dtype).removeprefix("torch.")
        bucket[key] = bucket.get(key, 0) + p.numel()

    def fmt(d: dict[str, int]) -> str:
        return ", ".join(f"{k} ({n:,} params)" for k, n in sorted(d.items())) or "none"

    return f"frozen base: {fmt(frozen)}; trainable: {fmt(trained)}"
