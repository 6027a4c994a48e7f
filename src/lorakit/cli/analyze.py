"""``lorakit analyze ADAPTER [ADAPTER2] [--model M] --out DIR``: the paper's analyses of saved adapters.

Writes ``report.md`` (ΔW spectra, subspace similarity of two adapters, amplification against the base
weights when ``--model`` is given) and PNG figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="subspace similarity, amplification and ΔW spectra of saved adapters")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="one or two adapter folders")
    p.add_argument("--model", help="base model (bundled name, folder or hub id) for the amplification table")
    p.add_argument("--task", choices=["causal-lm", "classification"],
                   help="how to load --model (default: the adapters' task, from their adapter_config.json: a "
                        "classification head or task_type SEQ_CLS gives classification; else causal-lm)")
    p.add_argument("--out", required=True, help="folder for report.md and the figures")
    p.set_defaults(func=run)


def adapter_task(path: str) -> str | None:
    """'classification' if adapter folder `path`'s config says it was trained with a classification head, else None.

    Read from adapter_config.json: PEFT's ``task_type`` SEQ_CLS, a ``...ForSequenceClassification`` base class
    (``auto_mapping``, as lorakit writes it) or a classifier head in ``modules_to_save``. An unreadable config
    says nothing here (`analyze` reports it).
    """
    try:
        fields = json.loads((Path(path).expanduser() / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(fields, dict):
        return None
    from lorakit.injection import HEAD_NAMES

    heads = [n for n in HEAD_NAMES if n != "qa_outputs"]  # a question-answering head is no classifier
    base_class = (fields.get("auto_mapping") or {}).get("base_model_class") or ""
    saved = fields.get("modules_to_save") or []
    if (fields.get("task_type") == "SEQ_CLS" or str(base_class).endswith("ForSequenceClassification")
            or any(str(m).rsplit(".", 1)[-1] in heads for m in saved)):
        return "classification"
    return None


def run(args: argparse.Namespace) -> int:
    from lorakit.analysis import analyze, write_report

    if len(args.adapters) > 2:
        raise ValueError(f"analyze takes one or two adapter folders, got {len(args.adapters)}")
    args.out = str(Path(args.out).expanduser())
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out!r} is a file, not a folder: choose another path")
    model = None
    if args.model:
        from lorakit.models import load_model

        task = args.task or next(filter(None, map(adapter_task, args.adapters)), "causal-lm")
        try:
            model, _ = load_model(args.model, task, tokenizer=False)  # the weights are all the analysis reads
        except ValueError as e:
            if args.task is None:  # an encoder loaded as a causal LM: say which flag loads it
                raise ValueError(f"{e}. The adapters' config names no classification head; for `lorakit analyze` "
                                 "pass --task classification (only the base weights are read)") from e
            raise
    report = write_report(analyze(args.adapters, model), args.out)
    print(f"wrote {report} and its figures")
    return 0
