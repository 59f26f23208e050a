"""Test helpers for the HTTP server: a fake engine with the runtime Engine's interface, and uvicorn in a thread."""
from __future__ import annotations

import collections
import itertools
import threading
import time
import types

import uvicorn

from llama3_deploy.errors import DeployError
from llama3_deploy.runtime.chat import ChatFormat
from llama3_deploy.runtime.engine import (EngineBusy, EngineStats, EngineStopped, FinishEvent, TokenEvent,
                                          TokenLogprob)
from llama3_deploy.runtime.tokenizer import Tokenizer

WORDS = " the quick brown fox jumps over a lazy dog and then runs back home"


class FakeHandle:
    def __init__(self, engine, rid, ids, params, sink):
        self.request_id, self.prompt_ids, self.params, self.sink = rid, ids, params, sink
        self.engine, self.cancelled, self.generated, self.released = engine, False, 0, ""

    def cancel(self) -> None:
        self.cancelled = True


class FakeEngine:
    """Deterministic tokens (a cycle of word tokens offset by the prompt, and by the seed when sampling), one
    token per running request per step, on a loop thread; bounded slots and waiting queue like the real one."""

    def __init__(self, tokenizer_dir, *, slots=4, max_waiting=8, max_context=256, step_s=0.002):
        self.tokenizer = Tokenizer.from_dir(tokenizer_dir)
        self.chat = ChatFormat(self.tokenizer)
        self.max_context = max_context
        self.config = types.SimpleNamespace(vocab_size=self.tokenizer.vocab_size, max_position_embeddings=max_context,
                                            eos_token_ids=(self.tokenizer.token_to_id("<|eot_id|>"),))
        self.words = [i for i in self.tokenizer.encode(WORDS) if not self.tokenizer.is_special(i)]
        self.slots, self.max_waiting, self.step_s = slots, max_waiting, step_s
        self.fail_after: int | None = None   # emit FinishEvent("error") after this many tokens
        self.eos_after: int | None = None    # finish with "stop" (EOS) after this many tokens
        self._lock = threading.Lock()
        self._waiting: collections.deque = collections.deque()
        self._running: list[FakeHandle] = []
        self._ids = itertools.count()
        self._stopping = self._stopped = False
        self.steps = self.max_rows = 0
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self._loop, name="fake-engine", daemon=True)
        self._thread.start()
        return self

    def expected_ids(self, prompt_ids, n_tokens, seed=None, temperature=0.0):
        offset = sum(prompt_ids) + (0 if not temperature or seed is None else seed)
        return [self.words[(offset + k) % len(self.words)] for k in range(n_tokens)]

    def submit(self, prompt_ids, params, sink, *, request_id=None):
        if any(not 0 <= i < self.tokenizer.vocab_size for i in prompt_ids):
            raise DeployError("token id outside the vocabulary")
        if len(prompt_ids) + params.max_new_tokens > self.max_context:
            raise DeployError(f"prompt plus max_new_tokens exceeds the context of {self.max_context}")
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine is draining")
            if len(self._running) + len(self._waiting) >= self.slots + self.max_waiting:
                raise EngineBusy("all slots and the waiting queue are full", retry_after_s=0.5)
            h = FakeHandle(self, request_id or f"req-{next(self._ids)}", list(prompt_ids), params, sink)
            self._waiting.append(h)
        return h

    def stats(self):
        with self._lock:
            return EngineStats(self.slots, len(self._running), len(self._waiting),
                               self._thread is not None and self._thread.is_alive(), self.steps, self.max_rows)

    def shutdown(self, *, drain_timeout_s=30.0):
        with self._lock:
            self._stopping = True
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline and (self._running or self._waiting):
            time.sleep(0.005)
        with self._lock:
            for h in list(self._running) + list(self._waiting):
                h.cancel()
        self._stopped = True
        if self._thread is not None:
            self._thread.join(5)

    def _finish(self, h, reason, text="", error=None):
        h.sink(FinishEvent(reason, text, len(h.prompt_ids), h.generated, error))

    def _loop(self):
        while not (self._stopped and not self._running and not self._waiting):
            with self._lock:
                while self._waiting and len(self._running) < self.slots:
                    self._running.append(self._waiting.popleft())
                rows = list(self._running)
            for h in rows:
                self._step(h)
            with self._lock:
                self._running = [h for h in self._running if not getattr(h, "done", False)]
                if rows:
                    self.steps += 1
                    self.max_rows = max(self.max_rows, len(rows))
                for h in [h for h in self._waiting if h.cancelled]:
                    self._waiting.remove(h)
                    self._finish(h, "cancelled")
            time.sleep(self.step_s)

    def _step(self, h):
        p = h.params
        if h.cancelled:
            h.done = True
            return self._finish(h, "cancelled")
        if self.fail_after is not None and h.generated >= self.fail_after:
            h.done = True
            return self._finish(h, "error", error="simulated engine failure")
        if self.eos_after is not None and h.generated >= self.eos_after and not p.ignore_eos:
            h.done = True
            return self._finish(h, "stop", h.released)
        token = self.expected_ids(h.prompt_ids, h.generated + 1, p.seed, p.temperature)[-1]
        h.generated += 1
        text = self.tokenizer.decode([token])
        if token in getattr(p, "stop_token_ids", ()):
            h.done = True
            return self._finish(h, "stop")
        pending = h.released + text  # `released` holds text kept back while it could start a stop string
        cut = min((i for i in (pending.find(s) for s in p.stop) if i >= 0), default=-1)
        if cut >= 0:
            h.done = True
            return self._finish(h, "stop", pending[:cut])
        hold = max((k for s in p.stop for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
        text, h.released = pending[:len(pending) - hold], pending[len(pending) - hold:]
        k = getattr(p, "logprobs", None)
        tops = tuple(TokenLogprob(self.words[(j + token) % len(self.words)], -1.0 - j) for j in range(k or 0))
        h.sink(TokenEvent(token, text, None if k is None else -0.25, tops))
        if h.generated >= p.max_new_tokens:
            h.done = True
            self._finish(h, "length", h.released)


class ServerThread:
    """uvicorn on a free loopback port in a daemon thread, with the CLI's h11 head limit."""

    def __init__(self, app, *, h11_max=64 << 10):
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", http="h11", lifespan="on",
                                h11_max_incomplete_event_size=h11_max, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)


def build_tokenizer(root):
    """The project's demo tokenizer, small (a 1,000-token BPE trains in ~2 s)."""
    from llama3_deploy.calibration.demo_tokenizer import build_demo_tokenizer
    build_demo_tokenizer(root / "tokenizer", vocab_size=1000)
    return root / "tokenizer"
