"""Model surgery: find the target modules, turn them into LoRA layers, freeze the rest.

`inject` plans everything first (matching, shapes, validation) and only then touches the
model, so a bad config leaves the model exactly as it was.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass

from torch import nn

from .config import LoraConfig, match_pattern_key, pattern_matches
from .layers import LoraLayer, LoraSpec, adapter_shapes, attach, base_shape, is_conv1d_gpt2, supports
from .saved import SavedModule, add_copy, inner_paths, remove_copy
from .state import (
    DEFAULT_ADAPTER,
    AdapterRecord,
    LoraState,
    all_params,
    check_adapter_name,
    check_not_mixed,
    check_not_peft,
    create_state,
    drop_state,
    get_state,
    lora_layers,
)

#: The paper's default targets (Wq, Wv) for common architectures, by ``config.model_type``. transformers renames
#: projections between versions (ViT's and DeiT's query/value became q_proj/v_proj): names a model lacks give way
#: to `FALLBACK_TARGETS`.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{t: ["q_proj", "v_proj"] for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "opt",
        "bart", "mbart", "gptj", "gpt_neo", "olmo", "olmo2", "starcoder2", "stablelm", "whisper",
        "granite", "cohere", "smollm3", "marian", "pegasus", "blenderbot", "m2m_100", "nllb-moe", "vit", "deit",
    )},
    **{t: ["query", "value"] for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "layoutlm")},
    **{t: ["q", "v"] for t in ("t5", "mt5", "umt5", "longt5", "mpnet")},
    "distilbert": ["q_lin", "v_lin"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "albert": ["query", "value"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "mpt": ["Wqkv"],
    "phi3": ["qkv_proj"],
    "codegen": ["qkv_proj"],  # fused q/v/k in model-parallel chunks: adapted whole, as PEFT does
}
#: Fused projections whose q/k/v are contiguous equal slices: adapt only q and v (loralib's MergedLinear).
DEFAULT_ENABLE_LORA: dict[str, dict[str, list[bool]]] = {"gpt2": {"c_attn": [True, False, True]}}
#: Top-level children that are a task's output head (sequence/token classification, QA): never "all-linear" targets.
HEAD_NAMES = ("classifier", "score", "classification_head", "qa_outputs")
#: Name pairs tried, in order, on models of unknown type or without their type's names.
FALLBACK_TARGETS = (["q_proj", "v_proj"], ["query", "value"], ["q_lin", "v_lin"], ["q", "v"], ["wq", "wv"])


@dataclass
class Planned:
    """One module `inject` will adapt, with its resolved per-layer hyper-parameters."""

    path: str
    module: nn.Module
    spec: LoraSpec


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def resolve_config(model: nn.Module, cfg: LoraConfig) -> LoraConfig:
    """A validated copy of `cfg` (fields set after construction are checked too) with `target_modules=None`
    filled in with the architecture's query/value projections."""
    if cfg.target_modules is not None:
        return cfg.replace()
    model_type = _model_type(model)
    if model_type in DEFAULT_ENABLE_LORA:
        enable = {**DEFAULT_ENABLE_LORA[model_type], **cfg.enable_lora}
        return cfg.replace(target_modules=list(DEFAULT_ENABLE_LORA[model_type]), enable_lora=enable)
    leaf_names = {path.rsplit(".", 1)[-1] for path, m in model.named_modules() if supports(m)}
    own = [DEFAULT_TARGETS[model_type]] if model_type in DEFAULT_TARGETS else []
    for names in (*own, *FALLBACK_TARGETS):
        if set(names) <= leaf_names:
            return cfg.replace(target_modules=list(names))
    lacks = f", which lacks its type's {own[0]}" if own else ""
    raise ValueError(
        f"cannot pick default target modules for {type(model).__name__} (model_type={model_type!r}{lacks}): "
        f"pass target_modules=[...], e.g. from its adaptable layers: {_adaptable_names(model)}"
    )


def output_head_paths(model: nn.Module) -> set[str]:
    """Paths of the output head(s) that ``"all-linear"`` leaves alone: the LM head and task heads (`HEAD_NAMES`)."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for path, m in model.named_modules():
        if (out is not None and m is out) or (out is None and path in ("lm_head", "output")):
            heads.add(path)
        if path.split(".", 1)[0] in HEAD_NAMES:
            heads.add(path)
    return heads


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d_gpt2(module)


def _name_match(names: list[str] | str, path: str) -> bool:
    """PEFT's rule: a list matches the path or its dotted suffix; a string is a full-path regex."""
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path == n or path.endswith("." + n) for n in names)


