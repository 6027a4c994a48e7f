"""Modules an adapter trains whole (``modules_to_save``, e.g. a classifier head): one copy per adapter.

The base module stays as it was; each adapter trains and saves its own copy, and the forward pass
uses the active adapter's copy (the base module when no active adapter has one, and inside
``disable_adapters``). In a mixed batch each row uses its own adapter's copy. This is PEFT's
``ModulesToSaveWrapper``, with its parameter names (``original_module``, ``modules_to_save.<name>``).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class SavedModule(nn.Module):
    """The base module plus one trainable copy per adapter; `active` picks the copy the forward uses."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.rows: list[str | None] | None = None  # set by mixed_batch: row i's adapter

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks (``weight``, ``out_features``) come from the module in use."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_modules" not in self.__dict__:  # while being copied or unpickled
                raise
        modules = self.__dict__["_modules"]
        active = self.__dict__.get("active")
        copies = modules["modules_to_save"]._modules
        return getattr(copies[active] if active in copies else modules["original_module"], name)

    def __setattr__(self, name: str, value) -> None:
        """A parameter set on the wrapper (``tie_weights`` setting ``lm_head.weight``) goes to the base module:
        the base stays tied as it was, each adapter's copy keeps its own trained weights."""
        modules = self.__dict__.get("_modules", {})
        if isinstance(value, nn.Parameter) and "original_module" in modules and name in modules["original_module"]._parameters:
            setattr(modules["original_module"], name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, *args, **kwargs):
        if self.rows is None:
            module = self.original_module if self.active is None else self.modules_to_save[self.active]
            return module(*args, **kwargs)
        return self._mixed(*args, **kwargs)

    def _mixed(self, x: Tensor, *args, **kwargs) -> Tensor:
        """Row i through its adapter's copy: the base module over all rows, each copy over its own rows."""
        rows = self.rows
        if any(r in self.modules_to_save for r in rows) and any(
                v is not None and not isinstance(v, (bool, int, float, str)) for v in (*args, *kwargs.values())):
            raise ValueError(
                f"mixed_batch: a module saved whole by adapters {list(self.modules_to_save)} takes inputs besides its "
                "input (attention masks, caches, position embeddings: a whole block?), which its rows' copies cannot "
                "split; mixed batches run saved heads, embeddings and norms per row. Use set_adapter for these adapters"
            )
        out = self.original_module(x, *args, **kwargs)
        if not any(r in self.modules_to_save for r in rows):
            return out
        n = x.shape[0]
        if n % len(rows):
            raise ValueError(
                f"mixed_batch: a module saved whole by adapters {list(self.modules_to_save)} got an input of batch size "
                f"{n} for {len(rows)} rows (its input is not one row per name, e.g. position ids), so its rows cannot "
                "use different copies; use set_adapter for these adapters"
            )
        rows = [r for r in rows for _ in range(n // len(rows))]  # generate repeats each row for beams / num_return_sequences
        for name in dict.fromkeys(r for r in rows if r in self.modules_to_save):
            index = torch.tensor([i for i, r in enumerate(rows) if r == name], device=x.device)
            part = self.modules_to_save[name](x.index_select(0, index), *args, **kwargs)
            out = out.index_copy(0, index, part.to(out.dtype))
        return out


def add_copy(model: nn.Module, path: str, adapter: str) -> nn.Module:
    """Give `adapter` its own copy of the module at `path` (wrapping it on first use); returns the copy."""
    parent, _, leaf = path.rpartition(".")
    owner = model.get_submodule(parent)
    module = getattr(owner, leaf)
    if not isinstance(module, SavedModule):
        module = SavedModule(module)
        setattr(owner, leaf, module)
    module.modules_to_save[adapter] = copy.deepcopy(module.original_module)
    return module.modules_to_save[adapter]


def remove_copy(model: nn.Module, path: str, adapter: str) -> None:
    """Drop `adapter`'s copy at `path`; the base module goes back in place when no copy is left."""
    parent, _, leaf = path.rpartition(".")
    owner = model.get_submodule(parent)
    wrapper = getattr(owner, leaf)
    del wrapper.modules_to_save[adapter]
    if wrapper.active == adapter:
        wrapper.active = None
    if not len(wrapper.modules_to_save):
        setattr(owner, leaf, wrapper.original_module)


def unwrap(model: nn.Module, keep: list[str] = ()) -> None:
    """Put back each wrapped module: the copy of the first adapter in `keep` that has one (a merged,
    unloaded model keeps the active adapter's head), else the base module."""
    for path, wrapper in [(p, m) for p, m in model.named_modules() if isinstance(m, SavedModule)]:
        parent, _, leaf = path.rpartition(".")
        chosen = next((wrapper.modules_to_save[n] for n in keep if n in wrapper.modules_to_save), wrapper.original_module)
        setattr(model.get_submodule(parent), leaf, chosen)


def saved_copy(model: nn.Module, path: str, adapter: str) -> nn.Module:
    """`adapter`'s copy of the module at `path`."""
    return model.get_submodule(path).modules_to_save[adapter]


def base_of(module: nn.Module) -> nn.Module:
    """The base module behind a wrapper (or `module` itself)."""
    return module.original_module if isinstance(module, SavedModule) else module


def wrappers(model: nn.Module) -> list[SavedModule]:
    """Every `SavedModule` in `model`."""
    return [m for m in model.modules() if isinstance(m, SavedModule)]


def inner_paths(model: nn.Module) -> set[str]:
    """Paths of the modules inside wrappers (the base module, the copies and all below): never targets."""
    prefixes = tuple(p + "." for p, m in model.named_modules() if isinstance(m, SavedModule))
    return {p for p, _ in model.named_modules() if prefixes and p.startswith(prefixes)}
