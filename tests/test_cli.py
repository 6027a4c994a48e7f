"""The ``lorakit`` command's face: help, version and subcommand discovery (the demo itself is tested elsewhere)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lorakit
from lorakit.cli import build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"lorakit {lorakit.__version__}"


def test_help_lists_the_discovered_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lorakit") and "demo" in out


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: lorakit" in capsys.readouterr().out


def test_unknown_subcommand_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["no-such-command"])
    assert exit_.value.code == 2
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err


def test_demo_parser_is_registered_with_a_handler():
    args = build_parser().parse_args(["demo"])
    assert args.command == "demo" and callable(args.func)
    assert args.func.__module__ == "lorakit.cli.demo"


def test_python_dash_m_lorakit_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "lorakit", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"lorakit {lorakit.__version__}"
