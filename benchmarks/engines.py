"""Engines under test, each timing the same work: a forced number of greedy tokens after a prefill.

Every engine returns the time to first token (request in -> first greedy token on the host) and each
later decode step's time, measured around the engine's own calls, synchronised on CUDA. Warm-up runs
are the caller's business. The harness gives every row of a batch the same prompt length, so no
engine pays for padding.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import time
from pathlib import Path

ENGINE_KINDS = ("ort", "torch-eager", "torch-compile", "optimum", "genai", "llamacpp")


@dataclasses.dataclass
class Timing:
    ttft_ms: float
    step_ms: list[float]
    tokens: list[list[int]]


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _ort_version() -> str:
    """The imported onnxruntime's own version and build (the package metadata may name another install)."""
    import onnxruntime as ort
    build = "CUDA build" if "CUDAExecutionProvider" in ort.get_available_providers() else "CPU build"
    return f"onnxruntime {ort.__version__} ({build})"


def _same_length(prompts: list[list[int]]) -> None:
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("this engine's timing loop takes prompts of one length (no padding)")


class OrtEngine:
    """This project's runtime (IO-bound ONNX Runtime loop) on an export directory."""

    kind = "ort"

    def __init__(self, export_dir: str | Path, *, device: str = "cpu", threads: int = 0, label: str | None = None,
                 cuda_graph: bool = False):
        from llama3_deploy.runtime.generate import Generator
        self.gen = Generator(export_dir, device=device, threads=threads, cuda_graph=cuda_graph)
        m = self.gen.session.manifest
        # Weight-only quantized exports are named by their weights (int8/int4), which is what sets their floor.
        self.dtype = f"int{m.quantization['bits']}" if m.quantization else self.gen.session.dtype
        self.name = label or f"llama3-deploy ort ({self.dtype}, {m.flavor})"
        self.version = f"llama3-deploy {_version('llama3-deploy')}, {_ort_version()}"

    def run(self, prompts: list[list[int]], new_tokens: int) -> Timing:
        from llama3_deploy.runtime.sampling import SamplingParams
        results = self.gen.generate(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        return Timing(results[0].ttft_ms, results[0].step_ms, [r.generated_ids for r in results])


class _Torch:
    """Shared loading and helpers of the PyTorch engines (transformers' LlamaForCausalLM)."""

    def __init__(self, checkpoint_dir: str | Path, *, dtype: str, device: str, attn_implementation: str,
                 threads: int = 0):
        import torch
        from transformers import LlamaForCausalLM
        if threads:
            torch.set_num_threads(threads)
        self.torch, self.device, self.dtype = torch, device, dtype
        import transformers
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        self.model = LlamaForCausalLM.from_pretrained(
            checkpoint_dir, attn_implementation=attn_implementation, **{key: getattr(torch, dtype)}).to(device).eval()
        self.version = f"torch {torch.__version__}, transformers {_version('transformers')}"

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def _ids(self, prompts: list[list[int]]):
        _same_length(prompts)
        return self.torch.tensor(prompts, dtype=self.torch.int64, device=self.device)

    def _timed_greedy(self, prompts: list[list[int]], new_tokens: int, prefill, step) -> Timing:
        """Time `prefill(ids) -> (tok, state)` then `step(tok, state) -> (tok, state)` per new token.

        Each token is copied to the host (`tolist`) inside its timed span, which synchronises the device.
        """
        out_tokens: list[list[int]] = [[] for _ in prompts]
        steps = []

        def record(tok) -> None:
            for r, t in enumerate(tok.tolist()):
                out_tokens[r].append(t[0])

        with self.torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            tok, state = prefill(self._ids(prompts))
            record(tok)
            ttft = (time.perf_counter() - t0) * 1e3
            for _ in range(new_tokens - 1):
                t1 = time.perf_counter()
                tok, state = step(tok, state)
                record(tok)
                steps.append((time.perf_counter() - t1) * 1e3)
        return Timing(ttft, steps, out_tokens)


class TorchEagerEngine(_Torch):
    """transformers' LlamaForCausalLM, eager PyTorch, with its own KV cache (DynamicCache).

    Prefill asks for last-position logits only (`logits_to_keep=1`), as `generate()` does.
    """

    kind = "torch-eager"

    def __init__(self, checkpoint_dir: str | Path, *, dtype: str = "float32", device: str = "cpu",
                 attn_implementation: str = "sdpa", threads: int = 0):
        super().__init__(checkpoint_dir, dtype=dtype, device=device, attn_implementation=attn_implementation,
                         threads=threads)
        self.name = f"pytorch eager ({dtype}, {attn_implementation})"

    def run(self, prompts: list[list[int]], new_tokens: int) -> Timing:
        def prefill(ids):
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1].argmax(-1, keepdim=True), (out.past_key_values, ids.shape[1])

        def step(tok, state):
            cache, pos = state
            out = self.model(input_ids=tok, position_ids=self.torch.full_like(tok, pos), past_key_values=cache,
                             use_cache=True)
            return out.logits[:, -1].argmax(-1, keepdim=True), (out.past_key_values, pos + 1)

        return self._timed_greedy(prompts, new_tokens, prefill, step)


