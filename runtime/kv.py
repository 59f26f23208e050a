"""Key/value caches: each owns its device buffers, how one graph run binds them, and its prefill and decode.

gpt-fast's generate.py reads prefill -> decode_one_token -> decode_n_tokens over a model that owns its cache.
Here the graph is fixed and the cache is memory bound to it, so the cache carries the step functions and the
token loop (runtime/generate.py) calls the same methods for either graph flavor:

    cache.prefill(rows)         prompts -> last-position logits [B, V] (greedy ids [B] with ids_only)
    cache.decode(tokens)        one token per row, [B] -> logits [B, V] (ids [B])
    cache.prompt_logits(ids)    one prompt -> logits at every position [T, V]
    cache.forward(ids, row)     one graph run: bind, run, advance; the three above are made of it

SharedKV (the optimized graph) adds the slot API a continuous-batching server drives: slots are rows of its
buffers; prefill_row(r, ids) refills one slot from empty while the others keep their cache, reset_row(r) empties
an idle one, and decode(tokens) steps every row with the same pointers and shapes each time (what a captured CUDA
graph replays).

`allocate` sums the bytes a cache needs before allocating anything, so an impossible context is a clear error.
"""
from __future__ import annotations

import os

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException as OrtRuntimeError

from llama3_deploy import contract
from llama3_deploy.config import human_bytes
from llama3_deploy.dtypes import itemsize
from llama3_deploy.errors import DeployError

from .session import DecoderSession, Device, DeviceBuffer

HOST = Device("cpu")


