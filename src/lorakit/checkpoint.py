"""The adapter folder, in Hugging Face PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Config fields use PEFT's names, tensors PEFT's keys (``base_model.model.<path>.lora_A.weight``),
so a folder written here loads in PEFT and the other way round. lorakit's own config is also
kept, exactly, in the safetensors header metadata. Writes are atomic (temp file + rename);
loading checks every key and shape before it touches the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import Tensor, nn

from .adapters import PREFIX, _unmerged_value, activate, adapter_state_dict, peft_param_name
from .config import LoraConfig
from .functional import cast_in_range, compress_sliced_B, lora_scale
from .injection import HEAD_NAMES, _bias_params, _find_saved_modules, inject, plan, resolve_config, saved_name_matches
from .layers import adapter_shapes, is_conv1d_gpt2
from .saved import base_of, saved_copy
from .state import (
    DEFAULT_ADAPTER,
    all_params,
    check_adapter_name,
    check_not_peft,
    get_state,
    lora_layers,
    resolve_adapter,
)

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TMP_SUFFIX = ".tmp"  # atomic_write_files' temp files: .<name>.<random>.tmp
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
METADATA_KEY = "lorakit_config"
TRAINABLE_FILE = "trainable.safetensors"  # what a `--method` baseline run saves instead of an adapter (baselines.py)
LORA_SLOTS = ("lora_A", "lora_B", "lora_B_bias")
SAVED = "saved:"  # slot prefix of a `modules_to_save` entry: the key inside the adapter's copy

#: PEFT fields that change the math and that lorakit does not implement: refused when set.
UNSUPPORTED_FIELDS: dict[str, Any] = {
    "use_dora": False,
    "use_qalora": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "megatron_config": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "velora_config": None,
    "monteclora_config": None,
}
#: init_lora_weights values whose saved weights load into an untouched base as they are.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
#: init_lora_weights values (prefixes) that also rewrite the base weights W0 when the adapter is created.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
#: PEFT fields that lorakit reads; any other field is metadata and ignored (with a debug log).
KNOWN_FIELDS = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "bias",
    "init_lora_weights", "use_rslora", "modules_to_save", "fan_in_fan_out", "lora_bias",
    "base_model_name_or_path",
}


# ---- config mapping ------------------------------------------------------------------------------

def to_peft_config(model: nn.Module, adapter: str | None = None) -> dict[str, Any]:
    """The adapter's config as PEFT's ``adapter_config.json`` fields."""
    name = resolve_adapter(model, adapter)
    record = get_state(model).adapters[name]
    cfg = record.config
    modules = dict(model.named_modules())
    # Per-layer ranks and alphas go in as one exact-path key (the path, regex-escaped) per layer that differs from r /
    # lora_alpha: PEFT takes the first matching key and re-sorts keys when it saves, so overlapping patterns would
    # change meaning there.
    # A fused layer adapted on n slices is stored as the equivalent dense rank-(n·r) LoRA.
    rank_pattern, alpha_pattern = {}, {}
    for path in record.layers:
        spec = modules[path].lora_specs[name]
        r_file = spec.r * (sum(spec.enabled) if spec.enabled is not None else 1)
        # a fused layer's alpha for PEFT: the one that gives the same scale at the dense rank
        alpha_file = spec.alpha if spec.enabled is None else spec.scale * (r_file**0.5 if spec.use_rslora else r_file)
        if r_file != cfg.r:
            rank_pattern[re.escape(path)] = r_file
        if not math.isclose(alpha_file, float(cfg.alpha), rel_tol=1e-9):
            alpha_pattern[re.escape(path)] = alpha_file
    base = cfg.base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    targets, layers, layers_pattern = cfg.target_modules, cfg.layers, cfg.layers_pattern
    if _written_as_list(cfg):
        targets, layers, layers_pattern = list(record.layers), None, None
    return {
        "peft_type": "LORA",
        "task_type": None,
        # what PEFT writes without a task type: AutoPeftModel builds the base from this class and `base_model_name_or_path`
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        "base_model_name_or_path": base,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "exclude_modules": cfg.exclude_modules,
        "layers_to_transform": layers,
        "layers_pattern": layers_pattern,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": cfg.bias,
        "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
        "use_rslora": cfg.use_rslora,
        "modules_to_save": cfg.modules_to_save,
        "fan_in_fan_out": any(is_conv1d_gpt2(modules[p]) for p in record.layers),
        "lora_bias": cfg.lora_bias,
        "use_dora": False,
        "inference_mode": True,
    }


def _written_as_list(cfg: LoraConfig) -> bool:
    """Whether `to_peft_config` writes `cfg`'s targets as the list of adapted module paths.

    PEFT refuses layers_to_transform beside a regex or "all-linear", layers_pattern without layers, and finds no
    block index at the top level of a path ("layers.1.q"); its "all-linear" also adapts the task heads lorakit's
    leaves alone (classifier, score) unless the task type is SEQ_CLS.
    """
    return cfg.layers is not None or bool(cfg.layers_pattern) or cfg.target_modules == "all-linear"


def _flag(fields: dict[str, Any], key: str) -> bool:
    """A true/false field of adapter_config.json; anything else is an error (``bool("false")`` is True)."""
    value = fields.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"adapter_config.json: {key} must be true or false, got {value!r}; fix the file")
    return value


def from_peft_config(fields: dict[str, Any]) -> LoraConfig:
    """A `LoraConfig` from PEFT's ``adapter_config.json`` fields; refuses what lorakit lacks."""
    peft_type = fields.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise ValueError(f"adapter is a {peft_type} adapter; lorakit loads LoRA adapters only")
    bad = [f"{k}={fields[k]!r}" for k, off in UNSUPPORTED_FIELDS.items() if fields.get(k, off) not in (off, None, False, [], {})]
    init = fields.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        why = (
            "it rewrites the base weights, so the adapter only fits that modified base; save it from PEFT with "
            "path_initial_model_for_weight_conversion to get plain LoRA"
            if str(init).lower().startswith(BASE_CHANGING_INITS)
            else f"lorakit knows only {list(PLAIN_INITS)}"
        )
        bad.append(f"init_lora_weights={init!r} ({why})")
    if fields.get("ensure_weight_tying") is True and fields.get("modules_to_save"):
        bad.append("ensure_weight_tying=True with modules_to_save (PEFT ties the saved copy of an embedding to the "
                   "output head; lorakit keeps saved copies untied, so the head would differ)")
    slices = fields.get("enable_lora")
    if slices and (not isinstance(slices, list) or any(slices)):  # PEFT <= 0.2's fused q/k/v slices (MergedLinear)
        bad.append(f"enable_lora={fields['enable_lora']!r} (the fused-slice format of PEFT 0.2 and older, whose tensor "
                   "layout current PEFT does not read either; lorakit reads slices only from its own files)")
    if bad:
        raise ValueError(f"adapter config uses PEFT features lorakit does not implement: {', '.join(bad)}")
    for key in sorted(set(fields) - KNOWN_FIELDS - set(UNSUPPORTED_FIELDS) - {"enable_lora"}):
        log.debug("ignoring adapter_config.json field %s=%r (does not change the math)", key, fields[key])
    return LoraConfig(
        r=_field(fields, "r", 8, _integer, "a positive integer"),
        alpha=_field(fields, "lora_alpha", 8, float, "a positive number"),
        dropout=_field(fields, "lora_dropout", 0.0, float, "a number in [0, 1)"),
        target_modules=fields.get("target_modules"),
        exclude_modules=fields.get("exclude_modules"),
        layers=fields.get("layers_to_transform"),
        layers_pattern=fields.get("layers_pattern"),
        rank_pattern=_field(fields, "rank_pattern", {}, _mapping, "an object of module regex -> rank"),
        alpha_pattern=_field(fields, "alpha_pattern", {}, _mapping, "an object of module regex -> alpha"),
        bias=fields.get("bias", "none"),
        init="gaussian" if init == "gaussian" else "kaiming",
        use_rslora=_flag(fields, "use_rslora"),
        modules_to_save=fields.get("modules_to_save"),
        lora_bias=_flag(fields, "lora_bias"),
        base_model_name_or_path=fields.get("base_model_name_or_path"),
    )


