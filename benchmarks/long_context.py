"""Generate past a position through the Python API and show the KV cache the runtime allocates for it.

    python -m llama3_deploy.benchmarks.long_context --model EXPORT --prompt-tokens 8300 --new-tokens 8 \
        --result benchmarks/results/cpu-llama3.1-8b-int4-past-8192.json

Llama 3.1's rope scaling stretches 8,192 trained positions to 131,072. The runtime sizes its cache by the request
(prompt + new tokens, in whole pages), not by the model's context: the result records the cache it allocated,
what the model's whole context would take, and the clear refusal that allocating the whole context gets on a
machine too small for it (checked before anything is allocated).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

from llama3_deploy.config import human_bytes
from llama3_deploy.errors import DeployError


def run(*, model: str, prompt_tokens: int, new_tokens: int, seed: int = 0, threads: int = 0) -> dict:
    """Prefill `prompt_tokens` seeded random ids, generate `new_tokens` greedy ones; the figures as a dict."""
    from llama3_deploy.manifest import tool_versions
    from llama3_deploy.runtime.generate import Generator
    from llama3_deploy.runtime.kv import FLAVORS, check_fits

    from .harness import make_prompts

    t0 = time.perf_counter()
    g = Generator(model, threads=threads)
    load_s = time.perf_counter() - t0
    c = g.config
    avoid = {i for i in (c.bos_token_id, *c.eos_token_ids) if i is not None}
    # ids below 128000: ordinary text tokens, never the special ones
    prompt = make_prompts(1, prompt_tokens, min(c.vocab_size, 128000), seed=seed, avoid=avoid)[0]
    r = g.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True)
    kv = r.kv_cache
    whole = FLAVORS[g.session.flavor].nbytes(g.session, 1, c.max_position_embeddings, g.prefill_chunk)
    try:  # what asking for the model's whole context gets: allocate's check, made before any allocation
        check_fits(g.session, 1, c.max_position_embeddings, g.prefill_chunk)
        whole_context = "allocatable (this machine has room for it; nothing was allocated)"
    except DeployError as e:
        whole_context = f"refused: {e}"
    rs = c.rope_scaling
    return {
        "what": "generation past a position through the Python API (Generator), and the KV cache it allocated",
        "weights": "seeded random (not trained): positions, memory and time are meaningful, the text is not",
        "model": str(model), "config": {"layers": c.num_hidden_layers, "kv_heads": c.num_key_value_heads,
                                        "head_dim": c.head_dim, "max_position_embeddings": c.max_position_embeddings,
                                        "rope_scaling": None if rs is None else vars(rs)},
        "prompt_tokens": prompt_tokens, "new_tokens": len(r.generated_ids),
        "first_generated_position": prompt_tokens, "last_generated_position": prompt_tokens + len(r.generated_ids) - 1,
        "generated_ids": r.generated_ids, "load_s": round(load_s, 1), "ttft_s": round(r.ttft_ms / 1e3, 2),
        "tpot_ms": round(r.tpot_ms, 1), "step_ms": [round(s, 1) for s in r.step_ms],
        "kv_cache": kv, "kv_cache_human": human_bytes(kv["kv_bytes"]),
        "whole_context_bytes": whole, "whole_context_human": human_bytes(whole), "whole_context": whole_context,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1)},
        "versions": tool_versions(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="export directory")
    p.add_argument("--prompt-tokens", type=int, default=8300)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--result", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    try:
        out = run(model=args.model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, seed=args.seed,
                  threads=args.threads)
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out["command"] = " ".join(["python -m llama3_deploy.benchmarks.long_context", *(argv or sys.argv[1:])])
    if args.result:
        from llama3_deploy.fsutil import atomic_write_text
        Path(args.result).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.result), json.dumps(out, indent=1))
    kv = out["kv_cache"]
    print(f"generated positions {out['first_generated_position']}..{out['last_generated_position']} "
          f"(TTFT {out['ttft_s']} s, {out['tpot_ms']} ms per token)")
    print(f"KV cache: {kv['batch']} row x {kv['capacity_tokens']:,} positions, {kv['kv_dtype']}, "
          f"{out['kv_cache_human']}; the model's {kv['model_context_tokens']:,} positions: "
          f"{out['whole_context_human']} ({out['whole_context']})")
    print(f"peak RSS {human_bytes(out['peak_rss_bytes'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