def _layer_index(path: str, patterns: list[str] | str | None) -> int | None:
    """The block index in `path` (the first numbered segment, or after `patterns`)."""
    if not patterns:
        match = re.match(r"(?:.*?\.)?[^.]*\.(?P<idx>\d+)\.", path)  # blocks may sit at the top level (layers.3.q)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match:
                break
    return int(match.group("idx")) if match else None


def saved_name_matches(path: str, name: str) -> bool:
    """PEFT's `modules_to_save` rule: a plain suffix match (``"norm"`` also saves ``input_layernorm``), so
    adapter files carry the same modules in both libraries."""
    return path.endswith(name)


def is_saved_module(path: str, modules_to_save: list[str] | None) -> bool:
    """Whether `path` is (inside) one of `modules_to_save`."""
    if not modules_to_save:
        return False
    parts = path.split(".")
    ancestors = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(saved_name_matches(a, m) for a in ancestors for m in modules_to_save)


def _warn_unmatched(cfg: LoraConfig, adapted: list[str]) -> None:
    """Warn (as PEFT does) about rank_pattern / alpha_pattern keys that match no adapted layer, naming a few
    adapted layers to match instead. (An exclude_modules name that matches nothing is often defensive: no warning.)"""
    unmatched = [f"{field}[{key!r}]" for field in ("rank_pattern", "alpha_pattern") for key in getattr(cfg, field)
                 if not any(pattern_matches(key, p) for p in adapted)]
    if unmatched:
        warnings.warn(f"{', '.join(unmatched)} matched no adapted layer and changed nothing; adapted layers are "
                      f"named like {adapted[:3]}", stacklevel=4)


