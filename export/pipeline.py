"""`llama3-deploy export`: checkpoint -> validated ONNX decoder directory, in bounded memory."""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import onnx_ir as ir

from llama3_deploy import contract
from llama3_deploy.config import LlamaConfig, human_bytes
from llama3_deploy.dtypes import itemsize
from llama3_deploy.errors import DeployError
from llama3_deploy.fsutil import atomic_directory, check_output_dir, contained_file
from llama3_deploy.manifest import FORMAT as MANIFEST_FORMAT, MANIFEST_FILE, tool_versions

from . import defaults, flavors, genai, onnx_export, validate
from .flavors import ExpectedWeights
from .quantize import QuantSpec
from .spec import ExportSpec
from .weights import SafetensorsCheckpoint, WeightSource, name_table, open_source

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
                 f"  files: {contract.MODEL_FILE} {human_bytes(m['files'][contract.MODEL_FILE])}, "
                 f"{contract.DATA_FILE} {human_bytes(m['files'][contract.DATA_FILE])}",
                 f"  time {m['timings']['total_s']:.1f} s (trace {m['timings']['trace_s']:.1f} s, "
                 f"write {m['timings']['write_s']:.1f} s, validate {m['timings']['validate_s']:.1f} s)"]
        tok = m.get("tokenizer_files") or []
        lines.append(f"  tokenizer: {', '.join(tok)}" if tok else
                     "  tokenizer: none (text prompts and chat need one: export again with --tokenizer DIR; "
                     "token ids work without)")
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


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[export] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class GraphTransform:
    """A change to the built graph before it is written (calibration's Q/DQ) and the check that stands in for
    the numeric comparison with the fp32 reference, which a transformed graph is not meant to pass."""

    name: str                          # the manifest key of its record and of its check's figures
    apply: Callable[[ir.Model], dict]  # edits the graph in place (weights still streamed); returns its record
    verify: Callable[[Path], dict]     # runs on the written export directory; raises to fail the build


@dataclasses.dataclass(frozen=True)
class _Written:
    timings: dict
    expected: ExpectedWeights  # the weights the saved graph must hold, for validate.check_structure
    record: dict | None        # the transform's record
    opset: int


def _write_graph(source: WeightSource, spec: ExportSpec, out_dir: Path, *, progress: bool, what: str = "",
                 transform: GraphTransform | None = None) -> _Written:
    """Build (or trace) the spec's graph, transform it, then stream its weights to disk."""
    flavor = flavors.flavor(spec)
    _say(progress, f"building the {spec.flavor} graph{what} ({spec.config.num_hidden_layers} layers)")
    t0 = time.perf_counter()
    model = flavor.build(source, spec)
    record = transform.apply(model) if transform is not None else None
    expected = flavor.expected_weights(model, spec) if transform is None else onnx_export.initializer_layout(model)
    t1 = time.perf_counter()
    _say(progress, f"graph built in {t1 - t0:.1f} s; writing weights{what}")
    onnx_export.save(model, out_dir, progress=progress, desc=f"writing weights{what}")
    return _Written({"trace_s": t1 - t0, "write_s": time.perf_counter() - t1}, expected, record,
                    model.opset_imports[""])


