"""The trainer: fine-tune a model with LoRA (or another method) on prompt/completion pairs or labelled texts.

AdamW over the trainable parameters only (optionally LoRA+: a higher learning rate for B), linear
warm-up then linear decay, gradient clipping and accumulation, periodic evaluation, and atomic,
resumable checkpoints (trainable weights, optimizer, scheduler, RNG, step) so a killed run loses
only the steps since its last checkpoint. Progress goes to a callback the caller supplies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from . import baselines
from .adapters import adapter_parameters
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, atomic_write_bytes, save_adapter
from .config import LoraConfig, _is_real
from .data import IGNORE_INDEX, collate, encode_causal, encode_classification
from .injection import HEAD_NAMES, inject
from .models import is_bidirectional_encoder
from .precision import base_dtype_choice, cast_base
from .state import check_module, check_not_peft, get_state, is_merged

log = logging.getLogger(__name__)

TASKS = ("causal-lm", "classification")
CHECKPOINT_PREFIX = "checkpoint-"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
#: Written to the output folder when a run has saved its final result: a resume of it has nothing to do.
FINISHED_JSON = "run_finished.json"
#: TrainConfig fields that must match when a run resumes (the others may change, e.g. eval_every).
RESUME_FIELDS = ("task", "method", "r", "alpha", "dropout", "target_modules", "init", "bias", "lr", "lr_ratio_b", "steps",
                 "epochs", "batch_size", "grad_accum", "max_length", "warmup", "schedule", "weight_decay", "max_grad_norm",
                 "seed", "precision", "use_chat_template", "modules_to_save")
#: Files a finished run leaves in its output folder (LoRA, full fine-tuning, the other methods): a new run never overwrites them.
FULL_MODEL_FILE = "model.safetensors"
ARTEFACTS = (CONFIG_NAME, WEIGHTS_NAME, FULL_MODEL_FILE, baselines.TRAINABLE_FILE)
SCHEDULES = ("linear", "cosine", "constant")


class TrainingError(RuntimeError):
    """Training stopped cleanly (NaN loss, disk full…); the message names the last good checkpoint."""


@dataclass
class TrainConfig:
    """Hyper-parameters of one fine-tuning run.

    `batch_size` is per micro-batch; an optimizer step sees ``batch_size * grad_accum`` examples.
    `steps` (optimizer steps) wins over `epochs`. `warmup` < 1 is a fraction of the steps, else a
    step count; after it the lr follows `schedule` (``"linear"`` or ``"cosine"`` decay to 0, or
    ``"constant"``). `precision`: ``"auto"`` (bf16 frozen base where the CPU/GPU runs bf16 fast, else
    fp32), ``"bf16"`` or ``"fp32"``; trainable weights and optimizer state stay fp32.
    """

    task: str = "causal-lm"
    method: str = "lora"
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: list[str] | str | None = None
    init: str = "kaiming"
    bias: str = "none"
    lr: float = 2e-4
    lr_ratio_b: float = 1.0
    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    warmup: float = 0.06
    schedule: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_checkpointing: bool = False
    eval_every: int = 0
    eval_batch_size: int = 32
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    precision: str = "auto"
    use_chat_template: bool | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        for name in ("batch_size", "grad_accum", "max_length", "eval_batch_size", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        for name in ("epochs", "lr", "lr_ratio_b"):
            if not (_is_real(getattr(self, name)) and math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name in ("warmup", "weight_decay", "max_grad_norm"):
            if not (_is_real(getattr(self, name)) and math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        for name, never in (("eval_every", "never"), ("save_every", "never"), ("keep_checkpoints", "keep every checkpoint")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0: {never}), got {value!r}")
        if not isinstance(self.grad_checkpointing, bool):
            raise ValueError(f"grad_checkpointing must be True or False, got {self.grad_checkpointing!r}")
        if not (self.use_chat_template is None or isinstance(self.use_chat_template, bool)):
            raise ValueError(f"use_chat_template must be True, False or None (the tokenizer decides), got "
                             f"{self.use_chat_template!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in 0..{2**32 - 1}, got {self.seed!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only' (PEFT's: which base biases train), got {self.bias!r}")
        if self.bias != "none" and self.method != "lora":
            raise ValueError(f"bias={self.bias!r} (--bias) trains base biases beside LoRA; method {self.method!r} "
                             "has its own trainable set: leave it at 'none'")
        if self.lr_ratio_b != 1.0 and self.method != "lora":
            raise ValueError(f"lr_ratio_b (LoRA+, --lr-ratio-b) sets the learning rate of LoRA's B matrices; method "
                             f"{self.method!r} has none: leave it at 1")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (saved in each checkpoint)."""
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What a run did: steps, last losses and eval metrics, where its files are, and the precision it chose."""

    steps: int
    train_loss: float
    eval_metrics: dict[str, float]
    precision: str
    trainable: int
    total: int
    seconds: float
    out_dir: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    peak_memory_mb: float | None = None  # see `peak_memory_kind` for what was measured
    peak_memory_kind: str = ""
    start_step: int = 0  # the step a resumed run started from; `seconds` and `history` cover only this run

    @property
    def median_step_s(self) -> float:
        """Median wall time of one optimizer step (the first step, with its warm-up, included)."""
        steps = sorted(h["step_s"] for h in self.history if "step_s" in h)
        return steps[len(steps) // 2] if steps else float("nan")


# ---- methods: how the model is prepared and saved ----------------------------------------------------

@dataclass(frozen=True)
class Method:
    """A fine-tuning method: `prepare` sets which parameters train; `save` writes the final artefact."""

    prepare: Callable[[nn.Module, TrainConfig], None]
    save: Callable[[nn.Module, Path], None]


def classification_head(model: nn.Module) -> list[str]:
    """Names of the model's sequence-classification head module(s), for ``modules_to_save``."""
    names = [n for n, _ in model.named_children() if n in HEAD_NAMES]
    if not names:
        raise ValueError(
            f"cannot find the classification head of {type(model).__name__} (looked for {HEAD_NAMES}); "
            "pass modules_to_save=[<head module name>]"
        )
    return names


