"""``lorakit convert``: inspect an adapter folder, or rewrite it as safetensors / in another precision.

    lorakit convert inspect DIR [--json]          rank, alpha, targets, params, size, dtypes, base model
    lorakit convert DIR --out DIR2 [--dtype fp16]  legacy .bin -> safetensors, fp32 -> fp16/bf16
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="inspect an adapter folder (PEFT layout) or convert it (.bin -> safetensors, precision)",
        description="`lorakit convert inspect DIR` describes an adapter folder (lorakit's or PEFT's); "
        "`lorakit convert DIR --out DIR2 [--dtype fp16]` writes it as safetensors, optionally cast.",
    )
    p.add_argument("args", nargs="+", metavar="inspect DIR | DIR", help="`inspect DIR`, or the folder to convert")
    p.add_argument("--out", help="folder to write the converted adapter to (must not hold an adapter yet)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="store the tensors in this precision")
    p.add_argument("--json", action="store_true", help="inspect: print JSON instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.convert import convert_adapter, inspect_adapter

    words = list(args.args)
    if words[0] == "inspect" and len(words) == 2:
        info = inspect_adapter(words[1])
        print(json.dumps(info.to_dict(), indent=2) if args.json else info.to_text())
        return 0
    if len(words) != 1:
        raise ValueError(f"expected `inspect DIR` or `DIR --out DIR2`, got {' '.join(words)!r}")
    if not args.out:
        raise ValueError("pass --out DIR2 to convert, or `lorakit convert inspect DIR` to look inside")
    out = convert_adapter(words[0], args.out, dtype=args.dtype)
    print(inspect_adapter(out).to_text())
    return 0
