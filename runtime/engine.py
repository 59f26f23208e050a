"""A continuous-batching engine: concurrent requests share the decode steps of one optimized-flavor graph.

Each request holds a slot, a row of the SharedKV buffers (runtime/kv.py), so batching needs no new graph. The loop
thread repeats, until stopped:

    admit       waiting requests take free slots (FIFO); a cancelled one is finished without running
    prefill     one chunk (prefill_chunk tokens) of the oldest request still prefilling, into its slot alone
    decode      one step of every decoding row at once (the same pointers and shapes each step: with
                cuda_graph a captured CUDA graph replays it)

so a long prompt costs the running rows one chunk per step, not its whole length. The decode step runs every
row: an idle slot decodes a dummy token and is emptied again (reset_row), and a slot still prefilling has the
entry the step wrote into it forgotten (truncate_row; its next chunk overwrites that position). A finished or
cancelled request frees its slot at once.

Per request: its own Sampler (seeded like a batch-1 Generator, so a seeded request samples the same tokens
alone or batched), its own stop ids and stop strings (generate.py's _Sequence), logprobs from the raw logits.
Greedy rows of an --argmax export read the graph's ids; logits are read back only when a row needs them.

Events go to each request's `sink` from the loop thread: TokenEvent per generated token, then one
FinishEvent. Admission is bounded: `slots` running plus `max_waiting` queued; beyond that `submit` raises
EngineBusy at once. If the loop dies, every request gets FinishEvent("error") and the engine reports not alive.
Generator shares the step code (SharedKV's forward/decode and _Sequence) rather than running through the engine.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from llama3_deploy.errors import DeployError

from .chat import ChatFormat
from .generate import _Sequence
from .kv import SharedKV, allocate
from .sampling import Sampler, SamplingParams, token_logprobs
from .session import DecoderSession
from .tokenizer import Tokenizer

DEFAULT_SLOTS = 8
DEFAULT_MAX_WAITING = 64
DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per prefill run: what one step may cost the running rows
MAX_SLOTS = 256


class EngineBusy(Exception):
    """Every slot is taken and the waiting queue is full: retry later (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineStopped(Exception):
    """The engine is draining or has stopped (or its loop died): no new requests (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token (EOS / stop ids are not reported as tokens). `text` is the text it releases (may be ''
    while a multi-byte character or a possible stop string is held back)."""

    token_id: int
    text: str
    logprob: float | None = None                 # with params.logprobs is not None
    top_logprobs: tuple[TokenLogprob, ...] = ()  # params.logprobs most likely alternatives


@dataclasses.dataclass(frozen=True)
class FinishEvent:
    """The request ended. finish_reason: "stop" (EOS, stop id or stop string), "length", "cancelled", or "error"
    (then `error` says why). `text` is any held-back text released at the end."""

    finish_reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


Event = TokenEvent | FinishEvent


@dataclasses.dataclass(frozen=True)
class EngineStats:
    slots: int
    running: int   # requests holding a slot (prefilling or decoding)
    waiting: int   # admitted, waiting for a slot
    alive: bool    # the loop thread is running (False after a crash or stop)
    steps: int     # decode steps run so far
    max_rows_in_a_step: int  # the most rows one decode step has carried


class RequestHandle:
    """A submitted request. Events go to the `sink` given to `Engine.submit`, from the engine's thread."""

    def __init__(self, engine: Engine, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 sink: Callable[[Event], None]):
        self.request_id, self.prompt_ids, self.params = request_id, prompt_ids, params
        self._engine, self._sink = engine, sink
        self.order = 0  # admission order: prefill serves the oldest first
        self.cancelled = False
        self.finished = threading.Event()

    def cancel(self) -> None:
        """Stop generating within one step and free the slot; the sink then gets FinishEvent('cancelled')."""
        self.cancelled = True
        self._engine._wake()


class _Active:
    """A request in a slot: how much of its prompt is cached, its sampler and its output so far."""

    def __init__(self, handle: RequestHandle, slot: int, engine: Engine):
        self.handle, self.slot = handle, slot
        self.prefilled, self.next_token = 0, 0
        p = handle.params
        self.seq = _Sequence(handle.prompt_ids, p, engine.tokenizer, engine.eos_ids)
        self.sampler = Sampler(p, 1, engine.config.vocab_size, prompts=[handle.prompt_ids])

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.handle.prompt_ids)


