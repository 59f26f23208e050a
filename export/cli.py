"""Arguments of `llama3-deploy export`; defaults come from export_model's signature."""
from __future__ import annotations

import argparse

from llama3_deploy import contract

from . import defaults


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="checkpoint directory (config.json + *.safetensors), or random:PRESET / random:CONFIG_DIR "
                        "for seeded random weights (presets: meta-llama-3-8b-instruct, meta-llama-3.1-8b-instruct, "
                        "meta-llama-3-70b-instruct, llama3-cpu-bench)")
    p.add_argument("--output", required=True, help="output directory (created atomically)")
    p.add_argument("--dtype", choices=[*contract.DTYPE_ALIASES, *contract.EXPORT_DTYPES], default=defaults.DTYPE,
                   help="weight and KV cache dtype (norms, RoPE and softmax stay fp32)")
    p.add_argument("--no-validate", action="store_true", help="skip validation against PyTorch")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory when done")
    p.add_argument("--seed", type=int, default=defaults.SEED, help="seed for random:... weights")
    p.add_argument("--tokenizer", default=None, help="copy tokenizer files from this directory instead")
    p.add_argument("--validate-max-gib", type=float, default=defaults.VALIDATE_MAX_BYTES / (1 << 30),
                   help="largest export validated numerically in full; larger ones validate a reduced-depth "
                        "export of the same checkpoint (GiB of weights)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .pipeline import export_model  # torch is imported only when exporting

    result = export_model(args.model, args.output, dtype=args.dtype, validate_export=not args.no_validate,
                          overwrite=args.overwrite, seed=args.seed, tokenizer=args.tokenizer,
                          validate_max_bytes=int(args.validate_max_gib * (1 << 30)), progress=not args.quiet)
    print(result.summary())
    return 0
