"""`llama3-deploy generate | chat | tokens | inspect`: the runtime's commands (no torch)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llama3_deploy.config import human_bytes, load_config
from llama3_deploy.dtypes import itemsize
from llama3_deploy.contract import TOKENIZER_FILES
from llama3_deploy.errors import DeployError
from llama3_deploy.manifest import MANIFEST_FILE, load_manifest

from .generate import BACKENDS, DEFAULT_PREFILL_CHUNK
from .sampling import SamplingParams

_S = SamplingParams()
CHAT_MAX_NEW_TOKENS = 512  # a long answer, yet a runaway reply ends in seconds on a GPU, a minute or two on a CPU


def _session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="export directory (from llama3-deploy export), or an engine directory with --backend tensorrt")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                   help="onnxruntime: an export directory; tensorrt: an engine directory from build-engine "
                        "(needs --device cuda and the tensorrt extra)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture the decode step once and replay it (CUDA, optimized exports with --logits last)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, help="prompt tokens per prefill run")


def _sampling_args(p: argparse.ArgumentParser, *, max_new_tokens: int = _S.max_new_tokens) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="most tokens per reply")
    p.add_argument("--temperature", type=float, default=_S.temperature, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=_S.top_k, help="0 disables")
    p.add_argument("--top-p", type=float, default=_S.top_p)
    p.add_argument("--repetition-penalty", type=float, default=_S.repetition_penalty)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens tokens")


def _params(args) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def _generator(args):
    from .generate import Generator
    return Generator(args.model, device=args.device, threads=args.threads, prefill_chunk=args.prefill_chunk,
                     cuda_graph=args.cuda_graph, backend=args.backend)


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    _session_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="comma-separated token ids")
    p.add_argument("--chat", action="store_true", help="wrap --prompt as a user message in the chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    _sampling_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(run=run_generate)


def _parse_ids(text: str, option: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DeployError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise DeployError(f"{option} holds no ids")
    return ids


def run_generate(args) -> int:
    params = _params(args)
    gen = _generator(args)
    if args.prompt_ids is not None:
        prompt = _parse_ids(args.prompt_ids, "--prompt-ids")
    elif args.chat:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
                 [{"role": "user", "content": args.prompt}]
    else:
        prompt = args.prompt
    if args.json:
        r = gen.generate(prompt, params)
        print(json.dumps(r.to_json(), ensure_ascii=False))
        return 0
    if gen.tokenizer is None:  # no text to stream: print the generated ids rather than an empty line
        r = gen.generate(prompt, params)
        print(",".join(map(str, r.generated_ids)))
        print(f"({args.model} has no tokenizer: printed token ids; finish: {r.finish_reason})", file=sys.stderr)
        return 0
    for delta in gen.stream(prompt, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    _session_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    _sampling_args(p, max_new_tokens=CHAT_MAX_NEW_TOKENS)
    p.set_defaults(run=run_chat)


def run_chat(args) -> int:
    params = _params(args)
    gen = _generator(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: empty line or Ctrl-D to quit, /reset to clear the conversation", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            print("(conversation cleared" + (", system prompt kept)" if args.system else ")"), file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        sys.stdout.write("assistant> ")
        reply, stream = "", gen.stream(messages, params)
        try:
            while True:
                try:
                    delta = next(stream)
                except StopIteration as done:  # the stream's return value is the GenerationResult
                    if done.value is not None and done.value.finish_reason == "length":
                        sys.stdout.write(f" [cut at --max-new-tokens {params.max_new_tokens}]")
                    break
                reply += delta
                sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C ends this reply; the conversation goes on with what was shown
            stream.close()
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})
    return 0


def add_tokens_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", nargs="?", help="text to look for in token strings")
    p.add_argument("--model", required=True, help="checkpoint, export or tokenizer directory")
    p.add_argument("--ids", help="comma-separated ids to decode instead")
    p.add_argument("--case-sensitive", action="store_true")
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(run=run_tokens)


def run_tokens(args) -> int:
    from .tokenizer import Tokenizer
    model = Path(args.model)
    # A tokenizer file names its directory (tokenizer.json or tokenizer.model beside the other files).
    tok = Tokenizer.from_dir(model.parent if model.is_file() and model.name in TOKENIZER_FILES else model)
    if args.ids:
        ids = _parse_ids(args.ids, "--ids")
        bad = [i for i in ids if not 0 <= i < tok.vocab_size]
        if bad:  # all checked before any line is printed
            raise DeployError(f"ids outside the vocabulary [0, {tok.vocab_size}): {bad[:5]}")
        for i in ids:
            print(f"{i}\t{tok.id_to_token(i)}\t{tok.decode([i])!r}")
        return 0
    if not args.query:
        raise DeployError("give a QUERY to search for, or --ids")
    hits = tok.search(args.query, case_sensitive=args.case_sensitive, limit=args.limit)
    for i, token in hits:
        print(f"{i}\t{token}")
    print(f"{len(hits)} tokens", file=sys.stderr)
    return 0


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint or export directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run_inspect)


def inspect_model(model_dir: str | Path) -> dict:
    """Config, sizes and EOS ids of a checkpoint or export directory."""
    c = load_config(Path(model_dir))
    n = c.num_parameters()
    info = {
        "layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "attention_heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "gqa_ratio": c.gqa_ratio, "vocab_size": c.vocab_size, "context": c.max_position_embeddings,
        "rope_theta": c.rope_theta, "rope_scaling": None if c.rope_scaling is None else vars(c.rope_scaling),
        "tie_word_embeddings": c.tie_word_embeddings, "parameters": n,
        "bytes": {d: n * itemsize(d) for d in ("float32", "float16", "bfloat16", "int8")},
        "kv_cache_bytes_per_token": {d: c.kv_bytes_per_token(itemsize(d)) for d in ("float32", "float16")},
        "bos_id": c.bos_token_id, "eos_ids": list(c.eos_token_ids),
    }
    present = [n for n in TOKENIZER_FILES if (Path(model_dir) / n).is_file()]
    info["tokenizer_files"] = present
    if (Path(model_dir) / MANIFEST_FILE).is_file():
        m = load_manifest(model_dir).raw
        info["export"] = {"dtype": m.get("dtype"), "flavor": m.get("flavor"), "opset": m.get("opset"),
                          "logits": m.get("logits", "all"), "quantization": m.get("quantization"),
                          "argmax": bool(m.get("argmax")), "source": m.get("source", {}).get("description")}
    return info


def run_inspect(args) -> int:
    info = inspect_model(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rs = info["rope_scaling"]
    print(f"{args.model}")
    print(f"  layers {info['layers']}, hidden {info['hidden_size']}, intermediate {info['intermediate_size']}")
    print(f"  heads {info['attention_heads']}, kv heads {info['kv_heads']} (GQA {info['gqa_ratio']}:1), "
          f"head_dim {info['head_dim']}")
    print(f"  vocabulary {info['vocab_size']}, context {info['context']}, rope theta {info['rope_theta']:g}"
          + (f", rope scaling llama3 x{rs['factor']:g} from {rs['original_max_position_embeddings']}" if rs else ""))
    print(f"  parameters {info['parameters'] / 1e9:.3f} B: " + ", ".join(
        f"{d} {human_bytes(b)}" for d, b in info["bytes"].items()))
    print("  KV cache per token: " + ", ".join(
        f"{d} {human_bytes(b)}" for d, b in info["kv_cache_bytes_per_token"].items()))
    print(f"  bos {info['bos_id']}, eos {info['eos_ids']}")
    print(f"  tokenizer: {', '.join(info['tokenizer_files'])}" if info["tokenizer_files"] else
          "  tokenizer: none (text prompts and chat need one; an export takes it from its checkpoint or from "
          "--tokenizer DIR; token ids work without)")
    if "export" in info:
        e = info["export"]
        q = e["quantization"]
        print(f"  export: {e['flavor']} graph, {e['dtype']}, logits {e['logits']}"
              + (f", int{q['bits']} weights (block {q['block_size']}, {q['method']})" if q else "")
              + (", in-graph argmax" if e["argmax"] else "") + f", opset {e['opset']}, from {e['source']}")
    return 0