NON_NULL_FIELDS = ("r", "lora_alpha")  # PEFT always writes them; a null is a damaged file, not "the default"


def _field(fields: dict[str, Any], key: str, default: Any, convert: Any, what: str) -> Any:
    """Field `key` of adapter_config.json through `convert` (`default` when absent or null); an error naming it otherwise."""
    value = fields.get(key)
    if value is None and (key not in fields or key not in NON_NULL_FIELDS):
        return default
    try:
        return convert(value)
    except (TypeError, ValueError):
        raise ValueError(f"adapter_config.json: {key} must be {what}, got {value!r}; fix the file") from None


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(value)  # 4.7 is no rank (int() would truncate it)
    return int(value)


def _mapping(value: Any) -> dict:
    if not isinstance(value, dict):
        raise TypeError(value)
    return dict(value)


# ---- files ---------------------------------------------------------------------------------------

def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder and a rename: readers never see half a file."""
    atomic_write_files({Path(path): data})


def atomic_write_files(files: dict[Path, bytes]) -> None:
    """Write several files, each via a temp file: all are written (and synced) before any is renamed into
    place, so a failed write (a full disk) leaves every file as it was. Each rename is atomic, the set is not:
    a process killed (or a rename failing) between two renames leaves the later files' temps in place
    (``.<name>.<random>.tmp``), which `config_of` reports when the folder's files disagree."""
    temps: list[tuple[str, Path]] = []
    renamed = 0
    try:
        for path, data in files.items():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
            temps.append((tmp, path))
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would (0644 under umask 022)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in temps:
            os.replace(tmp, path)
            renamed += 1
    except BaseException:
        if not renamed:  # nothing new in place: the folder is as it was
            for tmp, _ in temps:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cast_checked(key: str, t: Tensor, dtype: torch.dtype | None) -> Tensor:
    """`t` (floating) cast to `dtype` (None: as it is); a value the cast turns into ±inf is an error, not a file of infs."""
    if dtype is None or not t.is_floating_point():
        return t
    cast = cast_in_range(t, dtype)
    if cast is None:
        raise ValueError(f"{key} overflows {dtype} (max |value| {t.abs().max().item():.3g}); use bf16, which has fp32's range")
    return cast


