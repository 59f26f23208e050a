"""The decoder's I/O contract: names, dtypes and symbolic axes, defined once.

Export names the graph's inputs and outputs from here, the runtime binds buffers from here, the
manifest records it, and tests check graphs against it. The names are the ones Optimum's
ORTModelForCausalLM and onnxruntime-genai use. No torch here.
"""
from __future__ import annotations

import dataclasses
from typing import Union

from .config import LlamaConfig

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"

# Symbolic axis names.
BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST_SEQUENCE = "past_sequence_length"
TOTAL_SEQUENCE = "total_sequence_length"

Dim = Union[int, str]

EXPORT_DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def normalize_dtype(name: str) -> str:
    """fp32/fp16/bf16 or float32/float16/bfloat16 -> the canonical name; ValueError otherwise."""
    canonical = DTYPE_ALIASES.get(name, name)
    if canonical not in EXPORT_DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {', '.join([*DTYPE_ALIASES, *EXPORT_DTYPES])}")
    return canonical
LOGITS_DTYPE = "float32"  # logits leave the graph in fp32 whatever the weights' dtype


def past_key(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key(layer: int) -> str:
    return f"present.{layer}.key"


def present_value(layer: int) -> str:
    return f"present.{layer}.value"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: "int64", "float32", "float16", "bfloat16"
    shape: tuple[Dim, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclasses.dataclass(frozen=True)
class DecoderIO:
    """Inputs and outputs, in graph order: ids, mask, positions, then (key, value) per layer."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def past_names(self) -> list[str]:
        return [s.name for s in self.inputs[3:]]

    @property
    def present_names(self) -> list[str]:
        return [s.name for s in self.outputs[1:]]

    def to_json(self) -> dict:
        return {"inputs": [s.to_json() for s in self.inputs], "outputs": [s.to_json() for s in self.outputs]}

    @classmethod
    def from_json(cls, d: dict) -> DecoderIO:
        return cls(tuple(TensorSpec.from_json(x) for x in d["inputs"]),
                   tuple(TensorSpec.from_json(x) for x in d["outputs"]))


def decoder_io(config: LlamaConfig, dtype: str) -> DecoderIO:
    """The contract of the portable decoder graph for a config and a weight dtype."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    kv_in = (BATCH, config.num_key_value_heads, PAST_SEQUENCE, config.head_dim)
    kv_out = (BATCH, config.num_key_value_heads, TOTAL_SEQUENCE, config.head_dim)
    inputs = [TensorSpec(INPUT_IDS, "int64", (BATCH, SEQUENCE)),
              TensorSpec(ATTENTION_MASK, "int64", (BATCH, TOTAL_SEQUENCE)),
              TensorSpec(POSITION_IDS, "int64", (BATCH, SEQUENCE))]
    outputs = [TensorSpec(LOGITS, LOGITS_DTYPE, (BATCH, SEQUENCE, config.vocab_size))]
    for i in range(config.num_hidden_layers):
        inputs += [TensorSpec(past_key(i), dtype, kv_in), TensorSpec(past_value(i), dtype, kv_in)]
        outputs += [TensorSpec(present_key(i), dtype, kv_out), TensorSpec(present_value(i), dtype, kv_out)]
    return DecoderIO(tuple(inputs), tuple(outputs))
