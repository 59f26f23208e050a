"""Is a Q/DQ graph ready for TensorRT's explicit quantization? A static check of the ONNX file, no TensorRT needed.

TensorRT (10.1 deprecated implicit INT8 calibration, 11 removed it) builds INT8/FP8 engines from ONNX carrying
QuantizeLinear/DequantizeLinear as a strongly typed network. Its ONNX parser refuses or misreads graphs that
break these rules, each checked here op by op:
  * every op is an ONNX-domain op on ALLOWED_OPS (the ops the portable graph and Q/DQ use, each listed as
    supported in onnx-tensorrt's docs/operators.md for TensorRT 10.x); contrib-domain ops have no importer;
    axes inputs of Slice/Squeeze/Unsqueeze/Reduce* are constants (a restriction on that page);
  * Q/DQ are symmetric: zero points absent or all zero, of type int8 or float8e4m3fn (a QuantizeLinear without
    a zero point outputs uint8, which TensorRT only accepts as a network input or output);
  * float8 types appear only at opset >= 19 (where ONNX defines them);
  * a quantized (int8/fp8) initializer feeds DequantizeLinear directly, and nothing else reads it (TensorRT folds
    the DQ into the weights of the GEMM that follows; an op in between leaves it an unfoldable int8 tensor);
  * a per-channel DQ on a [in, out] MatMul weight uses the output dimension (axis 1 or -1), scales sized to it;
  * activations are quantized per tensor, every QuantizeLinear is followed only by DequantizeLinear with the same
    scale and zero point, and every DQ reads a quantized initializer, a QuantizeLinear, or an int8/fp8 graph
    input (a quantized KV cache, dequantized per tensor; its QuantizeLinear's output is also a graph output);
  * scales and zero points are constants (initializers or Constant nodes); readable scales are positive and finite.
The model is loaded without external data: names and types come from the graph, scale and zero-point values
from inline initializers, or external ones of at most SMALL_BYTES read from the model's directory.
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from llama3_deploy.contract import MODEL_FILE
from llama3_deploy.errors import ValidationError

# Each is "Y" in onnx-tensorrt docs/operators.md (TensorRT 10.0/10.1, opsets 9..20); the list is what the
# portable decoder plus Q/DQ uses (and Identity/Constant, which exporters emit). Extend only from that page.
ALLOWED_OPS = frozenset({
    "Add", "And", "Cast", "Concat", "Constant", "Cos", "DequantizeLinear", "Div", "Expand", "Gather", "Greater",
    "Identity", "LessOrEqual", "MatMul", "Mul", "Neg", "Pow", "QuantizeLinear", "Range", "Reciprocal",
    "ReduceMean", "Reshape", "Shape", "Sigmoid", "Sin", "Slice", "Softmax", "Sqrt", "Squeeze", "Transpose",
    "Unsqueeze", "Where",
})
# "`axes` must be an initializer" (or constant) on the same page: op -> index of its axes input.
AXES_INPUT = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "ReduceMean": 1}
QUANT_TYPES = {TensorProto.INT8: "int8", TensorProto.FLOAT8E4M3FN: "float8e4m3fn"}
FP8_TYPES = {TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ}
FP8_MIN_OPSET = 19
SMALL_BYTES = 1 << 20  # external scales/zero points up to this size are read to check their values


def _load(model) -> tuple[onnx.ModelProto, Path | None]:
    if isinstance(model, onnx.ModelProto):
        return model, None
    path = Path(model)
    path = path / MODEL_FILE if path.is_dir() else path
    return onnx.load(str(path), load_external_data=False), path.parent


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


class _Graph:
    """Lookups over one GraphProto: initializers, Constant outputs, producers and consumers by value name."""

    def __init__(self, proto: onnx.ModelProto, base: Path | None):
        g = proto.graph
        self.base = base
        self.inits = {t.name: t for t in g.initializer}
        self.constants = {n.output[0]: n.attribute[0].t for n in g.node
                          if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for n in g.node:
            for i, name in enumerate(n.input):
                if name:
                    self.consumers[name].append((n, i))

    def is_const(self, name: str) -> bool:
        return name in self.inits or name in self.constants

    def tensor(self, name: str) -> TensorProto | None:
        return self.inits.get(name) or self.constants.get(name)

    def value(self, name: str) -> np.ndarray | None:
        """A constant's values as float32, when inline or small external data; None when unreadable."""
        t = self.tensor(name)
        if t is None:
            return None
        if t.data_location == TensorProto.EXTERNAL:
            length = int({kv.key: kv.value for kv in t.external_data}.get("length", SMALL_BYTES + 1))
            if self.base is None or length > SMALL_BYTES:
                return None
            return numpy_helper.to_array(t, str(self.base)).astype(np.float32)
        return numpy_helper.to_array(t).astype(np.float32)