def save_adapter(
    model: nn.Module, path: str | os.PathLike, adapter: str | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write the adapter folder (PEFT layout) atomically; returns the folder.

    `dtype` (e.g. ``torch.float16``) stores the tensors in another precision; default: as trained.
    """
    name = resolve_adapter(model, adapter)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.float16 or torch.bfloat16, got {dtype!r}")
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{str(folder)!r} is a file; save_adapter writes a folder: pass a folder path")
    tensors = {}
    for key, t in adapter_state_dict(model, name).items():
        if t.is_meta:
            raise ValueError(f"cannot save {key}: the model is on the meta device (materialise it first)")
        t = t.detach().to("cpu")
        tensors[key] = cast_checked(key, t, dtype).contiguous().clone()
    cfg = get_state(model).adapters[name].config
    metadata = {"format": "pt", METADATA_KEY: json.dumps(cfg.to_dict())}
    folder.mkdir(parents=True, exist_ok=True)
    config_text = json.dumps(to_peft_config(model, name), indent=2, sort_keys=True) + "\n"
    atomic_write_files({folder / WEIGHTS_NAME: _sorted_metadata(st_save(tensors, metadata=metadata)),
                        folder / CONFIG_NAME: config_text.encode()})
    return folder


def _sorted_metadata(data: bytes) -> bytes:
    """safetensors bytes with the header's metadata in key order, so equal adapters give equal files.

    safetensors writes metadata from a hash map, in an order that changes from call to call. Layout:
    8-byte little-endian header length, the JSON header (space-padded to 8 bytes), the tensor data.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if "__metadata__" in header:
        header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def read_adapter(
    path: str | os.PathLike, model: nn.Module | None = None, adapter: str = DEFAULT_ADAPTER
) -> tuple[dict[str, Any], dict[str, Tensor], LoraConfig]:
    """(PEFT config fields, tensors, LoraConfig) of an adapter folder; never unpickles.

    ``adapter_config.json`` is authoritative, as in PEFT. lorakit's own copy of its config (in the
    safetensors header) is used only when it says the same thing, to recover what PEFT's fields
    cannot express (``enable_lora`` slices); an edited JSON wins, with a warning. Given the `model` the
    adapter will load into (as `adapter`), a copy whose targets the JSON lists by path must also adapt
    exactly the file's modules there.
    """
    fields, tensors, metadata = read_adapter_files(path)
    return fields, tensors, config_of(path, fields, metadata, adapted_paths(tensors), model, adapter)


def adapted_paths(tensors: dict[str, Tensor]) -> list[str]:
    """Module paths that an adapter file holds LoRA factors for (from its ``…lora_A.weight`` keys)."""
    suffixes = (".lora_A.weight", ".lora_embedding_A")
    return [k.removeprefix(PREFIX).removesuffix(s) for k in tensors for s in suffixes if k.endswith(s)]


def config_of(
    path: str | os.PathLike, fields: dict[str, Any], metadata: dict[str, str], modules: list[str],
    model: nn.Module | None = None, adapter: str = DEFAULT_ADAPTER,
) -> LoraConfig:
    """The `LoraConfig` of an adapter folder from its config fields and safetensors metadata (see `read_adapter`);
    `modules`: the adapted module paths (`adapted_paths`)."""
    try:
        cfg = from_peft_config(fields)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    except (TypeError, AttributeError) as e:
        raise ValueError(f"{path}: adapter_config.json has a field of the wrong type ({e}); compare it with PEFT's LoraConfig") from e
    if METADATA_KEY in metadata:
        saved = _saved_config(path, metadata[METADATA_KEY])
        if saved is not None and _same_for_peft(saved, cfg, modules, model, adapter):
            return saved.replace(base_model_name_or_path=cfg.base_model_name_or_path)
        if saved is not None:
            _refuse_if_interrupted(path, saved, modules)
        log.warning("%s: adapter_config.json differs from the config lorakit saved with the weights (or that config "
                    "adapts other modules of this model than the file holds); using adapter_config.json, as PEFT does", path)
    return cfg


def check_not_interrupted(path: str | os.PathLike, fields: dict[str, Any], metadata: dict[str, str], modules: list[str]) -> None:
    """Raise if the folder's adapter_config.json is the older half of an interrupted save (`atomic_write_files`),
    for tools that copy a folder without loading it; a config lorakit cannot read is left to them."""
    saved = _saved_config(path, metadata[METADATA_KEY]) if METADATA_KEY in metadata else None
    try:
        cfg = from_peft_config(fields)
    except (ValueError, TypeError, AttributeError):
        return
    if saved is not None and not _same_for_peft(saved, cfg, modules, None, DEFAULT_ADAPTER):
        _refuse_if_interrupted(path, saved, modules)


def _refuse_if_interrupted(path: str | os.PathLike, saved: LoraConfig, modules: list[str]) -> None:
    """Raise if adapter_config.json (which disagrees with the weights' header `saved`) is the older half of an
    interrupted save: a temp config that goes with the weights is still there."""
    unfinished = _unfinished_config(Path(path).expanduser(), saved, modules)
    if unfinished is not None:
        raise ValueError(_interrupted_message(path, unfinished, f"{CONFIG_NAME} is the older one and does not match the weights"))


def _unfinished_config(folder: Path, saved: LoraConfig, modules: list[str]) -> Path | None:
    """The config an interrupted save left as a temp file (`atomic_write_files`) beside the weights it belongs to:
    the newest ``.adapter_config.json.*.tmp`` that says what the weights' lorakit header says. None if there is none
    (temp files of other, older interrupted saves do not match the weights)."""
    def age(p: Path) -> float:  # a temp may vanish meanwhile (another process's save finishing)
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    for tmp in sorted(folder.glob(f".{CONFIG_NAME}.*{TMP_SUFFIX}"), key=age, reverse=True):
        try:
            cfg = from_peft_config(json.loads(tmp.read_text()))
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        if _same_for_peft(saved, cfg, modules, None, DEFAULT_ADAPTER):
            return tmp
    return None


def _interrupted_message(path: str | os.PathLike, tmp: Path, what: str) -> str:
    return (f"{path}: a save into this folder was interrupted after {WEIGHTS_NAME} was replaced: {what}. The config that "
            f"goes with these weights is in {tmp.name}: rename it to {CONFIG_NAME} to finish that save, or save the adapter again")


def _saved_config(path: str | os.PathLike, text: str) -> LoraConfig | None:
    """lorakit's own config from the safetensors header, or None (with a warning) when it cannot be read:
    adapter_config.json is authoritative, so a damaged or newer copy only loses what PEFT's fields cannot say."""
    try:
        fields = json.loads(text)
        known = {f.name for f in dataclasses.fields(LoraConfig)}
        unknown = sorted(set(fields) - known)
        if unknown:
            log.warning("%s: ignoring %s in the weights' lorakit config (written by a newer lorakit?)", path, unknown)
        return LoraConfig(**{k: v for k, v in fields.items() if k in known})
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
        log.warning("%s: the lorakit config in the weights' header cannot be read (%s); using adapter_config.json", path, e)
        return None


def _same_for_peft(
    saved: LoraConfig, from_json: LoraConfig, modules: list[str], model: nn.Module | None, adapter: str
) -> bool:
    """Whether `from_json` (read from adapter_config.json) says what `saved` says for the adapted `modules`.

    Compared by what each module gets (the file's rank, the scale), since `to_peft_config` writes per-layer
    values as exact-path patterns and fused slices as dense LoRA. A config with `layers` or "all-linear" is
    written as the list of adapted modules; given the `model`, `saved` must then adapt exactly those there
    (older lorakit versions filtered full-path targets by `layers` too). With the same targets as the JSON it
    plans what the JSON plans.
    """
    plain = ("r", "dropout", "exclude_modules", "bias", "lora_bias", "init", "use_rslora", "modules_to_save")
    if any(getattr(saved, k) != getattr(from_json, k) for k in plain) or float(saved.alpha) != float(from_json.alpha):
        return False
    where = ("target_modules", "layers", "layers_pattern")
    as_written = all(getattr(saved, k) == getattr(from_json, k) for k in where) and (
        # fused slices come from the stored copy alone: one an older lorakit wrote may no longer plan (a key matching
        # no module, slices on an embedding); the file holds dense LoRA then, which the JSON describes
        model is None or not saved.enable_lora or _plans_exactly(model, saved, adapter, modules, strict=True))
    as_list = (_written_as_list(saved) and from_json.layers is None and not from_json.layers_pattern
               and sorted(from_json.target_modules or []) == sorted(modules)
               and (model is None or _plans_exactly(model, saved, adapter, modules)))
    return (as_written or as_list) and all(_file_values(saved, m) == _file_values(from_json, m) for m in modules)


def _plans_exactly(model: nn.Module, cfg: LoraConfig, adapter: str, modules: list[str], strict: bool = False) -> bool:
    """Whether injecting `cfg` into `model` as `adapter` would adapt exactly the module paths `modules` (`strict`: as
    `inject` plans, which also refuses names that match nothing, e.g. an enable_lora typo)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the rank warnings come once more when the adapter is injected
            planned = plan(model, cfg, adapter, strict=strict)
    except ValueError:
        return False
    return sorted(p.path for p in planned) == sorted(modules)


def _file_values(cfg: LoraConfig, path: str) -> tuple[int, float]:
    """(rank in the file, scale) of module `path` under `cfg`; fused slices are one dense rank-(n·r) LoRA."""
    r, slices = cfg.rank_for(path), cfg.slices_for(path)
    return r * (sum(slices) if slices else 1), round(lora_scale(cfg.alpha_for(path), r, cfg.use_rslora), 9)


def read_adapter_files(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, str]]:
    """(config fields, tensors, safetensors header metadata) of an adapter folder, as stored; never unpickles.

    Unlike `read_adapter` it does not judge the config, so a tool can inspect adapters lorakit cannot load.
    """
    folder = Path(path).expanduser()
    if folder.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is a file; pass the adapter folder that holds it ({str(folder.parent)!r})")
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {str(folder)!r} does not exist")
    config_file = folder / CONFIG_NAME
    if not config_file.is_file() and (folder / TRAINABLE_FILE).is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} holds {TRAINABLE_FILE}: the output of a `lorakit finetune --method` baseline (BitFit, "
            "adapters, prefix tuning or LoRA+prefix), not a LoRA adapter folder; only `--method lora` runs write adapters"
        )
    if not config_file.is_file() and (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} holds a whole model (model.safetensors: full fine-tuning or a base model), not a LoRA adapter folder"
        )
    if not config_file.is_file() and (folder / WEIGHTS_NAME).is_file() and any(folder.glob(f".{CONFIG_NAME}.*{TMP_SUFFIX}")):
        tensors, metadata = _read_safetensors(folder / WEIGHTS_NAME)
        saved = _saved_config(folder, metadata[METADATA_KEY]) if METADATA_KEY in metadata else None
        unfinished = _unfinished_config(folder, saved, adapted_paths(tensors)) if saved is not None else None
        if unfinished is not None:
            raise FileNotFoundError(_interrupted_message(folder, unfinished, f"there is no {CONFIG_NAME} yet"))
    if not config_file.is_file():
        named = sorted(d.name for d in folder.iterdir() if (d / CONFIG_NAME).is_file())
        hint = f"; it holds named adapters (PEFT saves non-default ones in subfolders): {named}, pass e.g. {str(folder / named[0])!r}" if named else ""
        raise FileNotFoundError(f"{str(folder)!r} has no {CONFIG_NAME}: it is not an adapter folder{hint}")
    try:
        fields = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file} is not valid JSON ({e}): the file is truncated or corrupted") from e
    if not isinstance(fields, dict):
        raise ValueError(
            f"{config_file} holds a JSON {type(fields).__name__}, not an object of config fields: the file is corrupted"
        )
    metadata: dict[str, str] = {}
    if (folder / WEIGHTS_NAME).is_file():
        tensors, metadata = _read_safetensors(folder / WEIGHTS_NAME)
    elif (folder / LEGACY_WEIGHTS_NAME).is_file():
        tensors = _read_legacy_bin(folder / LEGACY_WEIGHTS_NAME)
    else:
        raise FileNotFoundError(f"{str(folder)!r} has neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")
    return fields, tensors, metadata


def _read_safetensors(file: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and header metadata, read through one memory map (a PEFT file may hold a whole embedding)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, ValueError, OSError) as e:
        raise ValueError(f"{file} is truncated or corrupted and cannot be read as safetensors: {e}") from e
    return tensors, metadata


def _read_legacy_bin(file: Path) -> dict[str, Tensor]:
    """A legacy PyTorch ``.bin`` adapter, through ``torch.load(weights_only=True)`` only."""
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{file} needs full unpickling, which can run arbitrary code, so lorakit refuses it. "
            f"Only plain tensor dicts load (torch.load weights_only=True). Detail: {e}"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{file} is truncated or corrupted: {e}") from e
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{file} does not hold a dict of tensors")
    return obj


# ---- loading into a model --------------------------------------------------------------------------

Expected = dict[str, tuple[str, str, tuple[int, ...]]]


def _expected(model: nn.Module, cfg: LoraConfig, adapter: str) -> tuple[Expected, Expected]:
    """file key -> (module path, slot, shape): what the adapter must contain, and what it may contain.

    The optional keys are the base weights PEFT writes with an adapter (``save_embedding_layers``, e.g. after
    resizing the vocabulary): an adapted layer's own (``<layer>.base_layer.weight``, for embeddings) and those of
    the model's input and output embeddings that carry no LoRA, under their plain names (``lm_head.weight``).
    """
    expected: Expected = {}
    optional: Expected = {}
    planned = plan(model, cfg, adapter, strict=False)
    layers = [p.path for p in planned]
    modules = dict(model.named_modules())
    saved = _find_saved_modules(model, cfg.modules_to_save)
    for path in _embedding_paths(model):
        if path not in layers and path not in saved:  # adapted: `…base_layer.weight` below; saved: the adapter's copy
            for leaf, t in modules[path].named_parameters(recurse=False):
                optional[f"{PREFIX}{path}.{leaf}"] = (path, leaf, tuple(t.shape))
    for p in planned:
        for leaf, t in p.module.named_parameters(recurse=False):
            optional[f"{PREFIX}{p.path}.base_layer.{leaf}"] = (p.path, leaf, tuple(t.shape))
        shapes = adapter_shapes(p.module, p.spec)
        a_shape, b_shape = shapes["lora_A"], shapes["lora_B"]
        if p.spec.enabled is not None:  # stored as the dense block-structured B
            n_on, d_slice, r = b_shape
            b_shape = (len(p.spec.enabled) * d_slice, n_on * r)
        if isinstance(p.module, nn.Embedding):
            expected[f"{PREFIX}{p.path}.lora_embedding_A"] = (p.path, "lora_A", a_shape)
            expected[f"{PREFIX}{p.path}.lora_embedding_B"] = (p.path, "lora_B", b_shape)
        else:
            expected[f"{PREFIX}{p.path}.lora_A.weight"] = (p.path, "lora_A", a_shape)
            expected[f"{PREFIX}{p.path}.lora_B.weight"] = (p.path, "lora_B", b_shape)
        if "lora_B_bias" in shapes:
            expected[f"{PREFIX}{p.path}.lora_B.bias"] = (p.path, "lora_B_bias", shapes["lora_B_bias"])
    for path in saved:  # loaded into the adapter's own copy, made by inject
        for key, t in base_of(modules[path]).state_dict().items():
            expected[f"{PREFIX}{path}.{key}"] = (path, SAVED + key, tuple(t.shape))
    params = all_params(model)
    for pname in _bias_params(model, cfg, layers):
        key = f"{PREFIX}{peft_param_name(pname, layers)}"
        expected[key] = (pname, "bias", tuple(params[pname].shape))
        optional.pop(key, None)
    return expected, optional


def _embedding_paths(model: nn.Module) -> list[str]:
    """Paths of the model's input and output embedding modules (transformers' get_input/output_embeddings)."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        try:
            module = get() if callable(get) else None
        except NotImplementedError:  # a transformers model without embeddings of that kind
            module = None
        if isinstance(module, nn.Module):
            found.append(module)
    return [path for path, m in model.named_modules() if any(m is f for f in found)]


