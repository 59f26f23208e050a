"""Arguments of `llama3-deploy serve`. FastAPI, uvicorn and the engine are imported in `run` only, so
`llama3-deploy --help` works without the serve extra."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from llama3_deploy.errors import DeployError

API_KEY_ENV = "LLAMA3_DEPLOY_API_KEY"
H11_MAX_HEAD_BYTES = 64 << 10  # uvicorn/h11 stops buffering a request head beyond this (CVE-2025-48956)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="optimized-flavor export directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--served-model-name", default=None,
                   help="model id clients send (default: the export's directory name)")
    p.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` on every route but /health (default: ${API_KEY_ENV})")
    p.add_argument("--slots", type=int, default=8, help="requests decoded together (KV cache rows)")
    p.add_argument("--max-waiting", type=int, default=64, help="admitted requests waiting for a slot; beyond: 429")
    p.add_argument("--max-context", type=int, default=None, help="prompt + completion tokens (default: the model's)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill step")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for in-flight requests before cancelling them")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body (413 above)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(run=run)


def _check(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise DeployError(f"--port must be in 0..65535 (got {args.port})")
    for name in ("slots", "max_waiting", "max_body_bytes", "prefill_chunk"):
        if getattr(args, name) < (0 if name == "max_waiting" else 1):
            raise DeployError(f"--{name.replace('_', '-')} must be a positive integer (got {getattr(args, name)})")
    if not args.drain_timeout >= 0:
        raise DeployError(f"--drain-timeout must be >= 0 seconds (got {args.drain_timeout})")
    if not Path(args.model).is_dir():
        raise DeployError(f"--model {args.model}: not a directory (pass an export made by `llama3-deploy export`)")


def run(args: argparse.Namespace) -> int:
    import signal

    import uvicorn

    from llama3_deploy.runtime.engine import Engine

    from .app import create_app
    from .limits import Limits

    _check(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    name = args.served_model_name or Path(args.model).resolve().name
    engine = Engine(args.model, slots=args.slots, max_waiting=args.max_waiting, max_context=args.max_context,
                    prefill_chunk=args.prefill_chunk, device=args.device, threads=args.threads).start()
    app = create_app(engine, model_name=name, api_key=api_key, drain_timeout_s=args.drain_timeout,
                     limits=Limits(max_body_bytes=args.max_body_bytes))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.draining = True  # /health turns 503 and new requests on open connections get 503
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, http="h11", lifespan="on",
                            log_level=args.log_level, h11_max_incomplete_event_size=H11_MAX_HEAD_BYTES,
                            timeout_graceful_shutdown=args.drain_timeout, server_header=False)
    # uvicorn re-raises the signal it caught once it has shut down; with the default SIGTERM action that would
    # kill the process after a clean drain. A no-op handler makes a drained SIGTERM exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        Server(config).run()
    finally:
        if engine.stats().alive:  # the lifespan drained it already unless uvicorn failed to start
            engine.shutdown(drain_timeout_s=0)
    return 0
