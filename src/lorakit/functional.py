"""The method as pure tensor functions: scaling, initialisation and ΔW.

Everything that needs ΔW (forward, merge, unmerge, combining, analysis) calls `delta_weight`.
Shapes follow PEFT's files: A is (r, d_in[, *kernel]), B is (d_out, r[, 1, ...]).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """alpha/r (paper, Sec. 4.1) or alpha/√r (rsLoRA, Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def cast_in_range(t: Tensor, dtype: torch.dtype) -> Tensor | None:
    """`t` cast to `dtype`, or None when the cast turns finite values into ±inf (fp16's range ends at 65504)."""
    cast = t.to(dtype)
    if (~torch.isfinite(cast)).sum() > (~torch.isfinite(t)).sum():  # infs or NaNs already there are `t`'s own
        return None
    return cast


def init_lora_A(A: Tensor, init: str, r: int) -> None:
    """Initialise A in place: Kaiming-uniform as loralib/PEFT, or N(0, 1/r²) as PEFT's "gaussian"."""
    if A.is_meta:
        return
    with torch.no_grad():
        if init == "kaiming":
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        elif init == "gaussian":
            torch.nn.init.normal_(A, std=1.0 / r)
        else:  # pragma: no cover - LoraConfig validates init
            raise ValueError(f"unknown init {init!r}")


def expand_sliced_B(B: Tensor, enabled: list[bool]) -> Tensor:
    """Dense B of a fused projection adapted slice by slice.

    B: (n_on, d_slice, r), one block per enabled slice -> (len(enabled)·d_slice, n_on·r), block
    structured, zero rows for the slices that are not adapted (loralib's ``MergedLinear``).
    """
    n_on, d_slice, r = B.shape
    dense = B.new_zeros(len(enabled) * d_slice, n_on * r)
    j = 0
    for s, on in enumerate(enabled):
        if on:
            dense[s * d_slice : (s + 1) * d_slice, j * r : (j + 1) * r] = B[j]
            j += 1
    return dense


def compress_sliced_B(dense: Tensor, enabled: list[bool], r: int) -> Tensor:
    """Inverse of `expand_sliced_B`; raises if `dense` has weight outside the slice blocks."""
    n_on = sum(enabled)
    d_slice = dense.shape[0] // len(enabled)
    blocks = []
    check = dense.clone()
    j = 0
    for s, on in enumerate(enabled):
        if on:
            rows, cols = slice(s * d_slice, (s + 1) * d_slice), slice(j * r, (j + 1) * r)
            blocks.append(dense[rows, cols])
            check[rows, cols] = 0
            j += 1
    if dense.shape != (len(enabled) * d_slice, n_on * r) or torch.count_nonzero(check) > 0:
        raise ValueError("lora_B is not block structured as enable_lora says; the file does not match its config")
    return torch.stack(blocks)


def delta_weight(
    A: Tensor,
    B: Tensor,
    scale: float,
    *,
    fan_in_fan_out: bool = False,
    enabled: list[bool] | None = None,
    embedding: bool = False,
) -> Tensor:
    """ΔW = scale·B·A in fp32 (fp64 for fp64 factors), shaped like the base weight.

    - Linear: A (r, k), B (d, r) -> (d, k). `fan_in_fan_out` (GPT-2 ``Conv1D``) -> (k, d).
    - Fused slices: B (n_on, d_slice, r), `enabled` as in `LoraConfig.enable_lora`.
    - Embedding (PEFT layout): A (r, num_embeddings), B (dim, r) -> (num_embeddings, dim).
    - Conv: A (r, c_in, *kernel), B (c_out, r, 1, ...) -> (c_out, c_in, *kernel).
    """
    dtype = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)  # fp64 factors stay fp64
    A32, B32 = A.to(dtype), B.to(dtype)
    if enabled is not None:
        B32 = expand_sliced_B(B32, enabled)
    if A32.dim() > 2:  # convolution: B is a 1x1 conv after A
        delta = (B32.flatten(1) @ A32.flatten(1)).reshape(B32.shape[0], *A32.shape[1:])
        return delta * scale
    delta = (B32 @ A32) * scale
    return delta.T if (fan_in_fan_out or embedding) else delta
