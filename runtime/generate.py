"""The token loop: chunked prefill, then one decode step at a time on bound device buffers.

Per decode step the host writes B token ids, B positions and the mask row prefix, binds pointers,
runs the graph, and samples from B x V last-position logits (greedy on an --argmax export: reads back B ids);
no key/value data crosses to the host.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np

from llama3_deploy import contract
from llama3_deploy.errors import DeployError

from .chat import ChatFormat
from .sampling import Sampler, SamplingParams
from .session import DecoderSession, Device, DeviceBuffer, SharedKV
from .tokenizer import Tokenizer

DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per prefill run; bounds the logits buffer to B x chunk x V
CAPACITY_PAGE = 256  # KV capacity grows in whole pages, so slightly longer prompts reuse the buffers
Messages = Sequence[dict]
Prompt = Union[str, Sequence[int], Messages]


@dataclasses.dataclass
class GenerationResult:
    prompt_ids: list[int]
    generated_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS id or stop string) or "length"
    ttft_ms: float      # prompt in -> first token out
    tpot_ms: float      # mean time per output token after the first
    step_ms: list[float] = dataclasses.field(default_factory=list)  # each decode step's time

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _is_single_prompt(prompts) -> bool:
    """One prompt is text, a list of token ids, or a list of message dicts; a batch is a list of those."""
    if isinstance(prompts, str):
        return True
    items = list(prompts)
    return not items or all(isinstance(x, (int, np.integer, dict)) for x in items)


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


class _Buffers:
    """Everything one (batch, capacity) shape needs, allocated once and reused across generations."""

    _graphs = 0  # CUDA graph ids handed out; each allocation captures its own decode graph

    def __init__(self, session: DecoderSession, batch: int, capacity: int, chunk: int):
        c = session.config
        self.batch, self.capacity, self.chunk = batch, capacity, chunk
        self.kv = session.kv_cache(batch, capacity)
        self.shared = isinstance(self.kv, SharedKV)  # in-place KV; rows prefilled one at a time
        self.logits_len = chunk if session.manifest.logits == "all" else 1  # logits positions per prefill run
        host = Device("cpu")
        logits_rows = batch * self.logits_len if self.shared else batch * chunk
        # With CUDA graphs the ids and logits live on the device too (a replayed graph reads and writes fixed
        # device addresses); otherwise they are host buffers ONNX Runtime copies from and into.
        self.graph_id = None
        if session.cuda_graph:
            _Buffers._graphs += 1
            self.graph_id = _Buffers._graphs
        io_device = session.device if session.cuda_graph else host
        self.logits = DeviceBuffer(io_device, "float32", logits_rows * c.vocab_size)
        # In-graph greedy ids (exports with --argmax): always bound, so the graph never allocates an output.
        self.next_token = (DeviceBuffer(io_device, "int64", logits_rows) if session.manifest.argmax else None)
        self.ids = DeviceBuffer(io_device, "int64", batch * chunk)
        self.ids_host = self.ids.host if self.ids.host is not None else np.zeros(batch * chunk, np.int64)
        if not self.shared:  # the portable graph's positions and padding mask (the shared KV keeps its own lengths)
            self.pos = DeviceBuffer(host, "int64", batch * chunk)
            self.mask = DeviceBuffer(host, "int64", batch * capacity)       # full-length mask, per generation
            self.mask_step = DeviceBuffer(host, "int64", batch * capacity)  # the contiguous [B, total] bound
            self.mask_step.host.fill(1)
        self.binding = session.new_binding()


class Generator:
    """Generate text from an export directory: `generate(...)` for results, `stream(...)` for text deltas."""

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", threads: int = 0,
                 graph_optimization: str = "all", prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 cuda_graph: bool = False):
        if prefill_chunk <= 0:
            raise DeployError("prefill_chunk must be positive")
        self.session = DecoderSession(model_dir, device=device, threads=threads,
                                      graph_optimization=graph_optimization, cuda_graph=cuda_graph)
        self.config = self.session.config
        self.prefill_chunk = prefill_chunk
        has_tokenizer = any((Path(model_dir) / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))
        self.tokenizer = Tokenizer.from_dir(model_dir) if has_tokenizer else None
        self.chat = ChatFormat.from_dir(model_dir) if has_tokenizer else None
        if self.tokenizer is not None and self.tokenizer.vocab_size > self.config.vocab_size:
            raise DeployError(f"{model_dir}: tokenizer has {self.tokenizer.vocab_size} tokens but the model's "
                              f"vocabulary is {self.config.vocab_size}; they do not belong together")
        self.eos_ids = frozenset(self.config.eos_token_ids)
        self._buffers: _Buffers | None = None

    @classmethod
    def from_dir(cls, model_dir: str | Path, **kwargs) -> Generator:
        """Same as Generator(model_dir, ...): device, threads, graph_optimization, prefill_chunk."""
        return cls(model_dir, **kwargs)

    # --- prompts -------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt, *, chat: bool = False) -> list[int]:
        """Text (plain, or as one user message with chat=True), a list of messages, or token ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise DeployError("empty prompt")
            self._need_tokenizer()
            if chat:
                return self.chat.encode_dialog([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt, bos=self.tokenizer.bos_id is not None)  # never parses specials
        items = list(prompt)
        if not items:
            raise DeployError("empty prompt")
        if all(isinstance(x, dict) for x in items):
            self._need_tokenizer()
            return self.chat.encode_dialog(items)
        if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in items):
            raise DeployError("a prompt is text, a list of chat messages, or a list of token ids")
        ids = [int(x) for x in items]
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise DeployError(f"prompt token ids outside the vocabulary [0, {self.config.vocab_size}): {bad[:5]}")
        return ids

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise DeployError(f"{self.session.model_dir} has no tokenizer files; pass token ids instead")

    # --- public API ----------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None, *,
                 chat: bool = False, **kwargs) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (returns a result) or a list of prompts (returns a list, one per row)."""
        params = params or SamplingParams(**kwargs)
        single = _is_single_prompt(prompts)
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise DeployError("empty prompt")
        ids = [self.encode_prompt(p, chat=chat) for p in batch]
        results = None
        for event in self._run(ids, params):
            if isinstance(event, list):
                results = event
        return results[0] if single else results

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *, chat: bool = False,
               **kwargs) -> Iterator[str]:
        """Yield text deltas for one prompt; their concatenation equals the final result's text."""
        params = params or SamplingParams(**kwargs)
        for event in self._run([self.encode_prompt(prompt, chat=chat)], params):
            if isinstance(event, tuple) and event[1]:
                yield event[1]

    def prompt_logits(self, prompt: Prompt) -> np.ndarray:
        """Logits [T, V] (fp32) at every position of one prompt, for scoring and perplexity.

        Needs an export that computes all positions (the portable flavor, or optimized with --logits all).
        """
        if self.session.manifest.logits != "all":
            raise DeployError(f"{self.session.model_dir} computes logits for the last position only; export it with "
                              "--logits all to score every position")
        ids = self.encode_prompt(prompt)
        T, V = len(ids), self.config.vocab_size
        if T > self.config.max_position_embeddings:
            raise DeployError(f"prompt of {T} tokens exceeds the model's context of "
                              f"{self.config.max_position_embeddings} tokens")
        buf = self._prepare(1, T)
        out = np.empty((T, V), np.float32)
        arr = np.asarray(ids, np.int64)[None]
        for lo in range(0, T, buf.chunk):
            hi = min(T, lo + buf.chunk)
            if buf.shared:
                out[lo:hi] = self._step_shared(buf, arr[:, lo:hi], row=0, full=True)[0]
            else:
                out[lo:hi] = self._step(buf, arr[:, lo:hi], np.arange(lo, hi)[None], hi, full=True)[0]
        return out

    # --- the loop ------------------------------------------------------------------------------------
    def _prepare(self, batch: int, capacity: int) -> _Buffers:
        """The buffers for this shape: reused when they fit, else reallocated once (capacity in whole pages)."""
        b = self._buffers
        if b is None or b.batch != batch or b.capacity < capacity:
            pages = -(-capacity // CAPACITY_PAGE) * CAPACITY_PAGE
            capacity = min(max(pages, b.capacity if b is not None and b.batch == batch else 0),
                           max(capacity, self.config.max_position_embeddings))
            self._buffers = None  # release the old buffers before allocating new ones
            b = self._buffers = _Buffers(self.session, batch, capacity, self.prefill_chunk)
        b.kv.reset()
        return b

    def _run(self, rows: list[list[int]], params: SamplingParams):
        """Yields (row, text_delta) while generating, then the list of GenerationResults."""
        c = self.config
        lens = [len(r) for r in rows]
        longest = max(lens)
        if longest + params.max_new_tokens > c.max_position_embeddings:
            raise DeployError(f"prompt of {longest} tokens plus max_new_tokens {params.max_new_tokens} exceeds the "
                              f"model's context of {c.max_position_embeddings} tokens")
        t0 = time.perf_counter()
        B, cap = len(rows), longest + params.max_new_tokens
        buf = self._prepare(B, cap)
        # Greedy without a repetition penalty is the argmax of the raw logits: with an --argmax export only
        # the graph's ids are read back (B int64 per step instead of B x V fp32 logits).
        ids_only = buf.next_token is not None and params.greedy and params.repetition_penalty == 1.0
        logits = (self._prefill_shared(buf, rows, ids_only=ids_only) if buf.shared
                  else self._prefill_padded(buf, rows))
        sampler = Sampler(params, B, c.vocab_size, prompts=rows)
        decoders = [self.tokenizer.stream_decoder(skip_special_tokens=True) if self.tokenizer else None
                    for _ in rows]
        stops = [_StopText(params.stop) for _ in rows]
        generated: list[list[int]] = [[] for _ in rows]
        texts = [""] * B
        finish: list[str | None] = [None] * B
        cut = [False] * B  # the row's text was cut at a stop string
        t_first = None
        step_ms: list[float] = []
        next_pos = np.asarray(lens, np.int64)[:, None]
        tokens = np.zeros((B, 1), np.int64)  # every row is rewritten each step
        for step in range(params.max_new_tokens):
            for r in range(B):
                tok = (int(logits[r]) if ids_only else sampler(logits[r], r)) if finish[r] is None else 0
                tokens[r, 0] = tok
                if finish[r] is not None:
                    continue
                if tok in self.eos_ids and not params.ignore_eos:
                    finish[r] = "stop"
                else:
                    generated[r].append(tok)
                    delta = decoders[r].push(tok) if decoders[r] else ""
                    out, stopped = stops[r].push(delta)
                    if out:
                        texts[r] += out
                        yield (r, out)
                    if stopped:
                        finish[r], cut[r] = "stop", True
                if finish[r] is None and len(generated[r]) == params.max_new_tokens:
                    finish[r] = "length"
            if t_first is None:
                t_first = t_last = time.perf_counter()
            else:
                now = time.perf_counter()
                step_ms.append((now - t_last) * 1e3)
                t_last = now
            if all(f is not None for f in finish):
                break
            logits = (self._step_shared(buf, tokens, ids_only=ids_only) if buf.shared
                      else self._step(buf, tokens, next_pos + step, longest + step + 1))
        t_end = time.perf_counter()
        for r in range(B):  # flush what each row held back, unless a stop string already cut it
            if cut[r]:
                continue
            out, cut[r] = stops[r].push(decoders[r].flush() if decoders[r] else "")
            out += "" if cut[r] else stops[r].flush()
            if cut[r]:
                finish[r] = "stop"
            if out:
                texts[r] += out
                yield (r, out)
        n = max(len(g) for g in generated)
        yield [GenerationResult(prompt_ids=list(rows[r]), generated_ids=generated[r], text=texts[r],
                                finish_reason=finish[r], ttft_ms=(t_first - t0) * 1e3,
                                tpot_ms=(t_end - t_first) * 1e3 / max(n - 1, 1), step_ms=step_ms)
               for r in range(B)]

    def _prefill_padded(self, buf: _Buffers, rows: list[list[int]]) -> np.ndarray:
        """Portable graph: the batch left-padded to its longest prompt, in chunks. Returns last logits [B, V]."""
        B, lens = len(rows), [len(r) for r in rows]
        longest = max(lens)
        pads = [longest - n for n in lens]
        mask = buf.mask.view((B, buf.capacity))
        mask.fill(1)
        for r, p in enumerate(pads):
            mask[r, :p] = 0
        prompt = np.zeros((B, longest), np.int64)
        for r, ids in enumerate(rows):
            prompt[r, pads[r]:] = ids
        positions = np.maximum(np.arange(longest)[None, :] - np.asarray(pads)[:, None], 0)
        logits = None
        for lo in range(0, longest, buf.chunk):
            hi = min(longest, lo + buf.chunk)
            logits = self._step(buf, prompt[:, lo:hi], positions[:, lo:hi], hi)
        return logits

    def _prefill_shared(self, buf: _Buffers, rows: list[list[int]], *, ids_only: bool = False) -> np.ndarray:
        """Optimized graph: each row prefilled alone into its slot (no padding), in chunks; a batch of equal
        lengths that fits one chunk in one run. Last logits [B, V], or with ids_only the greedy ids [B]."""
        B = len(rows)
        out = np.empty((B,) if ids_only else (B, self.config.vocab_size), np.int64 if ids_only else np.float32)
        if B > 1 and len({len(ids) for ids in rows}) == 1 and len(rows[0]) <= buf.chunk:
            out[:] = self._step_shared(buf, np.asarray(rows, np.int64), ids_only=ids_only)  # one batched run
            return out
        for r, ids in enumerate(rows):
            prompt = np.asarray(ids, np.int64)[None]
            for lo in range(0, prompt.shape[1], buf.chunk):
                last = self._step_shared(buf, prompt[:, lo:lo + buf.chunk], row=r, ids_only=ids_only)
            out[r] = last[0]
        return out

    def _step_shared(self, buf: _Buffers, ids: np.ndarray, row: int | None = None, *, full: bool = False,
                     ids_only: bool = False) -> np.ndarray:
        """Optimized graph: `ids` [n, S] for one row (prefill) or all rows (decode, S = 1). Returns the last
        position's logits [n, V], with full=True all the graph computed [n, L, V], or with ids_only the
        graph's greedy ids for the last position [n] (the logits stay where they are)."""
        n, S = ids.shape
        V = self.config.vocab_size
        L = S if buf.logits_len > 1 else 1
        buf.ids_host[:n * S] = ids.reshape(-1)
        buf.ids.upload(buf.ids_host)
        buf.ids.bind_input(buf.binding, contract.INPUT_IDS, (n, S))
        buf.kv.bind(buf.binding, S, row)
        buf.logits.bind_output(buf.binding, contract.LOGITS, (n, L, V))
        if buf.next_token is not None:
            buf.next_token.bind_output(buf.binding, contract.NEXT_TOKEN, (n, L))
        decode = row is None and S == 1
        self.session.run(buf.binding, graph_id=buf.graph_id if decode else None)  # only decode steps replay
        buf.kv.advance(S, row)
        if ids_only:
            return buf.next_token.download()[:n * L].reshape(n, L)[:, -1]
        logits = buf.logits.download()[:n * L * V].reshape(n, L, V)
        return logits if full else logits[:, -1]

    def _step(self, buf: _Buffers, ids: np.ndarray, pos: np.ndarray, total: int, *, full: bool = False) -> np.ndarray:
        """Run the graph on `ids` [B, S] at `pos` with `total` = past + S; returns logits[:, -1] [B, V] (host),
        or with full=True all positions [B, S, V]."""
        B, S = ids.shape
        V = self.config.vocab_size
        binding = buf.binding
        buf.ids.view((B, S))[...] = ids
        buf.pos.view((B, S))[...] = pos
        # The graph takes a contiguous [B, total] mask. One row has no padding: a prefix of the all-ones
        # buffer, no work. Left-padded rows are rebuilt per step (B x total int64 on the host); the
        # in-place flavor replaces the mask with per-row lengths.
        if B > 1:
            buf.mask_step.view((B, total))[...] = buf.mask.view((B, buf.capacity))[:, :total]
        buf.ids.bind_input(binding, contract.INPUT_IDS, (B, S))
        buf.mask_step.bind_input(binding, contract.ATTENTION_MASK, (B, total))
        buf.pos.bind_input(binding, contract.POSITION_IDS, (B, S))
        buf.kv.bind(binding, S)
        buf.logits.bind_output(binding, contract.LOGITS, (B, S, V))
        self.session.run(binding)
        buf.kv.advance(S)
        logits = buf.logits.view((B, S, V))
        return logits if full else logits[:, -1]
