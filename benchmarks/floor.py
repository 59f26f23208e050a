"""The physical floor beside every result: what the hardware allows at best, measured in the same run.

- Decode: a step must read every weight once (the embedding table only for the rows it gathers) plus
  the KV cache at that context, and write the new key/values. Floor = bytes / copy bandwidth.
- Prefill: 2 FLOPs per multiply-add of every linear layer per prompt token, the causal attention
  products, and the LM head for the last position only (all a greedy first token needs).
  Floor = FLOPs / matrix-multiply rate, or the weight bytes / bandwidth where that is larger.
Each floor is max(compute time, memory time): both limits hold at once.

Bandwidth is a large array copy counted as read + write bytes (one thread per core on the host,
a device-to-device copy on CUDA); the matmul rate is a square GEMM in the engines' precision
(numpy/OpenBLAS fp32 on the host, torch on CUDA). Both take the best of several repeats.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np

from llama3_deploy.config import LlamaConfig
from llama3_deploy.dtypes import itemsize


# --- what the model must do ------------------------------------------------------------------------
def linear_params(config: LlamaConfig) -> int:
    """Weights of the matrix multiplies in the decoder layers (no embedding, no head, no norms)."""
    h, i = config.hidden_size, config.intermediate_size
    per_layer = h * (config.q_size + 2 * config.kv_size) + config.q_size * h + 3 * h * i
    return config.num_hidden_layers * per_layer


QUANT_BLOCK = 32  # the benchmarked weight-only exports: symmetric blocks of 32 with one fp32 scale each
# llama.cpp's GGUF types: blocks of 32 weights with one fp16 scale (q8_0: 34 bytes, q4_0: 18), and its floats.
GGUF_BYTES = {"q8_0": 34 / 32, "q4_0": 18 / 32, "f16": 2.0, "bf16": 2.0, "f32": 4.0}
GGUF_ACTIVATIONS = "float32"  # llama.cpp's CPU backend keeps activations and (by default) an f16 KV cache


def bytes_per_weight(dtype: str) -> float:
    """Stored bytes per weight: the dtype's size, or for int8/int4 weight-only the packed value plus its
    share of the block's fp32 scale."""
    if dtype in ("int8", "int4"):
        return int(dtype[3:]) / 8 + 4 / QUANT_BLOCK
    if dtype in GGUF_BYTES:
        return GGUF_BYTES[dtype]
    return itemsize(dtype)


def activation_dtype(dtype: str) -> str:
    """The dtype of activations and the KV cache: weight-only quantized graphs on CPU compute in fp32 (on CUDA
    they use fp16 KV; at 8B and these contexts the KV share of a step is under 1%, so the floor barely moves)."""
    return "float32" if dtype in ("int8", "int4") or dtype in GGUF_BYTES else dtype


def weight_bytes_read(config: LlamaConfig, dtype: str, batch: int) -> int:
    """Weight bytes one forward pass must read: all weights once, the embedding only for `batch` rows
    (kept in the activation dtype by the quantized exports)."""
    table = config.vocab_size * config.hidden_size
    total = config.num_parameters()
    if config.tie_word_embeddings:
        return int(total * bytes_per_weight(dtype))
    return int((total - table) * bytes_per_weight(dtype)
               + batch * config.hidden_size * itemsize(activation_dtype(dtype)))


def attention_flops(config: LlamaConfig, batch: int, queries: int, past: int) -> int:
    """QK^T and PV for `queries` new tokens after `past` cached ones, causal (each query sees past + itself)."""
    pairs = queries * past + queries * (queries + 1) // 2
    return 4 * batch * config.num_hidden_layers * config.num_attention_heads * config.head_dim * pairs


def prefill_flops(config: LlamaConfig, batch: int, prompt_len: int) -> int:
    """FLOPs to the first token: every prompt token through the layers, the LM head for the last one."""
    head = 2 * batch * config.vocab_size * config.hidden_size
    return 2 * batch * prompt_len * linear_params(config) + attention_flops(config, batch, prompt_len, 0) + head


def decode_flops(config: LlamaConfig, batch: int, context: float) -> float:
    """FLOPs of one decode step attending to `context` cached tokens."""
    head = 2 * batch * config.vocab_size * config.hidden_size
    attn = 4 * batch * config.num_hidden_layers * config.num_attention_heads * config.head_dim * (context + 1)
    return 2 * batch * linear_params(config) + head + attn


def decode_bytes(config: LlamaConfig, dtype: str, batch: int, context: float) -> dict:
    """Bytes one decode step moves at `context` cached tokens: weights once, KV read, new KV written."""
    kv_tok = config.kv_bytes_per_token(itemsize(activation_dtype(dtype)))
    weights = weight_bytes_read(config, dtype, batch)
    kv_read = batch * context * kv_tok
    kv_write = batch * kv_tok
    return {"weights": weights, "kv_read": kv_read, "kv_write": kv_write, "total": weights + kv_read + kv_write}


