"""What one export builds, decided once and handed down: config, dtype, graph flavor and options, I/O contract."""
from __future__ import annotations

import dataclasses

from llama3_deploy import contract
from llama3_deploy.config import LlamaConfig
from llama3_deploy.dtypes import KV_QUANT_DTYPES, normalize_dtype
from llama3_deploy.errors import DeployError

from .quantize import QuantSpec


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    """The graph an export writes. `io` is the decoder's I/O contract, computed once from the rest; every stage
    (build, structure check, numeric check, manifest) reads it from here."""

    config: LlamaConfig
    dtype: str                          # canonical: float32, float16, bfloat16
    flavor: str                         # contract.FLAVORS
    logits: str                         # contract.LOGITS_MODES
    quantization: QuantSpec | None = None
    argmax: bool = False
    kv_dtype: str | None = None         # None: the weights' dtype; int8/float8e4m3fn: calibrate --kv-cache
    io: contract.DecoderIO = dataclasses.field(init=False, compare=False, repr=False)
    # The graph as traced, before a transform quantizes its KV cache (equal to io when kv_dtype is None).
    trace_io: contract.DecoderIO = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        def io(kv_dtype):
            return contract.decoder_io(self.config, self.dtype, flavor=self.flavor, logits=self.logits,
                                       argmax=self.argmax, kv_dtype=kv_dtype)
        object.__setattr__(self, "io", io(self.kv_dtype))
        object.__setattr__(self, "trace_io", io(None) if self.kv_dtype is not None else self.io)

    @classmethod
    def make(cls, config: LlamaConfig, *, dtype: str, flavor: str, logits: str | None = None,
             quantization: QuantSpec | None = None, argmax: bool = False, kv_dtype: str | None = None) -> ExportSpec:
        """Check the options against each other and the config (DeployError naming the problem); `logits`
        None takes the flavor's default."""
        try:
            dtype = normalize_dtype(dtype)
        except ValueError as e:
            raise DeployError(str(e)) from None
        if flavor not in contract.FLAVORS:
            raise DeployError(f"unknown --flavor {flavor!r}; choose one of {', '.join(contract.FLAVORS)}")
        logits = contract.DEFAULT_LOGITS[flavor] if logits is None else logits
        if logits not in contract.LOGITS_MODES:
            raise DeployError(f"unknown --logits {logits!r}; choose one of {', '.join(contract.LOGITS_MODES)}")
        if flavor == "portable" and (logits != "all" or quantization is not None or argmax):
            raise DeployError("the portable flavor computes logits for every position and has no weight-only "
                              "quantization (that is ONNX Runtime's MatMulNBits) or in-graph argmax; "
                              "use --flavor optimized")
        if flavor == "optimized" and dtype == "bfloat16":
            raise DeployError("the optimized flavor supports fp32 and fp16 (ONNX Runtime's CPU kernels for "
                              "GroupQueryAttention have no bfloat16)")
        if quantization is not None:
            quantization.check(config)
        if kv_dtype is not None and (flavor != "portable" or kv_dtype not in KV_QUANT_DTYPES.values()):
            raise DeployError(f"a {kv_dtype} KV cache is a calibrated Q/DQ option of the portable flavor "
                              f"(choose one of {', '.join(KV_QUANT_DTYPES.values())})")
        return cls(config, dtype, flavor, logits, quantization, bool(argmax), kv_dtype)

    def with_config(self, config: LlamaConfig) -> ExportSpec:
        """The same graph options for another config (the reduced export that validation runs)."""
        return dataclasses.replace(self, config=config)

    def options_json(self) -> dict:
        return {"flavor": self.flavor, "logits": self.logits, "argmax": self.argmax, "kv_dtype": self.kv_dtype,
                "quantization": self.quantization.to_json() if self.quantization else None}
