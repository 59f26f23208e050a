"""`llama3-deploy`: one console command, a subcommand per stage.

The top of the import graph: it imports each stage's argument module explicitly (those import no torch),
and the stages import their heavy libraries inside the handlers, so `--help` and the runtime commands work
on a runtime-only install (`pip install llama3-deploy`). A command whose extra is missing answers with one
line naming the extra to install.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
from typing import Callable

from llama3_deploy import demo
from llama3_deploy.benchmarks import cli as bench_cli
from llama3_deploy.calibration import cli as calibrate_cli
from llama3_deploy.export import cli as export_cli
from llama3_deploy.export import engine_cli
from llama3_deploy.runtime import cli as runtime_cli
from llama3_deploy.server import cli as server_cli

from .errors import DeployError

# The Python modules each optional extra (pyproject's [project.optional-dependencies]) brings.
EXTRA_MODULES = {
    "export": ("torch", "onnx", "onnx_ir", "onnxscript", "safetensors", "ml_dtypes", "tqdm"),
    "bench": ("torch", "onnx", "onnx_ir", "onnxscript", "safetensors", "ml_dtypes", "tqdm", "transformers",
              "matplotlib", "psutil"),
    "tensorrt": ("tensorrt", "cuda"),  # TensorRT and cuda-python (its module is `cuda`)
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
}
TORCH_NOTE = "torch: `pip install torch==2.13.0` takes the CPU wheel; an unpinned torch pulls CUDA packages"


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]  # also sets the handler: set_defaults(run=...)
    extra: str | None = None  # the optional extra it needs beyond the runtime install

    def missing(self) -> list[str]:
        return [m for m in EXTRA_MODULES.get(self.extra, ()) if importlib.util.find_spec(m) is None]


COMMANDS = (
    Command("export", "export a Hugging Face Llama checkpoint to a validated ONNX decoder",
            export_cli.add_arguments, "export"),
    Command("calibrate", "calibrate a checkpoint into a gated Q/DQ export (INT8 W8A8 with SmoothQuant, or FP8) "
            "that TensorRT builds", calibrate_cli.add_arguments, "export"),
    Command("build-engine", "build a TensorRT engine from a portable or calibrated Q/DQ export (for generate "
            "--backend tensorrt)", engine_cli.add_arguments, "tensorrt"),
    Command("generate", "generate text from an export (streams to the terminal; --json for scripts)",
            runtime_cli.add_generate_arguments),
    Command("chat", "interactive multi-turn chat with streaming", runtime_cli.add_chat_arguments),
    Command("tokens", "search the vocabulary for tokens containing a string, or show what ids decode to",
            runtime_cli.add_tokens_arguments),
    Command("inspect", "a model's config and structure at a glance (checkpoint or export)",
            runtime_cli.add_inspect_arguments),
    Command("serve", "serve an export over an OpenAI-compatible HTTP API (continuous batching, streaming)",
            server_cli.add_arguments, "serve"),
    Command("bench", "benchmark the runtime against PyTorch and peers (latency, memory, physical floor)",
            bench_cli.add_arguments, "bench"),
    Command("demo", "run the whole pipeline on an embedded default model with random weights",
            demo.add_arguments, "bench"),
)


def _needs(command: Command, missing: list[str]) -> str:
    note = f" ({TORCH_NOTE})" if "torch" in EXTRA_MODULES.get(command.extra, ()) else ""
    return (f"`llama3-deploy {command.name}` needs the {command.extra} extra (missing: {', '.join(missing)}): "
            f"pip install 'llama3-deploy[{command.extra}]'{note}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama3-deploy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS:
        help_text = c.help + (f" [needs the {c.extra} extra]" if c.missing() else "")
        p = sub.add_parser(c.name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        c.add_arguments(p)
        p.set_defaults(_command=c)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Command = args._command
    try:
        missing = command.missing()
        if missing:
            raise DeployError(_needs(command, missing))
        try:
            return int(args.run(args) or 0)
        except ModuleNotFoundError as e:  # an extra's module that find_spec saw but could not load
            if (e.name or "").split(".")[0] in EXTRA_MODULES.get(command.extra, ()):
                raise DeployError(_needs(command, [e.name])) from None
            raise
    except DeployError as e:
        print(f"llama3-deploy {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`inspect --json | head`): stop quietly, as other CLI tools do
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout at exit; give it a sink
        return 0