class Engine:
    """Owns one optimized-flavor DecoderSession, a SharedKV cache of `slots` rows, and a loop thread."""

    def __init__(self, model_dir: str | Path, *, slots: int = DEFAULT_SLOTS, max_waiting: int = DEFAULT_MAX_WAITING,
                 max_context: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, device: str = "cpu",
                 threads: int = 0, cuda_graph: bool = False):
        for name, value, lo, hi in (("slots", slots, 1, MAX_SLOTS), ("max_waiting", max_waiting, 0, 1 << 20),
                                    ("prefill_chunk", prefill_chunk, 1, 1 << 20)):
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise DeployError(f"{name} must be an integer from {lo} to {hi}, not {value!r}")
        self.session = DecoderSession.from_dir(model_dir, device=device, threads=threads, cuda_graph=cuda_graph)
        if self.session.flavor != "optimized":
            raise DeployError(f"{model_dir} is a {self.session.flavor} export; serving batches requests in the "
                              "optimized flavor's shared KV slots: export with --flavor optimized")
        self.config = self.session.config
        limit = self.config.max_position_embeddings
        if max_context is not None and (not isinstance(max_context, int) or isinstance(max_context, bool)
                                        or not 1 <= max_context <= limit):
            raise DeployError(f"max_context must be an integer from 1 to the model's context {limit}, "
                              f"not {max_context!r}")
        self.max_context = max_context or limit
        has_tokenizer = any((Path(model_dir) / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))
        self.tokenizer = Tokenizer.from_dir(model_dir) if has_tokenizer else None
        self.chat = ChatFormat.from_dir(model_dir) if has_tokenizer else None
        self.eos_ids = frozenset(self.config.eos_token_ids)
        self.slots, self.max_waiting = slots, max_waiting
        # Slots x context tokens of KV, allocated once (a clear error naming the bytes if they cannot fit).
        self.cache: SharedKV = allocate(self.session, slots, self.max_context, min(prefill_chunk, self.max_context))
        self._rows: list[_Active | None] = [None] * slots
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._draining = self._stop = False
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._steps = self._max_rows = 0

    # --- the client side --------------------------------------------------------------------------------
    def start(self) -> Engine:
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="llama3-deploy-engine", daemon=True)
                self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Event], None], *,
               request_id: str | None = None) -> RequestHandle:
        """Queue a request. Raises DeployError for invalid input (ids outside the vocabulary, prompt plus
        max_new_tokens over the context), EngineBusy when full, EngineStopped when draining/stopped."""
        if not isinstance(params, SamplingParams):
            raise DeployError(f"params must be a SamplingParams, not {type(params).__name__}")
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise DeployError("empty prompt")
        bad = [i for i in (*ids, *params.stop_token_ids) if not 0 <= i < self.config.vocab_size]
        if bad:
            raise DeployError(f"token ids must be in [0, {self.config.vocab_size}); got {bad[:5]}")
        if len(ids) + params.max_new_tokens > self.max_context:
            raise DeployError(f"prompt of {len(ids)} tokens plus max_new_tokens {params.max_new_tokens} exceeds the "
                              f"context of {self.max_context} tokens")
        with self._cv:
            if self._draining or not self.alive:
                raise EngineStopped("the engine is shutting down" if self._draining or self._error is None
                                    else f"the engine has failed: {self._error}")
            free = sum(r is None for r in self._rows)
            if len(self._waiting) >= free + self.max_waiting:
                raise EngineBusy(f"all {self.slots} slots are busy and {len(self._waiting)} requests are waiting")
            order = next(self._ids)
            handle = RequestHandle(self, request_id or f"req-{order}", ids, params, sink)
            handle.order = order
            self._waiting.append(handle)
            self._cv.notify()
        return handle

    def stats(self) -> EngineStats:
        with self._cv:
            return EngineStats(self.slots, sum(r is not None for r in self._rows), len(self._waiting), self.alive,
                               self._steps, self._max_rows)

    def shutdown(self, *, drain_timeout_s: float = 30.0) -> None:
        """Stop admitting, let running and waiting requests finish up to the timeout, cancel the rest, stop."""
        deadline = time.monotonic() + max(float(drain_timeout_s), 0.0)
        with self._cv:
            self._draining = True
            while (self._waiting or any(self._rows)) and self.alive:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.05))
            for h in [*self._waiting, *(r.handle for r in self._rows if r is not None)]:
                h.cancelled = True
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(deadline - time.monotonic(), 0) + 10)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], str, str]:
        """Blocking convenience: (generated ids, text, finish_reason)."""
        events: list[Event] = []
        handle = self.submit(prompt_ids, params, events.append)
        handle.finished.wait()
        end = events[-1]
        if end.finish_reason == "error":
            raise DeployError(f"generation failed: {end.error}")
        tokens = [e.token_id for e in events if isinstance(e, TokenEvent)]
        return tokens, "".join(e.text for e in events), end.finish_reason

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # --- the loop -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop and not self._waiting and not any(self._rows):
                        self._cv.wait()
                    if self._stop and not self._waiting and not any(self._rows):
                        return
                    admitted = self._admit()
                for handle in admitted:  # cancelled while waiting: finished without a slot
                    self._emit(handle, FinishEvent("cancelled", "", len(handle.prompt_ids), 0))
                self._reap_cancelled()
                self._prefill_step()
                self._decode_step()
                with self._cv:
                    self._cv.notify_all()  # shutdown() waits on the running count
        except Exception as e:  # noqa: BLE001 - the loop must report any failure to every request, then stop
            self._fail(f"{type(e).__name__}: {e}")

    def _admit(self) -> list[RequestHandle]:
        """Waiting requests into free slots (under the lock); returns those cancelled while they waited."""
        dropped = []
        for slot in range(self.slots):
            while self._rows[slot] is None and self._waiting:
                handle = self._waiting.popleft()
                if handle.cancelled:
                    dropped.append(handle)
                    continue
                self._rows[slot] = _Active(handle, slot, self)
        dropped += [h for h in self._waiting if h.cancelled]
        for h in dropped:
            if h in self._waiting:
                self._waiting.remove(h)
        return dropped

    def _reap_cancelled(self) -> None:
        for a in self._rows:
            if a is not None and a.handle.cancelled:
                self._finish(a, "cancelled")

    def _prefill_step(self) -> None:
        prefilling = [a for a in self._rows if a is not None and not a.decoding]
        if not prefilling:
            return
        a = min(prefilling, key=lambda x: x.handle.order)  # the oldest first
        if a.prefilled == 0:
            self.cache.reset_row(a.slot)
        ids = a.handle.prompt_ids
        chunk = np.asarray(ids[a.prefilled:a.prefilled + self.cache.chunk], np.int64)[None]
        self.cache.forward(chunk, row=a.slot)
        a.prefilled += chunk.shape[1]
        if a.decoding:
            greedy = self.cache.output(ids_only=True)[0] if self.session.argmax else None
            logits = None if greedy is not None and a.handle.params.plain_greedy else self.cache.output()[0]
            self._take(a, logits, greedy)

    def _decode_step(self) -> None:
        rows = [a for a in self._rows if a is not None and a.decoding]
        if not rows:
            return
        # Rows 0..n-1 run: every slot when a captured CUDA graph replays the step (fixed shapes), else the slots up
        # to the last decoding one (new requests take the lowest free slot), so a lone request costs one row.
        n = self.slots if self.session.cuda_graph else max(a.slot for a in rows) + 1
        tokens = np.zeros(n, np.int64)
        for a in rows:
            tokens[a.slot] = a.next_token
        keep = {a.slot: int(self.cache.lengths[a.slot]) for a in self._rows
                if a is not None and not a.decoding and a.slot < n}
        if self.session.argmax:  # the graph's greedy ids; logits read back only for rows that sample
            greedy = self.cache.decode(tokens, ids_only=True)
            logits = self.cache.output() if any(not a.handle.params.plain_greedy for a in rows) else None
        else:
            greedy, logits = None, self.cache.decode(tokens)
        for slot in range(n):  # the dummy entries of idle and still-prefilling slots among them are forgotten
            if self._rows[slot] is None:
                self.cache.reset_row(slot)
            elif slot in keep:
                self.cache.truncate_row(slot, keep[slot])
        self._steps += 1
        self._max_rows = max(self._max_rows, len(rows))
        for a in rows:
            self._take(a, None if logits is None else logits[a.slot], None if greedy is None else greedy[a.slot])

    def _take(self, a: _Active, logits: np.ndarray | None, greedy) -> None:
        """Pick the row's next token, emit it, and finish the request when it is done."""
        p = a.handle.params
        token = int(greedy) if greedy is not None and p.plain_greedy else a.sampler(logits, 0)
        n = len(a.seq.generated)
        text = a.seq.push(token)
        if len(a.seq.generated) > n:  # EOS / stop ids end the request without being reported
            lp, top = (token_logprobs(logits, token, p.logprobs) if p.logprobs is not None else (None, []))
            self._emit(a.handle, TokenEvent(token, text, lp, tuple(TokenLogprob(i, v) for i, v in top)))
        a.next_token = token
        if a.seq.done:
            self._finish(a, a.seq.finish_reason)

    def _finish(self, a: _Active, reason: str) -> None:
        tail = a.seq.flush() if reason != "cancelled" else ""
        if reason != "cancelled":
            reason = a.seq.finish_reason or reason
        self._rows[a.slot] = None
        self.cache.reset_row(a.slot)
        self._emit(a.handle, FinishEvent(reason, tail, len(a.handle.prompt_ids), len(a.seq.generated)))

    def _emit(self, handle: RequestHandle, event: Event) -> None:
        try:
            handle._sink(event)
        except Exception:  # noqa: BLE001 - a client's broken sink cancels its request, never the loop
            handle.cancelled = True
        if isinstance(event, FinishEvent):
            handle.finished.set()

    def _fail(self, error: str) -> None:
        with self._cv:
            self._error = error
            handles = [*self._waiting, *(r.handle for r in self._rows if r is not None)]
            counts = {id(r.handle): len(r.seq.generated) for r in self._rows if r is not None}
            self._waiting.clear()
            self._rows = [None] * self.slots
            self._cv.notify_all()
        for h in handles:
            self._emit(h, FinishEvent("error", "", len(h.prompt_ids), counts.get(id(h), 0), error=error))
