"""The token loop, read top-down like gpt-fast's generate.py: prefill the prompts, then decode one token per
row per step until every row has finished.

The KV cache (runtime/kv.py) owns the device buffers and the graph runs: `cache.prefill(rows)` and
`cache.decode(tokens)` are the same calls for either graph flavor. Per decode step the host writes B token ids,
runs the graph, and samples from B x V last-position logits (greedy on an --argmax export: reads back B ids);
no key/value data crosses to the host. Each row's text, stop strings and finish reason live in a _Sequence.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np

from llama3_deploy.engine import ENGINE_MANIFEST_FILE
from llama3_deploy.errors import DeployError

from .chat import ChatFormat
from .kv import KVCache, allocate
from .sampling import Sampler, SamplingParams
from .session import DecoderSession, Device
from .tokenizer import Tokenizer

DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per prefill run; bounds the logits buffer to B x chunk x V
BACKENDS = ("onnxruntime", "tensorrt")
CAPACITY_PAGE = 256  # KV capacity grows in whole pages, so slightly longer prompts reuse the buffers
Messages = Sequence[dict]
Prompt = Union[str, Sequence[int], Messages]
_PROMPT_LIKE = (str, bytes, bytearray, memoryview, Sequence, np.ndarray)  # what can be one prompt of a batch
_WHAT_A_PROMPT_IS = "a prompt is text, a list of token ids or a list of chat messages"


@dataclasses.dataclass
class GenerationResult:
    prompt_ids: list[int]
    generated_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS id or stop string) or "length"
    ttft_ms: float      # prompt in -> first token out
    tpot_ms: float      # mean time per output token after the first
    step_ms: list[float] = dataclasses.field(default_factory=list)  # each decode step's time
    kv_cache: dict | None = None  # the cache the run used: KVCache.describe() (capacity, bytes)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class _StopText:
    """Streams a row's text, holding back any tail that could still become a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops, self.pending, self.hold = tuple(stops), "", max((len(s) for s in stops), default=1) - 1

    def push(self, delta: str) -> tuple[str, bool]:
        self.pending += delta
        for s in self.stops:
            at = self.pending.find(s)
            if at >= 0:
                out, self.pending = self.pending[:at], ""
                return out, True
        cut = max(len(self.pending) - self.hold, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class _Sequence:
    """One row's output: its tokens, its text streamed through the stop-string filter, and why it finished."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer | None, eos_ids):
        self.prompt_ids, self.generated, self.text = list(prompt_ids), [], ""
        self.finish_reason: str | None = None
        self._decoder = tokenizer.stream_decoder(skip_special_tokens=True) if tokenizer else None
        self._stop = _StopText(params.stop)
        self._cut = False  # the text was cut at a stop string: nothing held back is emitted
        self._eos = (frozenset() if params.ignore_eos else frozenset(eos_ids)) | frozenset(params.stop_token_ids)
        self._max = params.max_new_tokens

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> str:
        """Take the next token; returns the text it releases (maybe '')."""
        if token in self._eos:
            self.finish_reason = "stop"
            return ""
        self.generated.append(token)
        out, stopped = self._stop.push(self._decoder.push(token) if self._decoder else "")
        self.text += out
        if stopped:
            self.finish_reason, self._cut = "stop", True
        elif len(self.generated) == self._max:
            self.finish_reason = "length"
        return out

    def flush(self) -> str:
        """The text held back at the end (a partial character or a possible stop string), unless already cut."""
        if self._cut:
            return ""
        out, self._cut = self._stop.push(self._decoder.flush() if self._decoder else "")
        out += "" if self._cut else self._stop.flush()
        if self._cut:
            self.finish_reason = "stop"
        self.text += out
        return out

    def result(self, ttft_ms: float, tpot_ms: float, step_ms: list[float], kv_cache: dict | None = None
               ) -> GenerationResult:
        return GenerationResult(self.prompt_ids, self.generated, self.text, self.finish_reason, ttft_ms, tpot_ms,
                                step_ms, kv_cache)


class Generator:
    """Generate text from an export directory: `generate(...)` for results, `stream(...)` for text deltas."""

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", threads: int = 0,
                 graph_optimization: str = "all", prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 cuda_graph: bool = False, backend: str = "onnxruntime"):
        """device: 'cpu', 'cuda' or 'cuda:N'. threads: ONNX Runtime intra-op threads, 0 (its default) to
        session.MAX_THREADS (1024; more is refused, not clamped). prefill_chunk: prompt tokens per prefill run.
        backend: "onnxruntime" (an export directory) or "tensorrt" (an engine directory from build-engine, on
        CUDA; threads and graph_optimization are ONNX Runtime's and do not apply)."""
        if not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or prefill_chunk <= 0:
            raise DeployError(f"prefill_chunk must be a positive integer, not {prefill_chunk!r}")
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise DeployError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if backend == "tensorrt":
            if Device.parse(device).kind != "cuda":
                raise DeployError("the tensorrt backend runs TensorRT engines on a CUDA GPU; pass device 'cuda' "
                                  "(or cuda:N), or use the onnxruntime backend with an export directory on the CPU")
            if cuda_graph:
                raise DeployError("cuda_graph is ONNX Runtime's decode capture; the tensorrt backend does not use it")
            from .tensorrt import TensorRTSession  # TensorRT and cuda-python load only here
            session = TensorRTSession(model_dir, device=device)
        else:
            if isinstance(model_dir, (str, os.PathLike)) and (Path(model_dir) / ENGINE_MANIFEST_FILE).is_file():
                raise DeployError(f"{model_dir} is a TensorRT engine directory; run it with backend 'tensorrt' "
                                  "(--backend tensorrt) on a CUDA device")
            session = DecoderSession.from_dir(model_dir, device=device, threads=threads,
                                              graph_optimization=graph_optimization, cuda_graph=cuda_graph)
        self._attach(session, model_dir, prefill_chunk)

    @classmethod
    def from_session(cls, session, *, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> Generator:
        """A Generator over an open session (a DecoderSession, or a TensorRTSession on any device: how the
        tests drive TensorRT's code on host memory); tokenizer files are read from `session.model_dir`."""
        if not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or prefill_chunk <= 0:
            raise DeployError(f"prefill_chunk must be a positive integer, not {prefill_chunk!r}")
        gen = cls.__new__(cls)
        gen._attach(session, session.model_dir, prefill_chunk)
        return gen

    def _attach(self, session, model_dir: str | Path, prefill_chunk: int) -> None:
        self.session = session
        self.config = self.session.config
        # An engine accepts at most its build's rows, context and prefill chunk (build-engine's limits).
        self.max_context = getattr(session, "max_context", self.config.max_position_embeddings)
        self.max_batch = getattr(session, "max_batch", None)
        engine_chunk = getattr(session, "prefill_chunk", None)
        if engine_chunk is not None and prefill_chunk > engine_chunk:
            if prefill_chunk != DEFAULT_PREFILL_CHUNK:
                raise DeployError(f"prefill_chunk {prefill_chunk} exceeds the engine's {engine_chunk} "
                                  "(build-engine --prefill-chunk); pass a value up to it")
            prefill_chunk = engine_chunk  # the default adapts to the engine
        self.prefill_chunk = prefill_chunk
        has_tokenizer = any((Path(model_dir) / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))
        self.tokenizer = Tokenizer.from_dir(model_dir) if has_tokenizer else None
        self.chat = ChatFormat.from_dir(model_dir) if has_tokenizer else None
        if self.tokenizer is not None and self.tokenizer.vocab_size > self.config.vocab_size:
            raise DeployError(f"{model_dir}: tokenizer has {self.tokenizer.vocab_size} tokens but the model's "
                              f"vocabulary is {self.config.vocab_size}; they do not belong together")
        self.eos_ids = frozenset(self.config.eos_token_ids)
        self._cache: KVCache | None = None

    def _context_name(self) -> str:
        if hasattr(self.session, "max_context"):
            return f"the engine's context of {self.max_context} tokens (build-engine --max-context)"
        return f"the model's context of {self.max_context} tokens"

    @classmethod
    def from_dir(cls, model_dir: str | Path, **kwargs) -> Generator:
        """Same as Generator(model_dir, ...): device, threads, graph_optimization, prefill_chunk, backend."""
        return cls(model_dir, **kwargs)

    # --- prompts -------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt, *, chat: bool = False) -> list[int]:
        """Text (plain, or as one user message with chat=True), a list of messages, or token ids."""
        if isinstance(prompt, (bytes, bytearray, memoryview)):
            raise DeployError("a prompt is text (str), not bytes: decode it first, e.g. prompt.decode('utf-8')")
        if isinstance(prompt, Mapping):
            raise DeployError("a chat message on its own is not a prompt: pass a list of messages, "
                              "e.g. [{'role': 'user', 'content': 'Hi'}]")
        if isinstance(prompt, str):
            if not prompt:
                raise DeployError("empty prompt")
            self._need_tokenizer()
            if chat:
                return _nonempty(self.chat.encode_dialog([{"role": "user", "content": prompt}]), "the chat template")
            return _nonempty(self.tokenizer.encode(prompt, bos=self.tokenizer.bos_id is not None), "the text")
        if not isinstance(prompt, _PROMPT_LIKE):
            raise DeployError(f"{_WHAT_A_PROMPT_IS}, not {type(prompt).__name__}")
        items = list(prompt)
        if not items:
            raise DeployError("empty prompt")
        if all(isinstance(x, Mapping) for x in items):
            self._need_tokenizer()
            return _nonempty(self.chat.encode_dialog(items), "the chat template")
        if any(isinstance(x, (Mapping, *_PROMPT_LIKE)) for x in items):
            kinds = sorted({type(x).__name__ for x in items})
            raise DeployError(f"{_WHAT_A_PROMPT_IS}; got a list {'mixing' if len(kinds) > 1 else 'of'} "
                              f"{', '.join(kinds)} (a batch is a list of prompts, one level deep)")
        for i, x in enumerate(items):
            if not isinstance(x, (int, np.integer)) or isinstance(x, (bool, np.bool_)):
                raise DeployError(f"token ids must be integers; item {i} is {type(x).__name__} {x!r}")
        ids = [int(x) for x in items]
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise DeployError(f"prompt token ids outside the vocabulary [0, {self.config.vocab_size}): {bad[:5]}")
        return ids

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise DeployError(f"{self.session.model_dir} has no tokenizer files; pass token ids instead")

    def _encode_batch(self, prompts, chat: bool) -> tuple[list[list[int]], bool]:
        """(token ids per row, whether `prompts` was one prompt rather than a batch of them)."""
        if not isinstance(prompts, _PROMPT_LIKE) or isinstance(prompts, (str, bytes, bytearray, memoryview)):
            return [self.encode_prompt(prompts, chat=chat)], True
        items = list(prompts)
        if not items or not any(isinstance(x, _PROMPT_LIKE) for x in items):  # token ids or messages: one prompt
            return [self.encode_prompt(items, chat=chat)], True
        if any(isinstance(x, (int, np.integer, float, Mapping)) for x in items):
            return [self.encode_prompt(items, chat=chat)], True  # refused there: mixes ids and nested lists
        rows = []
        for i, p in enumerate(items):
            try:
                rows.append(self.encode_prompt(p, chat=chat))
            except DeployError as e:
                raise DeployError(f"prompt {i}: {e}") from None
        return rows, False

    # --- public API ----------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None, *,
                 chat: bool = False, **kwargs) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (returns a result) or a list of prompts (returns a list, one per row).
        Sampling options come as a SamplingParams or as its keyword arguments, not both."""
        params = _sampling_params(params, kwargs)
        rows, single = self._encode_batch(prompts, chat)
        results = None
        for event in self._generate(rows, params):
            if isinstance(event, list):
                results = event
        return results[0] if single else results

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *, chat: bool = False,
               **kwargs) -> Iterator[str]:
        """Yield text deltas for one prompt; their concatenation equals the final result's text. The generator's
        return value (StopIteration.value, or `result = yield from gen.stream(...)`) is the GenerationResult."""
        params = _sampling_params(params, kwargs)
        rows, single = self._encode_batch(prompt, chat)
        if not single:
            raise DeployError("stream takes one prompt; use generate for a batch of prompts")
        result = None
        for event in self._generate(rows, params):
            if isinstance(event, tuple):
                if event[1]:
                    yield event[1]
            else:
                result = event[0]
        return result

    def prompt_logits(self, prompt: Prompt) -> np.ndarray:
        """Logits [T, V] (fp32) at every position of one prompt, for scoring and perplexity.

        Needs an export that computes all positions (the portable flavor, or optimized with --logits all).
        """
        if self.session.logits != "all":
            raise DeployError(f"{self.session.model_dir} computes logits for the last position only; export it with "
                              "--logits all to score every position")
        ids = self.encode_prompt(prompt)
        if len(ids) > self.max_context:
            raise DeployError(f"prompt of {len(ids)} tokens exceeds {self._context_name()}")
        return self._cache_for(1, len(ids)).prompt_logits(ids)

    # --- the loop ------------------------------------------------------------------------------------
    def _cache_for(self, batch: int, tokens: int) -> KVCache:
        """The cache for this shape: reused when it fits, else reallocated once (capacity in whole pages)."""
        c = self._cache
        if c is None or c.batch != batch or c.capacity < tokens:
            pages = -(-tokens // CAPACITY_PAGE) * CAPACITY_PAGE
            capacity = min(max(pages, c.capacity if c is not None and c.batch == batch else 0),
                           max(tokens, self.config.max_position_embeddings))
            self._cache = None  # release the old buffers before allocating new ones
            # A prefill run never holds more than `capacity` tokens, so no logits buffer beyond that
            self._cache = allocate(self.session, batch, capacity, min(self.prefill_chunk, capacity))
        return self._cache

    def _generate(self, rows: list[list[int]], params: SamplingParams):
        """Yields (row, text_delta) while generating, then the list of GenerationResults."""
        longest = max(len(r) for r in rows)
        if longest + params.max_new_tokens > self.max_context:
            raise DeployError(f"prompt of {longest} tokens plus max_new_tokens {params.max_new_tokens} exceeds "
                              f"{self._context_name()}")
        if self.max_batch is not None and len(rows) > self.max_batch:
            raise DeployError(f"{len(rows)} prompts exceed the engine's batch of {self.max_batch} "
                              "(build-engine --max-batch)")
        t0 = time.perf_counter()
        B = len(rows)
        cache = self._cache_for(B, longest + params.max_new_tokens)
        # Greedy without a repetition penalty is the argmax of the raw logits: with an --argmax export only
        # the graph's ids are read back (B int64 per step instead of B x V fp32 logits).
        ids_only = self.session.argmax and params.plain_greedy
        sampler = Sampler(params, B, self.config.vocab_size, prompts=rows)
        seqs = [_Sequence(r, params, self.tokenizer, self.eos_ids) for r in rows]
        out = cache.prefill(rows, ids_only=ids_only)  # [B, V] logits, or [B] ids
        tokens = np.zeros(B, np.int64)  # finished rows keep decoding a dummy 0 (fixed shapes)
        t_first, t_last, step_ms = None, t0, []
        for _ in range(params.max_new_tokens):
            for r, seq in enumerate(seqs):
                if seq.done:
                    tokens[r] = 0
                    continue
                tokens[r] = int(out[r]) if ids_only else sampler(out[r], r)
                delta = seq.push(int(tokens[r]))
                if delta:
                    yield r, delta
            now = time.perf_counter()
            if t_first is None:
                t_first = now
            else:
                step_ms.append((now - t_last) * 1e3)
            t_last = now
            if all(s.done for s in seqs):
                break
            out = cache.decode(tokens, ids_only=ids_only)
        t_end = time.perf_counter()
        for r, seq in enumerate(seqs):
            delta = seq.flush()
            if delta:
                yield r, delta
        n = max(len(s.generated) for s in seqs)
        tpot = (t_end - t_first) * 1e3 / max(n - 1, 1)
        kv = cache.describe()
        yield [s.result((t_first - t0) * 1e3, tpot, step_ms, kv) for s in seqs]


def _nonempty(ids: list[int], source: str) -> list[int]:
    if not ids:
        raise DeployError(f"empty prompt: {source} produced no tokens")
    return ids


def _sampling_params(params, kwargs: dict) -> SamplingParams:
    if params is not None:
        if not isinstance(params, SamplingParams):
            raise DeployError(f"params must be a SamplingParams, not {type(params).__name__} "
                              "(or pass sampling options as keyword arguments)")
        if kwargs:
            raise DeployError("pass sampling options as either a SamplingParams or keyword arguments, not both "
                              f"(got a SamplingParams and {', '.join(sorted(kwargs))})")
        return params
    known = [f.name for f in dataclasses.fields(SamplingParams)]
    for name in kwargs:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DeployError(f"unknown sampling parameter {name!r}{hint} (known: {', '.join(known)})")
    return SamplingParams(**kwargs)
