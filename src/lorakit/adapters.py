"""Adapters on a model: which are active, which train, their tensors, and a readable summary."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .functional import expand_sliced_B
from .layers import LoraLayer
from .merging import check_mergeable, restore_base_values, set_merged_all
from .saved import SavedModule, remove_copy, saved_copy, wrappers
from .state import (
    all_params,
    check_module,
    check_not_mixed,
    drop_state,
    get_state,
    is_merged,
    lora_layers,
    resolve_adapter,
)

PREFIX = "base_model.model."


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on `model` (empty if none)."""
    state = get_state(model, required=False)
    return list(state.adapters) if state else []


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters whose updates the forward pass applies."""
    state = get_state(model, required=False)
    return list(state.active) if state else []


def set_adapter(model: nn.Module, adapter: str | list[str]) -> None:
    """Make `adapter` (or several, whose updates add) the active, trainable adapter(s).

    On a merged model the old adapters are unmerged and the new ones merged, so inference
    keeps the base model's cost. Every check runs first: on an error nothing has changed.
    """
    state = get_state(model)
    if not isinstance(adapter, (str, list, tuple)):
        raise ValueError(f"set_adapter takes an adapter name or a list of names, got {adapter!r}; "
                         f"this model has {list(state.adapters)} (`with lorakit.disable_adapters(model):` computes the base)")
    names = [adapter] if isinstance(adapter, str) else list(dict.fromkeys(adapter))  # a name applies once
    if not names:
        raise ValueError(f"set_adapter got an empty list; name at least one of {list(state.adapters)} "
                         "(`with lorakit.disable_adapters(model):` computes the base model)")
    unknown = [n for n in names if n not in state.adapters]
    if unknown:
        raise ValueError(f"no adapter named {unknown}; this model has {list(state.adapters)}")
    activate(model, names)


def activate(model: nn.Module, names: list[str], merged: bool | None = None, freeze_base: bool = False) -> None:
    """Make `names` the active adapters, merged into the base weights or not (None: merged if the model is
    merged now, or was merged and its merged adapter deleted); all checks before any change. `freeze_base`
    (inject) also freezes every other parameter."""
    state = get_state(model)
    check_not_mixed(model, "change the active adapters")
    if merged is None:
        merged = is_merged(model)
    if merged:
        check_mergeable(model, names)
    heads: list[tuple[SavedModule, str | None]] = []
    for path, module in model.named_modules():
        if isinstance(module, SavedModule):
            owners = [n for n in names if n in module.modules_to_save]
            if len(owners) > 1:
                raise ValueError(
                    f"adapters {owners} each have their own copy of {path!r} (modules_to_save), and only one can "
                    "run at a time; activate one of them, or use mixed_batch to give rows different adapters"
                )
            heads.append((module, owners[0] if owners else None))
    layers = [(path, layer, [n for n in names if n in layer.lora_specs]) for path, layer in lora_layers(model)]
    # one fused pass per layer: W ← W0 + ΔW_new (exact W0 kept while merged, so no drift); all layers or none
    set_merged_all([(path, layer, own if merged else []) for path, layer, own in layers])
    for _, layer, own in layers:
        layer.active_adapters = own
    for module, owner in heads:
        module.active = owner
    state.active = names
    state.merged = merged
    _refresh_trainable(model, freeze_base)


def _refresh_trainable(model: nn.Module, freeze_base: bool = False) -> None:
    """Of lorakit's tensors (every adapter's A, B, saved copies and trained biases) only the active adapters'
    require grad. Other parameters keep the flags their owner set, as in PEFT's set_adapter; `freeze_base`
    (inject, as PEFT's) freezes them."""
    state = get_state(model)
    # found from the records, not by walking the model: this runs on every (merged) swap
    params = all_params(model) if any(r.bias_params for r in state.adapters.values()) else {}
    owned: dict[str, dict[int, nn.Parameter]] = {}
    for name, record in state.adapters.items():
        mine = owned[name] = {}
        for path in record.layers:
            layer = model.get_submodule(path)
            mine.update((id(store[name]), store[name]) for store in (layer.lora_A, layer.lora_B, layer.lora_B_bias) if name in store)
        for path in record.saved_modules:
            mine.update((id(p), p) for p in saved_copy(model, path, name).parameters())
        mine.update((id(params[n]), params[n]) for n in record.bias_params)
    managed = {i: p for mine in owned.values() for i, p in mine.items()}
    trainable = set().union(*(owned[n] for n in state.active))
    for p in model.parameters() if freeze_base else managed.values():
        p.requires_grad_(id(p) in trainable)


def adapter_parameters(model: nn.Module, adapter: str | None = None) -> dict[str, nn.Parameter]:
    """The adapter's trainable tensors by model parameter name (found by walking the LoRA layers)."""
    name = resolve_adapter(model, adapter)
    record = get_state(model).adapters[name]
    modules = dict(model.named_modules())
    out: dict[str, nn.Parameter] = {}
    for path in record.layers:
        layer = modules[path]
        for store_name in ("lora_A", "lora_B", "lora_B_bias"):
            store = getattr(layer, store_name)
            if name in store:
                out[f"{path}.{store_name}.{name}"] = store[name]
    for path in record.saved_modules:
        for pname, p in saved_copy(model, path, name).named_parameters():
            out[f"{path}.modules_to_save.{name}.{pname}"] = p
    params = all_params(model)
    for pname in record.bias_params:
        out[pname] = params[pname]
    return out


def adapter_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, Tensor]:
    """Adapter tensors keyed as in PEFT's ``adapter_model.safetensors``.

    ``base_model.model.<path>.lora_A.weight`` / ``lora_B.weight`` (``lora_embedding_A/B`` for
    embeddings, ``lora_B.bias`` for `lora_bias`); saved modules and trained biases under their
    own names (``<layer>.base_layer.bias`` inside an adapted layer, as PEFT), as are base weights that
    came with a PEFT file (a resized embedding). Fused-slice layers are written as the equivalent
    dense, block-structured B.
    """
    name = resolve_adapter(model, adapter)
    state = get_state(model)
    if state.open_block == "disable_adapters":
        raise ValueError(f"cannot save adapter {name!r} inside a disable_adapters block: its trained biases and loaded "
                         "base weights hold the base model's values there; save after the block")
    record = state.adapters[name]
    modules = dict(model.named_modules())
    out: dict[str, Tensor] = {}
    for path in record.layers:
        layer: LoraLayer = modules[path]
        spec = layer.lora_specs[name]
        A, B = layer.lora_A[name].detach(), layer.lora_B[name].detach()
        if spec.enabled is not None:
            B = expand_sliced_B(B, list(spec.enabled))
        if layer.is_embedding:
            out[f"{PREFIX}{path}.lora_embedding_A"] = A
            out[f"{PREFIX}{path}.lora_embedding_B"] = B
        else:
            out[f"{PREFIX}{path}.lora_A.weight"] = A
            out[f"{PREFIX}{path}.lora_B.weight"] = B
        if name in layer.lora_B_bias:  # as the layer applies it: zero on fused slices the adapter leaves alone
            out[f"{PREFIX}{path}.lora_B.bias"] = layer.lora_bias(name).detach()
    for path in record.saved_modules:
        for key, t in saved_copy(model, path, name).state_dict().items():
            out[f"{PREFIX}{path}.{key}"] = t.detach()
    params = all_params(model)
    for pname in record.bias_params + record.base_params:
        out[f"{PREFIX}{peft_param_name(pname, record.layers)}"] = _unmerged_value(modules, pname, params[pname])
    return out


