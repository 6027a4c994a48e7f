"""LoraConfig: what to adapt and how, validated when it is built.

Field names are lorakit's; `checkpoint.py` maps them to and from PEFT's `adapter_config.json`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

BIAS_CHOICES = ("none", "all", "lora_only")
INIT_CHOICES = ("kaiming", "gaussian")


@dataclass
class LoraConfig:
    """Hyper-parameters of one LoRA adapter.

    h = W0·x + scale·B·A·x with scale = alpha/r (or alpha/√r with `use_rslora`).

    - `target_modules`: list of names matched against the end of a module path (``"q_proj"``
      matches ``model.layers.0.self_attn.q_proj``), a regex string matched against the full
      path, ``"all-linear"`` (every linear layer but the output head: the LM head or a task head
      such as ``classifier``), or None (the query and
      value projections of a known architecture).
    - `exclude_modules`: same forms as `target_modules`; these are never adapted.
    - `layers` / `layers_pattern`: only adapt blocks with these indices (PEFT's
      ``layers_to_transform`` / ``layers_pattern``; an empty list means every block). As in PEFT, a
      target named by its full path is adapted whatever its block.
    - `rank_pattern` / `alpha_pattern`: per-module r / alpha, keys are regexes matched against
      the end of the module path.
    - `enable_lora`: fused projections adapted slice by slice (loralib's ``MergedLinear``):
      ``{"c_attn": [True, False, True]}`` splits c_attn's outputs in 3 equal parts and adapts
      q and v only. Keys are regexes matched against the end of the module path, like
      `rank_pattern`; they apply to linear layers (``nn.Linear``, GPT-2 ``Conv1D``) only. `inject`
      refuses a key that matches none of the modules `target_modules` names (a typo), counted
      before `exclude_modules`, `modules_to_save` and `layers` filter them.
    - `bias`: ``"none"``, ``"all"`` (every bias trains) or ``"lora_only"`` (biases of adapted
      layers train). `lora_bias` gives B a trainable bias of its own (PEFT's ``lora_bias``).
    - `init`: ``"kaiming"`` (loralib/PEFT) or ``"gaussian"`` (the paper, std 1/r); B starts at 0.
    - `modules_to_save`: whole modules trained and saved with the adapter (a classifier head).
    """

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    enable_lora: dict[str, list[bool]] = field(default_factory=dict)
    bias: str = "none"
    lora_bias: bool = False
    init: str = "kaiming"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if not (value is None or isinstance(value, str) and name != "modules_to_save"
                    or isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ValueError(f"{name} must be a list of module names{', a regex string' if name != 'modules_to_save' else ''} "
                                 f"or None, got {value!r}")
        for name in ("rank_pattern", "alpha_pattern", "enable_lora"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict of module-path regex -> value, got {getattr(self, name)!r}")
        self.r = _check_rank("r", self.r)
        self.alpha = _check_alpha("alpha", self.alpha)
        for name in ("use_rslora", "lora_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not (self.layers is None or _is_int(self.layers)
                or isinstance(self.layers, (list, tuple)) and all(_is_int(i) for i in self.layers)):
            raise ValueError(f"layers must be a block index or a list of block indices (ints), got {self.layers!r}")
        if self.layers is not None:  # plain ints (numpy integers are not JSON); [] means every block, as in PEFT
            self.layers = int(self.layers) if _is_int(self.layers) else ([int(i) for i in self.layers] or None)
        if not (self.layers_pattern is None or isinstance(self.layers_pattern, str)
                or isinstance(self.layers_pattern, list) and all(isinstance(v, str) for v in self.layers_pattern)):
            raise ValueError(f"layers_pattern must be a module name or a list of them, got {self.layers_pattern!r}")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise ValueError(f"base_model_name_or_path must be a string or None, got {self.base_model_name_or_path!r}")
        self.rank_pattern = {key: _check_rank(f"rank_pattern[{key!r}]", v) for key, v in self.rank_pattern.items()}
        self.alpha_pattern = {key: _check_alpha(f"alpha_pattern[{key!r}]", v) for key, v in self.alpha_pattern.items()}
        if not (_is_real(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = _plain(self.dropout)
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        if self.init not in INIT_CHOICES:
            raise ValueError(f"init must be one of {INIT_CHOICES}, got {self.init!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str) and value != "all-linear":
                _check_regex(name, value)
        for name in ("rank_pattern", "alpha_pattern", "enable_lora"):
            for key in getattr(self, name):
                _check_regex(f"{name} key", key)
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is an empty list: name at least one module, or pass None")
        for key, flags in self.enable_lora.items():
            if not flags or not any(flags) or not all(isinstance(f, bool) for f in flags):
                raise ValueError(
                    f"enable_lora[{key!r}] must be a list of booleans with at least one True, got {flags!r}"
                )

    def rank_for(self, path: str) -> int:
        """r for the module at `path`, after `rank_pattern`."""
        key = match_pattern_key(self.rank_pattern, path)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, path: str) -> float:
        """alpha for the module at `path`, after `alpha_pattern`."""
        key = match_pattern_key(self.alpha_pattern, path)
        return float(self.alpha_pattern[key]) if key is not None else float(self.alpha)

    def slices_for(self, path: str) -> list[bool] | None:
        """Which equal output slices of a fused projection to adapt, or None for the whole layer."""
        key = match_pattern_key(self.enable_lora, path)
        return list(self.enable_lora[key]) if key is not None else None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of the config (lorakit field names)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> LoraConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def match_pattern_key(patterns: dict[str, Any], path: str) -> str | None:
    """First key of `patterns` that matches the end of `path` as a regex (PEFT's rule)."""
    for key in patterns:
        if pattern_matches(key, path):
            return key
    return None


def pattern_matches(key: str, path: str) -> bool:
    """Whether the pattern key `key` (a regex) matches the end of `path` at a dot boundary."""
    return re.match(rf"(.*\.)?({key})$", path) is not None


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(
            f"{name} {pattern!r} is not a valid regular expression ({e}); pass a list of module names "
            "(e.g. ['q_proj', 'v_proj']) for plain suffix matching"
        ) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_rank(name: str, value: Any) -> int:
    """`value` as a plain int (numpy integers accepted), or a ValueError naming `name`."""
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_alpha(name: str, value: Any) -> int | float:
    """`value` as a plain int or float (numpy scalars accepted), or a ValueError naming `name`."""
    if not _is_real(value) or not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return _plain(value)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _plain(value: numbers.Real) -> int | float:
    """A numpy (or other) real number as Python's own int or float: what JSON and the arithmetic expect."""
    return int(value) if _is_int(value) else float(value)