def _as_records(data: Any, source: str) -> list[dict[str, Any]]:
    """`data` as a list of example dicts: a ``datasets.Dataset``, a generator or a tuple read once (and hashed by
    content for `--resume`'s data check), a dict of columns refused with the fix."""
    if isinstance(data, Mapping):
        raise ValueError(f"{source} data is one dict (columns?): pass one dict per example, e.g. "
                         "[dict(zip(cols, row)) for row in zip(*cols.values())]")
    records = [dict(ex) if isinstance(ex, Mapping) else ex for ex in data]
    bad = next((i for i, ex in enumerate(records) if not isinstance(ex, dict)), None)
    if bad is not None:
        raise ValueError(f"{source} data: example {bad} is a {type(records[bad]).__name__}, not a dict of fields "
                         "(e.g. {'prompt': ..., 'completion': ...} or {'text': ..., 'label': ...})")
    return records


def _prepare_lora(model: nn.Module, cfg: TrainConfig) -> None:
    state = get_state(model, required=False)
    if state is not None:  # the caller injected its own adapter: train that
        if len(state.active) != 1:
            raise ValueError(f"finetune trains (and saves) one adapter, but {len(state.active)} are active "
                             f"({state.active}); pick one first: lorakit.set_adapter(model, <name>), from {list(state.adapters)}")
        return
    saved = cfg.modules_to_save
    if saved is None and cfg.task == "classification":
        saved = classification_head(model)
    inject(model, LoraConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_modules,
                             init=cfg.init, bias=cfg.bias, modules_to_save=saved))


def _save_lora(model: nn.Module, out: Path) -> None:
    save_adapter(model, out)


