"""Inspect and convert adapter folders (PEFT layout) without a model: what is in a folder, and the
same adapter in another file layout (legacy ``adapter_model.bin`` -> safetensors) or precision."""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from .adapters import PREFIX
from .checkpoint import (
    CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    METADATA_KEY,
    WEIGHTS_NAME,
    _sorted_metadata,
    adapted_paths,
    atomic_write_files,
    cast_checked,
    check_not_interrupted,
    config_of,
    read_adapter_files,
)
from .config import LoraConfig, match_pattern_key
from .functional import lora_scale

#: ``--dtype`` names accepted by `convert_adapter`.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_LORA_A = re.compile(r"^(?P<path>.+)\.(lora_A\.weight|lora_embedding_A)$")


@dataclass
class LayerInfo:
    """One adapted module as stored: rank in the file, alpha, scale and parameter count."""

    path: str
    r: int
    alpha: float
    scale: float
    params: int
    fused: list[bool] | None = None  # lorakit's slice flags when the file's rank is n_on·r of a fused projection


@dataclass
class AdapterInfo:
    """What an adapter folder holds, read from its files alone (no model, no unpickling)."""

    folder: str
    weights_file: str
    size_bytes: int
    written_by: str
    base_model: str | None
    peft_type: str
    r: int | str  # a damaged config's value as written (`loadable` says why)
    alpha: float | str
    use_rslora: bool
    target_modules: Any
    layers: list[LayerInfo]
    lora_params: int
    other_tensors: dict[str, int]  # saved modules and biases: key -> numel
    dtypes: dict[str, int]  # dtype -> number of tensors
    modules_to_save: list[str] | None
    lora_bias: bool
    loadable: str  # "yes" (config and tensor names fine; shapes are checked against a model at load), or why not

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)

    def to_text(self) -> str:
        """A short human-readable report."""
        ranks = Counter(layer.r for layer in self.layers)
        alphas = Counter(layer.alpha for layer in self.layers)
        leaves = Counter(layer.path.rsplit(".", 1)[-1] for layer in self.layers)
        other = sum(self.other_tensors.values())
        lines = [
            f"adapter      {self.folder}",
            f"file         {self.weights_file} ({_size(self.size_bytes)}), written by {self.written_by}",
            f"base model   {self.base_model or '(not recorded)'}",
            f"type         {self.peft_type}{' (rsLoRA: scale = alpha/sqrt(r))' if self.use_rslora else ''}",
        ]
        if self.peft_type.upper() == "LORA":  # rank and alpha mean nothing for other PEFT types (IA3, ...)
            lines += [
                f"rank r       {self.r}" + (f"   per layer: {_counts(ranks)}" if set(ranks) - {self.r} else ""),
                f"alpha        {_fmt(self.alpha)}" + (f"   per layer: {_counts(alphas)}" if set(alphas) - {self.alpha} else ""),
            ]
        lines += [
            f"targets      {self.target_modules}",
            f"adapted      {len(self.layers)} modules: {_counts(leaves)}",
            f"LoRA params  {self.lora_params:,}" + (f"   + {other:,} in saved modules/biases" if other else ""),
            f"dtypes       {_counts(Counter(self.dtypes))}",
        ]
        fused = [layer for layer in self.layers if layer.fused]
        if fused:
            flags = "".join("x" if f else "-" for f in fused[0].fused)
            lines.append(f"fused        {len(fused)} fused projections adapted slice by slice [{flags}], stored as dense block-structured LoRA")
        if self.modules_to_save:
            lines.append(f"saved        modules_to_save={self.modules_to_save}")
        if self.lora_bias:
            lines.append("lora_bias    yes (B has a bias)")
        verdict = "loads it (config and key names checked here; shapes against the model when loading)"
        lines.append(f"lorakit      {verdict if self.loadable == 'yes' else 'refuses it: ' + self.loadable}")
        return "\n".join(lines)


def _counts(counter: Counter) -> str:
    """``value×count`` pairs, most frequent first."""
    items = sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))
    return ", ".join(f"{f'{k:g}' if isinstance(k, float) else k}×{n}" for k, n in items)


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def _as_written(value: Any) -> int | float | str:
    """A config number as written, or its JSON text when it is something else."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else json.dumps(value)


def _fmt(value: int | float | str) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _number(value: Any) -> float:
    """`value` as a float, NaN when a damaged config holds something else (inspect still reports the rest)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _weights_file(folder: Path) -> Path:
    return folder / WEIGHTS_NAME if (folder / WEIGHTS_NAME).is_file() else folder / LEGACY_WEIGHTS_NAME


