"""A quantized key/value cache (INT8 or FP8 E4M3) in the portable graph, as explicit Q/DQ for TensorRT.

The portable graph takes past [B, K, P, D] in and returns present = Concat(past, new) [B, K, P+S, D]. With a
quantized cache both are stored quantized, halving (fp16) or quartering (fp32) the cache's memory and the bytes
each decode step reads:

    past (int8 | fp8) ──DQ(s)──> past.dq ──Concat(new)──> present.fp ──Q(s)──> present (int8 | fp8) ──> output
                                                                                   └─DQ(s)──> present.dq ──> attention

Attention reads DQ(Q(present)): the new token's key/value are rounded before this step uses them, exactly as
they are stored for the next steps, so a step's result does not depend on whether its keys were just computed or
read back from the cache. Old entries pass DQ then Q with the same scale, which returns the same codes.

Scales: one per layer per key/value tensor (per tensor, symmetric, zero point 0: TensorRT's rule, and what its
own FP8/INT8 KV caches use), scale = amax / QMAX with amax the calibrated max |k| or |v| over prefill and decode
(`ActivationStats.kv_amax`; no clipping: a saturated key moves every later attention score). Keys are taken
after RoPE, which is what the cache holds.
"""
from __future__ import annotations

import json
import math

import numpy as np
import onnx_ir as ir

from llama3_deploy import contract
from llama3_deploy.dtypes import KV_QUANT_DTYPES
from llama3_deploy.errors import DeployError

from .qdq import FORMATS, FP8_MIN_OPSET, _codes, _scales

RECORD_KEY = "llama3_deploy.kv_qdq"  # metadata_props key holding the JSON record


def kv_targets(num_layers: int) -> list[str]:
    """The names kv_amax is keyed by: layers.<i>.key and layers.<i>.value."""
    return [f"layers.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def _io_names(i: int, kind: str) -> tuple[str, str]:
    return ((contract.past_key(i), contract.present_key(i)) if kind == "key"
            else (contract.past_value(i), contract.present_value(i)))


def quantize_kv_cache(model: ir.Model, *, kv_amax: dict[str, float], fmt: str) -> ir.Model:
    """Make `model`'s (a portable decoder's) KV cache int8 ("int8") or float8e4m3fn ("fp8") in place.

    `kv_amax`: layers.<i>.key / layers.<i>.value -> calibrated max |k| / |v|, for every layer. The record (format,
    each tensor's amax and scale) is stored as JSON in the model's metadata_props under RECORD_KEY."""
    if fmt not in FORMATS:
        raise DeployError(f"unknown KV cache format {fmt!r}; choose one of {', '.join(KV_QUANT_DTYPES)}")
    f, graph = FORMATS[fmt], model.graph
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name: k for k, v in enumerate(graph.outputs)}
    layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
    missing = [t for t in kv_targets(layers) if t not in kv_amax]
    bad = {k: v for k, v in kv_amax.items() if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0}
    if not layers or missing or bad:
        raise DeployError(f"KV cache amax must cover every layer's key and value with finite positive values "
                          f"(graph layers {layers}; missing {missing[:4]}; bad {dict(list(bad.items())[:4])})")
    record, float_types = {"format": f.name, "tensors": {}}, set()
    position = {id(n): k for k, n in enumerate(graph)}  # graph order before any insertion
    for target in kv_targets(layers):
        i, kind = int(target.split(".")[1]), target.split(".")[2]
        past_name, present_name = _io_names(i, kind)
        past, present = inputs.get(past_name), graph.outputs[outputs[present_name]]
        concat = present.producer()
        if past is None or concat is None or concat.op_type != "Concat" or concat.inputs[0] is not past:
            raise DeployError(f"{present_name} is not Concat({past_name}, new): not a portable decoder graph")
        dtype = past.dtype
        float_types.add(dtype)
        sval = _scales(np.array(float(kv_amax[target])), f, dtype.numpy())
        scale = ir.Value(name=f"{target}.kv_scale", type=ir.TensorType(dtype), shape=ir.Shape([]),
                         const_value=ir.Tensor(sval, dtype=dtype, name=f"{target}.kv_scale"))
        zero = ir.Value(name=f"{target}.kv_zero_point", type=ir.TensorType(f.qtype), shape=ir.Shape([]),
                        const_value=ir.Tensor(np.asarray(_codes(np.zeros((), np.float32), f)), dtype=f.qtype,
                                              name=f"{target}.kv_zero_point"))
        graph.register_initializer(scale)
        graph.register_initializer(zero)
        # past: stored codes in, dequantized for the Concat (and the Shape that reads its length).
        past.type = ir.TensorType(f.qtype)
        past_dq = ir.Value(name=f"{past_name}.dq", type=ir.TensorType(dtype), shape=past.shape)
        uses = list(past.uses())
        first = min((node for node, _ in uses), key=lambda n: position[id(n)])  # e.g. a Shape before the Concat
        graph.insert_before(first, ir.Node("", "DequantizeLinear", [past, scale, zero], outputs=[past_dq],
                                           name=past_dq.name))
        for node, index in uses:
            node.replace_input_with(index, past_dq)
        # present: the Concat's fp result is quantized into the output; attention reads it dequantized.
        present.name = f"{present_name}.fp"
        q = ir.Value(name=present_name, type=ir.TensorType(f.qtype), shape=present.shape)
        dq = ir.Value(name=f"{present_name}.dq", type=ir.TensorType(dtype), shape=present.shape)
        uses = list(present.uses())
        nodes = [ir.Node("", "QuantizeLinear", [present, scale, zero], outputs=[q], name=q.name),
                 ir.Node("", "DequantizeLinear", [q, scale, zero], outputs=[dq], name=dq.name)]
        graph.insert_after(concat, nodes)
        for node, index in uses:
            node.replace_input_with(index, dq)
        graph.outputs[outputs[present_name]] = q
        record["tensors"][target] = {"amax": float(kv_amax[target]), "scale": float(sval.astype(np.float32))}
    # float8 types and float16/bfloat16 scales (DequantizeLinear-19's T2) need opset 19.
    if f.name == "fp8" or float_types != {ir.DataType.FLOAT}:
        model.opset_imports[""] = max(model.opset_imports.get("", FP8_MIN_OPSET), FP8_MIN_OPSET)
    model.metadata_props[RECORD_KEY] = json.dumps(record, sort_keys=True)
    return model


def kv_record(model: ir.Model) -> dict | None:
    """The record `quantize_kv_cache` stored; None if the graph's cache is not quantized."""
    text = model.metadata_props.get(RECORD_KEY)
    return None if text is None else json.loads(text)