def _unmerged_value(modules: dict[str, nn.Module], pname: str, param: Tensor) -> Tensor:
    """`param`'s value without merged updates: a merged layer's weight and bias hold W0 + ΔW, its exact
    pre-merge copies (``lora_w0``, ``lora_b0``) what an adapter file must carry."""
    path, _, leaf = pname.rpartition(".")
    kept = modules[path]._buffers.get({"weight": "lora_w0", "bias": "lora_b0"}.get(leaf, ""))
    return (kept if kept is not None else param).detach()


def peft_param_name(pname: str, adapted: list[str]) -> str:
    """PEFT's name for base parameter `pname`: ``<layer>.base_layer.<leaf>`` when its layer carries LoRA."""
    path, _, leaf = pname.rpartition(".")
    return f"{path}.base_layer.{leaf}" if path in adapted else pname


def delete_adapter(model: nn.Module, adapter: str) -> None:
    """Remove adapter `adapter` and free its tensors; layers left with no adapter become plain.

    Its copies of `modules_to_save` go (the base modules return when no copy is left) and the
    biases it trained get their base values back. The other active adapters stay active; if it was
    the only one, none is (the model computes its base; unlike PEFT, no other adapter is picked) until
    `set_adapter`, which merges it if the model was merged.
    """
    from .injection import _drop_empty_layers

    state = get_state(model)
    check_not_mixed(model, f"delete adapter {adapter!r}")
    name = resolve_adapter(model, adapter)
    record = state.adapters[name]
    layers = lora_layers(model)
    # merged with others: what stays merged must fit the weights' dtype, checked (all layers or none) before any change
    set_merged_all([(path, layer, [n for n in layer.merged_adapters if n != name])
                    for path, layer in layers if name in layer.merged_adapters])
    for _, layer in layers:
        if name in layer.lora_specs:
            layer.remove_adapter(name)
    for path in record.saved_modules:
        remove_copy(model, path, name)
    del state.adapters[name]
    restore_base_values(model, record, keep=frozenset(p for r in state.adapters.values() for p in r.base_values))
    params = all_params(model)
    for pname in record.bias_params:  # base parameters again, frozen as inject left them
        params[pname].requires_grad_(False)
    state.active = [n for n in state.active if n != name]
    _drop_empty_layers(model)
    if not state.adapters:
        drop_state(model)  # every flag as before injection


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as its base (merged adapters are unmerged, trained biases
    hold their base values, saved modules are the base modules; all restored after). Adapters cannot be
    changed inside it (its exit restores them as they were); a nested block changes nothing."""
    state = get_state(model, required=False)
    if state is not None and state.open_block == "disable_adapters":
        yield model
        return
    check_not_mixed(model, "disable adapters")  # the block's hooks rely on the layers' switches
    layers = [layer for _, layer in lora_layers(model)]
    merged = {id(layer): list(layer.merged_adapters) for layer in layers}
    disabled = {id(layer): layer.lora_disabled for layer in layers}
    heads = [(module, module.active) for module in wrappers(model)]
    records = list(state.adapters.values()) if state else []
    params = all_params(model) if any(r.base_values for r in records) else {}
    changed: dict[str, Tensor] = {}
    try:
        for layer in layers:  # unmerged first: a merged bias holds its adapter's lora_bias too
            layer.set_merged([])
            layer.lora_disabled = True
        changed = {n: params[n].detach().clone() for r in records for n in r.base_values}
        for record in records:
            restore_base_values(model, record, params=params)
        for module, _ in heads:
            module.active = None
        if state is not None:
            state.open_block = "disable_adapters"
        yield model
    finally:
        if state is not None:
            state.open_block = None
        with torch.no_grad():
            for n, value in changed.items():
                params[n].copy_(value)
        for module, active in heads:
            module.active = active
        for layer in layers:
            layer.lora_disabled = disabled[id(layer)]
            layer.set_merged(merged[id(layer)])  # as it was, in one pass (it fitted)


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    check_module(model)
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    return list(seen.values())


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors count once."""
    params = _unique_params(model)
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def summary(model: nn.Module) -> str:
    """A table of the adapted layers (module, shape, adapter, r, alpha, params) with totals and %."""
    check_module(model)
    rows = [("module", "type", "shape (out×in)", "adapter", "r", "alpha", "params", "state")]
    adapter_params = 0
    for path, layer in lora_layers(model):
        d_out, d_in = layer.base_shape()
        for name, spec in layer.lora_specs.items():
            n = sum(store[name].numel() for store in (layer.lora_A, layer.lora_B, layer.lora_B_bias) if name in store)
            adapter_params += n
            kind = layer._lora_base_class.__name__ + (f"[{''.join('x' if e else '-' for e in spec.enabled)}]" if spec.enabled else "")
            status = "merged" if name in layer.merged_adapters else ("active" if name in layer.active_adapters else "inactive")
            rows.append((path, kind, f"{d_out}×{d_in}", name, str(spec.r), f"{spec.alpha:g}", f"{n:,}", status))
    trainable, total = trainable_parameters(model)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    pct = 100.0 * trainable / total if total else 0.0
    lines.append("")
    lines.append(f"LoRA layers: {len(rows) - 1}   adapter params: {adapter_params:,}")
    lines.append(f"trainable params: {trainable:,} / {total:,} ({pct:.4f}%)")
    return "\n".join(lines)


def init_adapters(model: nn.Module, adapter: str | None = None) -> None:
    """Initialise adapter `adapter` (default: every adapter) as `inject` does: A random, B zero.

    For models built on the meta device: ``inject`` there, ``model.to_empty(device=...)``, load the
    base weights, then call this (``to_empty`` leaves the adapters uninitialised memory).
    """
    state = get_state(model)
    check_not_mixed(model, "initialise adapters")
    names = [resolve_adapter(model, adapter)] if adapter is not None else list(state.adapters)
    for _, layer in lora_layers(model):
        for name in names:
            if name in layer.lora_specs:
                if name in layer.merged_adapters:
                    raise ValueError(f"adapter {name!r} is merged into the base weights: lorakit.unmerge(model) first")
                if layer.lora_A[name].is_meta:
                    raise ValueError(f"adapter {name!r} is still on the meta device: call model.to_empty(device=...) first")
                layer.reset_adapter(name, state.adapters[name].config.init)


@torch.no_grad()
def randomize_adapters(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Fill every A and B with small random values (B is zero after init): for tests and demos of merging."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        for store in (layer.lora_A, layer.lora_B, layer.lora_B_bias):
            for p in store.values():
                if not p.is_meta:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
