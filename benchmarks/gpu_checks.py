"""What the GPU check (benchmarks/gpu.py) measures and proves: the models it builds, the correctness checks on a
small model, the timed engines (this runtime through its public Generator API, PyTorch eager), device memory,
and the floor. No onnxruntime import at module level: gpu.py may install ONNX Runtime's CUDA build first.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from llama3_deploy.config import LlamaConfig, load_config, preset

# Built-in configs for the correctness model and for CPU-side tests (Llama 3 layout: GQA, rope theta 500000).
# "small" keeps the 8B's head_dim (128) and GQA ratio (4:1), so the same CUDA kernels run as at 8B.
BUILTIN = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=16, max_position_embeddings=4096),
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1792, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=128, max_position_embeddings=4096),
}
SPECIAL_IDS_FROM = 128000  # Llama 3's special tokens start here: prompts stay below


def model_source(spec: str, work: Path) -> str:
    """`tiny`/`small` (built-in configs, written under work/configs), else the spec as export_model takes it
    (random:PRESET, random:CONFIG_DIR or a checkpoint directory)."""
    if spec not in BUILTIN:
        return spec
    d = work / "configs" / spec
    d.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**BUILTIN[spec], rope_theta=500000.0, bos_token_id=0, eos_token_ids=(1, 2),
                      source_dtype="float32")
    (d / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=1))
    return f"random:{d}"


def source_config(source: str) -> LlamaConfig:
    what = source[len("random:"):] if source.startswith("random:") else source
    return load_config(Path(what)) if Path(what).is_dir() else preset(what)


def make_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, min(vocab, SPECIAL_IDS_FROM), size=(batch, length)).tolist()


def summarize(runs: list[tuple[float, list[float]]]) -> dict:
    """Median TTFT over rounds; TPOT percentiles over every decode step of every round."""
    steps = np.asarray([s for _, st in runs for s in st], np.float64)
    return {"ttft_ms": float(np.median([t for t, _ in runs])), "rounds": len(runs),
            "tpot_ms": {"p50": float(np.percentile(steps, 50)), "p90": float(np.percentile(steps, 90)),
                        "mean": float(steps.mean())} if steps.size else None,
            "raw": {"ttft_ms": [round(t, 3) for t, _ in runs],
                    "step_ms": [[round(s, 3) for s in st] for _, st in runs]}}


# --- engines -------------------------------------------------------------------------------------------
class OrtEngine:
    """This runtime through its public API: Generator(export, device=..., cuda_graph=...).generate(...)."""

    def __init__(self, export_dir: Path, *, device: str, cuda_graph: bool):
        from llama3_deploy.runtime import Generator
        t0 = time.perf_counter()
        self.gen = Generator(export_dir, device=device, cuda_graph=cuda_graph)
        self.load_s = time.perf_counter() - t0

    def run(self, prompts, new_tokens):
        res = self.gen.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
        return res[0].ttft_ms, list(res[0].step_ms), [list(r.generated_ids) for r in res]


class TorchEager:
    """transformers' LlamaForCausalLM from the same config, built on the device with random init (latency does
    not depend on the weight values), sdpa attention, DynamicCache; a static greedy loop with a forced token
    count, each token copied to the host inside its timed span (that synchronizes the device)."""

    def __init__(self, config: LlamaConfig, *, dtype: str, device: str, seed: int = 0):
        import torch
        import transformers
        from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
        self.torch, self.device = torch, device
        d = {k: v for k, v in config.to_hf_dict().items() if k not in ("torch_dtype", "dtype")}
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.device(device):
            self.model = LlamaForCausalLM._from_config(HFConfig(**d), attn_implementation="sdpa",
                                                       **{key: getattr(torch, dtype)}).eval()
        if next(self.model.parameters()).device.type != torch.device(device).type:
            self.model.to(device)  # a transformers that builds elsewhere despite the device context
        self._sync()
        self.load_s = time.perf_counter() - t0
        self.version = f"torch {torch.__version__}, transformers {transformers.__version__}"

    def _sync(self):
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def run(self, prompts, new_tokens):
        torch = self.torch
        out: list[list[int]] = [[] for _ in prompts]
        steps = []
        with torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            ids = torch.tensor(prompts, dtype=torch.int64, device=self.device)
            o = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            tok = o.logits[:, -1].argmax(-1, keepdim=True)
            cache, pos = o.past_key_values, ids.shape[1]
            for r, t in enumerate(tok.tolist()):
                out[r].append(t[0])
            ttft = (time.perf_counter() - t0) * 1e3
            for _ in range(new_tokens - 1):
                t1 = time.perf_counter()
                o = self.model(input_ids=tok, position_ids=torch.full_like(tok, pos), past_key_values=cache,
                               use_cache=True)
                tok, cache, pos = o.logits[:, -1].argmax(-1, keepdim=True), o.past_key_values, pos + 1
                for r, t in enumerate(tok.tolist()):
                    out[r].append(t[0])
                steps.append((time.perf_counter() - t1) * 1e3)
        return ttft, steps, out


def timed(engine, prompts, new_tokens: int, *, reps: int, warmup: int) -> dict:
    """Warm-up runs (they also capture CUDA graphs), then `reps` timed rounds; checks the forced count."""
    runs, tokens = [], None
    for i in range(warmup + reps):
        ttft, steps, tokens = engine.run(prompts, new_tokens)
        if any(len(t) != new_tokens for t in tokens):
            raise RuntimeError(f"asked for {new_tokens} forced tokens, got {[len(t) for t in tokens]}")
        if i >= warmup:
            runs.append((ttft, steps))
    return {**summarize(runs), "tokens_first_row_head": tokens[0][:12]}


# --- device memory -------------------------------------------------------------------------------------
class DeviceMemory:
    """Device memory an engine holds: cudaMemGetInfo's used bytes (total - free) over a baseline taken before
    it loads, so ONNX Runtime's arena (outside torch's allocator) counts too; the arena only grows, so the
    figure after its runs is its peak. None on the CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.method = ("cudaMemGetInfo (total - free) after the engine's runs, minus the same before it loaded "
                       "(torch caches emptied first)" if self.cuda else "not measured on the CPU")

    def used(self) -> int | None:
        if not self.cuda:
            return None
        import torch
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        return total - free


