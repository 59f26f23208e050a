"""Write a full-size Llama 3 checkpoint with seeded random weights (Hugging Face safetensors layout).

    python -m llama3_deploy.benchmarks.make_checkpoint --preset meta-llama-3-8b-instruct --output /tmp/llama3-8b-random

The weights are random: latency and memory figures are meaningful, quality figures are not.
"""
from __future__ import annotations

import argparse
import sys

from llama3_deploy.config import PRESETS, preset
from llama3_deploy.errors import DeployError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--shard-gib", type=float, default=2.0)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    import dataclasses

    from llama3_deploy.export.weights import RandomWeights, write_checkpoint
    try:
        config = dataclasses.replace(preset(args.preset), source_dtype=args.dtype)
        write_checkpoint(RandomWeights(config, seed=args.seed, dtype=args.dtype), args.output,
                         shard_bytes=int(args.shard_gib * (1 << 30)), progress=True, overwrite=args.overwrite)
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {args.preset}, seeded random {args.dtype} weights (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
