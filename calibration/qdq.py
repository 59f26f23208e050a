"""Explicit quantization: QuantizeLinear/DequantizeLinear pairs in the portable graph, for TensorRT.

TensorRT 10.1 deprecated implicit INT8 calibration and TensorRT 11 removed it; INT8 and FP8 engines are built
from ONNX that already carries Q/DQ, as a strongly typed network. `insert_qdq` rewrites each quantized projection
`MatMul(x, W)` (W an initializer [in, out] named by the decoder's name table) into

    x ──QuantizeLinear(x.scale, x.zero_point)──> <x>.q ──DequantizeLinear(same)──> <x>.dq ──┐
    W (int8 | float8e4m3fn) ──DequantizeLinear(W.scale, axis=1)──────────────> W.dq ──────MatMul──>

Weights: per output channel (axis 1 of [in, out]; one scale per column), symmetric, no zero point, the
quantized values stored as the initializer itself (same name, int8 or float8e4m3fn) feeding its DQ directly,
as TensorRT wants to fold it into the GEMM. scale[c] = max_k |W[k, c]| / QMAX; int8 codes are round-half-even
of W / scale clipped to [-127, 127] (TensorRT's int8 range is symmetric); fp8 codes are W / scale saturated to
±448 and cast to E4M3. Per channel because column ranges differ widely: one outlier column must not coarsen the others.
Activations: per tensor (TensorRT quantizes activations per tensor), symmetric, scale = amax / QMAX with amax
the calibrated max |x| (`input_amax`, keyed by weight name); a zero point of the quantized type with value 0
fixes Q's output type. One Q/DQ pair per activation tensor: q/k/v read one tensor and gate/up another, and a
shared pair (amax the max of its weights' entries) lets TensorRT fuse them into one quantized input.
QMAX is 127 (int8) or 448 (E4M3's largest finite value). Every scale is stored in the graph dtype, which makes
DequantizeLinear output the graph dtype; float16/bfloat16 scales and float8 need opset 19, so the default opset
import is raised to 19 for fp8 or a non-float32 graph (an fp32 int8 graph keeps opset 18).

Weights stay streamed: each quantized weight is a LazyTensor that reads the original (lazy) initializer when
the writer reaches it, quantizes it once (the last result is memoized, like export.optimized's _Weights, and
the small scales kept), so one weight is resident at a time. New node and value names derive from weight and
input names (`layers.0.attn.wq.dq`, `mul_89.q`, `mul_89.dq`), so equal inputs write byte-identical graphs.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from typing import Callable, Iterable

import numpy as np
import onnx_ir as ir

from llama3_deploy.errors import DeployError

FP8_MIN_OPSET = 19
# Quantized projections: the name table's linear weights (lm_head only when asked for through input_amax).
PROJECTION = re.compile(r"^(layers\.\d+\.(attn\.w[qkvo]|mlp\.w_(gate|up|down))|lm_head)$")
RECORD_KEY = "llama3_deploy.qdq"  # metadata_props key holding the JSON record
CHUNK_COLUMNS = 4096  # output columns quantized at once: bounds the float32 temporaries to one slice
_GRAPH_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclasses.dataclass(frozen=True)
class QFormat:
    name: str
    qtype: ir.DataType
    qmax: float  # codes span [-qmax, qmax]


FORMATS = {"int8": QFormat("int8", ir.DataType.INT8, 127.0),
           "fp8": QFormat("fp8", ir.DataType.FLOAT8E4M3FN, 448.0)}


def _np_dtype(dtype: ir.DataType):
    """numpy's type for a graph dtype (the scales' dtype)."""
    return dtype.numpy()


def _fmt(fmt: str) -> QFormat:
    if fmt not in FORMATS:
        raise DeployError(f"unknown quantization format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def _codes(ratio: np.ndarray, f: QFormat) -> np.ndarray:
    """float32 values already divided by their scale -> int8 or float8e4m3fn codes."""
    if f.name == "int8":
        return np.clip(np.rint(ratio), -127, 127).astype(np.int8)  # rint: round half to even
    import ml_dtypes
    # Saturate first: E4M3FN has no infinity, so an out-of-range cast would give NaN.
    return np.clip(ratio, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn)


def _scales(amax: np.ndarray, f: QFormat, scale_dtype) -> np.ndarray:
    """amax / QMAX in the scale dtype; never zero or subnormal (an all-zero column gets scale 1: codes are 0)."""
    import ml_dtypes
    tiny = float(ml_dtypes.finfo(scale_dtype).tiny)
    s = np.asarray(amax, np.float32) / np.float32(f.qmax)
    return np.where(s > 0, np.maximum(s, tiny), 1.0).astype(scale_dtype)


def quantize_weight(weight: np.ndarray, fmt: str, *, scale_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """A [in, out] weight -> (codes [in, out] int8 or float8e4m3fn, scales [out] in scale_dtype), symmetric per
    output column. Codes are computed against the stored (rounded) scale, so DQ reproduces W to one code step."""
    f = _fmt(fmt)
    if weight.ndim != 2:
        raise ValueError(f"expected a [in, out] weight, got shape {weight.shape}")
    codes = np.empty(weight.shape, _codes(np.zeros(1, np.float32), f).dtype)
    scales = np.empty(weight.shape[1], scale_dtype)
    for c in range(0, weight.shape[1], CHUNK_COLUMNS):
        w = weight[:, c:c + CHUNK_COLUMNS].astype(np.float32)
        s = _scales(np.abs(w).max(axis=0), f, scale_dtype)
        codes[:, c:c + CHUNK_COLUMNS] = _codes(w / s.astype(np.float32), f)
        scales[c:c + CHUNK_COLUMNS] = s
    return codes, scales


class _Streamed:
    """Quantizes weights when the writer asks for them: the last weight's (codes, scales) memoized, so its two
    initializers cost one quantization whichever the writer reaches first; every (small) scale vector kept."""

    def __init__(self, f: QFormat):
        self.f = f
        self._memo: tuple[str, tuple[np.ndarray, np.ndarray]] | None = None
        self._scales: dict[str, np.ndarray] = {}

    def codes(self, name: str, source: ir.TensorProtocol, scale_dtype) -> np.ndarray:
        if self._memo is None or self._memo[0] != name:
            self._memo = None  # drop the previous weight before reading the next
            result = quantize_weight(source.numpy(), self.f.name, scale_dtype=scale_dtype)
            self._memo, self._scales[name] = (name, result), result[1]
        return self._memo[1][0]

    def scales(self, name: str, source: ir.TensorProtocol, scale_dtype) -> np.ndarray:
        if name not in self._scales:
            self.codes(name, source, scale_dtype)
        return self._scales[name]


def _lazy(name: str, dtype: ir.DataType, shape: tuple[int, ...], fn: Callable[[], np.ndarray]) -> ir.LazyTensor:
    return ir.LazyTensor(lambda: ir.Tensor(np.ascontiguousarray(fn()), dtype=dtype, name=name),
                         dtype=dtype, shape=ir.Shape(list(shape)), name=name)


def _projection_uses(value: ir.Value) -> list[ir.Node]:
    """The MatMuls reading `value` as their weight (input 1); DeployError if anything else reads it."""
    nodes = []
    for node, index in value.uses():
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or index != 1:
            raise DeployError(f"weight {value.name} is read by {node.op_type} {node.name!r} (input {index}), "
                              "not only as a MatMul weight; it cannot be quantized per output channel")
        nodes.append(node)
    return nodes


def _select(graph: ir.Graph, input_amax: dict[str, float], weights: Iterable[str] | None) -> tuple[list[str], dict]:
    """The weights to quantize (checked) and the ones skipped with why."""
    bad = {k: v for k, v in input_amax.items()
           if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v) or v <= 0}
    if bad:
        raise DeployError(f"input_amax values must be finite and positive: {dict(sorted(bad.items())[:5])}")
    skipped = {}
    if weights is None:
        unknown = sorted(k for k in input_amax if not PROJECTION.match(k) or k not in graph.initializers)
        if "lm_head" in unknown and "lm_head" not in graph.initializers:  # tied head: no weight of its own
            unknown.remove("lm_head")
            skipped["lm_head"] = "tied to the embedding: the graph has no lm_head weight"
        if unknown:
            raise DeployError(f"input_amax names weights this graph has no projection for: {unknown[:5]}")
        chosen = [k for k in input_amax if k in graph.initializers]
    else:
        if isinstance(weights, str):
            raise DeployError(f"weights must be a list of weight names, not the string {weights!r}")
        chosen = list(dict.fromkeys(weights))
        missing = [w for w in chosen if w not in graph.initializers]
        if missing:
            raise DeployError(f"weights not in the graph: {missing[:5]}")
        no_amax = [w for w in chosen if w not in input_amax]
        if no_amax:
            raise DeployError(f"no calibrated input amax for: {no_amax[:5]}")
    return chosen, skipped


def insert_qdq(model: ir.Model, *, input_amax: dict[str, float], fmt: str,
               weights: Iterable[str] | None = None) -> ir.Model:
    """Quantize projections of `model` in place (see the module docstring for the layout) and return it.

    `input_amax`: weight name -> calibrated max |x| of the activation its MatMul reads. `fmt`: "int8" or "fp8".
    `weights`: names to quantize; None quantizes every projection with an entry (lm_head only if listed).
    The record (format, opset, quantized weights, each activation's amax and scale) is stored as JSON in the
    model's metadata_props under RECORD_KEY; `qdq_record` reads it back for the manifest.
    """
    f = _fmt(fmt)
    graph = model.graph
    chosen, skipped = _select(graph, input_amax, weights)
    matmuls: dict[str, list[ir.Node]] = {}
    for name in chosen:
        value = graph.initializers[name]
        if value.const_value is None:
            raise DeployError(f"weight {name} has no values; attach the weights before inserting Q/DQ")
        if value.dtype not in _GRAPH_DTYPES or value.shape is None or len(value.shape) != 2:
            raise DeployError(f"weight {name}: expected a 2-D float weight, got {value.dtype} {value.shape}")
        matmuls[name] = _projection_uses(value)
        if not matmuls[name]:
            raise DeployError(f"weight {name} is not read by any MatMul")

    streamed = _Streamed(f)
    taken = {v.name for v in [*graph.inputs, *graph.initializers.values()]}
    taken |= {o.name for n in graph for o in n.outputs}

    def fresh(name: str) -> str:  # generated names are deterministic, so a clash is a graph bug, not bad luck
        if name in taken:
            raise RuntimeError(f"Q/DQ name {name} already exists in the graph")
        taken.add(name)
        return name

    def initializer(name: str, dtype: ir.DataType, shape: tuple[int, ...], tensor) -> ir.Value:
        v = ir.Value(name=fresh(name), type=ir.TensorType(dtype), shape=ir.Shape(list(shape)), const_value=tensor)
        graph.register_initializer(v)
        return v

    # Graph order decides every loop below, so two runs insert the same nodes in the same places.
    position = {id(n): i for i, n in enumerate(graph)}
    chosen.sort(key=lambda w: position[id(matmuls[w][0])])
    groups: dict[ir.Value, list[tuple[str, ir.Node]]] = {}  # activation -> (weight, MatMul) reading it
    for node in sorted((n for w in chosen for n in matmuls[w]), key=lambda n: position[id(n)]):
        groups.setdefault(node.inputs[0], []).append((node.inputs[1].name, node))

    # Weights: W becomes its codes (same name, lazy), W.scale its per-column scales, W.dq = DequantizeLinear.
    for name in chosen:
        value = graph.initializers[name]
        source, dtype, shape = value.const_value, value.dtype, tuple(value.shape)
        sdtype = _np_dtype(dtype)
        value.type = ir.TensorType(f.qtype)
        value.const_value = _lazy(name, f.qtype, shape, lambda n=name, s=source, d=sdtype: streamed.codes(n, s, d))
        scale = initializer(f"{name}.scale", dtype, (shape[1],),
                            _lazy(f"{name}.scale", dtype, (shape[1],),
                                  lambda n=name, s=source, d=sdtype: streamed.scales(n, s, d)))
        out = ir.Value(name=fresh(f"{name}.dq"), type=ir.TensorType(dtype), shape=ir.Shape(list(shape)))
        graph.insert_before(matmuls[name][0], ir.Node("", "DequantizeLinear", [value, scale], outputs=[out],
                                                      attributes=[ir.AttrInt64("axis", 1)], name=out.name))
        for node in matmuls[name]:
            node.replace_input_with(1, out)

    # Activations: one Q/DQ pair per tensor, in front of the first quantized MatMul that reads it.
    activations = {}
    for x, users in groups.items():
        dtype, label = x.dtype, x.name
        amax = max(float(input_amax[w]) for w, _ in users)
        sval = _scales(np.array(amax), f, _np_dtype(dtype))
        scale = initializer(f"{label}.scale", dtype, (), ir.Tensor(sval, dtype=dtype, name=f"{label}.scale"))
        zero = np.asarray(_codes(np.zeros((), np.float32), f))
        zp = initializer(f"{label}.zero_point", f.qtype, (), ir.Tensor(zero, dtype=f.qtype, name=f"{label}.zero_point"))
        q_out = ir.Value(name=fresh(f"{label}.q"), type=ir.TensorType(f.qtype), shape=x.shape)
        dq_out = ir.Value(name=fresh(f"{label}.dq"), type=ir.TensorType(dtype), shape=x.shape)
        graph.insert_before(users[0][1], [
            ir.Node("", "QuantizeLinear", [x, scale, zp], outputs=[q_out], name=q_out.name),
            ir.Node("", "DequantizeLinear", [q_out, scale, zp], outputs=[dq_out], name=dq_out.name)])
        for _, node in users:
            node.replace_input_with(0, dq_out)
        activations[label] = {"amax": amax, "scale": float(sval.astype(np.float32)), "weights": [w for w, _ in users]}

    # float16/bfloat16 scales (DequantizeLinear-19's T2) and float8 types need opset 19.
    if chosen and (f.name == "fp8" or any(x.dtype != ir.DataType.FLOAT for x in groups)):
        model.opset_imports[""] = max(model.opset_imports.get("", FP8_MIN_OPSET), FP8_MIN_OPSET)
    record = {"format": f.name, "opset": model.opset_imports.get(""), "weights": chosen,
              "activations": activations, "skipped": skipped}
    model.metadata_props[RECORD_KEY] = json.dumps(record, sort_keys=True)
    return model


def qdq_record(model) -> dict | None:
    """The record `insert_qdq` stored, from an ir.Model or an onnx.ModelProto; None if it has none."""
    if isinstance(model, ir.Model):
        text = model.metadata_props.get(RECORD_KEY)
    else:
        text = next((p.value for p in model.metadata_props if p.key == RECORD_KEY), None)
    return None if text is None else json.loads(text)