def _node(n: onnx.NodeProto) -> str:
    return f"{n.op_type} {n.name or n.output[0]!r}"


def _check_ops(proto: onnx.ModelProto, g: _Graph) -> list[str]:
    problems = []
    for n in proto.graph.node:
        if n.domain not in ("", "ai.onnx"):
            problems.append(f"{_node(n)}: domain {n.domain!r} is not ONNX's; TensorRT's parser has no importer for it")
        elif n.op_type not in ALLOWED_OPS:
            problems.append(f"{_node(n)}: {n.op_type} is not on the TensorRT-supported op list")
        elif n.op_type in AXES_INPUT and len(n.input) > AXES_INPUT[n.op_type]:
            axes = n.input[AXES_INPUT[n.op_type]]
            if axes and not g.is_const(axes):
                problems.append(f"{_node(n)}: TensorRT needs its axes ({axes}) to be an initializer")
    return problems


def _check_fp8_opset(proto: onnx.ModelProto, g: _Graph) -> list[str]:
    opset = _opset(proto)
    if opset >= FP8_MIN_OPSET:
        return []
    where = [f"initializer {t.name}" for t in [*g.inits.values(), *g.constants.values()] if t.data_type in FP8_TYPES]
    gr = proto.graph
    where += [f"value {v.name}" for v in [*gr.input, *gr.output, *gr.value_info]
              if v.type.tensor_type.elem_type in FP8_TYPES]
    where += [_node(n) for n in gr.node if n.op_type == "Cast"
              and any(a.name == "to" and a.i in FP8_TYPES for a in n.attribute)]
    if not where:
        return []
    return [f"float8 types need opset >= {FP8_MIN_OPSET}, the model imports opset {opset}: {', '.join(where[:4])}"]


def _quant_type(g: _Graph, zp: str | None) -> int | None:
    t = g.tensor(zp) if zp else None
    return None if t is None else t.data_type


def _check_zero_point(n: onnx.NodeProto, g: _Graph, problems: list[str]) -> None:
    zp = n.input[2] if len(n.input) > 2 and n.input[2] else None
    if zp is None:
        output_dtype = next((a.i for a in n.attribute if a.name == "output_dtype"), 0)  # opset 21+
        if n.op_type == "QuantizeLinear" and output_dtype not in QUANT_TYPES:
            problems.append(f"{_node(n)}: no zero point, so it outputs uint8; give it an int8 or float8e4m3fn "
                            "zero point of 0")
        return
    if not g.is_const(zp):
        problems.append(f"{_node(n)}: zero point {zp} is not a constant")
        return
    if _quant_type(g, zp) not in QUANT_TYPES:
        problems.append(f"{_node(n)}: zero point {zp} has type {TensorProto.DataType.Name(_quant_type(g, zp))}; "
                        "TensorRT quantizes to int8 or float8e4m3fn")
    values = g.value(zp)
    if values is not None and np.any(values != 0):
        problems.append(f"{_node(n)}: zero point {zp} is not zero (TensorRT's quantization is symmetric)")


def _check_scale(n: onnx.NodeProto, g: _Graph, problems: list[str]) -> np.ndarray | None:
    scale = n.input[1]
    if not g.is_const(scale):
        problems.append(f"{_node(n)}: scale {scale} is not a constant (TensorRT needs build-time scales)")
        return None
    values = g.value(scale)
    if values is not None and not (np.all(np.isfinite(values)) and np.all(values > 0)):
        problems.append(f"{_node(n)}: scale {scale} has values that are not positive and finite")
    return values


def _axis(n: onnx.NodeProto) -> int:
    return next((a.i for a in n.attribute if a.name == "axis"), 1)