class KVCache:
    """What both flavors share: input ids, logits and next_token buffers, one IOBinding, and the run around
    the flavor's own `bind` (keys/values, mask, positions). Allocated once per (batch, capacity, chunk)."""

    _graphs = 0    # CUDA graph ids handed out; each cache captures its own decode graph
    KV_COPIES = 1  # key/value buffers per past/present tensor (for `nbytes`)
    MASKS = 3      # [B, capacity] int64 mask buffers (for `nbytes`)

    def __init__(self, session: DecoderSession, batch: int, capacity: int, chunk: int):
        self.session, self.batch, self.capacity, self.chunk = session, batch, capacity, chunk
        self.vocab = session.config.vocab_size
        self.kv_heads, self.head_dim = session.config.num_key_value_heads, session.config.head_dim
        self.all_logits = session.logits == "all"
        # With CUDA graphs (and on TensorRT, which reads every tensor from the device) the ids and logits live on
        # the device too (a replayed graph reads and writes fixed device addresses); otherwise they are host
        # buffers ONNX Runtime copies from and into.
        io_device = session.device if session.io_on_device else HOST
        self.graph_id = None
        if session.cuda_graph:
            KVCache._graphs += 1
            self.graph_id = KVCache._graphs
        L = chunk if self.all_logits else 1
        self.logits = DeviceBuffer(io_device, "float32", batch * L * self.vocab)  # [B, L, V]
        # In-graph greedy ids (--argmax exports): always bound, so the graph never allocates an output.
        self.next_token = DeviceBuffer(io_device, "int64", batch * L) if session.argmax else None  # [B, L]
        self.ids = DeviceBuffer(io_device, "int64", batch * chunk)  # [B, S]
        self.ids_host = self.ids.host if self.ids.host is not None else np.zeros(batch * chunk, np.int64)
        self.binding = session.new_binding()
        self._ran = (0, 0)  # (rows, logits positions) of the last run: what `output` reads

    @classmethod
    def nbytes(cls, session: DecoderSession, batch: int, capacity: int, chunk: int) -> int:
        """Bytes the cache allocates, host and device together (a slight upper bound), known beforehand."""
        c, L = session.config, chunk if session.logits == "all" else 1
        logits = batch * L * (c.vocab_size * 4 + (8 if session.argmax else 0))  # logits [B, L, V], next_token
        tokens = 3 * batch * chunk * 8  # ids (and their host copy), positions [B, S]
        kv = batch * capacity * c.kv_bytes_per_token(itemsize(session.kv_dtype))
        return logits + tokens + cls.KV_COPIES * kv + cls.MASKS * batch * capacity * 8

    def describe(self) -> dict:
        """What this cache holds: its rows, token capacity, element type and the bytes of its key/value buffers."""
        c = self.session.config
        per_token = self.KV_COPIES * c.kv_bytes_per_token(itemsize(self.session.kv_dtype))
        return {"batch": self.batch, "capacity_tokens": self.capacity, "kv_dtype": self.session.kv_dtype,
                "kv_bytes": per_token * self.batch * self.capacity, "kv_bytes_per_token": per_token,
                "model_context_tokens": c.max_position_embeddings}

    # --- the flavor's part -----------------------------------------------------------------------------
    def reset(self) -> None:
        raise NotImplementedError

    def bind(self, new_tokens: int, rows: slice) -> None:
        """Bind keys/values (and mask, positions) for `new_tokens` more tokens in the rows `rows`."""
        raise NotImplementedError

    def advance(self, new_tokens: int, rows: slice) -> None:
        raise NotImplementedError

    def prefill(self, rows: list[list[int]], *, ids_only: bool = False) -> np.ndarray:
        raise NotImplementedError

    # --- steps ---------------------------------------------------------------------------------------
    def forward(self, ids: np.ndarray, row: int | None = None, *, decode: bool = False) -> None:
        """One graph run on `ids` [n, S]: rows 0..n-1 (row None) or one row's slot. Only `decode` runs of every row
        get the CUDA graph id: their shapes and addresses never change, so they can be captured and replayed."""
        n, S = ids.shape
        rows = slice(0, n) if row is None else slice(row, row + 1)
        L = S if self.all_logits else 1
        self.ids_host[:n * S] = ids.reshape(-1)
        self.ids.upload(self.ids_host)
        self.ids.bind_input(self.binding, contract.INPUT_IDS, (n, S))
        self.bind(S, rows)
        self.logits.bind_output(self.binding, contract.LOGITS, (n, L, self.vocab))
        if self.next_token is not None:
            self.next_token.bind_output(self.binding, contract.NEXT_TOKEN, (n, L))
        self.session.run(self.binding, graph_id=self.graph_id if decode and n == self.batch else None)
        self.advance(S, rows)
        self._ran = (n, L)

    def output(self, *, ids_only: bool = False, full: bool = False) -> np.ndarray:
        """The last run's last-position logits [n, V] (full: every position it computed, [n, L, V]); with
        ids_only the graph's greedy ids [n] ([n, L]) and no logits copied. On the CPU a view the next run overwrites."""
        n, L = self._ran
        if ids_only:
            ids = self.next_token.download()[:n * L].reshape(n, L)
            return ids if full else ids[:, -1]
        logits = self.logits.download()[:n * L * self.vocab].reshape(n, L, self.vocab)
        return logits if full else logits[:, -1]

    def decode(self, tokens: np.ndarray, *, ids_only: bool = False) -> np.ndarray:
        """decode_one_token: `tokens` [n], one per row of rows 0..n-1 (n = B normally; a server decodes only the
        slots up to its last busy one) -> logits [n, V] (ids [n])."""
        tokens = np.asarray(tokens, np.int64)
        self.forward(tokens.reshape(tokens.size, 1), decode=True)
        return self.output(ids_only=ids_only)

    def prompt_logits(self, ids: list[int]) -> np.ndarray:
        """Logits [T, V] at every position of one prompt (a batch-1 cache of an export with --logits all)."""
        self.reset()
        prompt = np.asarray(ids, np.int64)[None]
        out = np.empty((prompt.shape[1], self.vocab), np.float32)
        for lo in range(0, prompt.shape[1], self.chunk):
            self.forward(prompt[:, lo:lo + self.chunk])
            out[lo:lo + self.chunk] = self.output(full=True)[0]
        return out