def measure_floor(device: str, quick_cpu: bool = True) -> dict:
    """Copy bandwidth (read + write) and matmul rate measured now, on the device the engines use."""
    from . import floor as F
    if device.startswith("cuda"):
        return {"device": device, "bandwidth": F.measure_cuda_bandwidth(nbytes=1 << 30, repeats=20),
                "matmul": F.measure_cuda_matmul(n=8192, repeats=10, dtype="float16")}
    return F.measure_machine("cpu", quick=quick_cpu)


def row_floor(config: LlamaConfig, export_dir: Path | None, batch: int, prompt_len: int, new_tokens: int,
              bandwidth: float, matmul: float, kv_itemsize: int = 2) -> dict:
    """Decode floor: the weight bytes a step reads (the export's data file less the embedding table plus the
    B rows it gathers; all weights once) plus the KV cache read at the mean context and written, over the
    measured copy bandwidth. TTFT floor from floor.floor_for (prefill FLOPs over the matmul rate)."""
    from llama3_deploy.export.quantize import QuantSpec

    from . import floor as F
    from .gpu_sizes import embedding_bytes
    act = "float16" if kv_itemsize == 2 else "float32"  # activations, KV and an unquantized embedding
    base = F.floor_for(config, act, batch, prompt_len, new_tokens, bandwidth, matmul)
    if export_dir is not None:  # the table as this export stores it (quantized with --int4-only)
        q = (json.loads(Path(export_dir, "manifest.json").read_text()).get("quantization")
             if Path(export_dir, "manifest.json").is_file() else None)
        table = embedding_bytes(config, dtype=act, quantization=QuantSpec.from_json(q) if q else None)
        weights = (Path(export_dir, "model.onnx.data").stat().st_size - table
                   + batch * table // config.vocab_size)
    else:
        weights = F.weight_bytes_read(config, act, batch)
    ctx = base["decode_mean_context"]
    kv = batch * (ctx + 1) * config.kv_bytes_per_token(kv_itemsize)
    return {"tpot_floor_ms": (weights + kv) / bandwidth * 1e3, "ttft_floor_ms": base["ttft_floor_ms"],
            "decode_bytes_per_step": weights + kv, "weight_bytes_per_step": weights, "kv_bytes_per_step": kv,
            "decode_mean_context": ctx, "bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": matmul}


# --- correctness on the small model --------------------------------------------------------------------
@contextlib.contextmanager
def count_downloads():
    """Record every device-to-host read-back this process makes through the runtime's DeviceBuffer.download
    and ONNX Runtime's public OrtValue.numpy / IOBinding.copy_outputs_to_cpu: (where, dtype, bytes)."""
    import onnxruntime as ort
    from llama3_deploy.runtime import session as S
    seen: list[tuple[str, str, int]] = []
    patches = []

    def wrap(owner, name):
        real = getattr(owner, name, None)
        if real is None:
            return

        def spy(self, *a, **k):
            out = real(self, *a, **k)
            for arr in (out if isinstance(out, list) else [out]):
                if hasattr(arr, "dtype"):
                    seen.append((f"{owner.__name__}.{name}", str(arr.dtype), int(arr.nbytes)))
            return out
        patches.append((owner, name, real))
        setattr(owner, name, spy)

    for owner, name in ((getattr(S, "DeviceBuffer", None), "download"), (ort.OrtValue, "numpy"),
                        (ort.IOBinding, "copy_outputs_to_cpu")):
        if owner is not None:
            wrap(owner, name)
    try:
        yield seen
    finally:
        for owner, name, real in patches:
            setattr(owner, name, real)


def _downloads_verdict(seen, batch: int, max_ids: int, kv_dtype: str) -> dict:
    dtypes = sorted({d for _, d, _ in seen})
    biggest = max((n for _, _, n in seen), default=0)
    ok = None if not seen else (all(d == "int64" for d in dtypes) and biggest <= 8 * max_ids)
    return {"ok": ok, "read_backs": len(seen), "dtypes": dtypes, "largest_bytes": biggest,
            "kv_dtype": kv_dtype, "bound_bytes": 8 * max_ids,
            "rule": "every read-back is int64 token ids (at most batch x prefill chunk of them); no key/value "
                    "dtype, no logits" + ("" if seen else "; none seen: the instrumentation missed the "
                                          "runtime's read-back path (inconclusive)")}


def node_placement(export_dir: Path, device: str) -> dict:
    """Which execution provider ran each node of one decode-shaped run (ONNX Runtime's profiler): the KV is
    only touched by GroupQueryAttention (optimized) or Concat/attention (portable), so every heavy node on the
    device's provider means no key/value byte is copied to the host inside the graph either."""
    import onnxruntime as ort
    from llama3_deploy import contract
    from llama3_deploy.dtypes import numpy_dtype
    from llama3_deploy.manifest import load_manifest
    io = load_manifest(export_dir).io
    dims = {contract.BATCH: 1, contract.SEQUENCE: 1, contract.PAST_SEQUENCE: 4, contract.TOTAL_SEQUENCE: 5,
            contract.MAX_SEQUENCE: 16}
    feeds = {}
    for s in io.inputs:
        shape = [d if isinstance(d, int) else dims[d] for d in s.shape]
        a = np.zeros(shape, numpy_dtype(s.dtype))
        if s.name == contract.INPUT_IDS:
            a[...] = 7
        elif s.name == contract.ATTENTION_MASK:
            a[:, :5] = 1
        elif s.name == contract.POSITION_IDS:
            a[...] = 4
        feeds[s.name] = a
    want = "CUDAExecutionProvider" if device.startswith("cuda") else "CPUExecutionProvider"
    providers = [(want, {"device_id": 0}), "CPUExecutionProvider"] if want != "CPUExecutionProvider" else [want]
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(export_dir / contract.MODEL_FILE), opts, providers=providers)
        for _ in range(2):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_provider: dict[str, dict[str, int]] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and "provider" in args and str(e.get("name", "")).endswith("_kernel_time"):
            ops = by_provider.setdefault(args["provider"], {})
            ops[args.get("op_name", "?")] = ops.get(args.get("op_name", "?"), 0) + 1
    heavy = ("GroupQueryAttention", "MatMul", "MatMulNBits", "SkipSimplifiedLayerNormalization",
             "SimplifiedLayerNormalization", "Softmax", "Concat", "ArgMax")
    elsewhere = {p: sorted(op for op in ops if op in heavy) for p, ops in by_provider.items() if p != want}
    elsewhere = {p: ops for p, ops in elsewhere.items() if ops}
    memcpy = {op: n for ops in by_provider.values() for op, n in ops.items() if op.startswith("Memcpy")}
    return {"ok": bool(by_provider) and not elsewhere, "provider": want, "ops_by_provider": by_provider,
            "heavy_ops_elsewhere": elsewhere, "memcpy_nodes": memcpy}


