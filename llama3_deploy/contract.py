"""The decoder's I/O contract: names, dtypes and symbolic axes, defined once.

Export names the graph's inputs and outputs from here, the runtime binds buffers from here, the
manifest records it, and tests check graphs against it. The names are the ones Optimum's
ORTModelForCausalLM and onnxruntime-genai use. No torch here.
"""
from __future__ import annotations

import dataclasses
from typing import Union

from .config import LlamaConfig
from .dtypes import EXPORT_DTYPES, KV_QUANT_DTYPES

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
NEXT_TOKEN = "next_token"  # optional (optimized flavor, --argmax): greedy ids, ArgMax of logits inside the graph
HEAD_OUTPUTS = (LOGITS, NEXT_TOKEN)  # the outputs that are not KV cache

# Symbolic axis names.
BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST_SEQUENCE = "past_sequence_length"
TOTAL_SEQUENCE = "total_sequence_length"
MAX_SEQUENCE = "max_sequence_length"  # optimized flavor: the fixed KV buffer length, chosen by the runtime

# Graph flavors. "portable": standard ONNX ops only (TensorRT and other runtimes), past in, a new present out.
# "optimized": ONNX Runtime contrib ops; past and present are one fixed buffer [B, K, max_len, D] written in
# place, and the mask only carries each row's length (a row's ones count), not its positions.
FLAVORS = ("portable", "optimized")
# Which positions the graph computes logits for: every new position, or only the last (prefill then does
# one head matmul instead of S). The portable graph always computes all.
LOGITS_MODES = ("all", "last")
DEFAULT_LOGITS = {"portable": "all", "optimized": "last"}  # the one place each flavor's default is decided

# Name templates in onnxruntime-genai's "%d" form; the per-layer names below are made from them.
PAST_KEY_TEMPLATE = "past_key_values.%d.key"
PAST_VALUE_TEMPLATE = "past_key_values.%d.value"
PRESENT_KEY_TEMPLATE = "present.%d.key"
PRESENT_VALUE_TEMPLATE = "present.%d.value"

Dim = Union[int, str]

# An export directory's files (besides the checkpoint's config, generation config and tokenizer files).
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # every weight, external data beside the graph
# Tokenizer files an export carries when its checkpoint (or --tokenizer DIR) has them; the first two each suffice.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")

LOGITS_DTYPE = "float32"  # logits leave the graph in fp32 whatever the weights' dtype


def past_key(layer: int) -> str:
    return PAST_KEY_TEMPLATE % layer


def past_value(layer: int) -> str:
    return PAST_VALUE_TEMPLATE % layer


def present_key(layer: int) -> str:
    return PRESENT_KEY_TEMPLATE % layer


def present_value(layer: int) -> str:
    return PRESENT_VALUE_TEMPLATE % layer


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
    """Inputs and outputs, in graph order: ids, mask, [positions,] then (key, value) per layer."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def past_names(self) -> list[str]:
        return [s.name for s in self.inputs[len(self.inputs) - len(self.present_names):]]

    @property
    def present_names(self) -> list[str]:
        return [s.name for s in self.outputs if s.name not in HEAD_OUTPUTS]

    @property
    def kv_dtype(self) -> str:
        """The KV cache's dtype: the weights' dtype, or int8 / float8e4m3fn for a calibrated quantized cache."""
        return next(s.dtype for s in self.inputs if s.name == past_key(0))

    @property
    def has_next_token(self) -> bool:
        return any(s.name == NEXT_TOKEN for s in self.outputs)

    def to_json(self) -> dict:
        return {"inputs": [s.to_json() for s in self.inputs], "outputs": [s.to_json() for s in self.outputs]}

    @classmethod
    def from_json(cls, d: dict) -> DecoderIO:
        return cls(tuple(TensorSpec.from_json(x) for x in d["inputs"]),
                   tuple(TensorSpec.from_json(x) for x in d["outputs"]))


def decoder_io(config: LlamaConfig, dtype: str, *, flavor: str = "portable", logits: str = "all",
               argmax: bool = False, kv_dtype: str | None = None) -> DecoderIO:
    """The contract of the decoder graph for a config, a weight dtype, a flavor, a logits mode, whether the
    graph also returns greedy ids, and the KV cache's dtype (None: the weights' dtype; int8 or float8e4m3fn
    for a calibrated portable graph whose cache is quantized, see calibration/kv_qdq.py).

    portable:  ids [B, S], mask [B, P+S] (0 = padding), positions [B, S], past [B, K, P, D] -> present [B, K, P+S, D]
    optimized: ids [B, S], mask [B, T] (T <= M; row b's count of ones is its length after this step, so
               its new tokens sit at positions length_b - S ... length_b - 1), past = present [B, K, M, D]
               (one buffer the graph writes in place; M is the runtime's capacity); no positions input.
               Our runtime binds T = M, so every decode step has the same shapes (CUDA graphs);
               onnxruntime-genai binds a growing T.
    logits:    [B, S, V] ("all") or [B, 1, V] ("last", optimized only), always fp32.
    next_token (argmax, optimized only): [B, S] or [B, 1] int64, the ArgMax of logits over V (first index on
               ties, like numpy), so greedy decoding copies B ids to the host instead of B x V logits.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    if flavor not in FLAVORS:
        raise ValueError(f"unknown graph flavor {flavor!r}; choose one of {', '.join(FLAVORS)}")
    if logits not in LOGITS_MODES or (flavor == "portable" and logits != "all"):
        raise ValueError(f"logits mode {logits!r} is not available for the {flavor} flavor")
    if argmax and flavor != "optimized":
        raise ValueError("in-graph argmax (next_token) is available for the optimized flavor only")
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    if kv_dtype != dtype and (kv_dtype not in KV_QUANT_DTYPES.values() or flavor != "portable"):
        raise ValueError(f"a {kv_dtype!r} KV cache is not available for a {dtype} {flavor} graph "
                         f"(quantized caches: {', '.join(KV_QUANT_DTYPES.values())}, portable flavor)")
    inputs = [TensorSpec(INPUT_IDS, "int64", (BATCH, SEQUENCE))]
    logits_len: Dim = SEQUENCE if logits == "all" else 1
    outputs = [TensorSpec(LOGITS, LOGITS_DTYPE, (BATCH, logits_len, config.vocab_size))]
    if argmax:
        outputs.append(TensorSpec(NEXT_TOKEN, "int64", (BATCH, logits_len)))
    if flavor == "portable":
        kv_in = (BATCH, config.num_key_value_heads, PAST_SEQUENCE, config.head_dim)
        kv_out = (BATCH, config.num_key_value_heads, TOTAL_SEQUENCE, config.head_dim)
        inputs += [TensorSpec(ATTENTION_MASK, "int64", (BATCH, TOTAL_SEQUENCE)),
                   TensorSpec(POSITION_IDS, "int64", (BATCH, SEQUENCE))]
    else:
        kv_in = kv_out = (BATCH, config.num_key_value_heads, MAX_SEQUENCE, config.head_dim)
        inputs += [TensorSpec(ATTENTION_MASK, "int64", (BATCH, TOTAL_SEQUENCE))]
    for i in range(config.num_hidden_layers):
        inputs += [TensorSpec(past_key(i), kv_dtype, kv_in), TensorSpec(past_value(i), kv_dtype, kv_in)]
        outputs += [TensorSpec(present_key(i), kv_dtype, kv_out), TensorSpec(present_value(i), kv_dtype, kv_out)]
    return DecoderIO(tuple(inputs), tuple(outputs))