def plan(model: nn.Module, cfg: LoraConfig, adapter: str = DEFAULT_ADAPTER, strict: bool = True) -> list[Planned]:
    """Which modules `cfg` adapts and with what spec; raises before anything changes.

    `strict` also rejects each name in a `target_modules` list that matches nothing.
    """
    cfg = resolve_config(model, cfg)
    targets = cfg.target_modules
    all_linear = isinstance(targets, str) and targets == "all-linear"
    heads = output_head_paths(model) if all_linear else set()
    layers = [cfg.layers] if isinstance(cfg.layers, int) else cfg.layers
    planned: list[Planned] = []
    hit: set[str] = set()
    named: list[str] = []  # what the targets name before exclude_modules, layers and modules_to_save filter it
    in_saved: list[str] = []  # targets left out only because they sit inside modules_to_save
    wrapped = inner_paths(model)  # other adapters' saved modules and the base modules behind them
    for path, module in model.named_modules():
        if not path or path in wrapped:
            continue
        if isinstance(targets, list):  # a name that matches only excluded modules is no typo
            hit.update(n for n in targets if path == n or path.endswith("." + n))
        if all_linear:
            if not _is_linear(module) or path in heads:
                continue
        elif not _name_match(targets, path):
            continue
        named.append(path)
        if cfg.exclude_modules and _name_match(cfg.exclude_modules, path):
            continue
        exact = isinstance(targets, list) and path in targets  # a full path is taken as named (PEFT: no layer filter)
        if layers is not None and not exact and _layer_index(path, cfg.layers_pattern) not in layers:
            continue
        if is_saved_module(path, cfg.modules_to_save):
            in_saved.append(path)
            continue
        if isinstance(module, SavedModule):
            raise ValueError(
                f"target {path!r} is saved whole by adapters {list(module.modules_to_save)} (modules_to_save), so it "
                "cannot also carry LoRA; target other modules, or delete those adapters first"
            )
        if not supports(module):
            inside = _adaptable_names(module)[:6]
            hint = (f"Name the linear layers inside it instead, e.g. {inside}" if inside else
                    f"It holds no layer lorakit can adapt; the adaptable layers of this model are named {_adaptable_names(model)[:12]}")
            raise ValueError(
                f"target {path!r} is a {type(module).__name__}; lorakit adapts nn.Linear, GPT-2 Conv1D, "
                f"nn.Embedding and nn.Conv1d/2d/3d. {hint}"
            )
        reason = _unadaptable(model, path, module)
        if reason is not None:
            if all_linear:  # every linear layer that LoRA can change
                continue
            raise ValueError(f"target {path!r} cannot carry LoRA: {reason}")
        if isinstance(module, LoraLayer) and adapter in module.lora_specs:
            raise ValueError(
                f"adapter {adapter!r} is already injected (at {path!r}); pick another name with "
                f"adapter=..., or lorakit.delete_adapter(model, {adapter!r}) first"
            )
        spec = _spec_for(path, cfg)
        if spec.enabled is not None and not _is_linear(module):
            raise ValueError(
                f"enable_lora[{match_pattern_key(cfg.enable_lora, path)!r}] matches {path!r} ({type(module).__name__}): "
                "enable_lora (fused-projection slices) applies to linear layers (nn.Linear, GPT-2 Conv1D) only; "
                "narrow the key to the fused projections"
            )
        planned.append(Planned(path, module, spec))
    missing = [n for n in targets if n not in hit] if isinstance(targets, list) else []
    if not planned and in_saved and not (strict and missing):
        raise ValueError(
            f"target_modules {targets!r} matched only modules inside modules_to_save {cfg.modules_to_save} (e.g. "
            f"{in_saved[0]!r}), which the adapter trains and saves whole, so they cannot also get LoRA; drop them from "
            "target_modules or from modules_to_save"
        )
    if not planned or (strict and missing):
        raise ValueError(_no_match_message(model, cfg, missing or targets, layers))
    unknown = [k for k in cfg.enable_lora if not any(pattern_matches(k, p) for p in named)]
    if strict and unknown:
        raise ValueError(_unknown_enable_lora_message(model, cfg, unknown[0], named))
    if strict:  # a key that matches no adapted layer is likely a typo
        _warn_unmatched(cfg, [p.path for p in planned])
    for p in planned:
        d_out, d_in = base_shape(p.module)
        d_upd = d_out // len(p.spec.enabled) if p.spec.enabled else d_out  # a fused slice's update is d_slice×d_in
        if p.spec.r > min(d_upd, d_in):
            warnings.warn(
                f"r={p.spec.r} exceeds min(d_out, d_in)={min(d_upd, d_in)} of layer {p.path!r}: "
                "the update cannot use that rank",
                stacklevel=3,
            )
        if p.spec.enabled is not None and d_out % len(p.spec.enabled):
            raise ValueError(
                f"enable_lora for {p.path!r} splits {d_out} outputs into {len(p.spec.enabled)} equal slices, "
                "which does not divide evenly"
            )
        if p.spec.lora_bias and isinstance(p.module, nn.Embedding):
            raise ValueError(f"lora_bias applies to linear and conv layers, not to the embedding {p.path!r}; exclude it")
        adapter_shapes(p.module, p.spec)  # raises for layouts lorakit cannot adapt, before any change
    return planned


def _unadaptable(model: nn.Module, path: str, module: nn.Module) -> str | None:
    """Why a supported layer type still cannot carry LoRA here (its owner or options bypass its forward), or None."""
    if isinstance(module, nn.Embedding) and module.sparse:
        return "it is an nn.Embedding(sparse=True), whose sparse gradients LoRA cannot use; build it with sparse=False"
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return ("it is an nn.Embedding(max_norm=...), which renormalises the looked-up rows in place, so "
                "merged and unmerged outputs differ; set max_norm=None or target other layers")
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups != 1:
        return (f"it is a grouped convolution (groups={module.groups}), which lorakit cannot adapt (PEFT can, unmerged "
                f"only); leave it out (exclude_modules=[{path!r}]) or target other layers")
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    if isinstance(parent, (nn.MultiheadAttention, nn.TransformerEncoderLayer)):
        return (f"its owner {type(parent).__name__} reads the weights directly in PyTorch's fused attention/"
                "encoder kernels, bypassing the layer's forward, so an adapter there would be silently ignored; "
                "target linear layers of your own modules instead")
    return None