def floor_for(config: LlamaConfig, dtype: str, batch: int, prompt_len: int, new_tokens: int,
              bandwidth: float, matmul_rate: float) -> dict:
    """The floor of one benchmark cell: TTFT and mean time per output token, with the figures behind them.

    Decode steps run at contexts prompt_len .. prompt_len + new_tokens - 2; the KV term is linear in the
    context, so the floor of the mean step is the floor at the mean context.
    """
    mean_ctx = prompt_len + (new_tokens - 2) / 2 if new_tokens > 1 else prompt_len
    pf = prefill_flops(config, batch, prompt_len)
    pb = (weight_bytes_read(config, dtype, batch)
          + batch * prompt_len * config.kv_bytes_per_token(itemsize(activation_dtype(dtype))))
    db = decode_bytes(config, dtype, batch, mean_ctx)
    df = decode_flops(config, batch, mean_ctx)
    ttft_compute, ttft_memory = pf / matmul_rate * 1e3, pb / bandwidth * 1e3
    tpot_memory, tpot_compute = db["total"] / bandwidth * 1e3, df / matmul_rate * 1e3
    return {
        "ttft_floor_ms": max(ttft_compute, ttft_memory),
        "ttft_bound": "compute" if ttft_compute >= ttft_memory else "memory",
        "tpot_floor_ms": max(tpot_memory, tpot_compute),
        "tpot_bound": "memory" if tpot_memory >= tpot_compute else "compute",
        "prefill_flops": pf, "prefill_bytes": pb, "decode_bytes_per_step": db["total"],
        "decode_bytes_breakdown": db, "decode_flops_per_step": df, "decode_mean_context": mean_ctx,
        "dtype": dtype, "bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": matmul_rate,
    }


# --- what the machine can do -----------------------------------------------------------------------
def measure_host_bandwidth(nbytes: int = 1 << 30, repeats: int = 5, threads: int | None = None) -> dict:
    """Copy bandwidth of host memory (read + write bytes per second), best of `repeats`.

    The copy is split across one thread per core (numpy releases the GIL while copying); pages are
    touched first so page faults are not timed.
    """
    threads = threads or os.cpu_count() or 1
    src = np.ones(nbytes // 4, np.float32)
    dst = np.zeros_like(src)
    bounds = np.linspace(0, src.size, threads + 1).astype(np.int64)

    def copy(a: np.ndarray, b: np.ndarray) -> None:
        np.copyto(b, a)

    parts = [(src[bounds[k]:bounds[k + 1]], dst[bounds[k]:bounds[k + 1]]) for k in range(threads)]
    samples = []
    for _ in range(repeats):
        ts = [threading.Thread(target=copy, args=part) for part in parts]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        samples.append(2 * src.nbytes / (time.perf_counter() - t0))
    nbytes_copied = src.nbytes
    del src, dst, parts
    return {"bytes_per_s": max(samples), "samples": samples, "bytes": nbytes_copied, "threads": threads,
            "method": f"numpy copy of {nbytes / (1 << 30):.2f} GiB split over {threads} threads, "
                      "read + write bytes, best of repeats"}


def measure_host_matmul(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> dict:
    """Square GEMM rate of numpy's BLAS in `dtype` (FLOPs per second), best of `repeats` after one warm-up."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32).astype(dtype)
    b = rng.standard_normal((n, n), dtype=np.float32).astype(dtype)
    a @ b
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        samples.append(2 * n ** 3 / (time.perf_counter() - t0))
    return {"flops_per_s": max(samples), "samples": samples, "n": n, "dtype": dtype,
            "method": f"numpy {n}x{n} @ {n}x{n} {dtype} ({np.__version__}), best of repeats"}


def measure_cuda_bandwidth(nbytes: int = 2 << 30, repeats: int = 20) -> dict:
    """Device-to-device copy bandwidth on the current CUDA device (read + write bytes per second)."""
    import torch
    src = torch.ones(nbytes // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        samples.append(2 * nbytes / (start.elapsed_time(end) / 1e3))
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes_per_s": max(samples), "samples": samples, "bytes": nbytes,
            "method": f"torch device copy of {nbytes / (1 << 30):.1f} GiB, read + write bytes, CUDA events, best"}


def measure_cuda_matmul(n: int = 8192, repeats: int = 10, dtype: str = "float16") -> dict:
    """Square GEMM rate on the current CUDA device in `dtype`."""
    import torch
    t = getattr(torch, dtype)
    a = torch.randn(n, n, device="cuda", dtype=t)
    b = torch.randn(n, n, device="cuda", dtype=t)
    a @ b
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        samples.append(2 * n ** 3 / (start.elapsed_time(end) / 1e3))
    del a, b
    torch.cuda.empty_cache()
    return {"flops_per_s": max(samples), "samples": samples, "n": n, "dtype": dtype,
            "method": f"torch {n}x{n} GEMM {dtype}, CUDA events, best of repeats"}


def measure_machine(device: str = "cpu", *, dtype: str = "float32", quick: bool = False) -> dict:
    """Bandwidth and matmul rate of the device the engines run on."""
    if device.startswith("cuda"):
        bw = measure_cuda_bandwidth(nbytes=(256 << 20) if quick else (2 << 30))
        mm = measure_cuda_matmul(n=1024 if quick else 8192, dtype=dtype)
    else:
        bw = measure_host_bandwidth(nbytes=(64 << 20) if quick else (1 << 30), repeats=3 if quick else 5)
        # fp32 whatever the engines' precision: x86 BLAS has no half-precision GEMM to measure.
        mm = measure_host_matmul(n=512 if quick else 2048, repeats=3 if quick else 5)
    return {"device": device, "bandwidth": bw, "matmul": mm}
