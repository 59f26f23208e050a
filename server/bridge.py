"""The engine's thread to asyncio: one HTTP request's engine requests and their events.

The engine calls each sink on its own thread; the sink hands the event to the request's event loop with
`call_soon_threadsafe(queue.put_nowait, ...)`. The queue is bounded in practice: each choice yields at most
max_tokens events plus one finish. The consumer checks for a disconnected client between events and while
idle, and `cancel()` (called from a finally) frees every slot still held.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import AsyncIterator

from llama3_deploy.errors import DeployError
from llama3_deploy.runtime.engine import EngineBusy, EngineStopped, FinishEvent, TokenEvent

from .errors import APIError, retry_after
from .metrics import Metrics

IDLE_POLL_S = 0.25        # how often an idle request looks for a disconnected client
DISCONNECT_POLL_S = 0.02  # at most this often between events (the check costs a receive() call)


class ClientGone(Exception):
    """The HTTP client disconnected: stop and free the slots."""


@dataclasses.dataclass
class _Choice:
    index: int
    prompt_tokens: int
    submitted: float
    handle: object = None
    last: float | None = None
    done: bool = False


class EngineRun:
    """The engine requests behind one HTTP request (n choices, or one per prompt)."""

    def __init__(self, engine, metrics: Metrics):
        self.engine, self.metrics = engine, metrics
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices: list[_Choice] = []

    def _sink(self, index: int):
        loop, queue = self.loop, self.queue

        def sink(event) -> None:  # on the engine's thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (index, event, time.monotonic()))
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                pass
        return sink

    def submit_all(self, jobs) -> None:
        """Submit (prompt_ids, params) pairs; all or nothing: on a refusal the ones already queued are cancelled."""
        try:
            for index, (ids, params) in enumerate(jobs):
                choice = _Choice(index, len(ids), time.monotonic())
                choice.handle = self.engine.submit(ids, params, self._sink(index))
                self.choices.append(choice)
        except EngineBusy as e:
            self.cancel()
            self.metrics.reject("busy")
            raise APIError(429, f"the server is busy: {e}", headers={"Retry-After": retry_after(e.retry_after_s)})
        except EngineStopped as e:
            self.cancel()
            self.metrics.reject("stopped")
            raise APIError(503, f"the server is not accepting requests: {e}") from None
        except DeployError as e:
            self.cancel()
            raise APIError(400, str(e)) from None
        except BaseException:
            self.cancel()
            raise

    async def events(self, request=None) -> AsyncIterator[tuple[int, TokenEvent | FinishEvent]]:
        """(choice index, event) until every choice has finished; raises ClientGone on a disconnect."""
        pending = len(self.choices)
        checked = time.monotonic()
        while pending:
            try:
                index, event, t = await asyncio.wait_for(self.queue.get(), IDLE_POLL_S)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    raise ClientGone() from None
                continue
            choice = self.choices[index]
            if isinstance(event, TokenEvent):
                if choice.last is None:
                    self.metrics.first_token(t - choice.submitted)
                else:
                    self.metrics.next_token(t - choice.last)
                choice.last = t
            else:
                choice.done = True
                pending -= 1
                self.metrics.finish(t - choice.submitted, event.finish_reason, event.prompt_tokens,
                                    event.completion_tokens)
            yield index, event
            if request is not None and pending and time.monotonic() - checked > DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    raise ClientGone()

    def cancel(self) -> None:
        """Free every slot still held (idempotent; safe after the choices finished)."""
        for choice in self.choices:
            if not choice.done and choice.handle is not None:
                choice.done = True
                choice.handle.cancel()


def failure(event: FinishEvent) -> APIError | None:
    """The error a finish event stands for, or None for a normal finish (stop / length)."""
    if event.finish_reason == "error":
        return APIError(500, f"generation failed: {event.error or 'engine error'}")
    if event.finish_reason == "cancelled":
        return APIError(503, "the request was cancelled: the server is shutting down")
    return None
