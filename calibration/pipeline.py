"""`llama3-deploy calibrate`: a checkpoint -> an explicit-quantization (Q/DQ) portable ONNX export, gated.

    data (calibration/data.py) -> statistics of every projection's input, prefill and decode (stats.py)
      -> SmoothQuant factors folded into the weights, statistics again on the smoothed model (smoothquant.py)
      -> the portable graph with int8 / float8 weights and per-tensor activation Q/DQ (qdq.py)
      -> TensorRT-readiness (trt_check.py) and the accuracy gate against the fp32 graph (gate.py)

The product is what TensorRT 10.1+ builds as a strongly typed network (implicit INT8 calibration is deprecated
there and removed in TensorRT 11); ONNX Runtime's CPU provider runs it too, which is how the gate measures it.
The export is written like any other (temporary directory, renamed when complete and validated), so a build
that fails its gate leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

from llama3_deploy.dtypes import KV_QUANT_DTYPES
from llama3_deploy.errors import DeployError
from llama3_deploy.export import pipeline as export_pipeline
from llama3_deploy.export.spec import ExportSpec
from llama3_deploy.export.weights import open_source

from . import gate
from .defaults import CLIPS, DECODE_STEPS, DEFAULT_CLIP, SMOOTHQUANT_ALPHA
from .data import DEFAULT_NUM_SEQUENCES, DEFAULT_SEQ_LEN, CalibrationSet, load_calibration_set
from .kv_qdq import kv_record, quantize_kv_cache
from .qdq import FORMATS, insert_qdq, qdq_record
from .smoothquant import SmoothedSource, smoothing_factors
from .stats import ActivationStats, collect_statistics
from .trt_check import require_tensorrt_ready


@dataclasses.dataclass(frozen=True)
class CalibrationPlan:
    """How to quantize: the format, SmoothQuant, the activation clip, the data, and the gate."""

    fmt: str = "int8"                             # "int8" (W8A8) or "fp8" (E4M3)
    kv_cache: str | None = None                   # "int8" or "fp8": a quantized KV cache; None: the graph dtype
    smoothquant_alpha: float | None = SMOOTHQUANT_ALPHA  # None: no smoothing
    clip: str | None = None                       # amax, percentile or mse; None: the format's default
    num_sequences: int = DEFAULT_NUM_SEQUENCES
    seq_len: int = DEFAULT_SEQ_LEN
    decode_steps: int = DECODE_STEPS
    seed: int = 0
    gate: gate.GateThresholds | None = gate.GateThresholds()  # None: no accuracy gate (say so in the manifest)
    heldout_sequences: int = 16
    heldout_len: int = 256

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise DeployError(f"unknown quantization format {self.fmt!r}; choose one of {', '.join(sorted(FORMATS))}")
        if self.kv_cache is not None and self.kv_cache not in KV_QUANT_DTYPES:
            raise DeployError(f"unknown KV cache format {self.kv_cache!r}; choose one of {', '.join(KV_QUANT_DTYPES)}")
        if self.clip is not None and self.clip not in CLIPS:
            raise DeployError(f"unknown clip method {self.clip!r}; choose one of {', '.join(CLIPS)}")

    @property
    def clip_method(self) -> str:
        return self.clip or DEFAULT_CLIP[self.fmt]


def _statistics(source, calib: CalibrationSet, plan: CalibrationPlan, cache: Path | None, *, progress: bool,
                log) -> tuple[ActivationStats, str]:
    """Statistics from the cache when it was made for this model and data, else collected (and cached)."""
    if cache is not None and cache.is_file():
        stats = ActivationStats.load(cache, expect_model=source, expect_data=calib,
                                     expect_decode_steps=plan.decode_steps)
        log(f"activation statistics from the cache {cache}")
        return stats, "cache"
    t0 = time.perf_counter()
    stats = collect_statistics(source, calib, decode_steps=plan.decode_steps, progress=progress)
    log(f"activation statistics collected in {time.perf_counter() - t0:.1f} s")
    if cache is not None:
        stats.save(cache)
    return stats, "collected"


def check_gate_fits(config) -> None:
    """The gate runs the fp32 graph and the quantized one in ONNX Runtime: refuse before any work when the fp32
    weights alone exceed half this machine's memory (an 8B needs 32 GB), rather than die out of memory."""
    import os

    need = export_pipeline.weight_bytes(config, "float32")
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have // 2:
        raise DeployError(f"the accuracy gate runs the fp32 graph ({need / 2**30:.1f} GiB of weights) beside the "
                          f"quantized one, more than half of this machine's {have / 2**30:.1f} GiB: run it on a larger "
                          "machine, or pass --no-gate (the manifest then says the gate did not run)")


HELDOUT_DRAWN = "drawn from the calibration source with seed + 1 (may overlap the calibration windows)"


def heldout_windows(given: list[list[int]] | None, data, *, model_dir: Path, config,
                    plan: CalibrationPlan) -> tuple[list[list[int]], str]:
    """The gate's token windows and where they came from: `given`, or drawn from the calibration source."""
    if given is not None:
        return given, "given"
    drawn = load_calibration_set(data, model_dir=model_dir, num_sequences=plan.heldout_sequences,
                                 seq_len=plan.heldout_len, seed=plan.seed + 1, config=config)
    return [list(s) for s in drawn.sequences], HELDOUT_DRAWN


