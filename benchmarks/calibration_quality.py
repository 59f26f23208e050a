"""Explicit-quantization (Q/DQ) quality on the small trained model: W8A8 with and without SmoothQuant, FP8, and
each with its KV cache quantized too.

    python -m llama3_deploy.benchmarks.calibration_quality --model work-out/trained-small \
        --out benchmarks/results/calibration-trained-small

Each variant is calibrated by `llama3-deploy calibrate`'s own code (calibration/pipeline.py) on the project's
default calibration text (the model's training split), then scored against the fp32 portable export on the
held-out windows benchmarks/quality.py uses (calibration.train_small.heldout_token_windows), with the accuracy
gate's figures and its default thresholds. Writes <out>.json (figures, command, machine, versions) and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {  # label -> CalibrationPlan fields
    "w8a8-int8-smoothquant": {"fmt": "int8", "smoothquant_alpha": 0.5},
    "w8a8-int8": {"fmt": "int8", "smoothquant_alpha": None},
    "fp8-e4m3": {"fmt": "fp8", "smoothquant_alpha": None},
    "fp8-e4m3-smoothquant": {"fmt": "fp8", "smoothquant_alpha": 0.5},
    "w8a8-int8-smoothquant + kv-int8": {"fmt": "int8", "smoothquant_alpha": 0.5, "kv_cache": "int8"},
    "fp8-e4m3 + kv-fp8": {"fmt": "fp8", "smoothquant_alpha": None, "kv_cache": "fp8"},
}


def kv_bytes_per_token(manifest: dict) -> int:
    """Bytes the cache holds per token: keys and values of every layer, in the cache's dtype."""
    from llama3_deploy.dtypes import itemsize
    c = manifest["config"]
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * itemsize(
        manifest.get("kv_dtype") or manifest["dtype"])


def run(model: str, out: str, *, windows: int, window_length: int, num_sequences: int, seq_len: int,
        workdir: str, command: str) -> dict:
    from llama3_deploy.benchmarks.cli import git_info, machine_info
    from llama3_deploy.calibration import gate
    from llama3_deploy.calibration.pipeline import CalibrationPlan, calibrate_model
    from llama3_deploy.calibration.train_small import heldout_token_windows
    from llama3_deploy.contract import DATA_FILE, MODEL_FILE
    from llama3_deploy.export.pipeline import export_model
    from llama3_deploy.fsutil import atomic_write_text
    from llama3_deploy.manifest import tool_versions

    held = heldout_token_windows(Path(model), count=windows, length=window_length, seed=0)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="calibration-quality-", dir=workdir))
    rows = []
    try:
        ref = export_model(model, tmp / "fp32", progress=False)
        size = lambda m: m["files"][MODEL_FILE] + m["files"][DATA_FILE]  # noqa: E731
        rows.append({"variant": "fp32 (portable)", "onnx_bytes": size(ref.manifest), "calibrate_s": None,
                     "kv_bytes_per_token": kv_bytes_per_token(ref.manifest),
                     **gate.compare(ref.output, ref.output, held)})
        for label, fields in VARIANTS.items():
            plan = CalibrationPlan(**fields, num_sequences=num_sequences, seq_len=seq_len, gate=None)
            t0 = time.perf_counter()
            res = calibrate_model(model, tmp / label, plan=plan, progress=False)
            wall = time.perf_counter() - t0
            figures = gate.compare(ref.output, res.output, held)
            try:
                gate.check(figures, gate.GateThresholds())
                verdict = "pass"
            except Exception as e:  # the gate's ValidationError: recorded, not raised, in a report
                verdict = f"fail: {e}"
            q = res.manifest["qdq"]
            rows.append({"variant": label, "onnx_bytes": size(res.manifest), "calibrate_s": q["calibrate_s"],
                         "kv_bytes_per_token": kv_bytes_per_token(res.manifest),
                         "export_total_s": round(wall, 1), "clip": q["clip"], "opset": q["opset"],
                         "gate": verdict, **figures})
            print(f"{label}: ppl {figures['perplexity']:.3f} ({100 * figures['ppl_change']:+.2f}%), "
                  f"KL {figures['kl_vs_fp32']:.3g}, top-1 {figures['top1_vs_fp32']:.4f}, gate {verdict[:4]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record = {"what": "explicit-quantization (Q/DQ) quality of llama3-deploy calibrate on the small trained model",
              "command": command, "model": model,
              "settings": {"heldout_windows": windows, "heldout_length": window_length,
                           "heldout_source": "calibration.train_small.heldout_token_windows(model, count, length, 0)",
                           "calibration": {"data": "default (the model's training split)", "sequences": num_sequences,
                                           "seq_len": seq_len},
                           "gate_thresholds": vars(gate.GateThresholds())},
              "machine": machine_info(), "git": git_info(), "versions": tool_versions(), "variants": rows}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(f"{out}.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(f"{out}.md", markdown(record))
    return record


def markdown(record: dict) -> str:
    lines = ["# Explicit quantization (Q/DQ) on the small trained model", "", f"Command: `{record['command']}`", "",
             "| variant | ONNX MiB | KV bytes/token | calibrate s | perplexity | change vs fp32 | KL vs fp32 (nats) "
             "| top-1 vs fp32 | gate |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in record["variants"]:
        cal = "" if r["calibrate_s"] is None else f"{r['calibrate_s']:.1f}"
        lines.append(f"| {r['variant']} | {r['onnx_bytes'] / 2**20:.2f} | {r['kv_bytes_per_token']:,} | {cal} | "
                     f"{r['perplexity']:.3f} | "
                     f"{100 * r['ppl_change']:+.2f}% | {r['kl_vs_fp32']:.2e} | {r['top1_vs_fp32']:.4f} | "
                     f"{r.get('gate', '')[:4]} |")
    s = record["settings"]
    lines += ["", f"Held-out: {s['heldout_windows']} windows of {s['heldout_length']} tokens the model never trained "
              f"on. Calibration: {s['calibration']['sequences']} x {s['calibration']['seq_len']} tokens of its "
              f"training text. Gate: perplexity +{100 * s['gate_thresholds']['max_ppl_increase']:g}%, KL "
              f"{s['gate_thresholds']['max_kl']:g} nats. Machine: {record['machine']['short']}; {record['machine']['mem_total_gib']} GiB. The model's weights are trained (calibration/train_small.py), not random."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama3_deploy.benchmarks.calibration_quality",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--window-length", type=int, default=256)
    p.add_argument("--num-sequences", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--workdir", default="work-out")
    args = p.parse_args(argv)
    command = shlex.join(["python", "-m", "llama3_deploy.benchmarks.calibration_quality",
                          *(sys.argv[1:] if argv is None else argv)])
    run(args.model, args.out, windows=args.windows, window_length=args.window_length,
        num_sequences=args.num_sequences, seq_len=args.seq_len, workdir=args.workdir, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