class TorchCompiledEngine(_Torch):
    """LlamaForCausalLM with a StaticCache and a torch.compile'd decode step (transformers' documented
    recipe: eager prefill into the static cache, then `torch.compile(decode, mode="reduce-overhead",
    fullgraph=True)`, CUDA graphs on GPU). The cache holds max(prompt + new tokens, `max_cache_len`)
    tokens per row, as a server sizes it once; each new cache shape (batch, length) recompiles, which
    warm-up absorbs, never a timed run.
    """

    kind = "torch-compile"

    def __init__(self, checkpoint_dir: str | Path, *, dtype: str = "float16", device: str = "cuda",
                 attn_implementation: str = "sdpa", backend: str = "inductor", mode: str | None = None,
                 max_cache_len: int = 0, threads: int = 0):
        super().__init__(checkpoint_dir, dtype=dtype, device=device, attn_implementation=attn_implementation,
                         threads=threads)
        torch = self.torch
        self.mode = mode if mode is not None else ("reduce-overhead" if device.startswith("cuda") else "default")
        self.backend, self.max_cache_len = backend, max_cache_len
        cfg = torch._dynamo.config  # one compile per cache shape; allow many (renamed recompile_limit in 2.6)
        limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, limit, max(getattr(cfg, limit), 64))
        model = self.model

        def decode(tok, cache_position, past_key_values):
            logits = model(tok, cache_position=cache_position, past_key_values=past_key_values,
                           return_dict=False, use_cache=True)[0]
            return logits[:, -1].argmax(-1, keepdim=True)

        kw = {"mode": self.mode} if backend == "inductor" else {}
        self.decode = torch.compile(decode, fullgraph=True, backend=backend, **kw)
        self.name = f"pytorch compiled ({dtype}, static cache, torch.compile {backend}/{self.mode})"
        self._cache, self._shape = None, None

    def _static_cache(self, batch: int, capacity: int):
        from transformers import StaticCache
        if self._shape != (batch, capacity):
            self._cache = None
            try:
                self._cache = StaticCache(config=self.model.config, max_cache_len=capacity)
            except TypeError:  # transformers < 4.56
                self._cache = StaticCache(config=self.model.config, max_batch_size=batch, max_cache_len=capacity,
                                          device=self.device, dtype=self.model.dtype)
            self._shape = (batch, capacity)
        else:
            self._cache.reset()
        return self._cache

    def run(self, prompts: list[list[int]], new_tokens: int) -> Timing:
        torch = self.torch

        def prefill(ids):
            S = ids.shape[1]
            cache = self._static_cache(len(prompts), max(S + new_tokens, self.max_cache_len))
            logits = self.model(ids, cache_position=torch.arange(S, device=self.device), past_key_values=cache,
                                return_dict=False, use_cache=True, logits_to_keep=1)[0]
            return logits[:, -1].argmax(-1, keepdim=True), (cache, torch.tensor([S], device=self.device))

        def step(tok, state):
            cache, cache_position = state
            tok = self.decode(tok.clone(), cache_position, cache)
            return tok, (cache, cache_position + 1)

        return self._timed_greedy(prompts, new_tokens, prefill, step)


