"""Arguments of `llama3-deploy build-engine`; defaults come from export/tensorrt.py (no TensorRT import here)."""
from __future__ import annotations

import argparse

from llama3_deploy.errors import DeployError

from .tensorrt import DEFAULT_MAX_CONTEXT, DEFAULT_PREFILL_CHUNK, DEFAULT_WORKSPACE_GIB


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a portable export (llama3-deploy export --flavor portable) or a calibrated Q/DQ export")
    p.add_argument("--output", required=True, help="engine directory (created atomically)")
    p.add_argument("--max-batch", type=int, default=1, help="most prompts per generate call")
    p.add_argument("--max-context", type=int, default=None,
                   help=f"most tokens per row, prompt and reply; unset: min({DEFAULT_MAX_CONTEXT}, the model's "
                        "context)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help=f"most prompt tokens per prefill run; unset: min({DEFAULT_PREFILL_CHUNK}, --max-context); "
                        "generate's --prefill-chunk must not exceed it")
    p.add_argument("--workspace-gib", type=float, default=DEFAULT_WORKSPACE_GIB,
                   help="TensorRT's workspace memory limit for tactics (GiB)")
    p.add_argument("--timing-cache", default=None,
                   help="timing cache file, read if present and written back, so later builds reuse its timings")
    p.add_argument("--device", default="cuda", help="cuda or cuda:N: the GPU to build for")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory when done")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(run=run)


def _device_index(spec: str) -> int:
    kind, _, idx = spec.partition(":")
    if kind != "cuda" or (idx and not idx.isdigit()):
        raise DeployError(f"--device must be cuda or cuda:N (TensorRT engines are built on a GPU), not {spec!r}")
    return int(idx or 0)


def run(args: argparse.Namespace) -> int:
    from .tensorrt import build_engine

    result = build_engine(args.model, args.output, max_batch=args.max_batch, max_context=args.max_context,
                          prefill_chunk=args.prefill_chunk, workspace_gib=args.workspace_gib,
                          timing_cache=args.timing_cache, device=_device_index(args.device),
                          overwrite=args.overwrite, progress=not args.quiet)
    print(result.summary())
    return 0
