"""`llama3-deploy`: one console command, a subcommand per stage.

Each subcommand's defaults are the defaults of the function it calls; heavy imports happen inside
the handlers so `llama3-deploy --help` and the runtime-only commands stay light.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import DeployError

_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, help_text: str):
    def register(fn):
        _COMMANDS[name] = (fn, help_text)
        return fn
    return register


@command("export", "export a Hugging Face Llama checkpoint to a validated ONNX decoder")
def _export_args(p: argparse.ArgumentParser) -> None:
    from export.cli import add_arguments
    add_arguments(p)


def _load_optional(module: str) -> None:
    """Register the subcommands of stages that exist in this install (runtime-only installs lack export)."""
    import importlib
    try:
        importlib.import_module(module)
    except ModuleNotFoundError:
        pass


def build_parser() -> argparse.ArgumentParser:
    for module in ("runtime.cli", "benchmarks.cli", "llama3_deploy.demo"):
        _load_optional(module)
    parser = argparse.ArgumentParser(prog="llama3-deploy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except DeployError as e:
        print(f"llama3-deploy {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

