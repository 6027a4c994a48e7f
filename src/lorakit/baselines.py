"""The baselines the LoRA paper compares against, as model-preparation functions for the same trainer.

Each function changes `model` in place and returns the parameters that train, by name; everything
else is frozen. Added modules start as the identity (adapters' up-projection is zero), so the model
is unchanged at step 0, except prefix tuning, whose prefixes enter attention from the first step.

- `full`: every parameter trains.                 - `bitfit`: biases only (Ben Zaken et al. 2021).
- `adapter_h`: Houlsby et al. 2019, a bottleneck adapter after the attention output projection and
  after the MLP of every block, before the residual add.
- `adapter_l`: Lin et al. 2020, one adapter (LayerNorm, bottleneck) after the MLP of every block.
- `prefix`: prefix tuning (Li & Liang 2021): trainable key/value prefixes of length `length` in
  every attention layer, concatenated inside the attention function (transformers' attention
  interface), so it also works with a KV cache and keeps the tokens' positions.
- `lora_prefix`: LoRA and prefix tuning together (the paper's Sec. 5.1 notes they combine).

`prepare(model, method, ...)` dispatches by the names in `METHODS`, which are also the trainer's
``--method`` values.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from .checkpoint import TRAINABLE_FILE, atomic_write_bytes
from .config import LoraConfig
from .injection import inject, is_saved_module
from .layers import base_shape

METHODS = ("lora", "full", "bitfit", "adapter-h", "adapter-l", "prefix", "lora+prefix")
#: Module paths (full-path regexes) of each block's attention output projection, by architecture.
ATTN_OUT = r"(.*\.)?(self_attn\.o_proj|attention\.output\.dense|attn\.c_proj|self_attn\.out_proj|attention\.out_lin)"
#: Module paths of each block's MLP output projection (LLaMA, BERT, GPT-2, OPT/BART, DistilBERT).
MLP_OUT = r"(.*\.)?(mlp\.down_proj|layer\.\d+\.output\.dense|mlp\.c_proj|fc2|ffn\.lin2)"
ADAPTER_NAME = "lorakit_adapter"
PREFIX_NAME = "lorakit_prefix"
PREFIX_ATTENTION = "lorakit_prefix"


# ---- which parameters train -------------------------------------------------------------------------

def _train_only(model: nn.Module, names: Iterable[str], train_modules: list[str] | None = None) -> dict[str, nn.Parameter]:
    """Freeze everything but the parameters in `names` and inside the modules `train_modules`; return them."""
    keep = set(names)
    out = {}
    for name, p in model.named_parameters():
        on = name in keep or is_saved_module(name, train_modules)
        p.requires_grad_(on)
        if on:
            out[name] = p
    if not out:
        raise ValueError(f"nothing would train on {type(model).__name__}: the method found no parameters to train")
    return out


def full(model: nn.Module) -> dict[str, nn.Parameter]:
    """Full fine-tuning: every parameter trains."""
    return _train_only(model, [n for n, _ in model.named_parameters()])


def bitfit(model: nn.Module, train_modules: list[str] | None = None) -> dict[str, nn.Parameter]:
    """BitFit: only the bias terms train (plus `train_modules`, e.g. a new classifier head)."""
    biases = [n for n, _ in model.named_parameters() if n == "bias" or n.endswith(".bias")]
    if not biases:
        raise ValueError(
            f"{type(model).__name__} has no bias parameters (LLaMA-style models use none), so BitFit has nothing "
            "to train; use another method, e.g. lora or adapter-h"
        )
    return _train_only(model, biases, train_modules)


# ---- bottleneck adapters ---------------------------------------------------------------------------

class BottleneckAdapter(nn.Module):
    """h + W_up·act(W_down·norm(h)): h (..., d) -> (..., d); W_up starts at zero, so it starts as the identity."""

    def __init__(self, dim: int, bottleneck: int, layer_norm: bool = False, device=None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, device=device) if layer_norm else nn.Identity()
        self.down = nn.Linear(dim, bottleneck, device=device)
        self.up = nn.Linear(bottleneck, dim, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:  # noqa: D102
        x = h.to(self.down.weight.dtype)  # fp32 adapter on a bf16 base: cast the activations, not the adapter
        return h + self.up(F.gelu(self.down(self.norm(x)))).to(h.dtype)


def _add_output_adapter(module: nn.Module, bottleneck: int, layer_norm: bool) -> BottleneckAdapter:
    adapter = BottleneckAdapter(base_shape(module)[0], bottleneck, layer_norm, device=module.weight.device)
    module.add_module(ADAPTER_NAME, adapter)
    module.register_forward_hook(lambda mod, args, out: getattr(mod, ADAPTER_NAME)(out))
    return adapter


def _paths(model: nn.Module, pattern: str, what: str) -> list[str]:
    paths = [p for p, m in model.named_modules() if re.fullmatch(pattern, p) and isinstance(getattr(m, "weight", None), Tensor)]
    if not paths:
        raise ValueError(
            f"found no {what} in {type(model).__name__} (known names: {pattern}, from LLaMA, BERT, GPT-2, "
            "OPT/BART and DistilBERT). `lorakit finetune --method adapter-h/adapter-l` supports those families; "
            "for others use the Python API with the module paths: baselines.adapter_h(model, attn_modules=[...], "
            "mlp_modules=[...]) / baselines.adapter_l(model, mlp_modules=[...])"
        )
    return paths


def _check_bottleneck(bottleneck: int) -> None:
    if not isinstance(bottleneck, int) or bottleneck < 1:
        raise ValueError(f"the adapter bottleneck must be a positive integer, got {bottleneck!r}")


def adapter_h(
    model: nn.Module, bottleneck: int = 16, train_modules: list[str] | None = None,
    attn_modules: list[str] | None = None, mlp_modules: list[str] | None = None,
) -> dict[str, nn.Parameter]:
    """Houlsby adapters: a bottleneck adapter after each block's attention output and MLP output projection."""
    _check_bottleneck(bottleneck)
    targets = (attn_modules or _paths(model, ATTN_OUT, "attention output projections")) + (
        mlp_modules or _paths(model, MLP_OUT, "MLP output projections"))
    return _add_adapters(model, targets, bottleneck, False, train_modules)


