"""``lorakit serve``: one base model, many adapters, an OpenAI-style HTTP API with mixed-adapter batching."""

from __future__ import annotations

import argparse

from lorakit.cli._args import bounded


def _named_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter takes NAME=PATH (e.g. sql=./adapters/sql), got {text!r}")
    return name, path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a base model with named adapters over HTTP (/v1/completions, /v1/chat/completions)")
    p.add_argument("--model", default="smollm2-135m", help="bundled short name, local folder or hub id")
    p.add_argument("--adapter", action="append", type=_named_path, default=[], metavar="NAME=PATH",
                   help="an adapter folder to serve as model NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=bounded(int, 0, 65535), default=8000)
    p.add_argument("--max-batch", type=bounded(int, 1), default=8, help="rows per mixed batch")
    p.add_argument("--max-wait-ms", type=bounded(float, 0), default=10.0, help="how long a batch waits for more requests")
    p.add_argument("--max-tokens", type=bounded(int, 1), default=256, help="largest max_tokens a request may ask for")
    p.add_argument("--max-context", type=bounded(int, 1), default=None,
                   help="prompt + completion tokens a request may use (default: the model's context)")
    p.add_argument("--max-body-mb", type=bounded(float, 0, open_low=True), default=None,
                   help="largest request body in MiB; a larger one is a 413 before it is read (default 16)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib.util

    import torch

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(f"lorakit serve needs {missing}: pip install 'lorakit[serve]'")
    from lorakit.models import load_model
    from lorakit.serve import Engine, create_app, load_servable, name_problem, serve

    names = [name for name, _ in args.adapter]
    problems = [p for p in map(name_problem, names) if p] + [
        f"--adapter {n}=... is given twice" for n in dict.fromkeys(names) if names.count(n) > 1]
    if problems:
        raise ValueError("; ".join(problems))
    model, tokenizer = load_model(args.model, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    for name, path in args.adapter:
        load_servable(model, name, path)
    engine = Engine(model, tokenizer, max_new_tokens=args.max_tokens, max_context=args.max_context)
    limit = {} if args.max_body_mb is None else {"max_body": int(args.max_body_mb * 2**20)}
    app = create_app(engine, max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000, **limit)
    serve(app, args.host, args.port)
    return 0
