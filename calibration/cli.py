"""Arguments of `llama3-deploy calibrate`; the work happens in calibration/pipeline.py (imported when run)."""
from __future__ import annotations

import argparse
import math

from llama3_deploy.errors import DeployError

from .data import DEFAULT_NUM_SEQUENCES, DEFAULT_SEQ_LEN
from .defaults import CLIPS, DECODE_STEPS, SMOOTHQUANT_ALPHA
from .gate import GateThresholds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory, or random:PRESET with --tokenizer")
    p.add_argument("--output", required=True, help="output directory of the Q/DQ export (created atomically)")
    p.add_argument("--format", choices=("int8", "fp8", "int4-awq"), default="int8",
                   help="int8: W8A8 Q/DQ (int8 weights per channel, int8 activations per tensor); fp8: E4M3 both; "
                        "int4-awq: weight-only INT4 (MatMulNBits, optimized flavor) after AWQ's scaling")
    p.add_argument("--kv-cache", choices=("int8", "fp8"), default=None,
                   help="int8/fp8 formats: also store the KV cache quantized (per-tensor scales per layer; default: "
                        "the graph's float dtype)")
    p.add_argument("--block-size", type=int, default=32, help="int4-awq: quantization block along the input axis")
    p.add_argument("--data", default=None, help="calibration data: JSONL of {\"messages\": [...]} or {\"text\": ...}, "
                                                "or a .txt file (default: the project's own offline text)")
    p.add_argument("--num-sequences", type=int, default=DEFAULT_NUM_SEQUENCES, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per calibration sequence")
    p.add_argument("--decode-steps", type=int, default=DECODE_STEPS,
                   help="single-token decode steps with a populated cache at the end of each sequence")
    p.add_argument("--smoothquant-alpha", type=float, default=SMOOTHQUANT_ALPHA, help="SmoothQuant migration strength in [0, 1]")
    p.add_argument("--no-smoothquant", action="store_true", help="quantize without smoothing")
    p.add_argument("--clip", choices=CLIPS, default=None,
                   help="activation range: amax, percentile (99.99) or mse (default: mse for int8, amax for fp8)")
    p.add_argument("--dtype", default="float32", help="dtype of the graph's float parts (fp32 or fp16)")
    p.add_argument("--cache", default=None, help="calibration cache file (.npz): reused when made for this "
                                                 "model and data, written otherwise")
    p.add_argument("--max-ppl-increase", type=float, default=GateThresholds.max_ppl_increase,
                   help="accuracy gate: relative perplexity increase vs fp32")
    p.add_argument("--max-kl", type=float, default=GateThresholds.max_kl, help="accuracy gate: mean KL vs fp32 (nats)")
    p.add_argument("--no-gate", action="store_true", help="skip the accuracy gate (the manifest says so)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (for random:... weights)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data sampling (and of random weights)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory when done")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .pipeline import CalibrationPlan, calibrate_model

    if args.format == "int4-awq":
        if args.kv_cache:
            raise DeployError("--kv-cache quantizes the portable Q/DQ graph's cache (--format int8 or fp8); "
                              "the int4-awq export is the optimized flavor, whose cache stays in the graph dtype")
        return _run_awq(args)
    if not args.no_smoothquant and not (math.isfinite(args.smoothquant_alpha) and 0 <= args.smoothquant_alpha <= 1):
        raise DeployError(f"--smoothquant-alpha must be in [0, 1] (got {args.smoothquant_alpha})")
    plan = CalibrationPlan(
        fmt=args.format, kv_cache=args.kv_cache, smoothquant_alpha=None if args.no_smoothquant else args.smoothquant_alpha, clip=args.clip,
        num_sequences=args.num_sequences, seq_len=args.seq_len, decode_steps=args.decode_steps, seed=args.seed,
        gate=None if args.no_gate else GateThresholds(args.max_ppl_increase, args.max_kl))
    result = calibrate_model(args.model, args.output, plan=plan, data=args.data, dtype=args.dtype,
                             tokenizer=args.tokenizer, cache=args.cache, overwrite=args.overwrite,
                             progress=not args.quiet)
    print(result.summary())
    q, v = result.manifest["qdq"], result.manifest["validation"].get("qdq", {})
    g = v.get("accuracy_gate")
    print(f"  Q/DQ {q['format']}: {len(q['weights'])} weights, {len(q['activations'])} activation scales, clip "
          f"{q['clip']}, SmoothQuant {q['smoothquant']['alpha'] if q['smoothquant'] else 'off'}; TensorRT-ready: "
          f"{v.get('tensorrt_ready', 'not checked')}")
    if q.get("kv_cache"):
        print(f"  KV cache {q['kv_cache']['format']}: {len(q['kv_cache']['tensors'])} per-tensor scales")
    if isinstance(g, dict):
        print(f"  accuracy gate passed: perplexity {g['perplexity']:.4g} vs fp32 {g['fp32_perplexity']:.4g} "
              f"({100 * g['ppl_change']:+.2f}%), KL {g['kl_vs_fp32']:.3g}, top-1 {100 * g['top1_vs_fp32']:.1f}%")
    return 0


def _run_awq(args: argparse.Namespace) -> int:
    from llama3_deploy.export.quantize import QuantSpec

    from .awq import export_awq
    from .pipeline import CalibrationPlan

    spec = QuantSpec(bits=4, block_size=args.block_size, symmetric=True)
    plan = CalibrationPlan(num_sequences=args.num_sequences, seq_len=args.seq_len, decode_steps=args.decode_steps,
                           seed=args.seed, gate=None if args.no_gate else GateThresholds(args.max_ppl_increase,
                                                                                          args.max_kl))
    result = export_awq(args.model, args.output, spec=spec, plan=plan, data=args.data, dtype=args.dtype,
                        tokenizer=args.tokenizer, overwrite=args.overwrite, progress=not args.quiet)
    print(result.summary())
    a = result.manifest["awq"]
    g = a["accuracy_gate"]
    print(f"  AWQ: alpha per layer group {a['alphas']}, calibration {a['calibrate_s']} s")
    if isinstance(g, dict):
        print(f"  accuracy gate passed: perplexity {g['perplexity']:.4g} vs fp32 {g['fp32_perplexity']:.4g} "
              f"({100 * g['ppl_change']:+.2f}%), KL {g['kl_vs_fp32']:.3g}, top-1 {100 * g['top1_vs_fp32']:.1f}%")
    return 0
