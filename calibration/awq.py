"""Activation-aware weight quantization (AWQ) for the optimized flavor's INT4 MatMulNBits weights.

AWQ (Lin et al., 2024) protects the weight channels that meet large activations: scale input channel j of a
projection by s_j = a_j^alpha before quantizing and divide the activation by s_j, so those channels get finer
steps. As in the paper, alpha is searched per layer group on a grid, and s is normalized by sqrt(max(s) min(s)).
The search minimizes an activation-weighted proxy of the output error, sum_j a_j^2 * ||Q(W_j s_j)/s_j - W_j||^2,
a diagonal stand-in for AWQ's ||Q(W diag(s)) (diag(s)^-1 X) - W X|| that needs only the calibration statistics'
per-channel maxima (a_j = max |x_j|; the paper averages |x_j|). alpha 0 is plain round-to-nearest, so on the
proxy AWQ never does worse than RTN. The factors fold into the same tensors as SmoothQuant's
(calibration/smoothquant.py: norm weights, up_proj and v_proj rows, GQA-tied o_proj inputs), so the graph is
the ordinary optimized INT4 graph.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from llama3_deploy.export import pipeline as export_pipeline
from llama3_deploy.export.quantize import QuantSpec, dequantize_matrix, quantize_matrix
from llama3_deploy.export.spec import ExportSpec
from llama3_deploy.export.weights import WeightSource

from . import gate
from .data import load_calibration_set
from .pipeline import CalibrationPlan, heldout_windows, open_inputs
from .smoothquant import GROUPS, SmoothedSource, Smoothing, build_smoothing
from .stats import collect_statistics

GRID = 11  # alpha in 0, 0.1, ..., 1 (the paper's search uses 20 points over the same range)


def _search(act: np.ndarray, weights: np.ndarray, spec: QuantSpec, expand: Callable, grid: int) -> tuple:
    """The best s (in act's space) for `weights` [in, out] against activation maxima `act`; and its alpha."""
    a = expand(act).astype(np.float64)  # [in]
    k, n = weights.shape
    importance = (a * a)[:, None]
    best = (np.inf, None, None)
    for alpha in np.linspace(0.0, 1.0, grid):
        s = np.where(act > 0, act.astype(np.float64) ** alpha, 1.0)
        s = s / np.sqrt(s.max() * s.min())
        s_in = expand(s)[:, None]
        q = dequantize_matrix(quantize_matrix((weights * s_in).astype(np.float32), spec), k, n, spec) / s_in
        err = float((importance * (q - weights) ** 2).sum())
        if err < best[0]:
            best = (err, s.astype(np.float32), float(alpha))
    return best[1], best[2], best[0]


def awq_factors(source: WeightSource, act_channel_max: Callable[[str], np.ndarray], *, spec: QuantSpec,
                grid: int = GRID, groups: tuple[str, ...] = GROUPS) -> Smoothing:
    """AWQ factors for every layer group of `source` for the INT4/INT8 weights `spec` describes."""
    chosen: list[float] = []

    def factor(act, consumers, reduce, expand):
        w = np.concatenate([source.get(n).float().numpy() for n in consumers], axis=0).T  # HF [out, in] -> [in, out]
        s, alpha, _ = _search(act, w, spec, expand, grid)
        chosen.append(alpha)
        return s

    smoothing = build_smoothing(source, act_channel_max, factor, groups=groups,
                                method={"method": "awq", "grid": grid, "quantization": spec.label})
    smoothing.method["alphas"] = chosen  # per layer group, in layer order
    return smoothing


def export_awq(model: str, output: str | Path, *, spec: QuantSpec, plan: CalibrationPlan = CalibrationPlan(),
               data: str | Path | None = None, heldout: list[list[int]] | None = None, logits: str | None = None,
               dtype: str = "float32", tokenizer: str | Path | None = None, overwrite: bool = False,
               progress: bool = True, grid: int = GRID) -> export_pipeline.ExportResult:
    """Calibrate, search AWQ factors, gate, and write the optimized flavor's quantized export of the smoothed weights.

    `plan` gives the data, decode steps, seed and accuracy gate (its Q/DQ fields do not apply). The gate scores a
    logits-at-every-position twin of the export against the fp32 graph before the export is written. Validation
    compares the graph with a reference holding the same smoothed, dequantized weights (as for any weight-only
    export), so it checks the kernels; the quantization error itself is what AWQ reduces and the gate bounds.
    """
    source, tokenizer_dir, protect = open_inputs(model, output, tokenizer=tokenizer, overwrite=overwrite, plan=plan)
    export_spec = ExportSpec.make(source.config, dtype=dtype, flavor="optimized", logits=logits, quantization=spec)
    t0 = time.perf_counter()
    calib = load_calibration_set(data, model_dir=tokenizer_dir, num_sequences=plan.num_sequences,
                                 seq_len=plan.seq_len, seed=plan.seed, config=source.config)
    stats = collect_statistics(source, calib, decode_steps=plan.decode_steps, progress=progress)
    smoothing = awq_factors(source, lambda t: stats.group_of(t).channel_max, spec=spec, grid=grid)
    smoothed = SmoothedSource(source, smoothing)
    record = {**smoothing.to_json(), "calibration": {"description": calib.description, "sha256": calib.sha256,
                                                     "sequences": len(calib.sequences), "seq_len": calib.seq_len,
                                                     "decode_steps": plan.decode_steps, "seed": plan.seed},
              "calibrate_s": round(time.perf_counter() - t0, 1), "accuracy_gate": "disabled (--no-gate)"}
    if plan.gate is not None:
        windows, where = heldout_windows(heldout, data, model_dir=tokenizer_dir, config=source.config, plan=plan)
        work = Path(tempfile.mkdtemp(prefix=".calibrate-", dir=Path(output).resolve().parent))
        try:
            common = dict(model=model, seed=plan.seed, tokenizer_dir=tokenizer_dir, protect=protect,
                          validate_export=False, progress=False)
            reference = export_pipeline.write_export(
                source, ExportSpec.make(source.config, dtype=dtype, flavor="portable"), work / "fp32", **common)
            twin = export_pipeline.write_export(
                smoothed, ExportSpec.make(source.config, dtype=dtype, flavor="optimized", logits="all",
                                          quantization=spec), work / "twin", **common)
            figures = gate.compare(reference.output, twin.output, windows)
            record["accuracy_gate"] = {**gate.check(figures, plan.gate), "heldout": where}
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return export_pipeline.write_export(smoothed, export_spec, output, model=model, seed=plan.seed,
                                        tokenizer_dir=tokenizer_dir, protect=protect, overwrite=overwrite,
                                        progress=progress, annotations={"awq": record})
