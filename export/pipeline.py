"""`llama3-deploy export`: checkpoint -> validated ONNX decoder directory, in bounded memory."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

from llama3_deploy import contract
from llama3_deploy.config import LlamaConfig, human_bytes
from llama3_deploy.dtypes import itemsize, normalize_dtype
from llama3_deploy.errors import DeployError
from llama3_deploy.fsutil import atomic_directory, check_output_dir
from llama3_deploy.manifest import MANIFEST_FILE, tool_versions

from . import defaults, genai, onnx_export, optimized, validate
from .quantize import QuantSpec
from .weights import SafetensorsCheckpoint, WeightSource, name_table, open_source

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
REDUCED_MAX_LAYERS = 2
REDUCED_VOCAB = 32768


@dataclasses.dataclass
class ExportResult:
    output: Path
    manifest: dict

    def summary(self) -> str:
        m = self.manifest
        v = m.get("validation", {})
        lines = [f"exported {m['source']['description']} -> {self.output}",
                 f"  {m['flavor']} graph (logits: {m['logits']}"
                 + (f", weights {QuantSpec.from_json(m['quantization']).label}" if m.get("quantization") else "")
                 + (", in-graph argmax" if m.get("argmax") else "")
                 + f"), dtype {m['dtype']}, opset {m['opset']}, {m['config']['num_hidden_layers']} layers, "
                 f"{m['parameters'] / 1e6:,.1f} M parameters",
                 f"  files: model.onnx {human_bytes(m['files']['model.onnx'])}, "
                 f"{contract.DATA_FILE} {human_bytes(m['files'][contract.DATA_FILE])}",
                 f"  time {m['timings']['total_s']:.1f} s (trace {m['timings']['trace_s']:.1f} s, "
                 f"write {m['timings']['write_s']:.1f} s, validate {m['timings']['validate_s']:.1f} s)"]
        num = v.get("numeric")
        if isinstance(num, dict):
            for s in num["steps"]:
                lines.append(f"  validation {s['step']}: logits max|diff| {s['logits_max_abs_diff']:.3g}, "
                             f"worst {s['worst_tensor']} {s['worst_max_abs_diff']:.3g} (limit {s['worst_limit']:.3g})")
            if num.get("reduced"):
                lines.append(f"  numeric validation on a reduced export of the same checkpoint "
                             f"({num['layers_validated']} layers, first {num['vocab_rows_validated']} vocabulary "
                             f"rows); full graph checked structurally")
        elif num:
            lines.append(f"  numeric validation: {num}")
        return "\n".join(lines)


def weight_bytes(config: LlamaConfig, dtype: str, *, layers: int | None = None) -> int:
    cfg = config if layers is None else config.with_layers(layers)
    return sum(math.prod(e.source_shape) for e in name_table(cfg)) * itemsize(dtype)


@dataclasses.dataclass(frozen=True)
class GraphOptions:
    """Which graph to build: the flavor, the logits it computes, weight-only quantization and in-graph greedy
    ids (the last two optimized only)."""

    flavor: str = defaults.FLAVOR
    logits: str = "all"
    quantization: QuantSpec | None = None
    argmax: bool = False

    def check(self, config: LlamaConfig, dtype: str) -> None:
        if self.flavor not in contract.FLAVORS:
            raise DeployError(f"unknown --flavor {self.flavor!r}; choose one of {', '.join(contract.FLAVORS)}")
        if self.logits not in contract.LOGITS_MODES:
            raise DeployError(f"unknown --logits {self.logits!r}; choose one of {', '.join(contract.LOGITS_MODES)}")
        if self.flavor == "portable" and (self.logits != "all" or self.quantization is not None or self.argmax):
            raise DeployError("the portable flavor computes logits for every position and has no weight-only "
                              "quantization (that is ONNX Runtime's MatMulNBits) or in-graph argmax; "
                              "use --flavor optimized")
        if self.flavor == "optimized" and dtype == "bfloat16":
            raise DeployError("the optimized flavor supports fp32 and fp16 (ONNX Runtime's CPU kernels for "
                              "GroupQueryAttention have no bfloat16)")
        if self.quantization is not None:
            self.quantization.check(config)

    def to_json(self) -> dict:
        return {"flavor": self.flavor, "logits": self.logits, "argmax": self.argmax,
                "quantization": self.quantization.to_json() if self.quantization else None}

    def io(self, config: LlamaConfig, dtype: str) -> contract.DecoderIO:
        return contract.decoder_io(config, dtype, flavor=self.flavor, logits=self.logits, argmax=self.argmax)


def _write_graph(source: WeightSource, config: LlamaConfig, dtype: str, graph: GraphOptions, out_dir: Path, *,
                 progress: bool, desc: str) -> tuple[dict, dict]:
    """Build or trace the graph, then stream its weights to disk. Returns (timings, the weights' layout for
    validate.check_structure)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    if graph.flavor == "portable":
        model = onnx_export.trace(config, dtype)
        t1 = time.perf_counter()
        total = onnx_export.attach_weights(model, source, config, dtype)
        expected = validate.portable_initializers(config, dtype)
    else:
        model = optimized.build(source, config, dtype, logits=graph.logits, quant=graph.quantization,
                                argmax=graph.argmax)
        t1 = time.perf_counter()
        total = sum(v.const_value.nbytes for v in model.graph.initializers.values())
        expected = optimized.expected_initializers(model)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, file=sys.stderr) as bar:
        onnx_export.save(model, out_dir, progress=bar.update)
    return {"trace_s": t1 - t0, "write_s": time.perf_counter() - t1}, expected


