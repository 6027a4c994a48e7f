"""The ``lorakit`` command: a thin face over the library.

Each subcommand is a module in this package that defines ``register(subparsers)``; it is found
automatically, so adding a command is adding a file.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand module of this package registered."""
    from lorakit import __version__

    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA for PyTorch models (Hu et al., 2022)")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def configure_logging(verbose: bool) -> None:
    """lorakit's own messages at INFO (DEBUG with -v); other libraries' only from WARNING (all with -v)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("lorakit").setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lorakit`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, ModuleNotFoundError) as e:  # OSError: a file or folder that cannot be written or read
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while loading (a running `finetune` names its checkpoint itself)
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
