"""Model-level bookkeeping: which adapters a model carries and how they were configured.

Stored on the root module as ``model._lorakit`` (a plain attribute, not a submodule, so it never
appears in ``state_dict``). Layer-level state lives in the LoRA layers themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .config import LoraConfig
from .layers import LoraLayer

DEFAULT_ADAPTER = "default"


@dataclass
class AdapterRecord:
    """One named adapter: its config and the module paths it touches."""

    config: LoraConfig
    layers: list[str]
    saved_modules: list[str] = field(default_factory=list)
    bias_params: list[str] = field(default_factory=list)
    base_params: list[str] = field(default_factory=list)  # adapted layers' own weights loaded from a PEFT file


@dataclass
class LoraState:
    """All adapters on a model, the active ones, and the requires_grad flags before injection."""

    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    requires_grad: dict[str, bool] = field(default_factory=dict)


def get_state(model: nn.Module, required: bool = True) -> LoraState | None:
    """The model's `LoraState`; raises a clear error if it has no adapters and `required`."""
    state = model.__dict__.get("_lorakit")
    if state is None and required:
        raise ValueError(
            f"{type(model).__name__} carries no lorakit adapter: call lorakit.inject(model, config) "
            "or lorakit.load_adapter(model, path) first"
        )
    return state


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """(path, layer) for every LoRA layer in the model, in module order."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoraLayer)]


def resolve_adapter(model: nn.Module, adapter: str | None) -> str:
    """Name of `adapter`, or of the single active adapter when None; errors name the choices."""
    state = get_state(model)
    if adapter is None:
        if len(state.active) != 1:
            raise ValueError(
                f"{len(state.active)} adapters are active ({state.active}); pass adapter=<name>, "
                f"one of {list(state.adapters)}"
            )
        return state.active[0]
    if adapter not in state.adapters:
        raise ValueError(f"no adapter named {adapter!r}; this model has {list(state.adapters)}")
    return adapter