def _spec_for(path: str, cfg: LoraConfig) -> LoraSpec:
    enabled = cfg.slices_for(path)
    return LoraSpec(
        r=cfg.rank_for(path),
        alpha=cfg.alpha_for(path),
        dropout=float(cfg.dropout),
        use_rslora=cfg.use_rslora,
        enabled=tuple(enabled) if enabled is not None else None,
        lora_bias=cfg.lora_bias,
    )


def _adaptable_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for path, m in model.named_modules():
        if path and supports(m) and _unadaptable(model, path, m) is None:
            names[path.rsplit(".", 1)[-1]] = None
    return list(names)


def _no_match_message(model: nn.Module, cfg: LoraConfig, missing, layers) -> str:
    names = _adaptable_names(model)
    paths = [p for p, _ in model.named_modules() if p]
    wanted = [missing] if isinstance(missing, str) else list(missing)
    close: list[str] = []
    for w in wanted:
        close += difflib.get_close_matches(w.rsplit(".", 1)[-1], names, n=3, cutoff=0.4)
        close += difflib.get_close_matches(w, paths, n=2, cutoff=0.6)
    close = list(dict.fromkeys(close))
    where = f" in layers {layers}" if layers is not None else ""
    msg = f"target_modules {missing!r} matched no module{where} of {type(model).__name__}."
    if isinstance(missing, str) and missing != "all-linear":
        msg += (r" A string is a regular expression over full module paths (as in PEFT), e.g. r'.*\.q_proj'; "
                f"to match module names, pass a list: [{missing!r}].")
    if cfg.exclude_modules:
        heads = output_head_paths(model)
        matched = [p for p, m in model.named_modules() if p and (_is_linear(m) and p not in heads if missing == "all-linear"
                                                               else _name_match(cfg.target_modules, p))]
        if matched and all(_name_match(cfg.exclude_modules, p) for p in matched):
            msg += f" All {len(matched)} modules it matches are excluded by exclude_modules={cfg.exclude_modules!r}."
    first = {id(m): p for p, m in model.named_modules()}
    pattern = missing if isinstance(missing, str) else wanted
    aliases = {p: first[id(m)] for p, m in model.named_modules(remove_duplicate=False)
               if p and p != first[id(m)] and missing != "all-linear" and _name_match(pattern, p)}
    if aliases:  # PyTorch (and so PEFT) lists a module reached under several names once, under its first name
        msg += (" " + "; ".join(f"{a!r} is the module {f!r} under a second name" for a, f in list(aliases.items())[:3])
                + ": one module object is adapted once, under its first name; target that name.")
    if close:
        msg += f" Closest names that exist: {close}."
    msg += f" Adaptable layers here are named: {names[:30]}"
    return msg


def _unknown_enable_lora_message(model: nn.Module, cfg: LoraConfig, key: str, named: list[str]) -> str:
    """Why enable_lora key `key` is refused: it matches none of the modules `named` by the targets, with close names."""
    leaves = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in named))
    plain = key.replace("\\.", ".")
    close = difflib.get_close_matches(plain.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.4)
    close = list(dict.fromkeys(close + difflib.get_close_matches(plain, named, n=2, cutoff=0.6)))
    hint = f" Closest targeted names: {close}." if close else ""
    return (
        f"enable_lora key {key!r} matches none of the modules target_modules {cfg.target_modules!r} names in "
        f"{type(model).__name__}, so its slices would be silently ignored (keys are regexes matched against the end "
        f"of the module path).{hint} Targeted modules are named: {leaves[:30]}"
    )