def inspect_adapter(path: str | os.PathLike) -> AdapterInfo:
    """Rank, alpha, targets, adapted modules, parameter counts, size, dtypes and base model of an adapter folder."""
    folder = Path(path)
    fields, tensors, metadata = read_adapter_files(folder)
    try:
        cfg: LoraConfig | None = config_of(folder, fields, metadata, adapted_paths(tensors))
        loadable = "yes"
    except ValueError as e:
        cfg, loadable = None, str(e)
    layers, lora_keys = [], set()
    for key, A in tensors.items():
        match = _LORA_A.match(key)
        if not match:
            continue
        stem = match.group("path")
        module = stem.removeprefix(PREFIX)
        keys = [key, *(k for k in (f"{stem}.lora_B.weight", f"{stem}.lora_embedding_B", f"{stem}.lora_B.bias") if k in tensors)]
        lora_keys.update(keys)
        fused = cfg.slices_for(module) if cfg is not None else None
        r = int(A.shape[0]) // (sum(fused) if fused else 1)  # the file's rank is n_on·r for fused slices
        if cfg is not None:
            alpha = cfg.alpha_for(module)
        else:
            patterns = fields.get("alpha_pattern")
            patterns = patterns if isinstance(patterns, dict) else {}
            hit = match_pattern_key(patterns, module)
            alpha = _number(patterns[hit] if hit is not None else fields.get("lora_alpha", 8))
        params = sum(tensors[k].numel() for k in keys)
        if fused:  # the dense B stores zero blocks for the slices that are not adapted
            params -= tensors[keys[1]].numel() * (len(fused) - 1) // len(fused)
        layers.append(LayerInfo(module, r, alpha, lora_scale(alpha, r, bool(fields.get("use_rslora"))), params, fused))
    unprefixed = sorted(k for k in lora_keys if not k.startswith(PREFIX))
    if loadable == "yes" and not layers:
        loadable = "the weights file holds no LoRA tensors (no lora_A / lora_embedding_A keys)"
    elif loadable == "yes" and unprefixed:
        loadable = f"tensor keys lack PEFT's {PREFIX!r} prefix (e.g. {unprefixed[0]!r}); re-save them with it"
    weights = _weights_file(folder)
    return AdapterInfo(
        folder=str(folder),
        weights_file=weights.name,
        size_bytes=weights.stat().st_size,
        written_by="lorakit" if METADATA_KEY in metadata else f"PEFT {fields.get('peft_version', '(version not recorded)')}",
        base_model=fields.get("base_model_name_or_path"),
        peft_type=str(fields.get("peft_type", "LORA")),
        r=cfg.r if cfg is not None else _as_written(fields.get("r", 8)),
        alpha=float(cfg.alpha) if cfg is not None else _as_written(fields.get("lora_alpha", 8)),
        use_rslora=bool(fields.get("use_rslora", False)),
        target_modules=fields.get("target_modules"),
        layers=layers,
        lora_params=sum(layer.params for layer in layers),
        other_tensors={k.removeprefix(PREFIX): t.numel() for k, t in tensors.items() if k not in lora_keys},
        dtypes=dict(Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())),
        modules_to_save=fields.get("modules_to_save"),
        lora_bias=bool(fields.get("lora_bias", False)),
        loadable=loadable,
    )


def convert_adapter(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | torch.dtype | None = None) -> Path:
    """Write the adapter at `src` to the folder `dst` as safetensors, optionally cast to `dtype` ("fp16", ...).

    Reads a legacy ``adapter_model.bin`` through ``torch.load(weights_only=True)`` only. The config and
    lorakit's header metadata are kept; `src` is never modified. Returns `dst`.
    """
    src, dst = Path(src), Path(dst)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
        dtype = DTYPES[dtype]
    fields, tensors, metadata = read_adapter_files(src)
    check_not_interrupted(src, fields, metadata, adapted_paths(tensors))
    if dst.resolve() == src.resolve():
        raise ValueError(f"--out {str(dst)!r} is the source folder; write the converted adapter to another folder")
    if (dst / CONFIG_NAME).exists() or (dst / WEIGHTS_NAME).exists():
        raise ValueError(f"{str(dst)!r} already holds an adapter; choose an empty --out folder")
    out = {}
    for key, t in tensors.items():
        out[key] = cast_checked(key, t, dtype).contiguous().clone()  # a .bin may hold views of one storage; safetensors wants them apart
    data = _sorted_metadata(st_save(out, metadata={**metadata, "format": "pt"}))
    dst.mkdir(parents=True, exist_ok=True)
    atomic_write_files({dst / WEIGHTS_NAME: data, dst / CONFIG_NAME: (json.dumps(fields, indent=2, sort_keys=True) + "\n").encode()})
    return dst
