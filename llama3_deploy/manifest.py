"""The export manifest: what was exported, how, and how it validated. Read by the runtime; no torch."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
from pathlib import Path

from . import contract
from .config import LlamaConfig, RopeScaling, read_json
from .errors import DeployError

MANIFEST_FILE = "manifest.json"
FORMAT = "llama3-deploy/onnx-decoder"
SUPPORTED_FLAVORS = contract.FLAVORS
TOOL_PACKAGES = ("llama3-deploy", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "onnx-ir",
                 "safetensors", "tokenizers", "numpy")


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TOOL_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


@dataclasses.dataclass(frozen=True)
class Manifest:
    path: Path
    raw: dict
    config: LlamaConfig
    dtype: str
    flavor: str
    logits: str                # "all" or "last": which positions the graph returns logits for
    quantization: dict | None  # the weight-only quantization spec (export.quantize.QuantSpec.to_json), if any
    io: contract.DecoderIO
    argmax: bool = False       # the graph also returns greedy ids (contract.NEXT_TOKEN)
    kv_dtype: str | None = None  # a quantized KV cache's dtype (calibrate --kv-cache); None: the weights' dtype


def load_manifest(model_dir: str | Path) -> Manifest:
    """Read and check an export's manifest.json; errors name the file and the problem."""
    path = Path(model_dir) / MANIFEST_FILE
    raw = read_json(path, what="export manifest")
    if raw.get("format") != FORMAT:
        raise DeployError(f"{path} is not a llama3-deploy export manifest (format {raw.get('format')!r})")
    flavor = raw.get("flavor")
    if flavor not in SUPPORTED_FLAVORS:
        raise DeployError(f"{path}: unsupported graph flavor {flavor!r} (supported: {', '.join(SUPPORTED_FLAVORS)})")
    try:
        cfg = dict(raw["config"])
        if cfg.get("rope_scaling"):
            cfg["rope_scaling"] = RopeScaling(**cfg["rope_scaling"])
        cfg["eos_token_ids"] = tuple(cfg.get("eos_token_ids", ()))
        config = LlamaConfig(**cfg)
        io = contract.DecoderIO.from_json(raw["io"])
        dtype = raw["dtype"]
        logits = raw.get("logits", contract.DEFAULT_LOGITS.get(flavor))
        quantization = raw.get("quantization")
        argmax = bool(raw.get("argmax", False))
        kv_dtype = raw.get("kv_dtype")
        expected = contract.decoder_io(config, dtype, flavor=flavor, logits=logits, argmax=argmax, kv_dtype=kv_dtype)
    except (KeyError, TypeError, ValueError) as e:
        raise DeployError(f"{path} is malformed: {e}") from None
    if io != expected:
        raise DeployError(f"{path}: its I/O contract does not match its config, dtype, flavor, logits mode, "
                          "argmax and KV cache dtype")
    return Manifest(path, raw, config, dtype, flavor, logits, quantization, io, argmax, kv_dtype)
