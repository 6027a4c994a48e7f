"""Training data: read records (JSONL, CSV/TSV, E2E NLG, GLUE, Hugging Face `datasets`) and turn them into batches.

Causal LM examples are ``{"prompt", "completion"}``; the loss covers the completion tokens only
(prompt and padding get label -100), and the prompt goes through the tokenizer's chat template
when it has one. Classification examples are ``{"text", "text_pair"?, "label": int}``.
"""

from __future__ import annotations

import csv
import json
import logging
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

#: GLUE tasks in the original ``glue_data/<TASK>/`` TSV layout: their label values (index = class id) ...
GLUE_LABELS: dict[str, list[str]] = {
    "SST-2": ["0", "1"],
    "CoLA": ["0", "1"],
    "RTE": ["entailment", "not_entailment"],
}
#: ... and the classes' names, the head's id2label by default.
GLUE_NAMES: dict[str, list[str]] = {
    "SST-2": ["negative", "positive"],
    "CoLA": ["unacceptable", "acceptable"],
    "RTE": ["entailment", "not_entailment"],
}


# ---- reading records -------------------------------------------------------------------------------

def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a data file (see `_read_records`); a file that is not UTF-8 is an error naming it and the fix."""
    try:
        return _read_records(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#x} at offset {e.start}): save it as UTF-8 "
                         "(in Excel: 'CSV UTF-8')") from None


def _read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl``/``.json`` (list of objects), ``.csv`` or ``.tsv`` file (header row) as dicts.

    CSV and TSV use standard quoting (a field in double quotes may hold the delimiter, newlines and ``""``).

    Read as UTF-8 with or without a byte-order mark (Excel's "CSV UTF-8" writes one). A JSON row that is
    not an object, or a CSV row with more fields than the header, is an error naming its line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        with path.open(encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(_json_object(json.loads(line), f"{path}:{n}"))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n} is not valid JSON ({e.msg}); each line must be one JSON object") from e
        return rows
    if suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            hint = "; it holds one JSON object per line: name it .jsonl" if e.msg == "Extra data" else ""
            raise ValueError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}){hint}") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path} must hold a JSON list of objects (or use .jsonl, one object per line)")
        return [_json_object(row, f"{path}: item {i}") for i, row in enumerate(rows)]
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8-sig", newline="") as f:
            # standard quoting, as csv.writer and pandas write it; GLUE's unquoted .tsv files go through `load_glue`
            reader = csv.DictReader(f, restkey=_EXTRA, **({"delimiter": "\t"} if suffix == ".tsv" else {}))
            rows = []
            for row in reader:
                if _EXTRA in row:
                    raise ValueError(f"{path}:{reader.line_num} has {len(reader.fieldnames) + len(row[_EXTRA])} fields but the "
                                     f"header has {len(reader.fieldnames)} ({reader.fieldnames}); quote values that hold "
                                     f"the delimiter {reader.reader.dialect.delimiter!r}")
                rows.append(row)
            return rows
    raise ValueError(
        f"cannot read {path}: use a .jsonl, .json, .csv or .tsv file, an E2E '<mr>||<ref>' .txt file (causal LM), "
        "a GLUE task folder, or hf:<dataset>"
    )


_EXTRA = "\0extra"  # DictReader's key for the fields of a row beyond the header's


def _json_object(value: Any, where: str) -> dict[str, Any]:
    """`value` if it is a JSON object, else an error naming `where`."""
    if not isinstance(value, dict):
        kind = "null" if value is None else type(value).__name__
        raise ValueError(f"{where} is a JSON {kind}, not an object; each example must be one object such as "
                         '{"prompt": "...", "completion": "..."}')
    return value


def _require(rows: Sequence[Mapping], fields: dict[str, str], source: str) -> None:
    """Every row has a non-null value for each field; `fields` maps a role (``prompt``, ``label``…) to its field name.

    The error names the example, the field and the option that renames it (CLI and Python).
    """
    if not rows:
        raise ValueError(f"{source} has no examples: the dataset is empty")
    for i, row in enumerate(rows):
        for role, name in fields.items():
            if name not in row:
                hint = ("; these look like classification examples (a label field): --task classification"
                        if role in ("prompt", "completion") and "label" in row else "")
                raise ValueError(
                    f"{source}: example {i} has no field {name!r} (it has {sorted(row)}); name the {role} field to use: "
                    f"--{role.replace('_', '-')}-field in the CLI, {role}_field= in lorakit.load_data(){hint}"
                )
            if row[name] is None:
                raise ValueError(f"{source}: field {name!r} is null in example {i} (the {role}); fill it in or "
                                 "remove that example")
            if role == "completion" and isinstance(row[name], str) and not row[name].strip():
                raise ValueError(f"{source}: field {name!r} is empty in example {i} (the completion), which would teach "
                                 "the model to answer with nothing (an empty cell in a CSV?); fill it in or remove that "
                                 "example")
            if isinstance(row[name], (dict, list)):
                raise ValueError(f"{source}: field {name!r} of example {i} (the {role}) is a JSON "
                                 f"{'object' if isinstance(row[name], dict) else 'list'}, not text or a number")


def class_id(raw: Any, i: int, source: str) -> int:
    """`raw` (an int, an integral float or a numeric string) as a class id >= 0; the error names example `i`."""
    try:
        label = int(raw)
    except (TypeError, ValueError, OverflowError):
        label = -1
    is_bool = isinstance(raw, bool) or str(getattr(raw, "dtype", "")) in ("bool", "torch.bool")  # numpy, torch too
    if label < 0 or is_bool or (not isinstance(raw, (numbers.Integral, str)) and raw != label):
        raise ValueError(f"{source}: example {i} has label {raw!r}; labels must be class ids: integers >= 0 "
                         "(0 .. number of classes - 1)")
    return label


def causal_examples(
    rows: list[dict], prompt_field: str = "prompt", completion_field: str = "completion", source: str = "data"
) -> list[dict[str, str]]:
    """Prompt/completion pairs from records with the given field names."""
    _require(rows, {"prompt": prompt_field, "completion": completion_field}, source)
    return [{"prompt": str(r[prompt_field]), "completion": str(r[completion_field])} for r in rows]


def classification_examples(
    rows: list[dict],
    text_field: str = "text",
    label_field: str = "label",
    text_pair_field: str | None = None,
    labels: Sequence[str] | None = None,
    source: str = "data",
) -> list[dict[str, Any]]:
    """Text (+ optional pair) and integer class id; with `labels` (class names, their order = class id) each
    label must be one of them, else labels must be class ids (integers >= 0)."""
    _require(rows, {"text": text_field, "label": label_field, **({"text_pair": text_pair_field} if text_pair_field else {})},
             source)
    names = [str(n) for n in labels] if labels is not None else None
    def word(raw: Any) -> bool:  # a label that is no class id
        return isinstance(raw, str) and bool(raw.strip()) and not raw.strip().lstrip("+-").isdigit()

    def key(raw: Any) -> str:  # a label as a name: 1.0 and " 1" are "1"
        return str(int(raw)) if isinstance(raw, float) and raw.is_integer() else str(raw).strip()

    # labels map through `names`, unless the names are all words and the labels all class ids: then they name the ids.
    # Decided by the names when one looks like a number (1..5 stars), so every file of a run maps alike.
    by_name = names is not None and (not all(map(word, names)) or any(word(r[label_field]) for r in rows))
    if by_name and (i := next((i for i, r in enumerate(rows) if key(r[label_field]) not in names), None)) is not None:
        raise ValueError(f"{source}: example {i} has label {rows[i][label_field]!r}, which is not one of the class "
                         f"names {names}")
    out = []
    for i, r in enumerate(rows):
        raw = r[label_field]
        if names is None and word(raw):
            found = sorted({str(x[label_field]) for x in rows})
            shown = ",".join(found[:10]) + (",..." if len(found) > 10 else "")
            raise ValueError(f"{source}: example {i} has label {raw!r}: labels are class ids (integers >= 0) unless you name "
                             f"the classes in class-id order: --label-names {shown} in the CLI, labels=[...] in "
                             f"lorakit.load_data() ({len(found)} distinct labels here)")
        label = names.index(key(raw)) if by_name else class_id(raw, i, source)
        if names is not None and label >= len(names):
            raise ValueError(f"{source}: example {i} has class id {label}, but the class names {names} name {len(names)} "
                             f"class{'es' if len(names) > 1 else ''} (ids 0..{len(names) - 1}): name every class")
        ex = {"text": str(r[text_field]), "label": label}
        if text_pair_field:
            ex["text_pair"] = str(r[text_pair_field])
        out.append(ex)
    return out


#: Between an E2E meaning representation and its reference, as in the LoRA paper's files: the prompt ends with it
#: and the completion starts with a space, so a model without a chat template still sees where the answer begins.
E2E_SEPARATOR = " ||"


def _e2e_example(mr: str, ref: str) -> dict[str, str]:
    return {"prompt": mr.strip() + E2E_SEPARATOR, "completion": " " + ref.strip()}


def load_e2e(path: str | os.PathLike) -> list[dict[str, str]]:
    """E2E NLG CSV (``mr,ref``): meaning representation → reference sentence, one pair per row."""
    rows = read_records(Path(path))
    return [_e2e_example(ex["prompt"], ex["completion"]) for ex in causal_examples(rows, "mr", "ref", source=str(path))]


def load_e2e_lora_format(path: str | os.PathLike) -> list[dict[str, str]]:
    """The LoRA paper's E2E files (microsoft/LoRA ``examples/NLG/data/e2e/*.txt``): ``<linearised MR>||<reference>`` per line."""
    path = Path(path)
    out = []
    with path.open(encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            mr, sep, ref = line.rstrip("\n").partition("||")
            if not sep:
                raise ValueError(f"{path}:{n} has no '||' between the meaning representation and the reference")
            out.append(_e2e_example(mr, ref))
    if not out:
        raise ValueError(f"{path} has no examples: the dataset is empty")
    return out


def glue_task(name: str) -> str | None:
    """The GLUE task a folder name stands for (``SST-2``, ``sst2``, ``cola``…), or None."""
    key = name.upper().replace("-", "").replace("_", "")
    return next((task for task in GLUE_LABELS if task.upper().replace("-", "") == key), None)


def glue_source(spec: str | os.PathLike) -> str | None:
    """The GLUE task a data source is (a task folder or one of its split files), else None."""
    path = Path(spec)
    if path.is_dir():
        return glue_task(path.name)
    return glue_task(path.parent.name) if path.is_file() and path.suffix == ".tsv" else None


def default_label_names(spec: str | os.PathLike) -> list[str] | None:
    """The class names of a GLUE source (the head's id2label when none are given), else None."""
    task = glue_source(spec)
    return list(GLUE_NAMES[task]) if task else None


def load_glue(task_dir: str | os.PathLike, split: str = "train", labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """A GLUE task (SST-2, RTE, CoLA) from its ``glue_data/<TASK>/<split>.tsv`` folder, read with QUOTE_NONE.

    `labels`: the classes' names in class-id order, one per class of the task; when they are the task's own label
    values or class names (`GLUE_NAMES`) the ids follow their order, otherwise they rename the task's classes."""
    task_dir = Path(task_dir)
    task = glue_task(task_dir.name)
    if task is None:
        raise ValueError(f"unknown GLUE task folder {task_dir.name!r}: lorakit reads {sorted(GLUE_LABELS)}")
    if labels is not None and len(labels) != len(GLUE_LABELS[task]):
        raise ValueError(f"{task} has {len(GLUE_LABELS[task])} classes ({', '.join(GLUE_NAMES[task])}); labels= gives "
                         f"{len(labels)}: {list(labels)} (--label-names in the CLI): give one name per class, or none")
    # the task's own label values or class names in another order reorder the ids; other names rename the classes
    given = [str(n) for n in labels] if labels is not None else []
    own = next((o for o in (GLUE_LABELS[task], GLUE_NAMES[task]) if set(given) == set(o)), None)
    values = [GLUE_LABELS[task][own.index(n)] for n in given] if own else None
    file = task_dir / f"{split}.tsv"
    if split == "test":
        raise ValueError(f"{file}: GLUE test splits carry no labels (the benchmark keeps them hidden), so they cannot "
                         "train or score a model; use train to train and dev to evaluate")
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist (GLUE splits are train, dev, test)")
    with file.open(encoding="utf-8", newline="") as f:
        if task == "CoLA":  # no header: source, label, original judgment, sentence
            rows = [{"sentence": r[3], "label": r[1]} for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
        else:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    pair = "sentence2" if task == "RTE" else None
    return classification_examples(rows, "sentence1" if pair else "sentence", "label", pair, values or GLUE_LABELS[task],
                                   source=str(file))


def load_hf(name: str, split: str = "train") -> list[dict[str, Any]]:
    """Records of a Hugging Face dataset (``name`` or ``name:config``) via the optional `datasets` package."""
    try:
        import datasets
    except ImportError as e:
        raise ModuleNotFoundError("hf: datasets need the datasets package: pip install datasets") from e
    dataset, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(dataset, config or None, split=split)
    except Exception as e:  # network, unknown name, missing split: all reported the same way
        raise ValueError(f"cannot load Hugging Face dataset {name!r} split {split!r}: {e}") from e
    return [dict(r) for r in ds]


def load_data(
    spec: str | os.PathLike,
    task: str = "causal-lm",
    split: str = "train",
    *,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    text_field: str = "text",
    text_pair_field: str | None = None,
    label_field: str = "label",
    labels: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Examples for `task` from a file, a GLUE task folder, an E2E CSV (``mr,ref``) or the LoRA paper's E2E ``.txt``
    (``mr||ref``), or ``hf:<dataset>[:<config>]``.

    For a folder or ``hf:`` source, `split` picks the split (``train``, ``dev``…); a file is one split
    (``train``, the default: any other split of a file is an error, not silently the same file).
    `labels` names the classes of string labels in class-id order (``["neg", "pos"]``: neg = 0).
    """
    spec = str(spec)
    if spec.startswith("hf:"):
        rows, source = load_hf(spec[3:], split), spec
    else:
        path = Path(spec)
        glue_file = path.is_file() and glue_source(path) is not None
        if split != "train" and path.is_file():  # a file is one split: never silently the training file again
            what, fix = ("one split's file", f"{path.parent / split}.tsv") if glue_file else ("a file", "FILE")
            raise ValueError(f"{path} is {what}: a split (split={split!r}, --eval-split) applies to a GLUE task folder "
                             f"or an hf: source; give the evaluation file itself (--eval-data {fix})")
        if (path.is_dir() and glue_task(path.name)) or glue_file:
            if task != "classification":
                raise ValueError(f"{path} is a GLUE task, labelled sentences: use --task classification "
                                 "(task='classification') with an encoder such as minilm-l6")
            return load_glue(path.parent, path.stem, labels) if glue_file else load_glue(path, split, labels)
        if path.is_dir():
            raise ValueError(f"{path} is a folder but not a GLUE task folder ({sorted(GLUE_LABELS)}); pass a data file")
        if task == "causal-lm" and path.suffix.lower() == ".txt":
            return load_e2e_lora_format(path)
        rows, source = read_records(path), spec
        if task == "causal-lm" and rows and {"mr", "ref"} <= set(rows[0]) and prompt_field not in rows[0]:
            return load_e2e(path)
        if task == "causal-lm" and rows and {k.lower() for k in rows[0]} == {"mr"}:
            raise ValueError(f"{path} holds E2E meaning representations without references (like E2E's testset.csv), "
                             "so there is no completion to learn or score: use a file with references "
                             "(testset_w_refs.csv, devset.csv, trainset.csv)")
    if task == "causal-lm":
        return causal_examples(rows, prompt_field, completion_field, source=source)
    if task == "classification":
        return classification_examples(rows, text_field, label_field, text_pair_field, labels, source=source)
    raise ValueError(f"task must be 'causal-lm' or 'classification', got {task!r}")


# ---- tokenising and batching ---------------------------------------------------------------------

def format_prompt(tokenizer: Any, prompt: str, use_chat_template: bool | None = None) -> str:
    """The prompt text the model sees: the chat template's user turn + assistant header when the tokenizer has one."""
    if use_chat_template is None:
        use_chat_template = getattr(tokenizer, "chat_template", None) is not None
    if use_chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt


def special_prefix(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts before any text by default (a BOS token), which ``tokenizer(prompt)`` at inference sends."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start]
    return []


def encode_prompt(tokenizer: Any, text: str, prefix: list[int] | None = None) -> list[int]:
    """Prompt ids as inference tokenizes them: the tokenizer's leading special tokens (BOS), unless the text (a chat
    template) already starts with them, and no trailing ones (the completion follows). `prefix`: `special_prefix`."""
    prefix = special_prefix(tokenizer) if prefix is None else prefix
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if ids[: len(prefix)] == prefix else prefix + ids


def encode_causal(
    tokenizer: Any, examples: list[dict[str, str]], max_length: int, use_chat_template: bool | None = None,
    source: str = "data",
) -> list[dict[str, list[int]]]:
    """Token ids and labels per example: labels copy the completion (+ EOS) and are -100 on the prompt.

    The prompt starts with the tokenizer's BOS where ``tokenizer(prompt)`` would add one (`encode_prompt`), so
    training sees the prompts that generation later sends.

    A too-long example keeps the end of its prompt (with a chat template: the assistant header the completion
    follows) and the start of its completion; the prompt keeps at least half of `max_length` (all of a shorter
    prompt), so that no example trains a completion without its prompt.
    Examples left with no completion token to predict are an error when it is all of them, else a warning.
    """
    if not examples:
        raise ValueError("the dataset is empty: nothing to train or evaluate on")
    _require(examples, {"prompt": "prompt", "completion": "completion"}, source)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prefix = special_prefix(tokenizer)
    out, cut, cut_prompt, cut_completion = [], 0, 0, 0
    for ex in examples:
        prompt_ids = encode_prompt(tokenizer, format_prompt(tokenizer, str(ex["prompt"]), use_chat_template), prefix)
        completion_ids = tokenizer(str(ex["completion"]), add_special_tokens=False)["input_ids"] + eos  # as files: text
        n_prompt, n_completion = len(prompt_ids), len(completion_ids)
        cut += n_prompt + n_completion > max_length
        completion_ids = completion_ids[:max_length - min(n_prompt, max(1, max_length // 2))]
        prompt_ids = prompt_ids[-(max_length - len(completion_ids)):]
        cut_prompt += len(prompt_ids) < n_prompt
        cut_completion += len(completion_ids) < n_completion
        out.append({
            "input_ids": prompt_ids + completion_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
        })
    if cut:
        log.warning("%s: %d of %d examples are longer than max_length=%d tokens (--max-length): %d lose the end of their "
                    "completion, %d the start of their prompt", source, cut, len(out), max_length, cut_completion, cut_prompt)
    empty = [i for i, item in enumerate(out) if all(t == IGNORE_INDEX for t in item["labels"][1:])]
    if len(empty) == len(out):
        if max_length < 2:
            raise ValueError(f"{source}: no completion tokens survive max_length={max_length} (--max-length) in any of the "
                             f"{len(out)} examples, so there is nothing to learn: raise it (to at least 2)")
        raise ValueError(f"{source}: none of the {len(out)} examples has a completion token to predict (that needs a "
                         "prompt token before it): check that prompts and completions are not empty")
    if empty:
        log.warning("%s: %d of %d examples have no completion token to predict (e.g. example %d) and add nothing to "
                    "the loss", source, len(empty), len(out), empty[0])
    return out


def encode_classification(
    tokenizer: Any, examples: list[dict[str, Any]], max_length: int, num_labels: int, source: str = "data"
) -> list[dict[str, Any]]:
    """Token ids (truncated to `max_length`) and the label; a label the head cannot take is an error."""
    if not examples:
        raise ValueError("the dataset is empty: nothing to train or evaluate on")
    _require(examples, {"text": "text", "label": "label"}, source)
    labels = [class_id(ex["label"], i, source) for i, ex in enumerate(examples)]
    bad = sorted({label for label in labels if label >= num_labels})
    if bad:
        first = next(i for i, label in enumerate(labels) if label >= num_labels)
        raise ValueError(
            f"{source}: labels {bad[:10]} (e.g. example {first}) do not fit a head with {num_labels} classes "
            f"(ids 0..{num_labels - 1}); "
            f"pass --num-labels {max(bad) + 1} (num_labels= of load_model) or fix the data"
        )
    pair = "" if any(ex.get("text_pair") is not None for ex in examples) else None
    special = len(tokenizer("", pair)["input_ids"])  # the tokens it adds around any text
    if max_length <= special:  # tokenizers then skip truncation altogether (and say so only in their log)
        raise ValueError(f"{source}: max_length={max_length} (--max-length) leaves no room for text: the tokenizer adds "
                         f"{special} special tokens; raise it to at least {special + 1}")
    out, cut = [], 0
    for ex, label in zip(examples, labels):
        text, text_pair = str(ex["text"]), (str(ex["text_pair"]) if ex.get("text_pair") is not None else None)
        enc = tokenizer(text, text_pair)
        if len(enc["input_ids"]) > max_length:  # tokenized again, cut as the tokenizer cuts pairs (longest first)
            cut += 1
            enc = tokenizer(text, text_pair, truncation=True, max_length=max_length)
        item = {"input_ids": enc["input_ids"], "labels": label}
        if "token_type_ids" in enc:
            item["token_type_ids"] = enc["token_type_ids"]
        out.append(item)
    if cut:
        log.warning("%s: %d of %d examples are longer than max_length=%d tokens (--max-length) and are cut to it",
                    source, cut, len(out), max_length)
    return out


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a list of encoded examples into a batch with an attention mask (labels -100 on padding)."""
    width = max(len(it["input_ids"]) for it in items)
    n = len(items)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    batch: dict[str, Tensor] = {"input_ids": ids, "attention_mask": mask}
    seq_labels = isinstance(items[0]["labels"], list)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long) if seq_labels else torch.tensor([it["labels"] for it in items])
    types = torch.zeros((n, width), dtype=torch.long) if "token_type_ids" in items[0] else None
    for i, it in enumerate(items):
        k = len(it["input_ids"])
        ids[i, :k] = torch.tensor(it["input_ids"])
        mask[i, :k] = 1
        if seq_labels:
            labels[i, :k] = torch.tensor(it["labels"])
        if types is not None:
            types[i, :k] = torch.tensor(it["token_type_ids"])
    batch["labels"] = labels
    if types is not None:
        batch["token_type_ids"] = types
    return batch
