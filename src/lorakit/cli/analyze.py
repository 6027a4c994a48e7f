"""``lorakit analyze ADAPTER [ADAPTER2] [--model M] --out DIR``: the paper's analyses of saved adapters.

Writes ``report.md`` (ΔW spectra, subspace similarity of two adapters, amplification against the base
weights when ``--model`` is given) and PNG figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="subspace similarity, amplification and ΔW spectra of saved adapters")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="one or two adapter folders")
    p.add_argument("--model", help="base model (bundled name, folder or hub id) for the amplification table")
    p.add_argument("--task", default="causal-lm", choices=["causal-lm", "classification"])
    p.add_argument("--out", required=True, help="folder for report.md and the figures")
    p.set_defaults(func=run)


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

        model, _ = load_model(args.model, args.task, tokenizer=False)  # the weights are all the analysis reads
    report = write_report(analyze(args.adapters, model), args.out)
    print(f"wrote {report} and its figures")
    return 0