class PingPongKV(KVCache):
    """The portable graph: past [B, K, P, D] in, a new present [B, K, P+S, D] out. Two device buffers per tensor
    swap roles each step, so the cache never leaves the device and nothing is allocated per step. Rows share one
    length: a batch is left-padded to its longest prompt, with positions and a [B, P+S] padding mask."""

    KV_COPIES = 2
    MASKS = 2

    def __init__(self, session: DecoderSession, batch: int, capacity: int, chunk: int):
        super().__init__(session, batch, capacity, chunk)
        numel = batch * self.kv_heads * capacity * self.head_dim
        self.buffers = [(DeviceBuffer(session.device, session.kv_dtype, numel),
                         DeviceBuffer(session.device, session.kv_dtype, numel)) for _ in session.io.past_names]
        # Positions and the bound mask live where the session reads its inputs (the host for ONNX Runtime, the
        # device for TensorRT), written on the host and uploaded each step (a no-op when they are host memory).
        io_device = session.device if session.io_on_device else HOST
        self.pos = DeviceBuffer(io_device, "int64", batch * chunk)             # [B, S]
        self.mask = DeviceBuffer(HOST, "int64", batch * capacity)              # [B, capacity]: 0 on left padding
        self.mask_step = DeviceBuffer(io_device, "int64", batch * capacity)    # the contiguous [B, P+S] bound
        self.pos_host = _host_of(self.pos)
        self.mask_step_host = _host_of(self.mask_step)
        self.mask_step_host.fill(1)
        self.mask_step.upload(self.mask_step_host)
        self.pads = np.zeros(batch, np.int64)
        self.length = 0   # tokens cached, padding included (the same for every row)
        self.parity = 0   # which buffer of each pair holds the cache

    def reset(self) -> None:
        self.length, self.parity = 0, 0
        self.pads[:] = 0
        self.mask.host.fill(1)

    def prefill(self, rows: list[list[int]], *, ids_only: bool = False) -> np.ndarray:
        """The batch left-padded to its longest prompt, in chunks -> last logits [B, V]."""
        self.reset()
        longest = max(len(r) for r in rows)
        self.pads[:] = [longest - len(r) for r in rows]
        mask = self.mask.view((self.batch, self.capacity))
        prompt = np.zeros((self.batch, longest), np.int64)
        for r, (ids, pad) in enumerate(zip(rows, self.pads)):
            mask[r, :pad] = 0
            prompt[r, pad:] = ids
        for lo in range(0, longest, self.chunk):
            self.forward(prompt[:, lo:lo + self.chunk])
        return self.output(ids_only=ids_only)

    def bind(self, new_tokens: int, rows: slice) -> None:
        if (rows.start, rows.stop) != (0, self.batch):
            raise DeployError("the portable graph's rows share one length; per-row prefill needs an optimized export")
        B, S, total = self.batch, new_tokens, self.length + new_tokens
        if total > self.capacity:
            raise DeployError(f"KV cache capacity {self.capacity} exceeded")
        # A row's positions count its real tokens: left padding shifts them down (clamped at 0 on the padding).
        self.pos_host[:B * S].reshape(B, S)[...] = np.maximum(np.arange(self.length, total)[None]
                                                              - self.pads[:, None], 0)
        self.pos.upload(self.pos_host)
        # The graph takes a contiguous [B, total] mask. One row has no padding: a prefix of the all-ones
        # buffer, no work. Left-padded rows are rebuilt per step (B x total int64 on the host).
        if B > 1:
            self.mask_step_host[:B * total].reshape(B, total)[...] = self.mask.view((B, self.capacity))[:, :total]
            self.mask_step.upload(self.mask_step_host)
        self.mask_step.bind_input(self.binding, contract.ATTENTION_MASK, (B, total))
        self.pos.bind_input(self.binding, contract.POSITION_IDS, (B, S))
        past = (B, self.kv_heads, self.length, self.head_dim)
        present = (B, self.kv_heads, total, self.head_dim)
        for (a, b), p_name, o_name in zip(self.buffers, self.session.io.past_names, self.session.io.present_names):
            src, dst = (a, b) if self.parity == 0 else (b, a)
            src.bind_input(self.binding, p_name, past)
            dst.bind_output(self.binding, o_name, present)

    def advance(self, new_tokens: int, rows: slice) -> None:
        self.length += new_tokens
        self.parity ^= 1


