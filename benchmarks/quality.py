"""Weight-only quantization quality on the small trained model: held-out perplexity and greedy agreement vs fp32.

    python -m llama3_deploy.benchmarks.quality --model work-out/trained-small --out benchmarks/results/quality-trained-small

Exports the checkpoint with the optimized flavor (logits at every position) in fp32 and with weight-only
INT8 / INT4 quantization (RTN symmetric and asymmetric, HQQ), then measures each export through this
project's runtime on held-out text the model never trained on (calibration.train_small.heldout_token_windows).
Writes <out>.json (figures, command, machine, versions, the model's training record) and <out>.md (a table).
Exports go to a temporary directory under --workdir and are removed afterwards unless --keep-exports.
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
from typing import Any, Callable

import numpy as np

DEFINITIONS = {
    "perplexity": "exp of the mean negative log-likelihood of tokens 2..L of each held-out window given the "
                  "tokens before it in that window (teacher-forced, from Generator.prompt_logits)",
    "ppl_change": "(perplexity - fp32 perplexity) / fp32 perplexity",
    "kl_vs_fp32": "mean over the same positions of KL(fp32 next-token distribution || variant's), in nats",
    "top1_vs_fp32": "fraction of the same positions where the variant's most likely next token equals fp32's",
    "greedy_prefix": "per prompt, (number of generated tokens before the first one that differs from fp32's "
                     "greedy continuation) / new tokens; averaged over prompts (1.0: identical continuations)",
    "greedy_overall": "per prompt, fraction of the new-token positions i where token i equals fp32's token i "
                      "(after a divergence the contexts differ, so later matches are re-convergence); averaged",
    "greedy_identical": "number of prompts whose whole continuation equals fp32's",
    "onnx_bytes": "model.onnx + model.onnx.data of the export",
}


def quant_variants(block_size: int) -> list[tuple[str, Any]]:
    """(label, QuantSpec or None) for fp32 and each weight-only variant measured, at `block_size`."""
    from llama3_deploy.export.quantize import QuantSpec
    specs = [QuantSpec(bits=8, block_size=block_size, symmetric=True, method="rtn"),
             QuantSpec(bits=8, block_size=block_size, symmetric=False, method="rtn"),
             QuantSpec(bits=4, block_size=block_size, symmetric=True, method="rtn"),
             QuantSpec(bits=4, block_size=block_size, symmetric=False, method="rtn"),
             QuantSpec(bits=4, block_size=block_size, symmetric=False, method="hqq")]
    awq = QuantSpec(bits=4, block_size=block_size, symmetric=True, method="rtn")  # RTN after AWQ's scaling
    return [("fp32", None)] + [(s.label, s) for s in specs] + [(f"int4-awq-sym-b{block_size}", awq)]


def greedy_agreement(ref: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    """Prefix agreement, overall positional agreement and identical count of `other` against `ref` (see DEFINITIONS)."""
    prefix, overall = [], []
    for a, b in zip(ref, other, strict=True):
        n = len(a)
        same = [x == y for x, y in zip(a, b)] + [False] * (n - len(b))
        first = same.index(False) if False in same else n
        prefix.append(first / n)
        overall.append(sum(same) / n)
    return {"greedy_prefix": float(np.mean(prefix)), "greedy_overall": float(np.mean(overall)),
            "greedy_identical": sum(a == b for a, b in zip(ref, other))}


def measure(export_dir: Path, windows: list[list[int]], prompts: list[list[int]], *, new_tokens: int, threads: int,
            ref: dict | None) -> tuple[dict, dict]:
    """Teacher-forced scores over `windows` and greedy continuations of `prompts` for one export.

    With `ref` (fp32's returned state) also KL, top-1 and greedy agreement against it. Returns (figures, state).
    """
    from llama3_deploy.calibration.gate import score
    from llama3_deploy.runtime.generate import Generator
    gen = Generator(export_dir, threads=threads)
    figures, logprobs = score(gen, windows, ref_logprobs=None if ref is None else ref["logprobs"])
    t0 = time.perf_counter()
    greedy = [r.generated_ids for r in gen.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)]
    figures["greedy_s"] = round(time.perf_counter() - t0, 2)
    if ref is None:
        figures.update(ppl_change=0.0, kl_vs_fp32=0.0, top1_vs_fp32=1.0, **greedy_agreement(greedy, greedy))
        return figures, {"logprobs": logprobs, "greedy": greedy, "perplexity": figures["perplexity"]}
    figures.update(ppl_change=figures["perplexity"] / ref["perplexity"] - 1, **greedy_agreement(ref["greedy"], greedy))
    return figures, ref


def run_quality(model: str | Path, out: str | Path, *, block_size: int = 32, windows: int = 32,
                window_length: int = 256, prompts: int = 16, prompt_length: int = 32, new_tokens: int = 64,
                threads: int = 0, workdir: str | Path = "work-out", keep_exports: bool = False,
                command: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Export every variant of `model`, measure it, write `<out>.json` and `<out>.md`; returns the JSON record."""
    from llama3_deploy.benchmarks.cli import git_info, machine_info
    from llama3_deploy.calibration.awq import export_awq
    from llama3_deploy.calibration.pipeline import CalibrationPlan
    from llama3_deploy.calibration.train_small import heldout_token_windows
    from llama3_deploy.contract import DATA_FILE
    from llama3_deploy.export.pipeline import export_model
    from llama3_deploy.config import load_config, read_json
    from llama3_deploy.errors import DeployError
    from llama3_deploy.fsutil import atomic_write_text
    from llama3_deploy.manifest import tool_versions

    model, out = Path(model), Path(out)
    config = load_config(model)
    training_path = model / "training.json"
    training = read_json(training_path, what="training.json") if training_path.is_file() else None
    if training is None:
        log(f"WARNING: {model} has no training.json: not a calibration.train_small model, so 'held-out' text "
            "may have been trained on")
    if new_tokens < 1 or prompts < 1 or windows < 1:
        raise DeployError("windows, prompts and new tokens must be positive")
    eval_windows = heldout_token_windows(model, count=windows, length=window_length, seed=0)
    prompt_ids = heldout_token_windows(model, count=prompts, length=prompt_length, seed=1)
    variants = quant_variants(block_size)
    for _, spec in variants[1:]:
        spec.check(config)  # refuse a block size the model cannot take before exporting anything
    Path(workdir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="quality-", dir=workdir))
    rows, ref = [], None
    try:
        for label, spec in variants:
            t0 = time.perf_counter()
            if label.startswith("int4-awq"):  # calibrated: AWQ factors from the default calibration text
                plan = CalibrationPlan(num_sequences=64, seq_len=min(256, config.max_position_embeddings), gate=None)
                res = export_awq(str(model), tmp / label, spec=spec, plan=plan, logits="all", progress=False)
            else:
                res = export_model(str(model), tmp / label, dtype="float32", flavor="optimized", logits="all",
                                   quantization=spec, progress=False)
            export_s = time.perf_counter() - t0
            steps = (res.manifest.get("validation", {}).get("numeric") or {}).get("steps") or []
            figures, ref = measure(res.output, eval_windows, prompt_ids, new_tokens=new_tokens, threads=threads,
                                   ref=ref)
            row = {"variant": label, "quantization": spec.to_json() if spec else None,
                   "onnx_bytes": res.manifest["files"]["model.onnx"] + res.manifest["files"][DATA_FILE],
                   "export_s": round(export_s, 1),
                   "validation_logits_max_abs_diff": max((s["logits_max_abs_diff"] for s in steps), default=None),
                   **figures}
            row["size_vs_fp32"] = row["onnx_bytes"] / (rows[0]["onnx_bytes"] if rows else row["onnx_bytes"])
            rows.append(row)
            log(f"{label}: ppl {row['perplexity']:.3f} ({100 * row['ppl_change']:+.2f}%), KL {row['kl_vs_fp32']:.2e}, "
                f"greedy prefix {row['greedy_prefix']:.3f} overall {row['greedy_overall']:.3f}, "
                f"{row['onnx_bytes'] / 2**20:.1f} MiB")
    finally:
        if keep_exports:
            log(f"exports kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    trained = training is not None
    record = {
        "what": "weight-only quantization quality of this project's optimized ONNX export",
        "command": command,
        "model": {"path": str(model), "trained_small_model": trained,
                  "description": ("small Llama 3-architecture model trained by calibration/train_small.py on the "
                                  "Python stdlib (real weights, not random)") if trained else "unknown checkpoint",
                  "parameters": config.num_parameters(), "config": config.to_hf_dict(), "training": training},
        "settings": {"block_size": block_size, "windows": windows, "window_length": window_length,
                     "window_seed": 0, "prompts": prompts, "prompt_length": prompt_length, "prompt_seed": 1,
                     "new_tokens": new_tokens, "decoding": "greedy, ignore_eos", "threads": threads,
                     "export": {"flavor": "optimized", "logits": "all", "dtype": "float32"},
                     "heldout_source": "llama3_deploy.calibration.train_small.heldout_token_windows(model, count, length, seed)"},
        "definitions": DEFINITIONS,
        "machine": machine_info(), "git": git_info(), "versions": tool_versions(),
        "variants": rows,
    }
    if trained and (training["heldout"]["windows"], training["heldout"]["length"]) == (windows, window_length):
        record["fp32_vs_training_heldout_perplexity"] = {"training (PyTorch)": training["heldout"]["perplexity"],
                                                         "fp32 export (ONNX Runtime)": rows[0]["perplexity"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_name(out.name + ".json"), json.dumps(record, indent=2) + "\n")
    atomic_write_text(out.with_name(out.name + ".md"), render_markdown(record))
    return record


def render_markdown(record: dict) -> str:
    """A Markdown report of a run_quality record: context, the table, the definitions."""
    s, m, t = record["settings"], record["model"], record["model"]["training"]
    lines = [f"# Quantization quality: {Path(m['path']).name}", "",
             f"Model: {m['description']}; {m['parameters'] / 1e6:.2f} M parameters, "
             f"{m['config']['num_hidden_layers']} layers, hidden {m['config']['hidden_size']}, "
             f"vocab {m['config']['vocab_size']}."]
    if t:
        lines.append(f"Training: {t['steps']} steps, {t['tokens_seen']:,} tokens, final train loss "
                     f"{t['final_train_loss']:.3f}, held-out perplexity (PyTorch) {t['heldout']['perplexity']:.2f}.")
    q = next((r["quantization"] for r in record["variants"] if r["quantization"]), None) or {}
    lines += ["", f"Optimized ONNX export (logits at every position), weight-only quantization with block size "
              f"{s['block_size']} (MatMulNBits accuracy_level {q.get('accuracy_level')}, output head "
              f"{'quantized' if q.get('lm_head') else 'fp32'}, "
              f"embedding {'quantized' if q.get('embedding') else 'fp32'}). Perplexity over "
              f"{s['windows']} held-out windows of {s['window_length']} tokens; greedy agreement over "
              f"{s['new_tokens']} new tokens from {s['prompts']} held-out prompts of {s['prompt_length']} tokens.", "",
              "| variant | ONNX MiB | size vs fp32 | perplexity | change vs fp32 | KL vs fp32 (nats) | top-1 vs fp32 "
              "| greedy prefix | greedy overall | identical |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in record["variants"]:
        lines.append(f"| {r['variant']} | {r['onnx_bytes'] / 2**20:.2f} | {r['size_vs_fp32']:.2f} | "
                     f"{r['perplexity']:.3f} | {100 * r['ppl_change']:+.2f}% | {r['kl_vs_fp32']:.2e} | "
                     f"{r['top1_vs_fp32']:.4f} | {r['greedy_prefix']:.3f} | {r['greedy_overall']:.3f} | "
                     f"{r['greedy_identical']}/{s['prompts']} |")
    lines += ["", "Definitions:", ""] + [f"- **{k}**: {v}" for k, v in record["definitions"].items()]
    cmd = record["command"] or "run_quality(...) from Python"
    lines += ["", f"Machine: {record['machine']['short']}; commit {record['git']['commit'][:12]}"
              + (" (dirty)" if record["git"]["dirty"] else "") + f"; command: `{cmd}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from llama3_deploy.errors import DeployError
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="work-out/trained-small", help="checkpoint from calibration.train_small")
    p.add_argument("--out", default="benchmarks/results/quality-trained-small", help="output path prefix")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--windows", type=int, default=32, help="held-out windows for perplexity")
    p.add_argument("--window-length", type=int, default=256)
    p.add_argument("--prompts", type=int, default=16, help="held-out prompts for greedy agreement")
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--workdir", default="work-out", help="where the temporary exports go")
    p.add_argument("--keep-exports", action="store_true")
    args = p.parse_args(argv)
    command = shlex.join(["python", "-m", "llama3_deploy.benchmarks.quality", *(sys.argv[1:] if argv is None else argv)])
    try:
        run_quality(args.model, args.out, block_size=args.block_size, windows=args.windows,
                    window_length=args.window_length, prompts=args.prompts, prompt_length=args.prompt_length,
                    new_tokens=args.new_tokens, threads=args.threads, workdir=args.workdir,
                    keep_exports=args.keep_exports, command=command, log=lambda msg: print(msg, flush=True))
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