#: a key's segment that follows the module path it belongs to: LoRA tensors, PEFT's wrapper internals
_MODULE_END = re.compile(r"\.(?:lora_[A-Za-z_]+|base_layer|modules_to_save|original_module)(?:\.|$)")


def _module_of(key: str) -> str | None:
    """The module path a file key belongs to (``…q_proj.lora_A.weight`` -> ``…q_proj``); None without PEFT's prefix."""
    if not key.startswith(PREFIX):
        return None
    rest = key.removeprefix(PREFIX)
    end = _MODULE_END.search(rest)
    return rest[: end.start()] if end else rest.rpartition(".")[0]


def _check_fit(
    expected: Expected, optional: Expected, tensors: dict[str, Tensor], source: str, paths: set[str]
) -> None:
    """Raise, naming every problem, unless `tensors` fit the keys and shapes expected (`paths`: the model's modules)."""
    problems = []
    for key, (_, _, shape) in optional.items():
        if key in tensors and tuple(tensors[key].shape) != tuple(shape):
            problems.append(
                f"{key}: file has shape {list(tensors[key].shape)}, model expects {list(shape)} "
                "(resize the model's embeddings to the adapter's vocabulary first)"
            )
    for key, (path, slot, shape) in expected.items():
        if key not in tensors:
            problems.append(f"missing key {key} (the model expects shape {list(shape)})")
        elif tuple(tensors[key].shape) != tuple(shape):
            got = list(tensors[key].shape)
            head = (slot.startswith(SAVED) and path.rpartition(".")[2] in HEAD_NAMES and len(got) == len(shape)
                    and got[1:] == list(shape[1:]))  # a classification head trained with another class count
            problems.append(f"{key}: file has shape {got}, model expects {list(shape)}" + (
                f" (a head for {got[0]} classes: load the model with num_labels={got[0]}, --num-labels in the CLI; "
                "the run's run_finished.json records it)" if head else ""))
    covered = {loc[0] for loc in expected.values() if not _is_base(loc)}  # the targeted and the saved modules
    for key in (k for k in tensors if k not in expected and k not in optional):
        module = _module_of(key)
        if module in covered:
            why = f"the adapter config targets or saves {module!r} but gives it no such tensor"
        elif module in paths:
            why = (f"module {module!r} exists in this model, but the adapter config neither targets nor saves it "
                   "(target_modules / modules_to_save)")
        else:
            why = "no such module in this model"
        problems.append(f"unexpected key {key} (shape {list(tensors[key].shape)}): {why}")
    if problems:
        head = "\n  ".join(problems[:12]) + (f"\n  … and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ValueError(f"adapter {source} does not fit this model; the model is unchanged:\n  {head}")


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter: str = DEFAULT_ADAPTER) -> nn.Module:
    """Inject the adapter saved at `path` into `model` and load its weights; returns `model`.

    Every key and shape is checked before the model changes; on any error the model is left
    exactly as it was.
    """
    check_adapter_name(adapter)
    state = get_state(model, required=False)
    check_not_peft(model)
    if state is not None and adapter in state.adapters:
        raise ValueError(f"adapter {adapter!r} is already on the model; load with adapter='<another name>'")
    fields, tensors, cfg = read_adapter(path, model, adapter)
    modules = dict(model.named_modules())
    try:
        cfg = _as_peft_resolves(model, resolve_config(model, cfg))
        tensors = _fold_wrapper_keys(model, cfg, tensors)
        expected, optional = _expected(model, cfg, adapter)
        tensors = _without_adapter_names(tensors, expected)
        _check_fit(expected, optional, tensors, str(path), set(modules))
    except ValueError as e:
        if fields.get("ensure_weight_tying") is True:
            raise ValueError(f"{e}\n  The file was saved by PEFT with ensure_weight_tying=True, which can give a tied "
                             "output head LoRA factors of its own; lorakit does not implement that option") from None
        raise ValueError(f"{e}{_other_base_hint(model, cfg)}") from None
    params = all_params(model)
    _check_finite_values(tensors, {**optional, **expected}, modules, params, str(path))
    # base weights PEFT saved alongside (a resized vocabulary): load only those that differ from the model's own
    # (unmerged) values; one another adapter already changed it cannot change again, one it brings alike it shares.
    # A tied weight (input embeddings and output head) is one tensor under several names: held under any of them,
    # and shared under its holder's name for it (the file's own name where the holder has that one too).
    names = _tied_names(params)
    holders = [(n, pname) for n, r in (state.adapters.items() if state else ()) for pname in r.base_values]
    held = {alias: (n, pname) for n, pname in holders for alias in names.get(pname, [pname])}
    held.update({pname: (n, pname) for n, pname in holders})
    alike: dict[str, str] = {}
    first: dict[int, str] = {}  # tensor -> the first file key that writes it
    for key, loc in optional.items():
        if key not in tensors:
            continue
        pname = _pname(loc)
        other = first.setdefault(id(params[pname]), key)
        if other != key and not torch.equal(tensors[key], tensors[other]):
            raise ValueError(f"adapter {path}: {other} and {key} give different values to one tensor of this model "
                             f"(tied as {names.get(pname, [pname])}); the model is unchanged")
        if not torch.equal(tensors[key], _base_value(modules, params, loc).to(tensors[key].dtype)):
            if pname in held:
                raise ValueError(
                    f"adapter {path} changes the base model's {pname!r}, which adapter {held[pname][0]!r} "
                    "already set to other values, and one base weight cannot hold both; delete_adapter(model, "
                    f"{held[pname][0]!r}) first, or load {adapter!r} on a model of its own; the model is unchanged")
            expected[key] = loc
        elif pname in held:
            owner, owned = held[pname]
            alike[owned] = owner
    specs = {p.path: p.spec for p in plan(model, cfg, adapter, strict=False)}
    on_meta = [p for p in specs if any(t.is_meta for t in modules[p].parameters(recurse=False))]
    if on_meta:
        raise ValueError(
            f"cannot load adapter {path}: the model is on the meta device (e.g. {on_meta[0]!r}), so the loaded "
            "weights would be lost. Load the base weights first (from_pretrained, or to_empty + load_state_dict); "
            "the model is unchanged"
        )
    values = {}
    for key, (mpath, slot, _) in expected.items():  # everything that can fail on the file's values, before any change
        values[key] = tensors[key]
        if slot == "lora_B" and specs[mpath].enabled is not None:
            try:
                values[key] = compress_sliced_B(tensors[key], list(specs[mpath].enabled), specs[mpath].r)
            except ValueError as e:
                raise ValueError(f"adapter {path}: {key}: {e}; the model is unchanged") from e
    backup = {key: _base_value(modules, params, loc).clone() for key, loc in expected.items() if _is_base(loc)}
    before_active = list(state.active) if state is not None else []
    before_merged = {p: list(layer.merged_adapters) for p, layer in lora_layers(model)}
    merged_mode = state is not None and state.merged  # merged serving, also with nothing merged right now
    before_flags = {id(p): p.requires_grad for p in model.parameters()}  # inject freezes the base, set_adapter won't thaw it
    inject(model, cfg, adapter)  # unmerges a merged model; merged again below, with the loaded ΔW
    try:
        with torch.no_grad():
            for key, (mpath, slot, _) in expected.items():
                if slot in LORA_SLOTS:
                    getattr(modules[mpath], slot)[adapter].copy_(values[key])
                elif slot.startswith(SAVED):
                    saved_copy(model, mpath, adapter).state_dict(keep_vars=True)[slot.removeprefix(SAVED)].copy_(values[key])
                else:
                    params[_pname((mpath, slot, None))].copy_(values[key])
        if merged_mode or any(before_merged.values()):
            activate(model, [adapter], merged=True)
    except Exception:
        from .adapters import delete_adapter, set_adapter

        delete_adapter(model, adapter)
        with torch.no_grad():
            for key, t in backup.items():
                params[_pname(expected[key])].copy_(t)
        if before_active:
            set_adapter(model, before_active)
        for p, layer in lora_layers(model):
            if before_merged.get(p):
                layer.set_merged(before_merged[p])  # as it was, in one pass (it fitted)
        if (after := get_state(model, required=False)) is not None:
            after.merged = merged_mode
        for p in model.parameters():
            if id(p) in before_flags:
                p.requires_grad_(before_flags[id(p)])
        raise
    # saved again with the adapter, so that a resized vocabulary survives lorakit -> PEFT
    state = get_state(model)
    record = state.adapters[adapter]
    loaded_base = {key: _pname(loc) for key, loc in expected.items() if key in optional}
    record.base_params = [*loaded_base.values(), *alike]
    record.base_values.update({pname: backup[key] for key, pname in loaded_base.items()})  # put back on delete/unload
    record.base_values.update({pname: state.adapters[owner].base_values[pname] for pname, owner in alike.items()})
    return model