class SharedKV(KVCache):
    """The optimized graph: one [B, K, M, D] buffer per past/present pair, bound as both input and output
    (GroupQueryAttention writes the new entries in place). Each row (slot) has its own length; the [B, M] mask
    tells the graph those lengths (row b has lengths[b] ones), so a decode step binds the same pointers and
    shapes every time. A one-row run binds that row's slice (a pointer offset).

    Slots for a server: decode always runs every row, so an idle slot decodes a dummy token each step; keep it
    reset (reset_row, length 0) so it never runs out of capacity, and prefill_row it when a request arrives.
    """

    def __init__(self, session: DecoderSession, batch: int, capacity: int, chunk: int):
        super().__init__(session, batch, capacity, chunk)
        self.row_numel = self.kv_heads * capacity * self.head_dim
        self.buffers = [DeviceBuffer(session.device, session.kv_dtype, batch * self.row_numel)
                        for _ in session.io.past_names]
        self.lengths = np.zeros(batch, np.int64)
        self.mask_host = np.zeros((batch, capacity), np.int64)  # the host copy of the lengths mask
        self._ones = np.ones(batch * capacity, np.int64)  # the mask of a first, batched prefill
        self.mask = DeviceBuffer(session.device, "int64", batch * capacity) if session.device.kind != "cpu" else None

    def reset(self) -> None:
        self.lengths[:] = 0
        self.mask_host.fill(0)

    def reset_row(self, row: int) -> None:
        """Empty one slot (a finished request) without touching the other rows' caches."""
        self.lengths[row] = 0
        self.mask_host[row].fill(0)

    def truncate_row(self, row: int, length: int) -> None:
        """Forget slot `row`'s entries past `length` (what a decode step wrote into a slot that is still being
        prefilled: the next prefill chunk overwrites those positions)."""
        self.lengths[row] = length
        self.mask_host[row, length:].fill(0)

    def prefill(self, rows: list[list[int]], *, ids_only: bool = False) -> np.ndarray:
        """Every row from empty: prompts of one length that fit a chunk in one batched run, otherwise each row
        alone into its slot (no padding). Last logits [B, V], or with ids_only the greedy ids [B]."""
        self.reset()
        if self.batch > 1 and len({len(r) for r in rows}) == 1 and len(rows[0]) <= self.chunk:
            self.forward(np.asarray(rows, np.int64))
            return self.output(ids_only=ids_only)
        out = np.empty((self.batch,) if ids_only else (self.batch, self.vocab), np.int64 if ids_only else np.float32)
        for r, ids in enumerate(rows):
            out[r] = self.prefill_row(r, ids, ids_only=ids_only)
        return out

    def prefill_row(self, row: int, ids: list[int], *, ids_only: bool = False) -> np.ndarray:
        """Slot `row` from empty, in chunks; the other rows keep their caches. Last logits [V] (greedy id [])."""
        self.reset_row(row)
        prompt = np.asarray(ids, np.int64)[None]
        for lo in range(0, prompt.shape[1], self.chunk):
            self.forward(prompt[:, lo:lo + self.chunk], row=row)
        return self.output(ids_only=ids_only)[0]

    def bind(self, new_tokens: int, rows: slice) -> None:
        lengths = self.lengths[rows]
        if int(lengths.max()) + new_tokens > self.capacity:
            raise DeployError(f"KV cache capacity {self.capacity} exceeded")
        for r, n in zip(range(rows.start, rows.stop), lengths):
            self.mask_host[r, n:n + new_tokens] = 1
        n_rows = rows.stop - rows.start
        # GroupQueryAttention takes several tokens per row for several rows only as a first prompt, i.e. a mask
        # exactly as wide as the new tokens; otherwise the mask spans the whole buffer (static decode shapes).
        first = new_tokens > 1 and n_rows > 1
        if first and lengths.any():
            raise DeployError("a multi-row prefill must start from empty rows; prefill rows one at a time")
        width = new_tokens if first else self.capacity
        host = self._ones[:n_rows * width].reshape(n_rows, width) if first else self.mask_host[rows]
        if self.mask is None:  # CPU: ONNX Runtime reads the host array itself
            self.binding.bind_input(contract.ATTENTION_MASK, "cpu", 0, np.int64, [n_rows, width], host.ctypes.data)
        else:
            self.mask.upload(self._ones if first else self.mask_host)
            self.mask.bind_input(self.binding, contract.ATTENTION_MASK, (n_rows, width),
                                 0 if first else rows.start * width)
        shape = (n_rows, self.kv_heads, self.capacity, self.head_dim)
        for buf, p_name, o_name in zip(self.buffers, self.session.io.past_names, self.session.io.present_names):
            buf.bind_input(self.binding, p_name, shape, rows.start * self.row_numel)
            buf.bind_output(self.binding, o_name, shape, rows.start * self.row_numel)  # same memory: in place

    def advance(self, new_tokens: int, rows: slice) -> None:
        self.lengths[rows] += new_tokens

    def tensors(self) -> list[np.ndarray]:
        """The cached keys/values [B, K, M, D] on the host, one per past/present pair (what validation checks)."""
        shape = (self.batch, self.kv_heads, self.capacity, self.head_dim)
        return [b.download().reshape(shape) for b in self.buffers]


