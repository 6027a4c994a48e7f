"""Fold adapters into the base weights and back, or take lorakit out of the model entirely.

Merges are explicit and tracked per layer: merging twice changes nothing, unmerging restores
W0 (to fp32 round-off), and nothing merges as a side effect of ``eval()``.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import LoraLayer, detach
from .saved import SavedModule, unwrap
from .state import AdapterRecord, all_params, check_not_mixed, drop_state, get_state, lora_layers


def merge(model: nn.Module, adapter: str | list[str] | None = None) -> nn.Module:
    """W ← W + (alpha/r)·B·A for the active adapters (or `adapter`); idempotent."""
    state = get_state(model)
    check_not_mixed(model, "merge")
    names = state.active if adapter is None else ([adapter] if isinstance(adapter, str) else list(adapter))
    unknown = [n for n in names if n not in state.adapters]
    if unknown:
        raise ValueError(f"cannot merge {unknown}: no such adapter on this model; it has {list(state.adapters)}")
    check_mergeable(model, names)
    set_merged_all([(path, layer, [*layer.merged_adapters, *(n for n in names if n in layer.lora_specs)])
                    for path, layer in lora_layers(model)])
    state.merged = True
    return model


def set_merged_all(todo: list[tuple[str, LoraLayer, list[str]]]) -> None:
    """Merge exactly `names` into each (path, layer, names), all or nothing: if one layer cannot (its merged
    weight would overflow an fp16 base), the layers done so far go back to what they held."""
    done: list[tuple[LoraLayer, list[str]]] = []
    for path, layer, names in todo:
        before = list(layer.merged_adapters)
        try:
            layer.set_merged(names)
        except ValueError as e:
            for undone, held in reversed(done):
                undone.set_merged(held)
            raise ValueError(f"cannot merge into {path!r}: {e}") from e
        done.append((layer, before))


def check_mergeable(model: nn.Module, names: list[str]) -> None:
    """Raise, naming the layer and the fix, if merging `names` would need a missing bias or change a tied weight."""
    shared: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(pname)
    for path, layer in lora_layers(model):
        if layer.weight.is_meta and any(n in layer.lora_specs for n in names):
            raise ValueError(
                f"cannot merge: the model is on the meta device ({path!r} holds no values yet), and a merge made now "
                "would unmerge to uninitialised memory after to_empty; load the base weights (to_empty + "
                "load_state_dict) first, or use merge_and_unload for the plain (meta) model"
            )
        if getattr(layer, "bias", None) is None and any(n in layer.lora_B_bias for n in names):
            raise ValueError(
                f"cannot merge: {path!r} has a lora_bias but no base bias to fold it into; "
                "keep the adapter unmerged, or inject with lora_bias=False"
            )
        merging = [n for n in names if n in layer.lora_specs and n not in layer.merged_adapters]
        tied = [t for t in shared[id(layer.weight)] if t != f"{path}.weight" and not _replaced_by_copies(model, t, merging)
                and model.get_submodule(t.rpartition(".")[0]) is not layer]  # the layer itself under another name
        if tied and merging:
            raise ValueError(
                f"cannot merge into {path!r}: its weight is tied to {tied}, which would change too (tied input "
                "embeddings and output head). Untie it first, e.g. model.lm_head.weight = "
                "nn.Parameter(model.lm_head.weight.detach().clone()); model.config.tie_word_embeddings = False; "
                "or keep the adapter unmerged"
            )


def _replaced_by_copies(model: nn.Module, pname: str, names: list[str]) -> bool:
    """Whether `pname` is the base module of a `modules_to_save` wrapper in which every adapter in `names` has its own
    copy: while they are merged their copy computes, so a tied base weight (an untied head copy) may change."""
    head, sep, _ = pname.partition(".original_module.")
    if not sep:
        return False
    wrapper = model.get_submodule(head) if head else model
    return isinstance(wrapper, SavedModule) and all(n in wrapper.modules_to_save for n in names)


def unmerge(model: nn.Module) -> nn.Module:
    """Undo every merge (W0 back from its exact copy); idempotent."""
    state = get_state(model)
    check_not_mixed(model, "unmerge")
    for _, layer in lora_layers(model):
        layer.set_merged([])  # never one adapter at a time: a subset of merged adapters need not fit an fp16 weight
    state.merged = False
    return model


def _strip(model: nn.Module, keep_merged: bool) -> nn.Module:
    state = get_state(model)  # a clear error if the model carries no adapter
    check_not_mixed(model, "unload the adapters")
    for _, layer in lora_layers(model):
        if not keep_merged:
            layer.set_merged([])
        detach(layer)
    if not keep_merged:
        for record in state.adapters.values():
            restore_base_values(model, record)
    unwrap(model, keep=state.active if keep_merged else [])
    drop_state(model)
    return model


@torch.no_grad()
def restore_base_values(model: nn.Module, record: AdapterRecord, keep: frozenset[str] = frozenset(),
                        params: dict[str, nn.Parameter] | None = None) -> None:
    """Put back the base values of the parameters `record`'s adapter changed (trained biases, base weights loaded
    from its file), except those in `keep` (still held by another adapter). In a merged layer the value goes into
    its exact unmerged copy and the merge is redone, so unmerging later gives the base value too. `params`:
    `all_params(model)` when the caller has it (walking every parameter is the costly part)."""
    todo = {pname: value for pname, value in record.base_values.items() if pname not in keep}
    if todo and params is None:
        params = all_params(model)
    for pname, value in todo.items():
        layer = model.get_submodule(pname.rpartition(".")[0])
        merged = list(layer.merged_adapters) if isinstance(layer, LoraLayer) else []
        if merged:
            layer.set_merged([])
        params[pname].copy_(value)
        if merged:
            layer.set_merged(merged)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the active adapters into W and return the plain model (no lorakit types left).

    Inference then costs exactly what the base model costs (the paper's Sec. 4.2). A module the
    active adapter trained whole (``modules_to_save``) is replaced by its trained copy.
    """
    get_state(model)  # the clear errors for a non-module or a model without adapters come first
    if not all(layer.weight.is_meta for _, layer in lora_layers(model)):  # all on meta: no values to fold
        merge(model)  # some on meta (offloaded): an error, never a model with some adapters silently dropped
    return _strip(model, keep_merged=True)


def unload(model: nn.Module) -> nn.Module:
    """Drop every adapter and return the plain model as it was: merges undone, trained biases and saved modules back to base."""
    return _strip(model, keep_merged=False)