def adapter_l(
    model: nn.Module, bottleneck: int = 16, train_modules: list[str] | None = None, mlp_modules: list[str] | None = None
) -> dict[str, nn.Parameter]:
    """Lin adapters: one adapter (LayerNorm then bottleneck) after each block's MLP output projection."""
    _check_bottleneck(bottleneck)
    return _add_adapters(model, mlp_modules or _paths(model, MLP_OUT, "MLP output projections"), bottleneck, True,
                         train_modules)


def _add_adapters(model: nn.Module, targets: list[str], bottleneck: int, layer_norm: bool,
                  train_modules: list[str] | None) -> dict[str, nn.Parameter]:
    modules = dict(model.named_modules())
    missing = [t for t in targets if t not in modules]
    if missing:
        raise ValueError(f"no module named {missing[:3]} in {type(model).__name__}")
    taken = [t for t in targets if hasattr(modules[t], ADAPTER_NAME)]
    if taken:
        raise ValueError(f"{taken[:3]} already carry an adapter: prepare the model only once")
    for t in targets:
        _add_output_adapter(modules[t], bottleneck, layer_norm)
    names = [n for n, _ in model.named_parameters() if f".{ADAPTER_NAME}." in n]
    return _train_only(model, names, train_modules)


# ---- prefix tuning -----------------------------------------------------------------------------------

class PrefixKV(nn.Module):
    """Trainable key and value prefixes of one attention layer: (n_kv_heads, length, head_dim) each."""

    def __init__(self, n_kv_heads: int, length: int, head_dim: int, std: float, device=None) -> None:
        super().__init__()
        self.key = nn.Parameter(torch.randn(n_kv_heads, length, head_dim, device=device) * std)
        self.value = nn.Parameter(torch.randn(n_kv_heads, length, head_dim, device=device) * std)


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Self-attention modules that call transformers' attention interface (they have `scaling` and `config`)."""
    found = []
    for path, m in model.named_modules():
        if (type(m).__name__.endswith("Attention") and hasattr(m, "scaling") and hasattr(m, "config")
                and not getattr(m, "is_cross_attention", False)):
            found.append((path, m))
    return found


def prefix_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     **kwargs) -> tuple[Tensor, Tensor | None]:
    """SDPA attention with the module's prefix keys/values in front of its own: key (B, h_kv, T, d) -> (B, h_kv, P+T, d).

    Every query sees every prefix position; the causal/padding mask over the real tokens is kept.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prefix = getattr(module, PREFIX_NAME, None)
    if prefix is not None:
        b, t_q, t_kv, length = key.shape[0], query.shape[2], key.shape[2], prefix.key.shape[1]
        key = torch.cat([prefix.key.to(key.dtype).expand(b, -1, -1, -1), key], dim=2)
        value = torch.cat([prefix.value.to(value.dtype).expand(b, -1, -1, -1), value], dim=2)
        causal = kwargs.get("is_causal", getattr(module, "is_causal", False))
        if attention_mask is None and causal and t_q > 1:  # SDPA would have used is_causal: spell the mask out
            offset = t_kv - t_q
            attention_mask = torch.ones(t_q, t_kv, dtype=torch.bool, device=query.device).tril(offset)[None, None]
        if attention_mask is not None:
            attention_mask = attention_mask[..., -t_kv:]  # some masks are padded past the key length
            fill = torch.ones if attention_mask.dtype == torch.bool else torch.zeros
            pad = fill(*attention_mask.shape[:-1], length, dtype=attention_mask.dtype, device=attention_mask.device)
            attention_mask = torch.cat([pad, attention_mask], dim=-1)
        kwargs["is_causal"] = False
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _use_prefix_attention(model: nn.Module) -> None:
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
    AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)
    model.config._attn_implementation = PREFIX_ATTENTION


def prefix(model: nn.Module, length: int = 10, std: float = 0.02, train_modules: list[str] | None = None) -> dict[str, nn.Parameter]:
    """Prefix tuning: `length` trainable key/value vectors per attention layer; the model's own weights stay frozen."""
    add_prefix(model, length, std)
    names = [n for n, _ in model.named_parameters() if f".{PREFIX_NAME}." in n]
    return _train_only(model, names, train_modules)


