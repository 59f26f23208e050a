"""Sizes the GPU check (benchmarks/gpu.py) plans with before it writes or loads anything: an export's bytes on
disk (the prepare phase's free-disk check), the embedding table's share of them (the decode floor), and whether
PyTorch eager's fp16 weights fit the device (else that reference is skipped, with the reason recorded).

At 70B only INT4 fits one 80 GB H100: 70.55 B parameters are 141 GB in fp16, the INT4 export ~40 GB."""
from __future__ import annotations

import math
import os

from llama3_deploy.config import LlamaConfig
from llama3_deploy.dtypes import itemsize
from llama3_deploy.export.quantize import QuantSpec, quantized_layout


def int4_spec(*, embedding: bool = False) -> QuantSpec:
    """The check's INT4 export: MatMulNBits, symmetric blocks of 32, scales in the graph dtype; embedding=True
    quantizes the token table too (GatherBlockQuantized: at 70B 0.6 GB on the device instead of 2.1 GB)."""
    return QuantSpec(bits=4, block_size=32, symmetric=True, embedding=embedding)


def _matrix_bytes(k: int, n: int, spec: QuantSpec | None, item: int, *, embedding: bool = False) -> int:
    """Stored bytes of one [k, n] weight (an embedding table is [n, k]): packed values, scales, zero points."""
    if spec is None:
        return k * n * item
    return sum(math.prod(shape) * (1 if kind == "uint8" else item)
               for shape, kind in quantized_layout(k, n, spec, embedding=embedding).values())


def embedding_bytes(config: LlamaConfig, *, dtype: str, quantization: QuantSpec | None = None) -> int:
    """The token table as the optimized export stores it (quantized only with quantization.embedding)."""
    spec = quantization if quantization is not None and quantization.embedding else None
    return _matrix_bytes(config.hidden_size, config.vocab_size, spec, itemsize(dtype), embedding=True)


def export_bytes(config: LlamaConfig, *, dtype: str, quantization: QuantSpec | None = None) -> int:
    """Bytes of the optimized export's model.onnx.data: per layer the fused q/k/v, o, fused gate/up and down
    projections (quantized when a spec is given), the norms, the embedding, the head (its own tensor even when
    tied, quantized unless lm_head=False) and the rotary cos/sin caches. The graph file itself is ~0.1 MB."""
    item = itemsize(dtype)
    h, i, q, kv, v = (config.hidden_size, config.intermediate_size, config.q_size, config.kv_size,
                      config.vocab_size)
    layer = sum(_matrix_bytes(k, n, quantization, item) for k, n in ((h, q + 2 * kv), (q, h), (h, 2 * i), (i, h)))
    norms = (2 * config.num_hidden_layers + 1) * h * item
    head_spec = quantization if quantization is not None and quantization.lm_head else None
    rotary = 2 * config.max_position_embeddings * (config.head_dim // 2) * item
    return (config.num_hidden_layers * layer + norms + embedding_bytes(config, dtype=dtype, quantization=quantization)
            + _matrix_bytes(h, v, head_spec, item) + rotary)


def weight_bytes(config: LlamaConfig, *, dtype: str = "float16") -> int:
    """Unquantized weights as PyTorch holds them: every parameter once at the dtype's size."""
    return config.num_parameters() * itemsize(dtype)


def device_memory_bytes(device: str) -> int:
    """Total memory of the device the engines run on: the GPU's, or on the CPU the host's physical memory."""
    if device.startswith("cuda"):
        import torch
        index = int(device.split(":")[1]) if ":" in device else 0
        return int(torch.cuda.get_device_properties(index).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def eager_margin_bytes(device_bytes: int) -> int:
    """Room PyTorch needs beside its weights: the CUDA context, activations, the KV cache, allocator slack
    (10% of the device, at least 4 GiB)."""
    return max(4 << 30, device_bytes // 10)


def eager_plan(config: LlamaConfig, device_bytes: int, *, dtype: str = "float16", where: str = "GPU") -> dict:
    """Whether PyTorch eager at `dtype` fits the device with room: {"run", "reason", and the figures}.
    70B in fp16 (141 GB) on an 80 GB H100 does not, 8B (16 GB) does."""
    need, margin = weight_bytes(config, dtype=dtype), eager_margin_bytes(device_bytes)
    run = need <= device_bytes - margin
    short = {"float16": "fp16", "float32": "fp32", "bfloat16": "bf16"}.get(dtype, dtype)
    reason = None if run else (f"PyTorch eager {short} needs {need / 1e9:.0f} GB of weights, more than this "
                               f"{where}'s {device_bytes / 2**30:.0f} GiB ({device_bytes / 1e9:.0f} GB) less a "
                               f"{margin / 2**30:.0f} GiB margin")
    return {"run": run, "reason": reason, "weight_bytes": need, "device_bytes": device_bytes, "margin_bytes": margin,
            "dtype": dtype}


def disk_needed_bytes(expect: int) -> int:
    """Free disk an export of `expect` bytes asks for: 5% over the estimate and 2 GiB for everything else."""
    return int(1.05 * expect) + (2 << 30)