def open_inputs(model: str, output: str | Path, *, tokenizer: str | Path | None, overwrite: bool,
                plan: CalibrationPlan) -> tuple:
    """Before any work: the tokenizer directory the data needs, the inputs the output must spare, the weight
    source, and whether the gate fits this machine. Returns (source, tokenizer_dir, protect)."""
    tokenizer_dir = Path(tokenizer) if tokenizer else (Path(model) if not model.startswith("random:") else None)
    if tokenizer_dir is None:
        raise DeployError("calibrating random weights needs a tokenizer for the data: pass --tokenizer DIR")
    protect = export_pipeline.check_inputs(model, output, tokenizer_dir, overwrite=overwrite)
    source = open_source(model, seed=plan.seed)
    if plan.gate is not None:
        check_gate_fits(source.config)
    return source, tokenizer_dir, protect


def calibrate_model(model: str, output: str | Path, *, plan: CalibrationPlan = CalibrationPlan(),
                    data: str | Path | None = None, heldout: list[list[int]] | None = None, dtype: str = "float32",
                    tokenizer: str | Path | None = None, cache: str | Path | None = None, overwrite: bool = False,
                    progress: bool = True) -> export_pipeline.ExportResult:
    """Calibrate a checkpoint (or `random:...` with `tokenizer`) and write its gated Q/DQ export to `output`.

    `heldout`: token windows the gate scores (e.g. calibration.train_small.heldout_token_windows); None draws
    them from the calibration source with another seed (the manifest says they may overlap the calibration data).
    """
    log = (lambda m: print(f"[calibrate] {m}", flush=True)) if progress else (lambda m: None)  # noqa: E731
    source, tokenizer_dir, protect = open_inputs(model, output, tokenizer=tokenizer, overwrite=overwrite, plan=plan)
    spec = ExportSpec.make(source.config, dtype=dtype, flavor="portable",
                           kv_dtype=KV_QUANT_DTYPES[plan.kv_cache] if plan.kv_cache else None)
    t0 = time.perf_counter()
    calib = load_calibration_set(data, model_dir=tokenizer_dir, num_sequences=plan.num_sequences,
                                 seq_len=plan.seq_len, seed=plan.seed, config=source.config)
    heldout, heldout_source = heldout_windows(heldout, data, model_dir=tokenizer_dir, config=source.config, plan=plan)
    log(f"calibration set: {len(calib.sequences)} x {calib.seq_len} tokens, {calib.description}")
    stats, how = _statistics(source, calib, plan, Path(cache) if cache else None, progress=progress, log=log)
    qsource, smoothing = source, None
    if plan.smoothquant_alpha is not None:
        smoothing = smoothing_factors(source, lambda t: stats.group_of(t).channel_max, alpha=plan.smoothquant_alpha)
        qsource = SmoothedSource(source, smoothing)
        # The clip ranges are those of the smoothed activations: measured again, not derived.
        stats = collect_statistics(qsource, calib, decode_steps=plan.decode_steps, progress=progress)
        log(f"SmoothQuant alpha {plan.smoothquant_alpha:g} folded; statistics of the smoothed model collected")
    input_amax = stats.input_amax(plan.clip_method)
    calibrate_s = time.perf_counter() - t0

    work = Path(tempfile.mkdtemp(prefix=".calibrate-", dir=Path(output).resolve().parent))
    try:
        reference = None
        if plan.gate is not None:  # the fp32 graph of the original weights, the gate's reference
            log("exporting the fp32 reference graph for the accuracy gate")
            reference = export_pipeline.write_export(
                source, dataclasses.replace(spec, kv_dtype=None), work / "fp32", model=model, seed=plan.seed, tokenizer_dir=tokenizer_dir,
                protect=protect, validate_export=False, progress=False).output

        def apply(graph) -> dict:
            insert_qdq(graph, input_amax=input_amax, fmt=plan.fmt)
            if plan.kv_cache:
                quantize_kv_cache(graph, kv_amax=stats.kv_amax, fmt=plan.kv_cache)
            return {**qdq_record(graph), "kv_cache": kv_record(graph), "clip": plan.clip_method, "statistics": how,
                    "smoothquant": smoothing.to_json() if smoothing else None,
                    "calibration": {"source": calib.source, "description": calib.description,
                                    "sha256": calib.sha256, "sequences": len(calib.sequences),
                                    "seq_len": calib.seq_len, "decode_steps": plan.decode_steps, "seed": plan.seed},
                    "calibrate_s": round(calibrate_s, 1)}

        def verify(export_dir: Path) -> dict:
            require_tensorrt_ready(export_dir / "model.onnx")
            result = {"tensorrt_ready": "passed (static check: ops, Q/DQ layout, zero points, axes, opset)"}
            if plan.gate is None:
                return {**result, "accuracy_gate": "disabled (--no-gate)"}
            log(f"accuracy gate: {len(heldout)} held-out windows, quantized vs fp32")
            figures = gate.compare(reference, export_dir, heldout)
            return {**result, "accuracy_gate": {**gate.check(figures, plan.gate), "heldout": heldout_source}}

        transform = export_pipeline.GraphTransform("qdq", apply, verify)
        return export_pipeline.write_export(qsource, spec, output, model=model, seed=plan.seed,
                                            tokenizer_dir=tokenizer_dir, protect=protect, overwrite=overwrite,
                                            progress=progress, transform=transform)
    finally:
        shutil.rmtree(work, ignore_errors=True)
