"""`llama3-deploy demo`: the whole pipeline on an embedded default model, on a fresh machine.

Builds the project's own tokenizer, makes a small checkpoint with the Llama 3 architecture and
seeded RANDOM weights, exports and validates it, generates a chat reply through the runtime, and
prints a latency table against PyTorch eager on the same model.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from .config import LlamaConfig

DEMO_BASE_VOCAB = 4000  # + 256 Llama 3 special tokens
# The demo's ~70 MB of files go to the user's cache, not into the working directory (a repository checkout).
DEFAULT_WORKDIR = Path.home() / ".cache" / "llama3-deploy" / "demo"


def demo_config(vocab_size: int, bos: int, eos: tuple[int, ...]) -> LlamaConfig:
    """Llama 3 architecture (GQA 4:1, RoPE theta 500000, SwiGLU, RMSNorm) at demo size (~9 M parameters)."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=896, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                       rope_theta=500000.0, bos_token_id=bos, eos_token_ids=eos, source_dtype="float32")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default=str(DEFAULT_WORKDIR),
                   help="where the demo's files go (its tokenizer, checkpoint and exports are replaced)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of the latency table")
    p.add_argument("--new-tokens", type=int, default=32, help="forced tokens per latency run")
    p.add_argument("--repeats", type=int, default=3, help="latency repetitions per engine (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_demo)


def run_demo(args) -> int:

    from llama3_deploy.calibration.demo_tokenizer import build_demo_tokenizer
    from llama3_deploy.export.pipeline import copy_tokenizer_files, export_model
    from llama3_deploy.export.weights import RandomWeights, write_checkpoint

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    say = lambda msg: print(f"[demo] {msg}", flush=True)  # noqa: E731
    say(f"working directory: {work.resolve()}")
    say("NOTE: the demo model has seeded RANDOM weights; its text is gibberish, its latencies are real.")

    say("1/5 building the project's own byte-level BPE tokenizer with the Llama 3 special tokens")
    tok = build_demo_tokenizer(work / "tokenizer", vocab_size=DEMO_BASE_VOCAB, seed=args.seed, overwrite=True)
    config = demo_config(tok["vocab_size"], tok["bos_token_id"], tuple(tok["eos_token_ids"]))

    say(f"2/5 writing a Llama 3-architecture checkpoint: {config.num_parameters() / 1e6:.1f} M parameters, "
        f"{config.num_hidden_layers} layers, GQA {config.gqa_ratio}:1, random weights (seed {args.seed})")
    ckpt = write_checkpoint(RandomWeights(config, seed=args.seed, dtype="float32"), work / "checkpoint",
                            overwrite=True)
    copy_tokenizer_files(work / "tokenizer", ckpt)

    say("3/5 exporting to ONNX (portable graph, and the optimized graph for ONNX Runtime) and validating "
        "both against PyTorch")
    exports = []
    for flavor in ("portable", "optimized"):
        result = export_model(str(ckpt), work / f"onnx-{flavor}", flavor=flavor, overwrite=True, progress=False)
        print(result.summary())
        exports.append(result.output)

    say("4/5 a chat reply through the runtime (ONNX Runtime, IO binding, in-place KV cache)")
    from llama3_deploy.runtime.generate import Generator
    from llama3_deploy.runtime.sampling import SamplingParams
    gen = Generator(exports[1])
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Write a haiku about exporting models."}]
    sys.stdout.write("assistant> ")
    for delta in gen.stream(messages, SamplingParams(max_new_tokens=40, temperature=0.8, top_p=0.95, seed=args.seed)):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")

    say(f"5/5 latency vs PyTorch eager: prompt {args.prompt_tokens} tokens, {args.new_tokens} forced greedy "
        f"tokens, median of {args.repeats} interleaved runs after a warm-up")
    print(latency_table(ckpt, exports, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                        repeats=args.repeats, vocab_size=config.vocab_size))
    say("random weights: figures measure speed only. Files are in " + str(work))
    return 0


def latency_table(checkpoint: Path, export_dirs: list[Path], *, prompt_tokens: int, new_tokens: int, repeats: int,
                  vocab_size: int) -> str:
    """Interleaved runs of this runtime (each export) and PyTorch eager on the same model; a Markdown table."""
    import numpy as np

    from llama3_deploy.benchmarks.engines import OrtEngine, TorchEagerEngine

    engines = [*(OrtEngine(d) for d in export_dirs), TorchEagerEngine(checkpoint)]
    prompt = [np.random.default_rng(0).integers(0, vocab_size - 256, prompt_tokens).tolist()]
    for e in engines:  # warm-up
        e.run(prompt, new_tokens)
    runs: dict[str, list] = {e.name: [] for e in engines}
    for _ in range(repeats):
        for e in engines:
            runs[e.name].append(e.run(prompt, new_tokens))
    rows = ["| engine | TTFT ms | TPOT ms (p50) | tokens/s | same tokens as PyTorch |", "|---|---:|---:|---:|---|"]
    ref_tokens = runs[engines[-1].name][0].tokens
    base = None
    for e in engines:
        ttft = statistics.median(t.ttft_ms for t in runs[e.name])
        tpot = statistics.median(statistics.median(t.step_ms) for t in runs[e.name])
        base = base or (ttft, tpot)
        same = "yes" if runs[e.name][0].tokens == ref_tokens else "NO"
        rows.append(f"| {e.name} | {ttft:.2f} | {tpot:.3f} | {1e3 / tpot:.0f} | {same} |")
    return "\n".join(rows)
