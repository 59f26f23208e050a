"""llama3-deploy: Meta-Llama-3 Instruct from Hugging Face safetensors to a validated ONNX decoder and a
light ONNX Runtime token loop.

One import root. The core modules here (config, contract, manifest, errors, fsutil) import nothing above
them; the stages install beside them from the repository's top-level folders:

    llama3_deploy.export       checkpoint -> validated ONNX decoder (needs the [export] extra: torch)
    llama3_deploy.runtime      the token loop on ONNX Runtime (the base install; no torch)
    llama3_deploy.calibration  calibration data and the small trained quality model
    llama3_deploy.benchmarks   latency, memory and quality measurements (the [bench] extra)

    from llama3_deploy import Generator, SamplingParams   # lazy: importing llama3_deploy loads nothing
"""
from __future__ import annotations

_RUNTIME_NAMES = ("ChatFormat", "GenerationResult", "Generator", "SamplingParams", "StreamDecoder", "Tokenizer")
__all__ = list(_RUNTIME_NAMES)


def __getattr__(name: str):
    if name in _RUNTIME_NAMES:
        from . import runtime
        return getattr(runtime, name)
    raise AttributeError(f"module 'llama3_deploy' has no attribute {name!r}")