_NAMED_KEY = re.compile(r"^(?P<stem>.+\.(?:lora_A|lora_B|lora_embedding_A|lora_embedding_B))\.(?P<name>[^.]+)(?P<leaf>\.weight|\.bias)?$")


def _without_adapter_names(tensors: dict[str, Tensor], expected: Expected) -> dict[str, Tensor]:
    """Keys written with the adapter's name in them (``…lora_A.default.weight``, as in a model's own
    state dict) under the names the file format uses (``…lora_A.weight``); PEFT loads both."""
    out = {}
    for key, t in tensors.items():
        match = _NAMED_KEY.match(key)
        plain = f"{match['stem']}{match['leaf'] or ''}" if match and match["name"] not in ("weight", "bias") else key
        out[plain if plain in expected and plain not in tensors else key] = t
    return out


def _fold_wrapper_keys(model: nn.Module, cfg: LoraConfig, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the wrapper-internal copies PEFT writes for a saved module when ``bias="all"`` also collects them.

    ``<m>.modules_to_save.bias`` is the adapter's copy, saved again as ``<m>.bias`` (taken if that is
    missing); ``<m>.original_module.bias`` is the base module's own, unused while the copy is active.
    """
    if not cfg.modules_to_save:
        return tensors
    from .injection import _find_saved_modules

    out = dict(tensors)
    for path in _find_saved_modules(model, cfg.modules_to_save):
        base, copy = f"{PREFIX}{path}.original_module.", f"{PREFIX}{path}.modules_to_save."
        for key in [k for k in out if k.startswith((base, copy))]:
            value = out.pop(key)
            if key.startswith(copy):
                out.setdefault(f"{PREFIX}{path}.{key.removeprefix(copy)}", value)
    return out


def _as_peft_resolves(model: nn.Module, cfg: LoraConfig) -> LoraConfig:
    """Drop the names in `target_modules` / `modules_to_save` lists that match no module of `model`.

    PEFT ignores them (``task_type="SEQ_CLS"`` saves ``modules_to_save=["classifier", "score"]``;
    adapters list every projection name of a family); if nothing matches, injection still fails.
    """
    paths = [p for p, _ in model.named_modules() if p]

    def present(names: list[str]) -> list[str]:
        return [n for n in names if any(p == n or p.endswith("." + n) for p in paths)]

    changes: dict[str, Any] = {}
    if isinstance(cfg.target_modules, list) and present(cfg.target_modules):
        changes["target_modules"] = present(cfg.target_modules)
    if cfg.modules_to_save:
        changes["modules_to_save"] = [n for n in cfg.modules_to_save if any(saved_name_matches(p, n) for p in paths)] or None
    dropped = {k: sorted(set(getattr(cfg, k) or []) - set(v or [])) for k, v in changes.items()}
    for key, names in dropped.items():
        if names:
            log.debug("adapter %s %s match no module of %s: ignored, as PEFT does", key, names, type(model).__name__)
    return cfg.replace(**changes) if changes else cfg


def _tied_names(params: dict[str, nn.Parameter]) -> dict[str, list[str]]:
    """Every name of a parameter's tensor, by each of its names (a tied head: the embedding's and ``lm_head.weight``)."""
    by_tensor: dict[int, list[str]] = {}
    for name, p in params.items():
        by_tensor.setdefault(id(p), []).append(name)
    return {name: by_tensor[id(p)] for name, p in params.items()}


def _is_base(loc: tuple) -> bool:
    """Whether a file entry at `loc` writes into the base model (a bias, an embedding), not the adapter's own tensors."""
    return loc[1] not in LORA_SLOTS and not loc[1].startswith(SAVED)