def _compare(a: list[list[int]], b: list[list[int]]) -> dict:
    rows = []
    for x, y in zip(a, b):
        diff = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
        rows.append(diff if diff is not None or len(x) == len(y) else min(len(x), len(y)))
    return {"equal": a == b, "rows_equal": sum(r is None for r in rows), "rows": len(rows),
            "first_divergence": rows}


def correctness(exports: dict[str, Path], device: str, *, new_tokens: int = 32, log=print) -> dict:
    """1. greedy tokens on the device equal the CPU's (fp32; the portable graph, which is standard ONNX ops
    throughout, and the optimized one); 2. decode steps replayed from a captured CUDA graph equal uncaptured
    runs across two generations (fp16 optimized --argmax); 3. no key/value byte crosses to the host during
    decode: the read-backs are counted, and the node placement is read from ONNX Runtime's profiler."""
    from llama3_deploy.manifest import load_manifest
    cuda = device.startswith("cuda")
    out: dict = {"device": device, "new_tokens": new_tokens}

    def prompts_for(path):
        vocab = load_manifest(path).config.vocab_size
        return [make_prompts(1, n, vocab, seed=n)[0] for n in (5, 9, 17)]  # rows of different lengths

    def gen(path, dev, graph=False):
        return OrtEngine(path, device=dev, cuda_graph=graph).gen

    for key in ("small-portable-fp32", "small-opt-fp32"):
        if key not in exports:
            out[f"{key}: device equals cpu"] = {"ok": None, "skipped": "export missing (see the prepare log)"}
            continue
        p = prompts_for(exports[key])
        cpu = [r.generated_ids for r in gen(exports[key], "cpu").generate(p, max_new_tokens=new_tokens,
                                                                           ignore_eos=True)]
        with count_downloads() as seen:
            dev = [r.generated_ids for r in gen(exports[key], device).generate(p, max_new_tokens=new_tokens,
                                                                               ignore_eos=True)]
        cmp = _compare(dev, cpu)
        out[f"{key}: device equals cpu"] = {"ok": cmp["equal"], **cmp}
        if key == "small-opt-fp32":
            out[f"{key}: read-backs"] = _downloads_verdict(seen, 3, 3 * 512, "float32")
            try:  # whether every fp32 kernel exists on the device (GroupQueryAttention may be fp16-only there)
                out[f"{key}: node placement (informational)"] = node_placement(exports[key], device)
            except Exception as e:
                out[f"{key}: node placement (informational)"] = {"ok": None, "error": f"{type(e).__name__}: {e}"[:500]}
        log(f"correctness {key}: {device} tokens equal cpu: {cmp['equal']} ({cmp['rows_equal']}/{cmp['rows']} rows)")
    key = "small-opt-fp16"
    if key in exports:
        p = prompts_for(exports[key])
        plain = [r.generated_ids for r in gen(exports[key], device).generate(p, max_new_tokens=new_tokens,
                                                                             ignore_eos=True)]
        graphed = gen(exports[key], device, graph=cuda)
        reps = []
        with count_downloads() as seen:
            for _ in range(2):  # the second generation replays the graph captured in the first
                reps.append([r.generated_ids for r in graphed.generate(p, max_new_tokens=new_tokens,
                                                                       ignore_eos=True)])
        cmp = [_compare(r, plain) for r in reps]
        out[f"{key}: graph replay equals uncaptured"] = {
            "ok": all(c["equal"] for c in cmp), "cuda_graph": cuda, "generations": cmp,
            **({} if cuda else {"note": "no CUDA graphs on the CPU: two generations on the same buffers"})}
        out[f"{key}: read-backs"] = _downloads_verdict(seen, 3, 3 * 512, "float16")
        cpu16 = [r.generated_ids for r in gen(exports[key], "cpu").generate(p, max_new_tokens=new_tokens,
                                                                            ignore_eos=True)]
        out[f"{key}: device equals cpu (fp16, informational)"] = _compare(plain, cpu16)
        try:
            out[f"{key}: node placement"] = node_placement(exports[key], device)
        except Exception as e:  # the profiler's format is not a contract: record, do not fail the check
            out[f"{key}: node placement"] = {"ok": None, "error": f"{type(e).__name__}: {e}"[:500]}
        log(f"correctness {key}: graph replay equal: {out[f'{key}: graph replay equals uncaptured']['ok']}, "
            f"read-backs ok: {out[f'{key}: read-backs']['ok']}, placement ok: {out[f'{key}: node placement']['ok']}")
    verdicts = [v.get("ok") for k, v in out.items() if isinstance(v, dict) and "informational" not in k]
    out["ok"] = all(v is not False for v in verdicts) and any(v for v in verdicts)
    return out
