"""Block-wise weight-only quantization into ONNX Runtime's MatMulNBits / GatherBlockQuantized layouts.

The export streams weights one tensor at a time, so each weight is quantized in slices of output
columns (CHUNK_COLUMNS at a time) and concatenated: peak memory stays a few slices, not a copy of
the model. Packing is ORT's own: RTN calls its C++ quantizer, HQQ its HQQWeightOnlyQuantizer.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from llama3_deploy.errors import DeployError

QUANT_METHODS = ("rtn", "hqq")
QUANT_BITS = (4, 8)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# Output columns (N) quantized per slice; blocks run along K, so slicing N never splits a block.
CHUNK_COLUMNS = 4096
_SCALE_DTYPES = (np.float32, np.float16)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize the decoder's weights (see `check` for the constraints)."""

    bits: int = 4              # 4 or 8
    block_size: int = 32       # power of two, 16..256, along the input (K) axis
    symmetric: bool = False    # symmetric: no zero points stored; asymmetric: uint8 zero points
    method: str = "rtn"        # "rtn" (ORT's C++ round-to-nearest) or "hqq" (data-free Half-Quadratic Quantization)
    accuracy_level: int = 4    # MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute
    lm_head: bool = True       # quantize the output head too
    embedding: bool = False    # quantize the token embedding (GatherBlockQuantized, always RTN)

    def __post_init__(self) -> None:
        # bool is an int subclass: refuse it for the numeric fields so `bits=True` is not read as 1.
        for name in ("bits", "block_size", "accuracy_level"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise DeployError(f"quantization {name} must be an integer (got {value!r})")
        for name in ("symmetric", "lm_head", "embedding"):
            if not isinstance(getattr(self, name), bool):
                raise DeployError(f"quantization {name} must be true or false (got {getattr(self, name)!r})")
        if not isinstance(self.method, str):
            raise DeployError(f"quantization method must be a string (got {self.method!r})")

    def check(self, config) -> None:
        """Raise DeployError naming every problem with this spec for `config` (a LlamaConfig)."""
        problems = []
        if self.bits not in QUANT_BITS:
            problems.append(f"bits {self.bits} is not supported (choose from {', '.join(map(str, QUANT_BITS))})")
        bs = self.block_size
        if not (16 <= bs <= 256 and bs & (bs - 1) == 0):
            problems.append(f"block size {bs} must be a power of two between 16 and 256")
        if bs > 0:
            # Every K a MatMulNBits sees: hidden_size feeds q/k/v, gate/up and lm_head (and is the
            # embedding's E), q_size feeds o_proj, intermediate_size feeds down_proj.
            ks = {"hidden_size": config.hidden_size, "q_size": config.q_size,
                  "intermediate_size": config.intermediate_size}
            for name, k in ks.items():
                if k % bs:
                    problems.append(f"block size {bs} does not divide {name} {k}")
        if self.method not in QUANT_METHODS:
            problems.append(f"quantization method {self.method!r} is not supported "
                            f"(choose from {', '.join(QUANT_METHODS)})")
        elif self.method == "hqq" and self.symmetric:
            problems.append("method 'hqq' cannot be symmetric=True: HQQ fits a zero point per block, "
                            "so it is asymmetric by nature")
        if self.accuracy_level not in ACCURACY_LEVELS:
            problems.append(f"accuracy_level {self.accuracy_level} must be one of 0..4")
        if problems:
            raise DeployError("invalid quantization spec: " + "; ".join(problems))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> QuantSpec:
        """Inverse of `to_json`; missing keys take the defaults, unknown keys are refused."""
        if not isinstance(d, dict):
            raise DeployError(f"quantization spec must be a JSON object (got {type(d).__name__})")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise DeployError(f"unknown quantization spec keys: {', '.join(unknown)}")
        return cls(**d)

    @property
    def label(self) -> str:
        return f"int{self.bits}-{self.method}-{'sym' if self.symmetric else 'asym'}-b{self.block_size}"


@dataclasses.dataclass
class QuantizedMatrix:
    """Initializers of one quantized weight, ready for MatMulNBits (or GatherBlockQuantized)."""

    packed: np.ndarray              # uint8 [N, K // block_size, block_size * bits // 8]; embedding [V, E * bits // 8]
    scales: np.ndarray              # scale dtype, [N, K // block_size]
    zero_points: np.ndarray | None  # None when symmetric; uint8 [N, ceil(blocks * bits / 8)]; HQQ int4: float [N, blocks]


def quantized_layout(k: int, n: int, spec: QuantSpec, *, embedding: bool = False) -> dict[str, tuple]:
    """Shapes and kinds of the tensors `quantize_matrix` (or, with embedding=True for a [n, k] table,
    `quantize_embedding`) returns for a [k, n] weight: {"packed" | "scales" | "zero_points": (shape, kind)},
    kind "uint8" or "scale" (the scale dtype); no "zero_points" when symmetric. Lets a graph declare the
    initializers before any weight is read."""
    blocks, per_byte = k // spec.block_size, 8 // spec.bits
    packed = (n, k * spec.bits // 8) if embedding else (n, blocks, spec.block_size // per_byte)
    layout = {"packed": (packed, "uint8"), "scales": ((n, blocks), "scale")}
    if not spec.symmetric:
        float_zero = spec.method == "hqq" and spec.bits == 4 and not embedding  # see _hqq_columns
        layout["zero_points"] = ((n, blocks), "scale") if float_zero else ((n, -(-blocks // per_byte)), "uint8")
    return layout


def matmul_nbits_attributes(k: int, n: int, spec: QuantSpec) -> dict:
    return {"K": k, "N": n, "bits": spec.bits, "block_size": spec.block_size, "accuracy_level": spec.accuracy_level}


def gather_block_quantized_attributes(spec: QuantSpec) -> dict:
    return {"gather_axis": 0, "quantize_axis": 1, "block_size": spec.block_size, "bits": spec.bits}


def quantize_matrix(weight: np.ndarray, spec: QuantSpec, *, scale_dtype=np.float32) -> QuantizedMatrix:
    """weight is [K, N] (input x output, as the graph's MatMul uses it), float32/float16."""
    scale_dtype = _scale_dtype(scale_dtype)
    if weight.ndim != 2 or weight.shape[0] % spec.block_size:
        raise ValueError(f"expected a [K, N] weight with K a multiple of {spec.block_size}, got {weight.shape}")
    quant = _hqq_columns if spec.method == "hqq" else _rtn_columns
    return concat_quantized([quant(weight[:, c:c + CHUNK_COLUMNS], spec, scale_dtype)
                             for c in range(0, weight.shape[1], CHUNK_COLUMNS)])


def concat_quantized(parts: list[QuantizedMatrix]) -> QuantizedMatrix:
    """Quantized slices of output channels (N, or an embedding's rows) joined in order: every array is laid out
    channel-major, and each channel is quantized on its own, so this equals quantizing the whole at once."""
    zps = [p.zero_points for p in parts]
    return QuantizedMatrix(np.concatenate([p.packed for p in parts]), np.concatenate([p.scales for p in parts]),
                           None if zps[0] is None else np.concatenate(zps))


def dequantize_matrix(q: QuantizedMatrix, k: int, n: int, spec: QuantSpec) -> np.ndarray:
    """The [K, N] float32 weight MatMulNBits computes with (reference for tests and error reports)."""
    blocks = k // spec.block_size
    codes = _unpack(q.packed.reshape(n, -1), spec.bits)[:, :k].reshape(n, blocks, spec.block_size)
    if q.zero_points is None:  # MatMulNBits' default zero point: the middle of the code range
        zp = np.full((n, blocks), 2 ** (spec.bits - 1), np.float32)
    elif q.zero_points.dtype == np.uint8:
        zp = _unpack(q.zero_points.reshape(n, -1), spec.bits)[:, :blocks].astype(np.float32)
    else:
        zp = q.zero_points.astype(np.float32).reshape(n, blocks)
    scales = q.scales.astype(np.float32).reshape(n, blocks)
    return ((codes - zp[..., None]) * scales[..., None]).reshape(n, k).T


def quantize_embedding(table: np.ndarray, spec: QuantSpec, *, scale_dtype=np.float32) -> QuantizedMatrix:
    """table is [V, E]; GatherBlockQuantized layout (quantize_axis=1, gather_axis=0, block along E).

    With uint8 data GatherBlockQuantized follows MatMulNBits' conventions (low nibble first, zero
    points packed per row, default zero point 8 / 128), and MatMulNBits' [N, blocks, blob] layout
    of table.T is exactly [V, E * bits / 8] row-major, so ORT's C++ RTN quantizer serves here too.
    Always RTN: GatherBlockQuantized takes no float zero points, which HQQ would need.
    """
    v, e = table.shape
    q = quantize_matrix(table.T, dataclasses.replace(spec, method="rtn"), scale_dtype=scale_dtype)
    return QuantizedMatrix(q.packed.reshape(v, e * spec.bits // 8), q.scales, q.zero_points)


def dequantize_embedding(q: QuantizedMatrix, v: int, e: int, spec: QuantSpec) -> np.ndarray:
    """The [V, E] float32 table GatherBlockQuantized gathers rows from."""
    return dequantize_matrix(q, e, v, spec).T


def _scale_dtype(dtype) -> type:
    dtype = np.dtype(dtype).type
    if dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be float32 or float16, got {np.dtype(dtype).name}")
    return dtype


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., B] -> codes [..., B * 8 // bits] as float32, low nibble first (ORT's order)."""
    if bits == 8:
        return packed.astype(np.float32)
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1).astype(np.float32)


def _rtn_columns(w: np.ndarray, spec: QuantSpec, scale_dtype) -> QuantizedMatrix:
    """ORT's C++ RTN kernel, called as DefaultWeightOnlyQuantizer.qbits_block_quant (QOperator) does."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    # The kernel takes weight and scales in one dtype (ORT quantizes fp16 models this way too).
    w = np.ascontiguousarray(w, dtype=scale_dtype)
    rows, cols = w.shape
    kpack = 8 // spec.bits
    blocks = rows // spec.block_size
    packed = np.zeros((cols, blocks, spec.block_size // kpack), np.uint8)
    zero_points = np.zeros((cols, (blocks + kpack - 1) // kpack), np.uint8)
    scales = np.zeros((cols, blocks), scale_dtype)
    kernel = quantize_matmul_4bits if spec.bits == 4 else quantize_matmul_8bits
    kernel(packed, w, scales, zero_points, spec.block_size, cols, rows, spec.symmetric)
    return QuantizedMatrix(packed, scales, None if spec.symmetric else zero_points)


def _hqq_columns(w: np.ndarray, spec: QuantSpec, scale_dtype) -> QuantizedMatrix:
    """ORT's HQQWeightOnlyQuantizer (torch, imported only here) on one slice of columns."""
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    quantizer = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=spec.block_size, bits=spec.bits))
    wt = torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float32))  # [N, K]: blocks along rows, as ORT's quantize()
    codes, scales, zero = quantizer.quantize_internal(wt, bits=spec.bits, group_size=spec.block_size)
    n, k = codes.shape
    scales = scales.numpy().astype(scale_dtype)
    if spec.bits == 4:
        # ORT 1.32's CPU MatMulNBits accepts float zero points (in the scale dtype) for 4 bits:
        # keep HQQ's fitted float zero points, as ORT's own HQQ export does.
        zero_points = zero.numpy().astype(scale_dtype)
    else:
        # ...but refuses them for 8 bits ("use uint8 zero points"): round the zero point and
        # re-round the codes against it, so stored codes, scales and zero points stay consistent.
        zq = zero.round().clamp(0, 255)
        inv = 1.0 / torch.from_numpy(scales.astype(np.float32))
        codes = torch.round(wt.reshape(n, -1, spec.block_size) * inv[..., None] + zq[..., None])
        codes = codes.clamp(0, 255).reshape(n, k).int()
        zero_points = zq.numpy().astype(np.uint8)
    packed = torch.zeros((n, k * spec.bits // 8), dtype=torch.uint8)
    quantizer.pack_on_row_fast_248bit(packed, codes, spec.bits)
    return QuantizedMatrix(packed.numpy().reshape(n, k // spec.block_size, -1), scales, zero_points)