def add_prefix(model: nn.Module, length: int = 10, std: float = 0.02) -> list[str]:
    """Attach `PrefixKV` modules to every self-attention layer and route attention through `prefix_attention`."""
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"prefix length must be a positive integer, got {length!r}")
    config = getattr(model, "config", None)
    layers = _attention_modules(model)
    if config is None or not layers:
        raise ValueError(
            f"prefix tuning needs a transformers model whose attention uses the attention interface; "
            f"found no such attention layer in {type(model).__name__}"
        )
    if any(hasattr(m, PREFIX_NAME) for _, m in layers):
        raise ValueError("the model already has prefixes: prepare it only once")
    shapes = []  # (kv heads, head dim) of every layer, all read before any layer changes
    for path, m in layers:
        head_dim = getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None)
        n_heads = getattr(getattr(m, "config", None), "num_attention_heads", None)
        if not head_dim or not n_heads:
            raise ValueError(
                f"prefix tuning cannot read the head layout of {type(m).__name__} at {path!r} (no head_dim / "
                "num_attention_heads); it supports LLaMA-, GPT-2- and BERT-style attention. Use --method lora here"
            )
        shapes.append((n_heads // getattr(m, "num_key_value_groups", 1), head_dim))
    for (_, m), (n_kv, head_dim) in zip(layers, shapes):
        m.add_module(PREFIX_NAME, PrefixKV(n_kv, length, head_dim, std, device=next(m.parameters()).device))
    _use_prefix_attention(model)
    return [p for p, _ in layers]


def lora_prefix(model: nn.Module, config: LoraConfig, length: int = 10, std: float = 0.02) -> dict[str, nn.Parameter]:
    """LoRA (per `config`) plus prefix tuning; A, B, the prefixes and `config.modules_to_save` train."""
    inject(model, config)
    lora_trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    add_prefix(model, length, std)
    names = lora_trainable + [n for n, _ in model.named_parameters() if f".{PREFIX_NAME}." in n]
    return _train_only(model, names)


# ---- dispatch ----------------------------------------------------------------------------------------

def prepare(
    model: nn.Module, method: str, *, lora_config: LoraConfig | None = None, size: int | None = None,
    prefix_length: int = 10, train_modules: list[str] | None = None,
) -> dict[str, nn.Parameter]:
    """Prepare `model` for fine-tuning with `method` (one of `METHODS`); returns what trains, by name.

    `size` is the adapter bottleneck (adapter-h/-l, default 16) or the prefix length (prefix, default
    `prefix_length`). `train_modules` (e.g. ``["classifier"]``) also train; for LoRA pass them in
    `lora_config.modules_to_save`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in ("lora", "lora+prefix"):
        cfg = lora_config or LoraConfig(r=8, alpha=16, modules_to_save=train_modules)
        if method == "lora":
            inject(model, cfg)
            return {n: p for n, p in model.named_parameters() if p.requires_grad}
        return lora_prefix(model, cfg, prefix_length)
    if method == "full":
        return full(model)
    if method == "bitfit":
        return bitfit(model, train_modules)
    if method == "adapter-h":
        return adapter_h(model, size or 16, train_modules)
    if method == "adapter-l":
        return adapter_l(model, size or 16, train_modules)
    return prefix(model, size or prefix_length, train_modules=train_modules)


# ---- files -------------------------------------------------------------------------------------------

def save_trainable(model: nn.Module, out: str | os.PathLike, method: str = "") -> Path:
    """Write the trainable tensors by parameter name to ``out/trainable.safetensors`` (atomically); returns the file."""
    tensors = {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}
    if not tensors:
        raise ValueError("the model has no trainable parameters to save")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / TRAINABLE_FILE, st_save(tensors, metadata={"format": "pt", "lorakit_method": json.dumps(method)}))
    return folder / TRAINABLE_FILE


def load_trainable(model: nn.Module, out: str | os.PathLike) -> nn.Module:
    """Load ``trainable.safetensors`` into a model prepared with the same method; checks every key and shape first."""
    file = Path(out) / TRAINABLE_FILE if Path(out).is_dir() else Path(out)
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: save it with save_trainable(model, folder)")
    tensors = st_load(file.read_bytes())
    params = dict(model.named_parameters())
    problems = [f"{k}: no such parameter" for k in tensors if k not in params]
    problems += [f"{k}: file {list(t.shape)}, model {list(params[k].shape)}" for k, t in tensors.items()
                 if k in params and params[k].shape != t.shape]
    if problems:
        raise ValueError(f"{file} does not fit this model (prepare it with the same method first); unchanged:\n  "
                         + "\n  ".join(problems[:10]))
    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t)
    return model
