"""The one table of dtypes: canonical name -> element size, ONNX type number, ONNX Runtime type string.

numpy, onnx_ir and torch types are derived from this table where a stage needs them (`numpy_dtype`,
`ir.DataType(onnx_type(name))`, `getattr(torch, name)`: the canonical names are torch's and numpy's names).
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class DType:
    name: str
    itemsize: int
    onnx: int  # onnx.TensorProto.DataType
    ort: str   # ONNX Runtime's NodeArg.type


TABLE: dict[str, DType] = {d.name: d for d in (
    DType("float32", 4, 1, "tensor(float)"),
    DType("float16", 2, 10, "tensor(float16)"),
    DType("bfloat16", 2, 16, "tensor(bfloat16)"),
    DType("int64", 8, 7, "tensor(int64)"),
    DType("int32", 4, 6, "tensor(int32)"),
    DType("int8", 1, 3, "tensor(int8)"),
    DType("uint8", 1, 2, "tensor(uint8)"),
    DType("float8e4m3fn", 1, 17, "tensor(float8e4m3fn)"),
)}
EXPORT_DTYPES = ("float32", "float16", "bfloat16")  # weight dtypes an export can have (and its default KV dtype)
KV_QUANT_DTYPES = {"int8": "int8", "fp8": "float8e4m3fn"}  # calibrate --kv-cache: a quantized KV cache's dtype
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
FROM_ORT = {d.ort: d.name for d in TABLE.values()}
FROM_ONNX = {d.onnx: d.name for d in TABLE.values()}


def normalize_dtype(name: str) -> str:
    """fp32/fp16/bf16 or float32/float16/bfloat16 -> the canonical name; ValueError otherwise."""
    canonical = DTYPE_ALIASES.get(name, name) if isinstance(name, str) else name
    if canonical not in EXPORT_DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {', '.join([*DTYPE_ALIASES, *EXPORT_DTYPES])}")
    return canonical


def itemsize(name: str) -> int:
    return TABLE[name].itemsize


def onnx_type(name: str) -> int:
    return TABLE[name].onnx


def numpy_dtype(name: str) -> np.dtype:
    """numpy's dtype for a name; bfloat16 and float8e4m3fn come from ml_dtypes (installed with the export extra)."""
    if name in ("bfloat16", "float8e4m3fn"):
        import ml_dtypes
        return np.dtype(getattr(ml_dtypes, {"float8e4m3fn": "float8_e4m3fn"}.get(name, name)))
    return np.dtype(name)


def binding_dtype(name: str) -> tuple[np.dtype, object]:
    """(numpy storage dtype, element type ONNX Runtime's IOBinding takes) for a runtime buffer. float8 has no
    numpy type ONNX Runtime accepts: raw uint8 storage, bound by its ONNX type number."""
    if name == "float8e4m3fn":
        return np.dtype(np.uint8), onnx_type(name)
    return numpy_dtype(name), numpy_dtype(name)
