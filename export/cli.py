"""Arguments of `llama3-deploy export`; defaults come from export_model's signature."""
from __future__ import annotations

import argparse
import math

from llama3_deploy import contract
from llama3_deploy.dtypes import DTYPE_ALIASES, EXPORT_DTYPES
from llama3_deploy.errors import DeployError

from . import defaults
from .quantize import QUANT_METHODS, QuantSpec


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="checkpoint directory (config.json + *.safetensors), or random:PRESET / random:CONFIG_DIR "
                        "for seeded random weights (presets: meta-llama-3-8b-instruct, meta-llama-3.1-8b-instruct, "
                        "meta-llama-3-70b-instruct, llama3-cpu-bench)")
    p.add_argument("--output", required=True, help="output directory (created atomically)")
    p.add_argument("--dtype", choices=[*DTYPE_ALIASES, *EXPORT_DTYPES], default=defaults.DTYPE,
                   help="weight and KV cache dtype (norms, RoPE and softmax stay fp32)")
    p.add_argument("--flavor", choices=contract.FLAVORS, default=defaults.FLAVOR,
                   help="portable: standard ONNX ops (TensorRT, any runtime); optimized: ONNX Runtime's fused ops "
                        "with an in-place KV cache (GroupQueryAttention), fused norms and projections")
    p.add_argument("--logits", choices=contract.LOGITS_MODES, default=None,
                   help="positions the graph computes logits for (optimized only; default last: prefill runs the "
                        "head once); all is for scoring and perplexity")
    p.add_argument("--argmax", action="store_true",
                   help="optimized only: the graph also returns greedy ids (next_token, ArgMax over the vocabulary), "
                        "so greedy decoding copies B ids to the host per step instead of B x V logits")
    q = p.add_argument_group("weight-only quantization (optimized flavor; ONNX Runtime MatMulNBits)")
    q.add_argument("--quantize", choices=("int8", "int4"), default=None, help="quantize projection weights")
    q.add_argument("--block-size", type=int, default=QuantSpec.block_size,
                   help="quantization block along the input axis (power of two, 16..256; must divide the widths)")
    q.add_argument("--symmetric", action="store_true", help="symmetric blocks (no zero points)")
    q.add_argument("--quant-method", choices=QUANT_METHODS, default=QuantSpec.method,
                   help="rtn: round to nearest; hqq: half-quadratic quantization (data-free, fits scale and zero)")
    q.add_argument("--accuracy-level", type=int, default=QuantSpec.accuracy_level,
                   help="MatMulNBits accuracy_level: 4 computes with int8 activations (fastest on CPU), 0/1 in fp32")
    q.add_argument("--no-quantize-lm-head", action="store_true", help="keep the output head in the graph dtype")
    q.add_argument("--quantize-embedding", action="store_true", help="quantize the token embedding too")
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

    if not (math.isfinite(args.validate_max_gib) and args.validate_max_gib >= 0):
        raise DeployError(f"--validate-max-gib must be a finite number >= 0 (got {args.validate_max_gib})")

    quant = None
    if args.quantize:
        quant = QuantSpec(bits=int(args.quantize[3:]), block_size=args.block_size, symmetric=args.symmetric,
                          method=args.quant_method, accuracy_level=args.accuracy_level,
                          lm_head=not args.no_quantize_lm_head, embedding=args.quantize_embedding)
    result = export_model(args.model, args.output, dtype=args.dtype, flavor=args.flavor, logits=args.logits,
                          quantization=quant, argmax=args.argmax, validate_export=not args.no_validate,
                          overwrite=args.overwrite, seed=args.seed, tokenizer=args.tokenizer,
                          validate_max_bytes=int(args.validate_max_gib * (1 << 30)), progress=not args.quiet)
    print(result.summary())
    return 0