class OptimumEngine:
    """Optimum's ORTModelForCausalLM on an `optimum-cli export onnx --task text-generation-with-past` export.

    Timed with a manual greedy loop over its forward (input ids, attention mask, position ids,
    past_key_values), the calls `generate()` makes, without generate()'s logits processors.
    """

    kind = "optimum"

    def __init__(self, export_dir: str | Path, *, device: str = "cpu", threads: int = 0):
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        provider = "CUDAExecutionProvider" if device.startswith("cuda") else "CPUExecutionProvider"
        self.torch, self.device = torch, device
        self.model = ORTModelForCausalLM.from_pretrained(export_dir, provider=provider, session_options=opts,
                                                         use_cache=True)
        self.name = "optimum ORTModelForCausalLM"
        self.version = (f"optimum {_version('optimum')}, optimum-onnx {_version('optimum-onnx')}, "
                        f"{_ort_version()}")

    def run(self, prompts: list[list[int]], new_tokens: int) -> Timing:
        torch = self.torch
        out_tokens: list[list[int]] = [[] for _ in prompts]
        steps = []
        with torch.inference_mode():
            t0 = time.perf_counter()
            _same_length(prompts)
            ids = torch.tensor(prompts, dtype=torch.int64, device=self.device)
            B, S = ids.shape
            mask = torch.ones(B, S + new_tokens, dtype=torch.int64, device=self.device)
            pos = torch.arange(S, device=self.device).expand(B, S)
            out = self.model(input_ids=ids, attention_mask=mask[:, :S], position_ids=pos, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            first = tok.tolist()
            ttft = (time.perf_counter() - t0) * 1e3
            for r, t in enumerate(first):
                out_tokens[r].append(t[0])
            for i in range(new_tokens - 1):
                t1 = time.perf_counter()
                position = torch.full((B, 1), S + i, dtype=torch.int64, device=self.device)
                out = self.model(input_ids=tok, attention_mask=mask[:, :S + i + 1], position_ids=position,
                                 past_key_values=out.past_key_values, use_cache=True)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                host = tok.tolist()
                steps.append((time.perf_counter() - t1) * 1e3)
                for r, t in enumerate(host):
                    out_tokens[r].append(t[0])
        return Timing(ttft, steps, out_tokens)


class GenaiEngine:
    """onnxruntime-genai on a model built by its own builder (runs in its own virtual environment).

    TTFT covers GeneratorParams + Generator creation, `append_tokens(prompt)` (the prefill) and the
    first `generate_next_token()` (greedy pick from the prefill logits); each later
    `generate_next_token()` + `get_next_tokens()` is one decode step. min_length = max_length forces
    the token count.
    """

    kind = "genai"

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", threads: int = 0, precision: str | None = None):
        import onnxruntime_genai as og
        self.og = og
        self.model = og.Model(str(model_dir))
        self.name = f"onnxruntime-genai ({precision})" if precision else "onnxruntime-genai"
        self.version = f"onnxruntime-genai {_version('onnxruntime-genai')}, onnxruntime {_version('onnxruntime')}"

    def run(self, prompts: list[list[int]], new_tokens: int) -> Timing:
        import numpy as np
        og = self.og
        _same_length(prompts)
        B, S = len(prompts), len(prompts[0])
        ids = np.asarray(prompts, dtype=np.int32)
        out_tokens: list[list[int]] = [[] for _ in prompts]
        steps = []
        t0 = time.perf_counter()
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=S + new_tokens, min_length=S + new_tokens, do_sample=False,
                                  batch_size=B)
        gen = og.Generator(self.model, params)
        gen.append_tokens(ids)
        gen.generate_next_token()
        tok = gen.get_next_tokens().tolist()
        ttft = (time.perf_counter() - t0) * 1e3
        for r in range(B):
            out_tokens[r].append(int(tok[r]))
        for _ in range(new_tokens - 1):
            if gen.is_done():
                raise RuntimeError(f"onnxruntime-genai stopped after {len(out_tokens[0])} of {new_tokens} tokens")
            t1 = time.perf_counter()
            gen.generate_next_token()
            tok = gen.get_next_tokens().tolist()
            steps.append((time.perf_counter() - t1) * 1e3)
            for r in range(B):
                out_tokens[r].append(int(tok[r]))
        del gen
        return Timing(ttft, steps, out_tokens)


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python's C API (its own virtual environment) on a GGUF converted from the
    same checkpoint by llama.cpp's converter.

    The high-level `Llama` object runs one sequence, so rows are llama.cpp sequences in one `llama_batch`, as
    llama.cpp's own batched bench and server do: a context of `max_batch` sequences, each row's prompt in
    n_batch-token batches with logits only at its last token, then one batch of B tokens per decode step.
    TTFT covers clearing the cache, the prefill and the greedy pick; a step is one llama_decode plus B argmaxes
    over the vocabulary.
    """

    kind = "llamacpp"

    def __init__(self, gguf: str | Path, *, threads: int = 0, precision: str | None = None, max_batch: int = 8,
                 max_context: int = 4096, n_batch: int = 512):
        import os

        import llama_cpp as lc
        self.lc = lc
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = max_context * max_batch, n_batch, n_batch, max_batch
        cp.n_threads = cp.n_threads_batch = threads or os.cpu_count()
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(max(n_batch, max_batch), 0, max_batch)
        self.n_batch, self.max_batch = n_batch, max_batch
        self.dtype = precision
        self.name = f"llama.cpp ({precision})" if precision else "llama.cpp"
        self.version = f"llama-cpp-python {_version('llama_cpp_python')}"

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """One llama_decode of (token, pos, seq, wants_logits) entries -> the batch indices that have logits."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, int(logits)
            b.seq_id[i][0] = seq
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        return [i for i, e in enumerate(entries) if e[3]]

    def _argmax(self, index: int) -> int:
        import numpy as np
        return int(np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, index), shape=(self.vocab,)).argmax())

    def run(self, prompts: list[list[int]], new_tokens: int) -> Timing:
        _same_length(prompts)
        B, S = len(prompts), len(prompts[0])
        if B > self.max_batch:
            raise ValueError(f"batch {B} exceeds this context's {self.max_batch} sequences")
        out_tokens: list[list[int]] = [[] for _ in prompts]
        steps = []
        t0 = time.perf_counter()
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        entries = [(tok, pos, r, pos == S - 1) for r, ids in enumerate(prompts) for pos, tok in enumerate(ids)]
        last = {}
        for lo in range(0, len(entries), self.n_batch):
            part = entries[lo:lo + self.n_batch]
            for i in self._decode(part):
                last[part[i][2]] = i  # each row's last prompt token: its logits index within this batch
            if len(last) < B and lo + self.n_batch < len(entries):
                # llama_get_logits_ith indexes the latest batch: read finished rows before the next one
                for r, i in list(last.items()):
                    if not out_tokens[r]:
                        out_tokens[r].append(self._argmax(i))
        for r, i in last.items():
            if not out_tokens[r]:
                out_tokens[r].append(self._argmax(i))
        ttft = (time.perf_counter() - t0) * 1e3
        for k in range(1, new_tokens):
            t1 = time.perf_counter()
            idx = self._decode([(out_tokens[r][-1], S + k - 1, r, True) for r in range(B)])
            for r, i in enumerate(idx):
                out_tokens[r].append(self._argmax(i))
            steps.append((time.perf_counter() - t1) * 1e3)
        return Timing(ttft, steps, out_tokens)