def _prepare_full(model: nn.Module, cfg: TrainConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def _save_full(model: nn.Module, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # tied weights (input embeddings and output head) once, as safetensors' save_model/load_model expect them
    tensors = {k: v.detach().contiguous().clone() for k, v in _dedupe(model.state_dict()).items()}
    atomic_write_bytes(out / FULL_MODEL_FILE, st_save(tensors, metadata={"format": "pt"}))


def _dedupe(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each tensor once: a later name of the same tensor (same memory, shape and strides: a tied weight) is left out."""
    seen: set[tuple] = set()
    out = {}
    for k, t in tensors.items():
        key = (t.data_ptr(), t.shape, t.stride())
        if key not in seen:
            seen.add(key)
            out[k] = t
    return out


def _baseline(method: str) -> Method:
    """A `lorakit.baselines` method; `r` is its size (adapter bottleneck, prefix length; LoRA's r in lora+prefix)."""

    def prepare(model: nn.Module, cfg: TrainConfig) -> None:
        heads = cfg.modules_to_save or (classification_head(model) if cfg.task == "classification" else None)
        lora = LoraConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_modules,
                          init=cfg.init, modules_to_save=heads)
        baselines.prepare(model, method, lora_config=lora, size=cfg.r, train_modules=heads)

    return Method(prepare, lambda model, out: baselines.save_trainable(model, out, method))


#: Fine-tuning methods by name; another method registers itself here.
METHODS: dict[str, Method] = {"lora": Method(_prepare_lora, _save_lora), "full": Method(_prepare_full, _save_full),
                              **{m: _baseline(m) for m in ("bitfit", "adapter-h", "adapter-l", "prefix", "lora+prefix")}}


# ---- precision ---------------------------------------------------------------------------------------

def choose_precision(requested: str = "auto", device: torch.device | str = "cpu") -> tuple[str, str]:
    """(``"bf16"`` or ``"fp32"``, why): auto picks bf16 where `device` multiplies bf16 fast (CPU AMX/AVX512-BF16, CUDA)."""
    if requested != "auto":
        return requested, "requested"
    dtype, reason = base_dtype_choice(device)
    return ("bf16" if dtype == torch.bfloat16 else "fp32"), reason


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for a bf16 run whose weights all train (full fine-tuning keeps fp32 master weights)."""
    if precision == "bf16_autocast":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---- memory ---------------------------------------------------------------------------------------------

def reset_peak_memory(device: torch.device) -> str:
    """Start measuring peak memory on `device`; returns what `peak_memory_mb` will report."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "CUDA max allocated since training started"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the process's peak RSS (VmHWM)
        return "process peak RSS since training started"
    except OSError:
        return "process peak RSS since the process started"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB since `reset_peak_memory` (see its return value for the kind)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# ---- loss ---------------------------------------------------------------------------------------------

def _logits_are_head_of_decoder(model: nn.Module, decoder: nn.Module, head: nn.Module, batch: dict[str, Tensor]) -> bool:
    """Whether the model's logits are its output head applied to its decoder's last hidden state, nothing after
    (Gemma-2 soft-caps them, Cohere, Granite and FalconH1 scale them): checked once per model on one real row,
    in eval mode (no dropout, no RNG drawn), and kept on the model."""
    known = model.__dict__.get("_lorakit_plain_head")
    if known is not None:
        return known
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ids, mask = batch["input_ids"][:1], batch["attention_mask"][:1]
            full = model(input_ids=ids, attention_mask=mask).logits.float()
            mine = head(decoder(input_ids=ids, attention_mask=mask).last_hidden_state).float()
    finally:
        model.train(training)
    plain = full.shape == mine.shape and bool(torch.allclose(full, mine, rtol=1e-3, atol=1e-3 * float(full.abs().max())))
    model.__dict__["_lorakit_plain_head"] = plain
    return plain


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """(mean token cross-entropy over labelled positions, their count).

    The output head runs only at positions that predict a labelled token (the completion), not
    over the whole sequence: the same loss, without the vocabulary-sized matmul on prompt tokens.
    """
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    n = int(keep.sum())
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    plain_head = (decoder is not None and decoder is not model and isinstance(head, nn.Linear)
                  and _logits_are_head_of_decoder(model, decoder, head, batch))
    if plain_head:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = head(hidden[:, :-1][keep])
        target = labels[keep]
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
        target = labels[keep]
    return F.cross_entropy(logits.float(), target, reduction="mean") if n else logits.sum() * 0.0, n


def classification_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(mean cross-entropy, logits) of a sequence-classification model."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    return F.cross_entropy(logits, batch["labels"]), logits


# ---- the loop -------------------------------------------------------------------------------------------

def _batches_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def _micro_batch(data: list, cfg: TrainConfig, index: int) -> list:
    """The `index`-th micro-batch of the run: a fresh seeded permutation per epoch, so any step is reproducible."""
    per_epoch = _batches_per_epoch(len(data), cfg.batch_size)
    epoch, j = divmod(index, per_epoch)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
    return [data[i] for i in order[j * cfg.batch_size:(j + 1) * cfg.batch_size].tolist()]


def _loss_weight(batch: dict[str, Tensor], task: str) -> int:
    """What a micro-batch's mean loss averages over: its predicted (completion) tokens, or its examples.

    Gradient accumulation weights each micro-batch by it, so the step's loss is the mean over all its
    tokens, as one big batch would compute it (HF Trainer does the same since 4.46).
    """
    if task == "causal-lm":
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return len(batch["labels"])


def total_steps(n_examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps of the run: `steps`, or `epochs` passes over `n_examples`."""
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(_epoch_micro_batches(n_examples, cfg) / cfg.grad_accum))


def _epoch_micro_batches(n_examples: int, cfg: TrainConfig) -> int:
    """Micro-batches in `epochs` passes over `n_examples` (the last step takes what is left, no example twice)."""
    return max(1, math.ceil(cfg.epochs * _batches_per_epoch(n_examples, cfg.batch_size)))


def lr_schedule(total: int, warmup: float, schedule: str = "linear") -> Callable[[int], float]:
    """lr multiplier: linear warm-up over `warmup` steps (a fraction of `total` if < 1), then `schedule`
    (``"linear"`` or ``"cosine"`` decay to 0 at `total`, or ``"constant"``)."""
    warm = int(round(warmup * total)) if warmup < 1 else int(warmup)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        left = max(0.0, (total - step) / max(1, total - warm))  # 1 → 0 over the decay
        if schedule == "cosine":
            return 0.5 * (1 - math.cos(math.pi * left))
        return left if schedule == "linear" else 1.0

    return factor


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only; with LoRA+ (`lr_ratio_b` > 1) the B matrices get lr × ratio.

    Weight decay applies to matrices only: biases and norm weights (1-D) are not decayed, as in the HF Trainer.
    """
    b_ids: set[int] = set()
    if cfg.lr_ratio_b != 1.0 and get_state(model, required=False) is not None:
        b_ids = {id(p) for name, p in adapter_parameters(model).items() if ".lora_B." in name}
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: nothing to fine-tune")
    groups = []
    for lr, members in ((cfg.lr, [p for p in params if id(p) not in b_ids]), (cfg.lr * cfg.lr_ratio_b, [p for p in params if id(p) in b_ids])):
        if cfg.weight_decay:
            groups += [{"params": [p for p in members if p.dim() >= 2], "lr": lr},
                       {"params": [p for p in members if p.dim() < 2], "lr": lr, "weight_decay": 0.0}]
        else:
            groups.append({"params": members, "lr": lr})
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, encoded: list[dict], cfg: TrainConfig, pad_id: int, precision: str = "fp32") -> dict[str, float]:
    """Eval loss and perplexity (causal LM: per completion token) or loss and accuracy (classification; with
    two labels also Matthews correlation, GLUE's CoLA metric)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, count, correct = 0.0, 0, 0
    confusion = torch.zeros(2, 2, dtype=torch.long)  # [label, prediction], binary classification
    try:
        for i in range(0, len(encoded), cfg.eval_batch_size):
            batch = {k: v.to(device) for k, v in collate(encoded[i:i + cfg.eval_batch_size], pad_id).items()}
            with _autocast(precision, device):
                if cfg.task == "causal-lm":
                    loss, n = causal_lm_loss(model, batch)
                    loss_sum += float(loss) * n
                    count += n
                else:
                    loss, logits = classification_loss(model, batch)
                    n = len(batch["labels"])
                    loss_sum += float(loss) * n
                    count += n
                    pred = logits.argmax(-1)
                    correct += int((pred == batch["labels"]).sum())
                    if logits.shape[-1] == 2:
                        confusion += torch.bincount(2 * batch["labels"].cpu() + pred.cpu(), minlength=4).view(2, 2)
    finally:
        model.train(was_training)
    loss = loss_sum / max(count, 1)
    if cfg.task == "causal-lm":
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
    metrics = {"eval_loss": loss, "eval_accuracy": correct / max(count, 1)}
    if confusion.sum():
        (tn, fp), (fn, tp) = confusion.tolist()
        denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        metrics["eval_mcc"] = (tp * tn - fp * fn) / denom if denom else 0.0
    return metrics


def finetune(
    model: nn.Module,
    tokenizer: Any,
    train: list[dict[str, Any]],
    eval: list[dict[str, Any]] | None = None,
    config: TrainConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Fine-tune `model` in place on `train` examples (see `lorakit.data`); returns a `TrainResult`.

    With `out_dir`: checkpoints every `save_every` steps, ``metrics.jsonl``, ``loss.png`` and the
    final artefact (the adapter folder for LoRA) in `out_dir`. `resume` continues from the latest
    checkpoint there (a finished run, or a folder with no run of ours, is a `ValueError`: nothing to resume). `callback`
    receives dicts with ``event`` = start / step / eval / save / end.
    When the run is bf16 (``precision="auto"`` picks it where bf16 matmuls are fast) the frozen base
    weights are cast to bf16 in place; ``precision="fp32"`` leaves them exactly as loaded.
    """
    check_module(model)
    check_not_peft(model)
    if get_state(model, required=False) is not None and is_merged(model):
        raise ValueError("the model's adapters are merged into its base weights, where training cannot reach A and B: "
                         "call lorakit.unmerge(model) first (merge again after training)")
    cfg = config or TrainConfig()
    given = train  # as passed: what an older lorakit's checkpoints hashed (a datasets.Dataset's str())
    train = _as_records(train, "train")
    eval = _as_records(eval, "eval") if eval is not None else None
    out = Path(out_dir).expanduser() if out_dir is not None else None
    notify = callback or (lambda event: None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    finished = out / FINISHED_JSON if out is not None else None
    done = json.loads(finished.read_text())["step"] if finished is not None and finished.is_file() else None
    folders = _checkpoint_folders(out) if out is not None and out.is_dir() else []
    checkpoint, damage = folders[-1] if folders else (None, None)  # the newest: the one a resume continues from
    if done is not None and resume:
        raise ValueError(f"the run in {out} already finished at step {done}: nothing to resume (its result is kept); "
                         "to train again, use another output folder")
    if done is not None and not resume:
        raise ValueError(f"{out} holds a run that finished at step {done}: use another output folder, or delete this one")
    if checkpoint is not None and not resume:
        raise ValueError(f"{out} holds checkpoints of an earlier run ({checkpoint.name}): resume it (--resume, "
                         "resume=True), or use another output folder, or delete them")
    if damage is not None:
        raise ValueError(f"checkpoint {checkpoint} is damaged ({checkpoint / STATE_JSON}: {damage}); delete that "
                         "folder to resume from the checkpoint before it (from step 0 if it is the only one)")
    found = [name for name in ARTEFACTS if out is not None and (out / name).exists()]
    if out is not None and checkpoint is None and _foreign_metrics(out / "metrics.jsonl"):
        found.append("metrics.jsonl")
    if found and checkpoint is None:
        raise ValueError(f"{out} already holds a trained result ({', '.join(found)}): use another output folder, or "
                         "delete those files")
    if resume and out is None:
        raise ValueError("resume=True needs out_dir, the folder of the run to resume (--out in the CLI)")
    if resume and checkpoint is None:
        if out is None or not (out / "metrics.jsonl").is_file():  # no run of ours there: a mistyped folder, most likely
            raise ValueError(f"nothing to resume in {out}: it holds no lorakit checkpoint and no metrics.jsonl of a "
                             "run; check the output folder's name, or start a new run without --resume (resume=False)")
        log.warning("no checkpoint in %s to resume from (the run stopped before its first): starting from step 0", out)
    max_length = _fit_positions(model, cfg.max_length)
    if cfg.task == "causal-lm":
        _require_causal_lm(model)
        train_enc = encode_causal(tokenizer, train, max_length, cfg.use_chat_template, source="train data")
        eval_enc = encode_causal(tokenizer, eval, max_length, cfg.use_chat_template, source="eval data") if eval else None
    else:
        num_labels = int(getattr(getattr(model, "config", None), "num_labels", 0) or 0)
        if not num_labels:
            raise ValueError("classification needs a model with config.num_labels (a sequence-classification head)")
        train_enc = encode_classification(tokenizer, train, max_length, num_labels, source="train data")
        eval_enc = encode_classification(tokenizer, eval, max_length, num_labels, source="eval data") if eval else None
    if cfg.eval_every and not eval_enc:
        log.warning("eval_every=%d but no eval data was given: nothing will be evaluated", cfg.eval_every)
    # checkpoints record which data and which base weights they were trained on: a resume on others is refused
    identity = {"data_sha256": _data_digest(train) if out is not None else ""}

    torch.manual_seed(cfg.seed)
    METHODS[cfg.method].prepare(model, cfg)  # raises for a method the model cannot take: no folder left behind
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        finished.unlink(missing_ok=True)  # an earlier run's: this one is not finished until it saves
    device = next(model.parameters()).device
    precision, why = choose_precision(cfg.precision, device)
    if precision == "bf16":  # frozen base in bf16, adapters and heads fp32; all-trainable models autocast instead
        cast_base(model, torch.bfloat16)
    if out is not None:  # in the dtype the run trains in: the same model resumed as bf16 or fp32 agrees
        identity["base_weights"] = base_fingerprint(model)
    compute = "bf16_autocast" if precision == "bf16" and all(p.requires_grad for p in model.parameters()) else precision
    if cfg.grad_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5: the old name is deprecated
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            log.warning("%s has no activation checkpointing: grad_checkpointing ignored", type(model).__name__)
    optimizer = build_optimizer(model, cfg)
    total = total_steps(len(train_enc), cfg)
    if cfg.warmup >= 1 and cfg.warmup >= total:
        log.warning("warmup=%g steps is not shorter than the run's %d steps: the learning rate never reaches lr=%g "
                    "(give fewer warm-up steps, or a fraction < 1)", cfg.warmup, total, cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(total, cfg.warmup, cfg.schedule))
    trainable = [p for p in model.parameters() if p.requires_grad]
    named_trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    step = 0
    if checkpoint is not None:
        step = _load_checkpoint(checkpoint, cfg, named_trainable, optimizer, scheduler, identity, _data_digest(given))
        log.info("resumed from %s (step %d)", checkpoint, step)
    start_step = step
    if out is not None:
        _truncate_metrics(out / "metrics.jsonl", step)
    n_train, n_all = sum(p.numel() for p in trainable), sum({id(p): p.numel() for p in model.parameters()}.values())
    notify({"event": "start", "step": step, "total": total, "precision": precision, "precision_reason": why, "trainable": n_train,
            "total_params": n_all, "frozen": n_all - n_train, "compute": compute, "examples": len(train_enc)})

    memory_kind = reset_peak_memory(device)
    model.train()
    history: list[dict[str, Any]] = []
    eval_metrics: dict[str, float] = {}
    last_loss = float("nan")
    t_start = time.perf_counter()
    last_good = checkpoint
    micro_total = total * cfg.grad_accum if cfg.steps is not None else _epoch_micro_batches(len(train_enc), cfg)
    while step < total:
        t0 = time.perf_counter()
        loss_total, tokens = 0.0, 0
        batches = [collate(_micro_batch(train_enc, cfg, i), pad_id) for i in range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum)
                   if i < micro_total]  # an --epochs run's last step may take fewer micro-batches
        weights = [_loss_weight(batch, cfg.task) for batch in batches]
        step_weight = sum(weights) or 1  # each labelled token (example) of the step weighs the same
        for batch, weight in zip(batches, weights):
            batch = {key: v.to(device) for key, v in batch.items()}
            tokens += int(batch["attention_mask"].sum())
            with _autocast(compute, device):
                loss = causal_lm_loss(model, batch)[0] if cfg.task == "causal-lm" else classification_loss(model, batch)[0]
            if not torch.isfinite(loss):
                raise TrainingError(f"loss is {float(loss.detach())} at step {step + 1}: training stopped; {_where(last_good)}. "
                                    f"{_LOWER_LR}")
            share = weight / step_weight
            (loss * share).backward()
            loss_total += float(loss.detach()) * share
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf"))
        if not torch.isfinite(grad_norm):
            raise TrainingError(f"gradients are not finite at step {step + 1} (norm {float(grad_norm)}): training stopped "
                                f"before the update; {_where(last_good)}. {_LOWER_LR}")
        lr = optimizer.param_groups[0]["lr"]
        try:
            optimizer.step()
        except RuntimeError as e:  # an lr near float32's range: AdamW's step size overflows
            if "overflow" not in str(e):
                raise
            raise TrainingError(f"the optimizer step overflowed at step {step + 1} (lr {lr:g}): training stopped; "
                                f"{_where(last_good)}. {_LOWER_LR}") from e
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        last_loss = loss_total
        dt = time.perf_counter() - t0
        record = {"step": step, "loss": loss_total, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tokens / dt,
                  "step_s": dt, "peak_mb": peak_memory_mb(device)}
        if step % cfg.log_every == 0 or step == total:
            history.append(record)
            _append_metrics(out, record)
        notify({"event": "step", "total": total, **record})
        if eval_enc and cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
            eval_metrics = evaluate(model, eval_enc, cfg, pad_id, compute)
            record = {"step": step, **eval_metrics}
            history.append(record)
            _append_metrics(out, record)
            notify({"event": "eval", **record})
        if out is not None and cfg.save_every and step % cfg.save_every == 0 and step < total:
            last_good = _save_checkpoint(out, step, model, cfg, named_trainable, optimizer, scheduler, last_good, identity)
            notify({"event": "save", "step": step, "path": str(last_good)})
    if eval_enc and not cfg.eval_every:
        eval_metrics = evaluate(model, eval_enc, cfg, pad_id, compute)
        history.append({"step": step, **eval_metrics})
        _append_metrics(out, history[-1])
    if out is not None:
        _check_finite(named_trainable, step, last_good)
        try:
            METHODS[cfg.method].save(model, out)
            plot_loss(out / "metrics.jsonl", out / "loss.png")
            templated = cfg.task == "causal-lm" and (cfg.use_chat_template if cfg.use_chat_template is not None else
                                                     getattr(tokenizer, "chat_template", None) is not None)  # as format_prompt
            record = {"step": step, "config": cfg.to_dict(), "used_chat_template": templated}
            if cfg.task == "classification":  # what a reload needs: load_model(..., num_labels=, label_names=)
                record["num_labels"] = model.config.num_labels
                record["id2label"] = {str(k): v for k, v in getattr(model.config, "id2label", {}).items()}
            atomic_write_bytes(finished, json.dumps(record, indent=1).encode())
            _remove_unfinished(out)
        except OSError as e:
            raise TrainingError(f"could not write the final result to {out}: {e}; {_where(last_good, resume=True)}") from e
    seconds = time.perf_counter() - t_start
    peak = peak_memory_mb(device)
    notify({"event": "end", "step": step, "seconds": seconds, "peak_memory_mb": peak, "peak_memory_kind": memory_kind, **eval_metrics})
    return TrainResult(step, last_loss, eval_metrics, precision, n_train, n_all, seconds, out, history, peak, memory_kind,
                       start_step)


_LOWER_LR = "Start a new run (another --out) with a lower --lr, or check the data: --resume keeps a run's settings"


def _where(last_good: Path | None, resume: bool = False) -> str:
    """Where a stopped run can be picked up again, for its error message; `resume`: say how (a cause outside the
    run, such as a full disk, that the same settings can get past)."""
    if not last_good:
        return "no checkpoint was written"
    how = " (once the cause is fixed, e.g. space freed, the same command with --resume continues from it)" if resume else ""
    return f"the last good checkpoint is {last_good}{how}"


def _require_causal_lm(model: nn.Module) -> None:
    """Refuse a model that is not a causal LM (an encoder such as BERT, or a model without an LM head)."""
    config = getattr(model, "config", None)
    if config is not None and is_bidirectional_encoder(config):
        why = f"an encoder ({config.model_type}) that reads the text in both directions"
    elif hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is None:
        why = "it has no language-model head"
    else:
        return
    raise ValueError(f"{type(model).__name__} is not a causal language model ({why}): task 'causal-lm' needs one "
                     "(e.g. a ...ForCausalLM); fine-tune an encoder for classification (--task classification, "
                     "task='classification')")


# ---- checkpoints ------------------------------------------------------------------------------------------

def latest_checkpoint(out: Path) -> Path | None:
    """The highest-step complete checkpoint folder in `out` (half-written ones are hidden temp folders)."""
    if not out.is_dir():
        return None
    found = _own_checkpoints(out)
    return found[-1] if found else None


def _own_checkpoints(out: Path) -> list[Path]:
    """lorakit's complete ``checkpoint-<step>`` folders in `out`, oldest first (those with an intact state JSON)."""
    return [p for p, damage in _checkpoint_folders(out) if damage is None]


def _checkpoint_folders(out: Path) -> list[tuple[Path, str | None]]:
    """lorakit's ``checkpoint-<step>`` folders in `out`, oldest first, with why each state JSON is damaged (or None)."""
    found = []
    for p in out.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = p.name[len(CHECKPOINT_PREFIX):]
        if suffix.isdigit() and (p / STATE_TENSORS).is_file():  # Hugging Face's Trainer never writes STATE_TENSORS
            found.append((int(suffix), p, _state_damage(p, int(suffix))))
    return [(p, damage) for _, p, damage in sorted(found)]


def _state_damage(folder: Path, step: int) -> str | None:
    """Why `folder`'s state JSON is not a lorakit run's (missing, unreadable, without its step and config), or None."""
    try:
        meta = json.loads((folder / STATE_JSON).read_text())
    except FileNotFoundError:
        return "missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"not readable JSON: {e}"
    if not (isinstance(meta, dict) and meta.get("step") == step and isinstance(meta.get("config"), dict)):
        return f"not a lorakit checkpoint's state (step {step} and a config)"
    return None


def _data_digest(data: Any) -> str:
    """SHA-256 of `data` as sorted-key JSON: which training data a checkpoint was written on."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _check_finite(named: dict[str, nn.Parameter], step: int, last_good: Path | None) -> None:
    """Refuse to save trainable weights that went inf/NaN (a diverged run): stop, keeping the last good checkpoint."""
    bad = [n for n, p in named.items() if not torch.isfinite(p.detach()).all()]
    if bad:
        raise TrainingError(f"trainable weights are not finite after step {step} (e.g. {bad[0]}): training stopped "
                            f"without saving them; {_where(last_good)}. {_LOWER_LR}")


def _save_checkpoint(
    out: Path, step: int, model: nn.Module, cfg: TrainConfig, named: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer, scheduler: Any, last_good: Path | None, identity: dict[str, str] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` into a temp folder and rename it into place; on failure keep the last one."""
    _check_finite(named, step, last_good)
    final = out / f"{CHECKPOINT_PREFIX}{step}"
    tmp = out / f".{CHECKPOINT_PREFIX}{step}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tensors = {f"param.{n}": p.detach().contiguous().clone() for n, p in named.items()}
        opt = optimizer.state_dict()
        for idx, state in opt["state"].items():
            for key, value in state.items():
                tensors[f"opt.{idx}.{key}"] = value.detach().reshape(value.shape).contiguous().clone()
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = state
        atomic_write_bytes(tmp / STATE_TENSORS, st_save(tensors))
        meta = {"step": step, "config": cfg.to_dict(), "param_groups": opt["param_groups"], **(identity or {}),
                "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}}
        if get_state(model, required=False) is not None:
            save_adapter(model, tmp / "adapter")
        atomic_write_bytes(tmp / STATE_JSON, json.dumps(meta, indent=1).encode())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"could not write checkpoint at step {step} ({e}); training stopped; "
                            f"{_where(last_good, resume=True)}") from e
    old = _own_checkpoints(out)  # never another tool's checkpoint-<n> folders
    for p in old[:-cfg.keep_checkpoints] if cfg.keep_checkpoints > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    _remove_unfinished(out)
    return final


def _remove_unfinished(out: Path) -> None:
    """Delete the checkpoint temp folders a killed save left half written (only names lorakit itself writes)."""
    for p in out.glob(f".{CHECKPOINT_PREFIX}*.tmp"):
        if p.name[len(CHECKPOINT_PREFIX) + 1:-len(".tmp")].isdigit():
            shutil.rmtree(p, ignore_errors=True)


def _load_checkpoint(
    path: Path, cfg: TrainConfig, named: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any,
    identity: dict[str, str] | None = None, legacy_data_sha256: str = "",
) -> int:
    """Restore trainable weights, optimizer, scheduler and RNG from `path`; returns its step.

    `identity` (data and base-weight fingerprints) must match what the checkpoint recorded, where it did; the data
    may also match `legacy_data_sha256`, the digest an older lorakit took of the data argument as passed."""
    meta = json.loads((path / STATE_JSON).read_text())
    try:
        tensors = st_load((path / STATE_TENSORS).read_bytes())
    except Exception as e:  # safetensors raises its own SafetensorError for a damaged file
        raise ValueError(f"checkpoint {path} is damaged ({path / STATE_TENSORS}: {e}); delete that folder to resume "
                         "from the checkpoint before it (from step 0 if it is the only one)") from None
    saved = {**TrainConfig().to_dict(), **meta["config"]}  # a field added since the checkpoint: its default
    # targets written differently (None = the model's default, a list, a regex) that adapt the same layers are the same
    same_layers = {k.removeprefix("param.") for k in tensors if k.startswith("param.")} == set(named)
    changed = [f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(cfg, k)!r}" for k in RESUME_FIELDS
               if json.loads(json.dumps(getattr(cfg, k))) != saved.get(k) and not (k == "target_modules" and same_layers)]
    ident = identity or {}
    recorded = meta.get("data_sha256")
    if recorded and ident.get("data_sha256") and recorded not in (ident["data_sha256"], legacy_data_sha256):
        changed.append("the training data differ")
    if changed:
        raise ValueError(f"cannot resume from {path}: the run's settings changed ({'; '.join(changed)}); "
                         "use the same settings or a new --out folder")
    missing = [n for n in named if f"param.{n}" not in tensors]
    if missing:
        raise ValueError(f"checkpoint {path} lacks trainable tensors {missing[:5]}: it belongs to another model or method")
    wrong = [f"{n}: {tuple(tensors[f'param.{n}'].shape)} there, {tuple(p.shape)} here" for n, p in named.items()
             if tensors[f"param.{n}"].shape != p.shape]
    if wrong:
        raise ValueError(f"checkpoint {path} was trained on another model or head ({'; '.join(wrong[:3])}): resume with "
                         "the same --model and --num-labels, or use a new --out folder")
    if meta.get("base_weights") and ident.get("base_weights") and meta["base_weights"] != ident["base_weights"]:
        raise ValueError(f"cannot resume from {path}: the base model's weights differ from the run's (another --model of "
                         "the same shape?); resume with the same model, or use a new --out folder")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(tensors[f"param.{n}"])
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    if len(meta["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"cannot resume from {path}: its optimizer has {len(meta['param_groups'])} parameter groups and "
                         f"this run's has {len(optimizer.param_groups)} (a checkpoint of an older lorakit: since 2026-12-02 "
                         "weight decay leaves biases and norms out, in a group of their own); use a new --out folder")
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return int(meta["step"])


def _fit_positions(model: nn.Module, max_length: int) -> int:
    """`max_length`, cut to the model's position table (BERT 512, GPT-2 1024) with a warning: longer inputs crash it."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and "roberta" in str(getattr(config, "model_type", "")):
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1  # RoBERTa's positions start after the padding index
    if isinstance(limit, int) and 0 < limit < max_length:
        log.warning("max_length=%d (--max-length) exceeds the model's %d positions (config.max_position_embeddings): "
                    "using %d", max_length, limit, limit)
        return limit
    return max_length


def base_fingerprint(model: nn.Module) -> str:
    """A digest of the frozen weights (each tensor's Σ|w| to 10 significant digits, in name order), taken in the
    run's training dtype: another base of the same shape differs."""
    sums = [f"{n}:{float(p.detach().abs().sum(dtype=torch.float64)):.10g}"
            for n, p in sorted(model.named_parameters()) if not p.requires_grad and p.is_floating_point() and not p.is_meta]
    return hashlib.sha256("\n".join(sums).encode()).hexdigest()


# ---- metrics and plot ---------------------------------------------------------------------------------------

def _append_metrics(out: Path | None, record: dict[str, Any]) -> None:
    if out is None:
        return
    try:
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        last = latest_checkpoint(out)
        raise TrainingError(f"could not append to {out / 'metrics.jsonl'} ({e}); training stopped; the last good "
                            f"checkpoint is {last or 'none'} (--resume continues from it)") from e


def _foreign_metrics(file: Path) -> bool:
    """Whether `file` exists with a line that is not a lorakit step record (a fresh run replaces only a run's own)."""
    if not file.is_file():
        return False
    text = file.read_text(errors="replace")
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]  # a kill may tear the last line
    for line in lines:
        try:
            if not isinstance(json.loads(line).get("step"), int):
                return True
        except (json.JSONDecodeError, AttributeError):
            return True
    return False


def _truncate_metrics(file: Path, step: int) -> None:
    """Drop records after `step` (a resumed run re-does those steps) and any torn line, atomically."""
    if not file.is_file():
        return
    keep = []
    for line in file.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a crash or a full disk
            continue
    atomic_write_bytes(file, ("\n".join(keep) + "\n" if keep else "").encode())


def plot_loss(metrics_file: Path, png: Path) -> None:
    """Training (and eval) loss against step from ``metrics.jsonl``, as a PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(ln) for ln in metrics_file.read_text().splitlines() if ln.strip()] if metrics_file.is_file() else []
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        window = len(train) // 20  # smooth only when there are enough logged points to smooth
        ax.plot(*zip(*train), lw=0.8 if window > 1 else 1.6, alpha=0.5 if window > 1 else 1.0, label="train loss")
        if window > 1:
            ys = [statistics.fmean(y for _, y in train[max(0, i - window + 1):i + 1]) for i in range(len(train))]
            ax.plot([s for s, _ in train], ys, lw=1.6, label=f"train loss (mean of {window} logged steps)")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())