def _copy_side_files(source: WeightSource, tmp: Path, tokenizer_dir: Path | None) -> list[str]:
    """The checkpoint's config and generation config (written from the config for random weights), and the
    tokenizer files; every file copied resolves inside its directory (fsutil.contained_file)."""
    ckpt = source if isinstance(source, SafetensorsCheckpoint) else None
    for name, made in (("config.json", source.config.to_hf_dict), ("generation_config.json",
                                                                    source.config.generation_dict)):
        path = ckpt.side_file(name) if ckpt is not None else None
        if path is not None:
            shutil.copyfile(path, tmp / name)
        else:
            (tmp / name).write_text(json.dumps(made(), indent=2))
    tok_src = tokenizer_dir or (ckpt.model_dir if ckpt is not None else None)
    return copy_tokenizer_files(tok_src, tmp) if tok_src is not None else []


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files `src` has into `dst` (a link resolving outside `src` is refused); their names."""
    copied = []
    for name in contract.TOKENIZER_FILES:
        path = contained_file(src, name, what=name)
        if path is not None:
            shutil.copyfile(path, Path(dst) / name)
            copied.append(name)
    return copied


def _inputs(model: str, tokenizer_dir: Path | None) -> list[Path]:
    """The directories an export reads: its output must neither be nor contain them."""
    spec = model[len("random:"):] if model.startswith("random:") else model
    return [p for p in (Path(spec), tokenizer_dir) if p is not None and p.is_dir()]


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


def release_memory() -> None:
    """Hand the written graph's freed memory back before ONNX Runtime loads one: the writer's tensors are garbage
    by now, but glibc keeps freed heap pages, and the process's peak would be their sum with the session's."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _validate(source: WeightSource, spec: ExportSpec, tmp: Path, expected: ExpectedWeights, *, max_bytes: int,
              progress: bool) -> dict:
    _say(progress, "validating: structure (onnx.checker, I/O contract, every weight's shape)")
    structure = validate.check_structure(tmp / contract.MODEL_FILE, spec.io, expected)
    providers = validate.numeric_providers(spec.dtype)
    if providers is None:
        return {"structure": structure, "numeric": "skipped: ONNX Runtime runs bfloat16 graphs only on its "
                "CUDA execution provider, which this machine lacks"}
    if _ort_working_bytes(spec.config, spec.dtype, providers) <= max_bytes:
        _say(progress, "validating: ONNX Runtime against the streamed PyTorch reference")
        release_memory()
        numeric = flavors.check_numerics(tmp / contract.MODEL_FILE, source, spec, providers=providers)
        return {"structure": structure, "numeric": {**numeric, "reduced": False}}
    # Too large to run whole beside everything else: export a reduced graph of the same checkpoint
    # and validate that numerically; the full graph was checked structurally above.
    reduced = spec.with_config(reduced_config(spec.config))
    sub = tmp / ".validate-reduced"
    sub.mkdir()
    try:
        _write_graph(source, reduced, sub, progress=progress,
                     what=f" of the reduced graph ({reduced.config.vocab_size} vocabulary rows)")
        _say(progress, "validating the reduced graph: ONNX Runtime against the streamed PyTorch reference")
        release_memory()
        numeric = flavors.check_numerics(sub / contract.MODEL_FILE, source, reduced, providers=providers)
    finally:
        shutil.rmtree(sub, ignore_errors=True)
    return {"structure": structure,
            "numeric": {**numeric, "reduced": True, "vocab_rows_validated": reduced.config.vocab_size}}


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
    if not isinstance(validate_max_bytes, int) or isinstance(validate_max_bytes, bool) or validate_max_bytes < 0:
        raise DeployError(f"validate_max_bytes must be an integer >= 0 (got {validate_max_bytes!r})")
    tokenizer_dir = Path(tokenizer) if tokenizer else None
    protect = check_inputs(str(model), output, tokenizer_dir, overwrite=overwrite)
    source = open_source(str(model), seed=seed)
    spec = ExportSpec.make(source.config, dtype=dtype, flavor=flavor, logits=logits, quantization=quantization,
                           argmax=argmax)
    return write_export(source, spec, output, model=str(model), seed=seed, tokenizer_dir=tokenizer_dir,
                        protect=protect, validate_export=validate_export, validate_max_bytes=validate_max_bytes,
                        overwrite=overwrite, progress=progress)


def check_inputs(model: str, output: str | Path, tokenizer_dir: Path | None, *, overwrite: bool) -> list[Path]:
    """Refuse bad inputs and outputs before any work; returns the input directories the output must not be or
    contain."""
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        raise DeployError(f"tokenizer directory not found: {tokenizer_dir}")
    protect = _inputs(model, tokenizer_dir)
    check_output_dir(output, overwrite=overwrite, protect=protect)
    return protect


def write_export(source: WeightSource, spec: ExportSpec, output: str | Path, *, model: str, seed: int,
                 tokenizer_dir: Path | None, protect: list[Path], validate_export: bool = True,
                 validate_max_bytes: int = defaults.VALIDATE_MAX_BYTES, overwrite: bool = False,
                 progress: bool = True, transform: GraphTransform | None = None,
                 annotations: dict | None = None) -> ExportResult:
    """Write `spec`'s graph of `source` (optionally transformed) with its side files and manifest, atomically;
    `annotations` are extra manifest entries (how the weights were prepared, e.g. AWQ's factors)."""
    t0 = time.perf_counter()
    with atomic_directory(output, overwrite=overwrite, protect=protect) as tmp:
        written = _write_graph(source, spec, tmp, progress=progress, transform=transform)
        timings, expected = written.timings, written.expected
        tokenizer_files = _copy_side_files(source, tmp, tokenizer_dir)
        if spec.flavor == "optimized":
            genai.write_genai_config(tmp, spec.config)
        t1 = time.perf_counter()
        if not validate_export:
            validation = {"skipped": "--no-validate"}
        elif transform is None:
            validation = _validate(source, spec, tmp, expected, max_bytes=validate_max_bytes, progress=progress)
        else:  # a transformed graph is checked by its own verification, not against the untransformed reference
            _say(progress, "validating: structure (onnx.checker, I/O contract, every initializer's type and shape)")
            validation = {"structure": validate.check_structure(tmp / contract.MODEL_FILE, spec.io, expected),
                          "numeric": f"replaced by the {transform.name} check"}
        checkpoint = isinstance(source, SafetensorsCheckpoint)
        manifest = {
            "format": MANIFEST_FORMAT, "format_version": 1, **spec.options_json(),
            **({transform.name: written.record} if transform is not None else {}), **(annotations or {}),
            "source": {"model": model, "description": source.description,
                       "kind": "checkpoint" if checkpoint else "random", "seed": None if checkpoint else seed},
            "dtype": spec.dtype, "opset": written.opset,
            "parameters": spec.config.num_parameters(),
            "config": dataclasses.asdict(spec.config), "io": spec.io.to_json(),
            "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()},
            "tokenizer_files": tokenizer_files, "tools": tool_versions(),
            "validation": validation, "timings": timings,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        if transform is not None and validate_export:
            # Its check runs on the complete export (the runtime loads it like any other), then is recorded.
            _say(progress, f"validating: the {transform.name} check")
            validation[transform.name] = transform.verify(tmp)
        timings["validate_s"] = time.perf_counter() - t1
        timings["total_s"] = time.perf_counter() - t0
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return ExportResult(Path(output), manifest)
