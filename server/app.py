"""The FastAPI app: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, plus /health and /metrics.

`create_app(engine, model_name=...)` takes a started engine (runtime.engine.Engine or anything with its
interface), so tests can pass a fake one. Middleware order, outermost first: size limits, then API key.
"""
from __future__ import annotations

import contextlib
import logging

import anyio
from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

from . import prompts
from .auth import APIKeyMiddleware
from .bridge import ClientGone, EngineRun, failure
from .errors import JSON, APIError, error_response, install_handlers
from .limits import Limits, LimitsMiddleware
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, model_card
from .responses import DONE, Formatter, sse_error

log = logging.getLogger("llama3_deploy.server")


class _EngineStream(StreamingResponse):
    """An SSE response that frees its engine slots however it ends (done, disconnect, cancellation)."""

    def __init__(self, content, run: EngineRun):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._run = run

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._run.cancel()


def create_app(engine, *, model_name: str, api_key: str | None = None, limits: Limits = Limits(),
               drain_timeout_s: float = 30.0, shutdown_engine: bool = True) -> FastAPI:
    """The app over a started engine. On shutdown (uvicorn's lifespan) it drains the engine if `shutdown_engine`."""
    metrics = Metrics(model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.draining = False
        yield
        app.state.draining = True
        if shutdown_engine:
            await anyio.to_thread.run_sync(lambda: engine.shutdown(drain_timeout_s=drain_timeout_s))

    app = FastAPI(title="llama3-deploy", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.router.redirect_slashes = False  # a redirect would echo the Host header back; 404 instead
    app.state.draining = False
    app.state.engine, app.state.metrics, app.state.limits = engine, metrics, limits
    install_handlers(app)
    # add_middleware puts each new one outside the previous: limits run first, before any auth work.
    app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(LimitsMiddleware, limits=limits)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{model_name}`",
                           param="model", code="model_not_found")

    def check_admitting() -> None:
        if app.state.draining:
            metrics.reject("draining")
            raise APIError(503, "the server is shutting down and accepts no new requests")

    @app.get("/health")
    async def health():
        stats = engine.stats()
        if app.state.draining or not stats.alive:
            why = "draining" if app.state.draining else "the engine loop is not running"
            return error_response(APIError(503, f"unhealthy: {why}"))
        return JSON({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(engine.stats()), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        return JSON({"object": "list", "data": [model_card(model_name, engine.max_context)]})

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        check_model(model)
        return JSON(model_card(model_name, engine.max_context))

    async def serve(request: Request, body, *, chat: bool):
        check_model(body.model)
        check_admitting()
        if chat:
            ids = await anyio.to_thread.run_sync(prompts.chat_prompt, engine, body, limits)
            prompt_list = [ids]
        else:
            prompt_list = await anyio.to_thread.run_sync(prompts.completion_prompts, engine, body, limits)
        jobs = prompts.sampling_jobs(engine, body, prompt_list)
        fmt = Formatter(chat=chat, model=model_name, tokenizer=engine.tokenizer, n_choices=len(jobs),
                        prompt_tokens=sum(len(p) for p in prompt_list))
        fmt.want_logprobs(body.logprobs is not None and body.logprobs is not False)
        run = EngineRun(engine, metrics)
        run.submit_all(jobs)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _EngineStream(_stream(run, fmt, request, include_usage), run)
        try:
            async for index, event in run.events(request):
                fmt.add(index, event)
                if fmt.finish[index] is not None:
                    err = failure(event)
                    if err is not None:
                        raise err
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the slots are freed below
        finally:
            run.cancel()
        return JSON(fmt.body())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        return await serve(request, body, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await serve(request, body, chat=False)

    return app


async def _stream(run: EngineRun, fmt: Formatter, request: Request, include_usage: bool):
    """SSE chunks; a failure mid-stream is sent as a `data: {"error": ...}` event, then [DONE]."""
    try:
        for chunk in fmt.role_chunks(include_usage):
            yield chunk
        async for index, event in run.events(request):
            chunk = fmt.event_chunk(index, event, include_usage)
            err = failure(event) if fmt.finish[index] is not None and chunk is not None else None
            if err is not None:
                yield sse_error(err)
                yield DONE
                return
            if chunk is not None:
                yield chunk
        if include_usage:
            yield fmt.usage_chunk()
        yield DONE
    except ClientGone:
        return
    except Exception:  # noqa: BLE001 - the status line is gone: report in-band, never leave the client hanging
        log.exception("stream failed")
        yield sse_error(APIError(500, "internal error while streaming"))
        yield DONE
    finally:
        run.cancel()