def make_engine(spec: dict):
    """Build an engine from a spec: {"kind", "path", "device", "dtype", "threads", "options"}."""
    kind, path = spec["kind"], spec["path"]
    device, threads = spec.get("device", "cpu"), int(spec.get("threads", 0))
    opts = spec.get("options") or {}
    if device.startswith("cuda") and kind in ("ort", "optimum"):
        import onnxruntime
        if hasattr(onnxruntime, "preload_dlls"):  # CUDA/cuDNN from the pip-installed NVIDIA wheels
            onnxruntime.preload_dlls()
    if kind == "ort":
        return OrtEngine(path, device=device, threads=threads, **opts)
    if kind == "torch-eager":
        return TorchEagerEngine(path, dtype=spec.get("dtype", "float32"), device=device, threads=threads, **opts)
    if kind == "torch-compile":
        return TorchCompiledEngine(path, dtype=spec.get("dtype", "float16"), device=device, threads=threads, **opts)
    if kind == "optimum":
        return OptimumEngine(path, device=device, threads=threads)
    if kind == "genai":
        return GenaiEngine(path, device=device, threads=threads, precision=spec.get("dtype"))
    if kind == "llamacpp":
        return LlamaCppEngine(path, threads=threads, precision=spec.get("dtype"), **opts)
    raise ValueError(f"unknown engine kind {kind!r}; known: {', '.join(ENGINE_KINDS)}")