def _host_of(buf: DeviceBuffer) -> np.ndarray:
    """The host array a buffer is written through: itself on the CPU, a staging copy uploaded to a device one."""
    return buf.host if buf.host is not None else np.zeros(buf.numel, np.int64)


FLAVORS = {"portable": PingPongKV, "optimized": SharedKV}  # each graph flavor's cache


def check_fits(session: DecoderSession, batch: int, capacity: int, chunk: int) -> str:
    """The check `allocate` makes before allocating anything: a DeployError naming the bytes when a CPU cache
    would exceed this machine's physical memory; else the sentence saying what it needs."""
    need = FLAVORS[session.flavor].nbytes(session, batch, capacity, chunk)
    what = (f"a KV cache for {batch} row(s) of {capacity} tokens (and logits for {chunk}-token prefill chunks) "
            f"needs {human_bytes(need)} ({need:,} bytes)")
    memory = _physical_memory()
    if session.device.kind == "cpu" and memory and need > memory:
        raise DeployError(f"{what}, more than this machine's {human_bytes(memory)} of memory; "
                          "ask for fewer new tokens, fewer prompts at once or a smaller prefill_chunk")
    return what


def allocate(session: DecoderSession, batch: int, capacity: int, chunk: int) -> KVCache:
    """The cache for `session`'s flavor: `batch` rows of `capacity` tokens, prefilled `chunk` tokens per run.

    Refused with a DeployError naming the bytes needed when they exceed this machine's physical memory (CPU),
    or when the allocation itself fails (device memory, which ONNX Runtime does not report beforehand).
    """
    what = check_fits(session, batch, capacity, chunk)
    try:
        return FLAVORS[session.flavor](session, batch, capacity, chunk)
    except (MemoryError, OrtRuntimeError) as e:
        raise DeployError(f"{what}, which could not be allocated: {str(e).splitlines()[0][:200]}") from None


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