def _copy_side_files(source: WeightSource, tmp: Path, tokenizer_dir: Path | None) -> list[str]:
    config = source.config
    src_dir = source.model_dir if isinstance(source, SafetensorsCheckpoint) else None
    if src_dir is not None:
        shutil.copyfile(src_dir / "config.json", tmp / "config.json")
    else:
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    if src_dir is not None and (src_dir / "generation_config.json").exists():
        shutil.copyfile(src_dir / "generation_config.json", tmp / "generation_config.json")
    else:
        (tmp / "generation_config.json").write_text(json.dumps(config.generation_dict(), indent=2))
    tok_src = tokenizer_dir or src_dir
    return copy_tokenizer_files(tok_src, tmp) if tok_src is not None else []


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files `src` has into `dst`; returns their names."""
    copied = [name for name in TOKENIZER_FILES if (Path(src) / name).is_file()]
    for name in copied:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
    return copied


def _ort_working_bytes(config: LlamaConfig, dtype: str, providers: list[str]) -> int:
    """ONNX Runtime's working set for a graph: its weights, plus on the CPU EP for fp16 the fp32 copies it
    casts each weight to at run time (no native x86 fp16 GEMM), up to the largest tensor at once."""
    weights = weight_bytes(config, dtype)
    if dtype == "float32" or providers != ["CPUExecutionProvider"]:
        return weights
    return 3 * weights


def reduced_config(config: LlamaConfig) -> LlamaConfig:
    """The shape numerically validated for models too large to run whole: the first layers, the first
    vocabulary rows of the embedding and head (same tensors, same graph code, fewer rows and blocks)."""
    return dataclasses.replace(config.with_layers(min(REDUCED_MAX_LAYERS, config.num_hidden_layers)),
                               vocab_size=min(config.vocab_size, REDUCED_VOCAB))


def _check_numerics(path: Path, source: WeightSource, config: LlamaConfig, dtype: str, graph: GraphOptions,
                    providers: list[str]) -> dict:
    if graph.flavor == "portable":
        return validate.check_numerics(path, source, config, dtype, providers=providers)
    return validate.check_numerics_optimized(path, source, config, dtype, logits=graph.logits,
                                             quant=graph.quantization, argmax=graph.argmax, providers=providers)


def _validate(source: WeightSource, config: LlamaConfig, dtype: str, graph: GraphOptions, tmp: Path,
              expected: dict, *, max_bytes: int, progress: bool) -> dict:
    io = graph.io(config, dtype)
    structure = validate.check_structure(tmp / contract.MODEL_FILE, io, expected)
    providers = validate.numeric_providers(dtype)
    if providers is None:
        return {"structure": structure, "numeric": "skipped: ONNX Runtime runs bfloat16 graphs only on its "
                "CUDA execution provider, which this machine lacks"}
    if _ort_working_bytes(config, dtype, providers) <= max_bytes:
        numeric = _check_numerics(tmp / contract.MODEL_FILE, source, config, dtype, graph, providers)
        return {"structure": structure, "numeric": {**numeric, "reduced": False}}
    # Too large to run whole beside everything else: export a reduced graph of the same checkpoint
    # and validate that numerically; the full graph was checked structurally above.
    reduced = reduced_config(config)
    sub = tmp / ".validate-reduced"
    sub.mkdir()
    try:
        _write_graph(source, reduced, dtype, graph, sub, progress=progress,
                     desc=f"reduced export ({reduced.num_hidden_layers} layers, {reduced.vocab_size} vocab rows)")
        numeric = _check_numerics(sub / contract.MODEL_FILE, source, reduced, dtype, graph, providers)
    finally:
        shutil.rmtree(sub, ignore_errors=True)
    return {"structure": structure,
            "numeric": {**numeric, "reduced": True, "vocab_rows_validated": reduced.vocab_size}}


def export_model(model: str, output: str | Path, *, dtype: str = defaults.DTYPE, flavor: str = defaults.FLAVOR,
                 logits: str | None = None, quantization: QuantSpec | None = None, argmax: bool = False,
                 validate_export: bool = True,
                 overwrite: bool = False, seed: int = defaults.SEED, tokenizer: str | Path | None = None,
                 validate_max_bytes: int = defaults.VALIDATE_MAX_BYTES, progress: bool = True) -> ExportResult:
    """Export a checkpoint directory (or `random:PRESET`) to a validated ONNX decoder directory.

    flavor "portable" (standard ONNX ops) or "optimized" (ONNX Runtime contrib ops, in-place KV cache);
    logits "all" or "last" (optimized only; its default); quantization: weight-only INT8/INT4 (optimized only);
    argmax: the graph also returns greedy ids (`next_token`), so greedy decoding copies ids, not logits
    (optimized only).

    The output is built in a temporary sibling directory and renamed into place only when complete
    and validated; on any error nothing is left behind and an existing output is untouched.
    """
    try:
        dtype = normalize_dtype(dtype)
    except ValueError as e:
        raise DeployError(str(e)) from None
    graph = GraphOptions(flavor, logits or ("last" if flavor == "optimized" else "all"), quantization, argmax)
    check_output_dir(output, overwrite=overwrite)
    tokenizer_dir = Path(tokenizer) if tokenizer else None
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        raise DeployError(f"tokenizer directory not found: {tokenizer_dir}")
    source = open_source(str(model), seed=seed)
    config = source.config
    graph.check(config, dtype)
    t0 = time.perf_counter()
    with atomic_directory(output, overwrite=overwrite) as tmp:
        timings, expected = _write_graph(source, config, dtype, graph, tmp, progress=progress,
                                         desc="writing weights")
        tokenizer_files = _copy_side_files(source, tmp, tokenizer_dir)
        if graph.flavor == "optimized":
            genai.write_genai_config(tmp, config)
        t1 = time.perf_counter()
        validation = (_validate(source, config, dtype, graph, tmp, expected, max_bytes=validate_max_bytes,
                                progress=progress)
                      if validate_export else {"skipped": "--no-validate"})
        timings["validate_s"] = time.perf_counter() - t1
        timings["total_s"] = time.perf_counter() - t0
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "format": "llama3-deploy/onnx-decoder", "format_version": 1, **graph.to_json(),
            "source": {"model": str(model), "description": source.description,
                       "kind": "checkpoint" if isinstance(source, SafetensorsCheckpoint) else "random",
                       "seed": None if isinstance(source, SafetensorsCheckpoint) else seed},
            "dtype": dtype, "opset": onnx_export.OPSET, "parameters": config.num_parameters(),
            "config": dataclasses.asdict(config),
            "io": graph.io(config, dtype).to_json(),
            "files": files, "tokenizer_files": tokenizer_files, "tools": tool_versions(),
            "validation": validation, "timings": timings,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return ExportResult(Path(output), manifest)