def inject(model: nn.Module, config: LoraConfig, adapter: str = DEFAULT_ADAPTER) -> nn.Module:
    """Add adapter `adapter` to `model` in place per `config`, make it the one that trains.

    The base weights are frozen; only A, B (plus the adapter's own copies of `modules_to_save`
    and biases per `config.bias`) require grad. On a merged model the merged adapters are
    unmerged first, so the new one trains against W0. Returns the same model object.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lorakit.LoraConfig, got {type(config).__name__}")
    check_adapter_name(adapter)
    check_not_mixed(model, f"add adapter {adapter!r}")
    state = get_state(model, required=False)
    check_not_peft(model)
    if state is not None and adapter in state.adapters:
        raise ValueError(
            f"adapter {adapter!r} is already injected; pick another name with adapter=..., or "
            f"lorakit.delete_adapter(model, {adapter!r}) first"
        )
    config = resolve_config(model, config)
    planned = plan(model, config, adapter)
    saved = _find_saved_modules(model, config.modules_to_save)
    _check_saved_not_adapted(model, adapter, saved)
    biases = _bias_params(model, config, [p.path for p in planned])
    _check_shared_biases(state, adapter, config.bias, biases)
    created = state is None
    if created:
        state = create_state(model)
    copied: list[str] = []
    try:
        for p in planned:
            layer = attach(p.module)
            layer.add_adapter(adapter, p.spec, init=config.init)
        for path in saved:
            add_copy(model, path, adapter)
            copied.append(path)
    except Exception:
        for path in copied:
            remove_copy(model, path, adapter)
        for p in planned:
            if isinstance(p.module, LoraLayer):
                p.module.remove_adapter(adapter)
        _drop_empty_layers(model)
        if created:
            drop_state(model)
        raise
    params = all_params(model)
    state.adapters[adapter] = AdapterRecord(
        config=config,
        layers=[p.path for p in planned],
        saved_modules=saved,
        bias_params=biases,
        base_values={n: params[n].detach().clone() for n in biases},
    )
    from .adapters import activate

    activate(model, [adapter], merged=False, freeze_base=True)
    return model


def _check_saved_not_adapted(model: nn.Module, adapter: str, saved: list[str]) -> None:
    """A module one adapter trains whole cannot hold another adapter's LoRA layers (its copy would carry them)."""
    for path in saved:
        adapted = {n for m in model.get_submodule(path).modules() if isinstance(m, LoraLayer) for n in m.lora_specs}
        if adapted:
            raise ValueError(
                f"adapter {adapter!r} saves {path!r} whole (modules_to_save), but adapters {sorted(adapted)} put LoRA "
                f"inside it; one module cannot be both. Delete those adapters first, or put {adapter!r} on a model of its own"
            )


def _check_shared_biases(state: LoraState | None, adapter: str, bias: str, biases: list[str]) -> None:
    """Trained biases live in the base model, shared by every adapter: allow them only on a model with one adapter."""
    if state is None or not state.adapters:
        return
    if biases:
        raise ValueError(
            f"adapter {adapter!r} trains biases (bias={bias!r}), which are the base "
            f"model's own and would change for the adapters already here ({list(state.adapters)}); use bias='none' "
            "(lora_bias=True gives an adapter its own bias), or put it on a model of its own"
        )
    owners = [n for n, record in state.adapters.items() if record.bias_params]
    if owners:
        raise ValueError(
            f"adapter {owners[0]!r} trains the base model's biases, so another adapter on the same model would "
            f"see them; delete_adapter(model, {owners[0]!r}) first or load {adapter!r} on a model of its own"
        )


def _find_saved_modules(model: nn.Module, modules_to_save: list[str] | None) -> list[str]:
    if not modules_to_save:
        return []
    wrapped = inner_paths(model)
    paths = [p for p, _ in model.named_modules() if p and p not in wrapped]
    found: list[str] = []
    for p in paths:  # named_modules lists a parent before its children: keep the outermost match
        if any(saved_name_matches(p, m) for m in modules_to_save) and not any(p.startswith(f + ".") for f in found):
            found.append(p)
    missing = [m for m in modules_to_save if not any(saved_name_matches(p, m) for p in found)]
    if missing:
        close = [c for m in missing for c in difflib.get_close_matches(m, paths, n=3, cutoff=0.5)]
        raise ValueError(f"modules_to_save {missing} matched no module; closest that exist: {close or paths[-5:]}")
    return found


def _bias_params(model: nn.Module, cfg: LoraConfig, layers: list[str]) -> list[str]:
    """The base biases `cfg.bias` trains; those of `modules_to_save` train in the adapter's own copy instead."""
    if cfg.bias == "none":
        return []
    wrapped = inner_paths(model)
    names = []
    for path, m in model.named_modules():
        if path in wrapped or is_saved_module(path, cfg.modules_to_save):
            continue
        bias = getattr(m, "bias", None)
        if isinstance(bias, nn.Parameter) and (cfg.bias == "all" or path in layers):
            names.append(f"{path}.bias" if path else "bias")
    return names


def _drop_empty_layers(model: nn.Module) -> None:
    from .layers import detach

    for _, layer in lora_layers(model):
        if not layer.lora_specs:
            detach(layer)