def _other_base_hint(model: nn.Module, cfg: LoraConfig) -> str:
    """Why an adapter may not fit: it names another base model than `model`'s (empty if it does not say, or the same)."""
    base = cfg.base_model_name_or_path
    mine = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not base or base == mine or Path(str(base)).name == Path(str(mine)).name:
        return ""
    return (f"\n  The adapter was trained on {base!r}; this model is {type(model).__name__}"
            f"{f' from {mine!r}' if mine else ''}: if that is another model, load the adapter onto its own")


def _pname(loc: tuple) -> str:
    """The model parameter a base entry at `loc` writes (a trained bias's loc names it whole)."""
    path, slot, _ = loc
    return path if slot == "bias" and path.endswith(".bias") else f"{path}.{slot}"


def _check_finite_values(tensors: dict[str, Tensor], locs: Expected, modules: dict, params: dict, source: str) -> None:
    """Raise, naming each tensor, if the file brings NaN/inf values the model does not already hold there (a base
    weight saved alongside may carry the base's own inf; an adapter's factors, biases and saved copies may not)."""
    problems = []
    for key, loc in locs.items():
        t = tensors.get(key)
        if t is None or not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t)
        if _is_base(loc) and bad.any() and not params[_pname(loc)].is_meta:
            own = _base_value(modules, params, loc).to(t.device, t.dtype)
            bad &= ~((t == own) | (t.isnan() & own.isnan()))
        if n := int(bad.sum()):
            problems.append(f"{key}: {n} of {t.numel()} values are NaN or inf (a diverged training run? they would "
                            "turn every output they reach into NaN; load an earlier checkpoint)")
    if problems:
        raise ValueError(f"adapter {source} does not fit this model; the model is unchanged:\n  " + "\n  ".join(problems[:12]))


def _base_value(modules: dict, params: dict, loc: tuple) -> Tensor:
    """The value at `loc` without merged updates (a merged layer's exact W0 / b0 copy), detached."""
    return _unmerged_value(modules, _pname(loc), params[_pname(loc)])
