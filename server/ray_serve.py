"""The same OpenAI-compatible app on Ray Serve: replicas that autoscale on ongoing requests, one per GPU.

Started with one command (Ray's application-builder pattern; arguments are `key=value` after the import path):

    pip install 'llama3-deploy[ray]'
    serve run llama3_deploy.server.ray_serve:app_builder model=exports/llama3-8b-opt slots=8

Each replica builds its own Engine on the export and the very app `create_app` makes for `llama3-deploy serve`,
so routes, OpenAI error shapes, auth, size limits, /health and /metrics are the app's own. Ray's proxy listens on
127.0.0.1:8000 unless told otherwise (`serve start --http-host 0.0.0.0 --http-port 8000` before `serve run`,
or `http_options` in a Serve config file).

How it maps onto Serve:
- Ingress: `serve.ingress()` with no app and a `__serve_build_asgi_app__` method (the late-bound form the
  installed Ray documents): the replica's constructor loads the engine, then Serve asks it for the ASGI app and
  runs the app's lifespan, so stopping a replica drains its engine exactly as SIGTERM does under uvicorn.
  `graceful_shutdown_timeout_s` is the drain timeout plus a margin, so Ray waits for it.
- Load: a replica decodes `slots` requests at once, so autoscaling targets `slots` ongoing requests per replica
  (`autoscaling_config.target_ongoing_requests`), and Ray never sends a replica more than `slots + max_waiting`
  (`max_ongoing_requests`): the engine's own waiting queue is the replica's queue. Beyond that Ray holds at most
  `max_queued` requests in its router and answers the rest 503 itself (`max_queued_requests`), so overload is
  shed before it reaches a replica.
- Devices: with device=cuda each replica asks Ray for one GPU (`ray_actor_options={"num_gpus": 1}`) and runs on
  the one Ray assigns it (Ray sets CUDA_VISIBLE_DEVICES, so the replica's device is `cuda`, i.e. cuda:0 of what
  it sees): one replica per GPU, `max_replicas` at most the GPUs the cluster has (more stay pending).
  On the CPU a replica reserves `threads` CPUs (1 when threads=0), so replicas do not oversubscribe a node.
- Health: Ray calls `check_health` on each replica; a replica whose engine loop died is restarted.
- Auth: `api_key=...` as an argument, else LLAMA3_DEPLOY_API_KEY read from the environment of `serve run`
  (when the builder runs, never at import) and handed to the replicas as a constructor argument, so it reaches
  replicas on other nodes too. The API key protects every route but /health, as under `llama3-deploy serve`.
- /metrics is per replica (the proxy picks one); Ray exports its own per-deployment request metrics.

Why not `ray.serve.llm`: its LLMServer/`server_cls` hook sits behind Ray's own OpenAI ingress (its FastAPI routes,
its request models built on vLLM's protocol classes), and `ray[llm]` pins vLLM and NIXL CUDA wheels. A custom
server class would have to translate this engine's events into vLLM's response objects, and the app's auth,
limits, error shapes and metrics would be replaced by Ray's. A plain deployment of the app we already test keeps
one behaviour everywhere, with no vLLM install; Ray's LLM-specific extras (prefix-aware routing, LoRA
multiplexing, prefill/decode disaggregation) are what it gives up.

Ray, FastAPI and the engine are imported when the builder or a replica runs, never when this module is imported.
"""
import os
from pathlib import Path
from typing import Any, Optional

from .cli import API_KEY_ENV

DRAIN_MARGIN_S = 10.0  # Ray's graceful_shutdown_timeout_s = drain timeout + this