def _check_qdq(proto: onnx.ModelProto, g: _Graph) -> list[str]:
    problems: list[str] = []
    quantized_inputs = {v.name for v in proto.graph.input if v.type.tensor_type.elem_type in QUANT_TYPES}
    for n in proto.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or n.domain not in ("", "ai.onnx"):
            continue
        _check_zero_point(n, g, problems)
        _check_scale(n, g, problems)
        scale = g.tensor(n.input[1])
        scale_dims = tuple(scale.dims) if scale is not None else ()
        if n.op_type == "QuantizeLinear":
            if any(d != 1 for d in scale_dims):
                problems.append(f"{_node(n)}: per-channel scale {scale_dims}; activations are quantized per tensor")
            users = g.consumers.get(n.output[0], [])
            if not users:
                problems.append(f"{_node(n)}: its output feeds no DequantizeLinear")
            for user, index in users:
                same = user.op_type == "DequantizeLinear" and index == 0 and list(user.input[1:3]) == list(n.input[1:3])
                if not same:
                    problems.append(f"{_node(n)}: its output feeds {_node(user)}, not a DequantizeLinear with the "
                                    f"same scale and zero point ({n.input[1]})")
            continue
        # DequantizeLinear: on a quantized initializer (a weight) or right after a QuantizeLinear (an activation).
        x = n.input[0]
        source = g.producer.get(x)
        if x in g.inits:
            dims = tuple(g.inits[x].dims)
            if g.inits[x].data_type not in QUANT_TYPES:
                problems.append(f"{_node(n)}: weight {x} has type "
                                f"{TensorProto.DataType.Name(g.inits[x].data_type)}, not int8 or float8e4m3fn")
            if any(d != 1 for d in scale_dims):  # per channel: the output dimension of a [in, out] weight
                axis = _axis(n) % len(dims) if dims else None
                if len(dims) != 2 or axis != 1:
                    problems.append(f"{_node(n)}: per-channel axis {_axis(n)} on weight {x} {list(dims)}; a MatMul "
                                    "weight [in, out] is quantized per output channel (axis 1 or -1)")
                elif scale_dims != (dims[1],):
                    problems.append(f"{_node(n)}: scale shape {list(scale_dims)} does not match weight {x}'s "
                                    f"output dimension {dims[1]}")
        elif x in quantized_inputs:  # a quantized KV cache read back in: per tensor, like an activation
            if any(d != 1 for d in scale_dims):
                problems.append(f"{_node(n)}: per-channel scale {scale_dims} on graph input {x}; a quantized "
                                "cache is dequantized per tensor")
        elif source is None or source.op_type != "QuantizeLinear":
            what = f"the output of {_node(source)}" if source is not None else "a graph input"
            problems.append(f"{_node(n)}: reads {x}, {what}; TensorRT needs the quantized initializer or a "
                            "QuantizeLinear directly before a DequantizeLinear")
    return problems


def _check_quantized_initializers(g: _Graph) -> list[str]:
    """int8/fp8 initializers are read only by DequantizeLinear as its data, or by Q/DQ as their zero point."""
    problems = []
    for name, t in g.inits.items():
        if t.data_type not in QUANT_TYPES:
            continue
        for user, index in g.consumers.get(name, []):
            ok = (user.op_type == "DequantizeLinear" and index in (0, 2)) or (
                user.op_type == "QuantizeLinear" and index == 2)
            if not ok:
                problems.append(f"{QUANT_TYPES[t.data_type]} initializer {name} is read by {_node(user)}; a quantized "
                                "initializer must feed DequantizeLinear directly")
    return problems


def check_tensorrt_ready(model: str | os.PathLike | onnx.ModelProto) -> list[str]:
    """Problems that keep TensorRT from building this Q/DQ graph as a strongly typed network; [] when ready.

    `model`: a model.onnx path (or its directory) or a ModelProto; external data is never loaded in bulk."""
    proto, base = _load(model)
    g = _Graph(proto, base)
    return [*_check_ops(proto, g), *_check_fp8_opset(proto, g), *_check_qdq(proto, g),
            *_check_quantized_initializers(g)]


def require_tensorrt_ready(model: str | os.PathLike | onnx.ModelProto) -> None:
    """Raise ValidationError listing every problem `check_tensorrt_ready` finds."""
    problems = check_tensorrt_ready(model)
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValidationError(f"the graph is not ready for TensorRT explicit quantization ({len(problems)} "
                              "problems):\n  " + "\n  ".join(shown))
