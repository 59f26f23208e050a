"""The optimized flavor: the same decoder built directly from ONNX Runtime's fused contrib ops.

Per layer (E hidden, q/kv query/key-value widths, I intermediate, M the KV buffer length):
    h      = SkipSimplifiedLayerNormalization(prev_out, residual, attn_norm)  # add + RMSNorm, one kernel
    qkv    = MatMul(h, Wqkv [E, q+2kv])                                      # one projection, not three
    a, k, v = GroupQueryAttention(qkv, past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache)
             # rotary inside; past and present are the same [B, K, M, D] buffer, written in place
    h      = SkipSimplifiedLayerNormalization(MatMul(a, Wo), residual, mlp_norm)
    out    = MatMul(silu(g) * u, Wdown) where g, u = Split(MatMul(h, Wgate_up [E, 2I]))
The mask only carries lengths: seqlens_k = rowsum(mask) - 1, total_len = mask width (onnxruntime-genai's
convention). With logits "last", only the last position goes through the final norm and the head.
Weights are written lazily from the same name table as the portable graph, fused and (optionally)
weight-only quantized to MatMulNBits one tensor at a time, so the export's memory bound holds.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx_ir as ir
import torch

from llama3_deploy import contract
from llama3_deploy.config import LlamaConfig
from llama3_deploy.dtypes import numpy_dtype, onnx_type

from .model import rope_cos_sin
from .quantize import (QuantizedMatrix, QuantSpec, concat_quantized, gather_block_quantized_attributes,
                       matmul_nbits_attributes, quantize_embedding, quantize_matrix, quantized_layout)
from .spec import ExportSpec
from .weights import WeightEntry, WeightSource, derived_tensors, name_table, target_chunks, target_tensor

OPSET = 18
MS_DOMAIN = "com.microsoft"
GRAPH_DTYPES = ("float32", "float16")  # GroupQueryAttention has no bfloat16 CPU kernel


def _np(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().numpy()


class _Weights:
    """Declares initializers whose values are computed from the source only when the writer asks."""

    def __init__(self, source: WeightSource, config: LlamaConfig, dtype: str, quant: QuantSpec | None):
        self.source, self.config, self.dtype, self.quant = source, config, dtype, quant
        self.table = {e.target: e for e in name_table(config)}
        self.values: list[ir.Value] = []
        self._memo: tuple[str, object] | None = None  # the last quantized weight: its 2-3 tensors are written in a row

    def param(self, targets: tuple[str, ...], dtype: torch.dtype) -> np.ndarray:
        """Decoder parameters [in, out] in `dtype`, concatenated along the output axis (a fused projection)."""
        parts = [target_tensor(self.source, self.table[t], dtype) for t in targets]
        return _np(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])

    def add(self, name: str, dtype: str, shape: tuple[int, ...], fn: Callable[[], np.ndarray]) -> ir.Value:
        def make() -> ir.Tensor:
            arr = fn()
            if tuple(arr.shape) != shape:
                raise RuntimeError(f"initializer {name}: computed {arr.shape}, declared {shape}")
            return ir.Tensor(np.ascontiguousarray(arr), name=name)
        v = ir.Value(name=name, type=ir.TensorType(ir.DataType(onnx_type(dtype))), shape=ir.Shape(list(shape)),
                     const_value=ir.LazyTensor(make, dtype=ir.DataType(onnx_type(dtype)), shape=ir.Shape(list(shape)), name=name))
        self.values.append(v)
        return v

    def _cached(self, key: str, fn: Callable[[], object]):
        if self._memo is None or self._memo[0] != key:
            self._memo = None  # drop the previous weight before computing the next
            self._memo = (key, fn())
        return self._memo[1]

    def vector(self, target: str) -> ir.Value:
        return self.add(target, self.dtype, self.table[target].target_shape,
                        lambda: self.param((target,), getattr(torch, self.dtype)))

    def quantized(self, name: str, k: int, n: int, fn: Callable, *, embedding: bool = False) -> list[ir.Value]:
        """The packed weight, scales and (asymmetric) zero points of one quantized tensor, computed once by
        `fn` when the writer reaches the first of them."""
        get = lambda: self._cached(name, fn)
        return [self.add(f"{name}.{part}", self.dtype if kind == "scale" else kind, shape,
                         lambda part=part: getattr(get(), part))
                for part, (shape, kind) in quantized_layout(k, n, self.quant, embedding=embedding).items()]

    def quantize_streamed(self, targets: tuple[str, ...], *, embedding: bool = False) -> QuantizedMatrix:
        """The targets (fused along the output axis) quantized straight from the source, a chunk of output
        channels at a time: only one chunk is ever in fp32 (a 70B head at once would be 4.2 GB)."""
        quantize = quantize_embedding if embedding else quantize_matrix
        scale_dtype = numpy_dtype(self.dtype)
        return concat_quantized([quantize(_np(part), self.quant, scale_dtype=scale_dtype) for t in targets
                                 for _, part in target_chunks(self.source, self.table[t], torch.float32)])

    def linear(self, name: str, targets: tuple[str, ...], k: int, n: int, *, quantize: bool):
        """A [k, n] projection: (weight value, None) for MatMul, or (inputs, attributes) for MatMulNBits."""
        if self.quant is None or not quantize:
            return [self.add(name, self.dtype, (k, n), lambda: self.param(targets, getattr(torch, self.dtype)))], None
        return (self.quantized(name, k, n, lambda: self.quantize_streamed(targets)),
                matmul_nbits_attributes(k, n, self.quant))


def rotary_caches(config: LlamaConfig, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """[max_positions, D/2] cos and sin tables, computed in fp32 exactly as the portable graph does."""
    inv_freq = derived_tensors(config)["rope_inv_freq"]
    pos = torch.arange(config.max_position_embeddings, dtype=torch.int64)[None]
    cos, sin = rope_cos_sin(inv_freq, pos)  # [1, 1, P, D], halves repeated
    half = config.head_dim // 2
    return _np(cos[0, 0, :, :half].to(getattr(torch, dtype))), _np(sin[0, 0, :, :half].to(getattr(torch, dtype)))


def build(source: WeightSource, spec: ExportSpec) -> ir.Model:
    """The optimized decoder graph for the spec, its weights bound lazily to `source`; with argmax it also
    returns the greedy ids (contract.NEXT_TOKEN)."""
    dtype, logits, quant, argmax, io = spec.dtype, spec.logits, spec.quantization, spec.argmax, spec.io
    if dtype not in GRAPH_DTYPES:
        raise ValueError(f"the optimized flavor supports float32 and float16, not {dtype}")
    c = spec.config
    E, I, V, D = c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    T = ir.DataType(onnx_type(dtype))
    w = _Weights(source, c, dtype, quant)
    tape = ir.tape.Tape()

    def const(name: str, array: np.ndarray) -> ir.Value:
        v = ir.Value(name=name, type=ir.TensorType(ir.DataType(ir.tensor(array).dtype)), shape=ir.Shape(array.shape),
                     const_value=ir.tensor(array, name=name))
        w.values.append(v)
        return v

    def value(t: contract.TensorSpec) -> ir.Value:
        return ir.Value(name=t.name, type=ir.TensorType(ir.DataType(onnx_type(t.dtype))), shape=ir.Shape(list(t.shape)))

    inputs = [value(s) for s in io.inputs]
    ids, mask = inputs[0], inputs[1]
    past = dict(zip(io.past_names, inputs[2:]))

    def matmul(x: ir.Value, name: str, targets: tuple[str, ...], k: int, n: int, *, quantize: bool = True):
        ins, attrs = w.linear(name, targets, k, n, quantize=quantize)
        if attrs is None:
            return tape.op("MatMul", [x, ins[0]])
        return tape.op("MatMulNBits", [x, *ins], attrs, domain=MS_DOMAIN)

    def skip_norm(x: ir.Value, residual: ir.Value, gamma: ir.Value) -> tuple[ir.Value, ir.Value]:
        out, _, _, total = tape.op_multi_out("SkipSimplifiedLayerNormalization", [x, residual, gamma],
                                             {"epsilon": c.rms_norm_eps}, num_outputs=4, domain=MS_DOMAIN)
        return out, total

    # Lengths from the mask: seqlens_k [B] int32 = ones per row - 1; total_len () int32 = mask width.
    one = const("const.one", np.array(1, np.int64))
    axis1 = const("const.axis1", np.array([1], np.int64))
    rows = tape.op("ReduceSum", [mask, axis1], {"keepdims": 0})
    seqlens_k = tape.op("Cast", [tape.op("Sub", [rows, one])], {"to": ir.DataType.INT32})
    total_len = tape.op("Cast", [tape.op("Gather", [tape.op("Shape", [mask]), one], {"axis": 0})],
                        {"to": ir.DataType.INT32})
    cos_np, sin_np = rotary_caches(c, dtype)
    cos_cache, sin_cache = const("cos_cache", cos_np), const("sin_cache", sin_np)

    # Embedding: x [B, S, E]
    if quant is not None and quant.embedding:
        data, *rest = w.quantized("embed", E, V, lambda: w.quantize_streamed(("embed",), embedding=True),
                                  embedding=True)
        x = tape.op("GatherBlockQuantized", [data, ids, *rest], gather_block_quantized_attributes(quant),
                    domain=MS_DOMAIN)
    else:
        x = tape.op("Gather", [w.vector("embed"), ids], {"axis": 0})

    # Layer 0's norm has no residual to add: plain RMSNorm ops in fp32 (ONNX Runtime fuses them).
    eps = const("const.eps", np.array(c.rms_norm_eps, np.float32))
    x32 = tape.op("Cast", [x], {"to": ir.DataType.FLOAT}) if dtype != "float32" else x
    var = tape.op("ReduceMean", [tape.op("Mul", [x32, x32]), const("const.axis_last", np.array([-1], np.int64))],
                  {"keepdims": 1})
    normed = tape.op("Div", [x32, tape.op("Sqrt", [tape.op("Add", [var, eps])])])
    normed = tape.op("Cast", [normed], {"to": T}) if dtype != "float32" else normed
    h = tape.op("Mul", [normed, w.vector("layers.0.attn_norm.weight")])
    residual, prev = x, None
    presents: list[ir.Value] = []  # present key, value per layer: the graph outputs after the head's

    gqa_attrs = {"num_heads": c.num_attention_heads, "kv_num_heads": c.num_key_value_heads,
                 "scale": 1.0 / math.sqrt(D), "do_rotary": 1, "rotary_interleaved": 0, "local_window_size": -1}
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        if prev is not None:
            h, residual = skip_norm(prev, residual, w.vector(p + "attn_norm.weight"))
        qkv = matmul(h, p + "attn.wqkv", (p + "attn.wq", p + "attn.wk", p + "attn.wv"), E, c.q_size + 2 * c.kv_size)
        k_out = ir.Value(name=contract.present_key(i))
        v_out = ir.Value(name=contract.present_value(i))
        attn, _, _ = tape.op_multi_out(
            "GroupQueryAttention", [qkv, None, None, past[contract.past_key(i)], past[contract.past_value(i)],
                                    seqlens_k, total_len, cos_cache, sin_cache],
            gqa_attrs, outputs=[ir.Value(name=f"{p}attn.out"), k_out, v_out], domain=MS_DOMAIN)
        presents += [k_out, v_out]
        o = matmul(attn, p + "attn.wo", (p + "attn.wo",), c.q_size, E)
        h, residual = skip_norm(o, residual, w.vector(p + "mlp_norm.weight"))
        gu = matmul(h, p + "mlp.w_gate_up", (p + "mlp.w_gate", p + "mlp.w_up"), E, 2 * I)
        gate, up = tape.op_multi_out("Split", [gu], {"axis": -1, "num_outputs": 2}, num_outputs=2)
        act = tape.op("Mul", [tape.op("Mul", [gate, tape.op("Sigmoid", [gate])]), up])
        prev = matmul(act, p + "mlp.w_down", (p + "mlp.w_down",), I, E)

    if logits == "last":  # only the last position reaches the final norm and the head
        start, end = const("const.last", np.array([-1], np.int64)), const("const.end", np.array([2**62], np.int64))
        prev = tape.op("Slice", [prev, start, end, axis1])
        residual = tape.op("Slice", [residual, start, end, axis1])
    h, _ = skip_norm(prev, residual, w.vector("norm.weight"))
    head = ("lm_head",)
    if c.tie_word_embeddings:  # the head reads the embedding table transposed, stored as its own [E, V] tensor
        e = w.table["embed"]
        w.table["lm_head.tied"] = WeightEntry(e.source, "lm_head.tied", e.source_shape, True)
        head = ("lm_head.tied",)
    out = matmul(h, "lm_head", head, E, V, quantize=quant is not None and quant.lm_head)
    logits_value = ir.Value(name=contract.LOGITS)
    if dtype != "float32":
        tape.op("Cast", [out], {"to": ir.DataType.FLOAT}, output=logits_value)
    else:
        tape.op("Identity", [out], output=logits_value)

    graph_outputs = [logits_value]
    if argmax:  # on the fp32 logits, so ties and rounding match a sampler reading those logits
        graph_outputs.append(tape.op("ArgMax", [logits_value], {"axis": -1, "keepdims": 0},
                                     output=ir.Value(name=contract.NEXT_TOKEN)))
    graph_outputs += presents
    for v, out in zip(graph_outputs, io.outputs, strict=True):  # the contract's order, types and axes
        if v.name != out.name:
            raise RuntimeError(f"graph output {v.name} where the contract has {out.name}")
        v.type, v.shape = ir.TensorType(ir.DataType(onnx_type(out.dtype))), ir.Shape(list(out.shape))
    graph = ir.Graph(inputs, graph_outputs, nodes=tape.nodes, initializers=w.values,
                     opset_imports={"": OPSET, MS_DOMAIN: 1}, name="llama3_decoder_optimized")
    return ir.Model(graph, ir_version=10, producer_name="llama3-deploy")