def _args_model():
    from pydantic import BaseModel, ConfigDict, Field

    class RayServeArgs(BaseModel):
        """`serve run ...:app_builder key=value ...` arguments; the names of `llama3-deploy serve`'s options."""

        model_config = ConfigDict(extra="forbid", protected_namespaces=())

        model: str
        served_model_name: Optional[str] = None
        api_key: Optional[str] = None
        slots: int = Field(8, ge=1)
        max_waiting: int = Field(64, ge=0)
        max_context: Optional[int] = Field(None, ge=1)
        prefill_chunk: int = Field(256, ge=1)
        device: str = "cpu"
        threads: int = Field(0, ge=0)
        drain_timeout: float = Field(30.0, ge=0)
        max_body_bytes: int = Field(4 << 20, ge=1)
        # Serve's own knobs
        min_replicas: int = Field(1, ge=0)
        max_replicas: int = Field(4, ge=1)
        max_queued: int = Field(64, ge=-1)  # requests Ray's router holds beyond the replicas' capacity (-1: no limit)
        name: str = "llama3-deploy"         # the deployment's name

    return RayServeArgs


def deployment_options(args) -> dict[str, Any]:
    """`serve.deployment(...)` options for validated arguments (pure: no Ray import, so it is testable alone)."""
    if args.min_replicas > args.max_replicas:
        raise ValueError(f"min_replicas ({args.min_replicas}) exceeds max_replicas ({args.max_replicas})")
    gpu = args.device.startswith("cuda")
    actor: dict[str, Any] = {"num_cpus": max(1, args.threads)}
    if gpu:
        actor["num_gpus"] = 1
    return {
        "name": args.name,
        "ray_actor_options": actor,
        "max_ongoing_requests": args.slots + args.max_waiting,
        "max_queued_requests": args.max_queued,
        "autoscaling_config": {
            "min_replicas": args.min_replicas,
            "initial_replicas": max(1, args.min_replicas),
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.slots,
        },
        "graceful_shutdown_timeout_s": args.drain_timeout + DRAIN_MARGIN_S,
        # The constructor loads the model; a health check only reads the loop's liveness.
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
    }


class LlamaReplica:
    """One replica: an Engine on the export and `create_app` over it (wrapped by `serve.ingress` in build_app)."""

    def __init__(self, config: dict[str, Any], api_key: Optional[str]):
        from llama3_deploy.runtime.engine import Engine

        device = config["device"]
        if device.startswith("cuda"):
            device = "cuda"  # Ray assigned this replica one GPU through CUDA_VISIBLE_DEVICES: it is cuda:0 here
        self._config, self._api_key = config, api_key
        self._engine = Engine(config["model"], slots=config["slots"], max_waiting=config["max_waiting"],
                              max_context=config["max_context"], prefill_chunk=config["prefill_chunk"],
                              device=device, threads=config["threads"]).start()

    def __serve_build_asgi_app__(self):
        from .app import create_app
        from .limits import Limits

        c = self._config
        return create_app(self._engine, model_name=c["served_model_name"], api_key=self._api_key,
                          limits=Limits(max_body_bytes=c["max_body_bytes"]), drain_timeout_s=c["drain_timeout"])

    def check_health(self) -> None:
        stats = self._engine.stats()
        if not stats.alive:
            raise RuntimeError("the engine loop is not running")


def build_app(args):
    """A Serve Application for `args` (a dict of `key=value` strings, or RayServeArgs)."""
    from ray import serve

    model_cls = _args_model()
    args = args if isinstance(args, model_cls) else model_cls.model_validate(dict(args))
    path = Path(args.model)
    if not path.is_dir():
        raise ValueError(f"model={args.model}: not a directory (pass an export made by `llama3-deploy export`)")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    config = args.model_dump(exclude={"api_key"})
    config["model"] = str(path.resolve())
    config["served_model_name"] = args.served_model_name or path.resolve().name
    deployment = serve.deployment(serve.ingress()(LlamaReplica), **deployment_options(args))
    return deployment.bind(config, api_key)


def app_builder(args: dict):
    """Ray's application builder: `serve run llama3_deploy.server.ray_serve:app_builder model=DIR slots=8`."""
    return build_app(args)
