"""Model-level bookkeeping: which adapters a model carries and how they were configured.

Stored on the root module as ``model._lorakit`` (a plain attribute, not a submodule, so it never
appears in ``state_dict``). Layer-level state lives in the LoRA layers themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

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
    base_values: dict[str, Tensor] = field(default_factory=dict)  # base values of the parameters it changes (trained
    # biases, base weights loaded from its file): put back on delete/unload and inside disable_adapters
    base_params: list[str] = field(default_factory=list)  # adapted layers' own weights loaded from a PEFT file


@dataclass
class LoraState:
    """All adapters on a model, the active ones, the requires_grad flags before injection and lorakit's hooks."""

    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    hooks: list[RemovableHandle] = field(default_factory=list)
    open_block: str | None = None  # "mixed_batch" / "disable_adapters" while such a block is open
    merged: bool = False  # merge() was called (and no unmerge() since): set_adapter merges what it activates


#: Attribute names of PyTorch's module and parameter dicts, which adapter names key: a clash breaks them.
RESERVED_NAMES = frozenset(dir(nn.ModuleDict()) + dir(nn.ParameterDict()))


def check_adapter_name(name: object) -> None:
    """Adapter names key PyTorch module dicts: a non-empty string without '.', not one of their attributes."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r} (e.g. 'sql', 'v1_2')")
    if name in RESERVED_NAMES:
        raise ValueError(f"adapter name {name!r} is reserved (an attribute of PyTorch's module dicts); "
                         f"pick another, e.g. {name + '_adapter'!r}")


def check_not_mixed(model: nn.Module, action: str) -> None:
    """Raise if a `mixed_batch` or `disable_adapters` block is open on `model`: each restores the adapters as
    they were on entry, so a change made inside would be undone or mixed up on exit."""
    state = get_state(model, required=False)
    if state is not None and state.open_block is not None:
        raise ValueError(f"cannot {action} inside a {state.open_block} block: leave the block first")


def _contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of the output head: hand it a contiguous input.

    transformers' ``generate`` feeds the head ``hidden[:, -1:, :]`` (not contiguous for batch > 1),
    and for a weight that does not require grad ``torch.matmul`` then expands the weight per row
    and runs a batched matmul: on SmolLM2 (49,152 × 576) at batch 16 a ~0.9 GB copy and ~1.2 s
    instead of ~5 ms. Injecting freezes the head, so lorakit pays the (batch × hidden) copy instead.
    """
    x = args[0] if args else None
    if isinstance(x, Tensor) and x.dim() > 2 and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def create_state(model: nn.Module) -> LoraState:
    """Attach a new `LoraState` to `model`: record every requires_grad flag, hook the output head."""
    state = LoraState(requires_grad={name: p.requires_grad for name, p in model.named_parameters()})
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, nn.Linear):
        state.hooks.append(head.register_forward_pre_hook(_contiguous_input))
    model.__dict__["_lorakit"] = state
    return state


def drop_state(model: nn.Module) -> None:
    """Undo `create_state`: requires_grad flags as before injection, hooks removed, state gone."""
    state = model.__dict__.pop("_lorakit")
    for name, p in model.named_parameters():
        if name in state.requires_grad:
            p.requires_grad_(state.requires_grad[name])
    for handle in state.hooks:
        handle.remove()
    for module in model.modules():  # copies of a hooked head (modules_to_save) carry the hook too
        for key in [k for k, hook in module._forward_pre_hooks.items() if hook is _contiguous_input]:
            del module._forward_pre_hooks[key]


def is_merged(model: nn.Module) -> bool:
    """Whether the model serves merged: `merge` was called and no `unmerge` since (also while its merged adapter
    is deleted and nothing is merged), or some layer holds a merge."""
    state = get_state(model)
    return state.merged or any(layer.merged_adapters for _, layer in lora_layers(model))


def check_module(model: object) -> None:
    """A TypeError that says what to do when `model` is not a module (e.g. a model name passed by mistake)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}; load it first "
                        "(e.g. lorakit.models.load_model(name) or transformers' from_pretrained)")


def check_not_peft(model: nn.Module) -> None:
    """Refuse a model that carries PEFT's own adapter layers (a ``PeftModel``): lorakit would stack on them."""
    peft_layer = next((m for m in model.modules() if type(m).__module__.startswith("peft.")), None)
    if peft_layer is not None:
        raise ValueError(
            f"this model carries PEFT adapters ({type(peft_layer).__name__} from {type(peft_layer).__module__}); lorakit "
            "adapts plain models. To go on with a PEFT adapter, save it (peft_model.save_pretrained(folder)) and load it "
            "into the plain base with lorakit.load_adapter(base_model, folder); for the base alone, use peft_model.unload()"
        )


def get_state(model: nn.Module, required: bool = True) -> LoraState | None:
    """The model's `LoraState`; raises a clear error if it has no adapters and `required`, or is no module."""
    check_module(model)  # every public function that takes a model passes through here first
    state = model.__dict__.get("_lorakit")
    if state is None and required:
        raise ValueError(
            f"{type(model).__name__} carries no lorakit adapter: call lorakit.inject(model, config) "
            "or lorakit.load_adapter(model, path) first"
        )
    return state


def all_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter by every name it has: a tied weight under each of its names (``lm_head.weight`` too)."""
    return dict(model.named_parameters(remove_duplicate=False))


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
