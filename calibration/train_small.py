"""Train a small Llama 3-architecture model on offline text, so quantization-quality figures mean something.

    python -m llama3_deploy.calibration.train_small --output work-out/trained-small [--steps N] [--seed S] [--overwrite]

The text is the Python standard library's own sources and docs (the same files the demo tokenizer is
trained on). Files are split into train and held-out *by file*, by a hash of their path relative to the
stdlib, so held-out text is never trained on; `heldout_token_windows` recomputes the held-out windows
exactly, for scripts that measure quality later. Output: a Hugging Face checkpoint directory
(model.safetensors, config.json, generation_config.json, tokenizer files, training.json), written atomically.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import shlex
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

BASE_VOCAB = 4000            # + Llama 3's 256 special tokens
HELDOUT_PERMILLE = 50        # 5% of the corpus files are held out
MAX_TRAIN_CHARS = 8_000_000  # ~2.4 M tokens: twice what the default run sees, so no text repeats
MAX_HELDOUT_CHARS = 2_000_000


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str) -> bool:
    """Whether a corpus file (path relative to the stdlib, '/'-separated) belongs to the held-out split."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < HELDOUT_PERMILLE


def corpus_split() -> tuple[list[Path], list[Path]]:
    """(train, held-out) corpus files, each sorted by relative path. The file walk is the demo tokenizer's."""
    from llama3_deploy.calibration.demo_tokenizer import corpus_files
    root = stdlib_root()
    files = sorted((p.relative_to(root).as_posix(), p) for p in corpus_files(0))
    held = [is_heldout(rel) for rel, _ in files]
    return [p for (_, p), h in zip(files, held) if not h], [p for (_, p), h in zip(files, held) if h]


def read_texts(files: list[Path], *, max_chars: int) -> list[str]:
    """File texts in order (each capped like the tokenizer corpus), until `max_chars` in total."""
    from llama3_deploy.calibration.demo_tokenizer import read_corpus
    return list(read_corpus(files, max_chars=max_chars))


def token_stream(tokenizer: Any, texts: list[str]) -> list[int]:
    """Documents as one stream: <|begin_of_text|> text <|end_of_text|> for each (special strings stay text)."""
    stream: list[int] = []
    for enc in tokenizer.backend.encode_batch(texts, add_special_tokens=False):
        stream += [tokenizer.bos_id, *enc.ids, tokenizer.eos_id]
    return stream


def split_windows(stream: list[int], length: int) -> list[list[int]]:
    """Consecutive non-overlapping windows of `length` tokens (the incomplete tail is dropped)."""
    return [stream[i:i + length] for i in range(0, len(stream) - length + 1, length)]


def heldout_token_windows(tokenizer_dir: str | Path, *, count: int, length: int, seed: int = 0,
                          max_chars: int = MAX_HELDOUT_CHARS) -> list[list[int]]:
    """`count` held-out windows of `length` tokens, chosen by `seed`; the same on every call.

    The held-out files (sorted by path) become one token stream, cut into non-overlapping windows, of
    which `count` are sampled. `tokenizer_dir` is the trained checkpoint (or any directory with its tokenizer).
    """
    from llama3_deploy.errors import DeployError
    from llama3_deploy.runtime.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(tokenizer_dir)
    windows = split_windows(token_stream(tok, read_texts(corpus_split()[1], max_chars=max_chars)), length)
    if count > len(windows):
        raise DeployError(f"only {len(windows)} held-out windows of {length} tokens exist (asked for {count})")
    return [windows[i] for i in sorted(random.Random(seed).sample(range(len(windows)), count))]


def heldout_nll(model: Any, windows: list[list[int]], *, batch_size: int = 8) -> tuple[float, int]:
    """Mean negative log-likelihood (nats) of tokens 2..L of each window given the tokens before it."""
    import torch
    import torch.nn.functional as F
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            x = torch.tensor(windows[i:i + batch_size], dtype=torch.long)
            logits = model(input_ids=x).logits[:, :-1].float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            n += x[:, 1:].numel()
    return total / n, n


def train(output: str | Path, *, steps: int = 600, seed: int = 0, batch_size: int = 8, seq_len: int = 256,
          lr: float = 3e-3, min_lr_ratio: float = 0.1, warmup_steps: int | None = None, weight_decay: float = 0.1,
          hidden_size: int = 256, intermediate_size: int = 768, num_layers: int = 6, num_heads: int = 8,
          num_kv_heads: int = 2, head_dim: int = 32, base_vocab: int = BASE_VOCAB,
          max_corpus_chars: int = MAX_TRAIN_CHARS, tokenizer_chars: int | None = None, eval_windows: int = 32,
          eval_length: int = 256, log_every: int = 10, threads: int = 2, overwrite: bool = False,
          command: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the tokenizer, train LlamaForCausalLM (Llama 3 architecture) and write the checkpoint to `output`.

    Returns the training record also written as training.json.
    """
    import tokenizers
    import torch
    import transformers

    from llama3_deploy.calibration.demo_tokenizer import MAX_CORPUS_CHARS, build_demo_tokenizer
    from llama3_deploy.export.pipeline import copy_tokenizer_files
    from llama3_deploy.export.weights import SafetensorsCheckpoint
    from llama3_deploy.config import load_config
    from llama3_deploy.errors import DeployError
    from llama3_deploy.fsutil import atomic_directory, check_output_dir
    from llama3_deploy.runtime.tokenizer import Tokenizer

    if steps < 1 or batch_size < 1 or seq_len < 2:
        raise DeployError("steps and batch_size must be positive and seq_len at least 2")
    output = check_output_dir(output, overwrite=overwrite)  # refuse before minutes of training
    started = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    scratch = Path(tempfile.mkdtemp(prefix="train-small-"))
    try:
        tok_info = build_demo_tokenizer(scratch / "tokenizer", vocab_size=base_vocab, seed=seed,
                                        max_corpus_chars=tokenizer_chars or MAX_CORPUS_CHARS)
        tok = Tokenizer.from_dir(scratch / "tokenizer")
        train_files, heldout_files = corpus_split()
        random.Random(seed).shuffle(train_files)  # seeded document order
        texts = read_texts(train_files, max_chars=max_corpus_chars)
        stream = token_stream(tok, texts)
        data = torch.tensor(split_windows(stream, seq_len), dtype=torch.long)
        if len(data) == 0:
            raise DeployError("the training corpus is smaller than one window")
        log(f"corpus: {len(texts)} train files, {sum(map(len, texts))} chars, {len(stream)} tokens, "
            f"{len(data)} windows of {seq_len}; {len(heldout_files)} held-out files")

        torch.manual_seed(seed)
        config = transformers.LlamaConfig(
            vocab_size=tok_info["vocab_size"], hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
            head_dim=head_dim, max_position_embeddings=2048, rope_theta=500000.0, rms_norm_eps=1e-5,
            hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
            bos_token_id=tok_info["bos_token_id"], eos_token_id=tok_info["eos_token_ids"])
        model = transformers.LlamaForCausalLM(config)
        model.generation_config = transformers.GenerationConfig(
            bos_token_id=tok_info["bos_token_id"], eos_token_id=tok_info["eos_token_ids"])
        params = sum(p.numel() for p in model.parameters())
        decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices; norms' gains are not decayed
        rest = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
        warmup = warmup_steps if warmup_steps is not None else max(1, steps // 20)

        def lr_factor(step: int) -> float:  # linear warmup, then cosine decay to min_lr_ratio
            if step < warmup:
                return (step + 1) / warmup
            t = (step - warmup) / max(1, steps - warmup)
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        order = torch.Generator().manual_seed(seed)
        perm, cursor, epochs = torch.randperm(len(data), generator=order), 0, 1
        losses: list[float] = []
        log(f"model: {params / 1e6:.2f} M parameters, {num_layers} layers; {steps} steps of "
            f"{batch_size} x {seq_len} tokens, lr {lr} (warmup {warmup}, cosine to {min_lr_ratio * lr:g})")
        model.train()
        t0 = time.perf_counter()
        for step in range(steps):
            idx = []
            while len(idx) < batch_size:  # seeded permutation per epoch; the next one starts when it runs out
                if cursor == len(perm):
                    perm, cursor, epochs = torch.randperm(len(data), generator=order), 0, epochs + 1
                take = perm[cursor:cursor + batch_size - len(idx)]
                idx += take.tolist()
                cursor += len(take)
            x = data[idx]
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if (step + 1) % log_every == 0 or step + 1 == steps:
                el = time.perf_counter() - t0
                log(f"step {step + 1}/{steps}  loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.4f}  "
                    f"lr {sched.get_last_lr()[0]:.2e}  {(step + 1) * batch_size * seq_len / el:.0f} tok/s  {el:.0f} s")
        train_s = time.perf_counter() - t0

        eval_set = heldout_token_windows(scratch / "tokenizer", count=eval_windows, length=eval_length, seed=0)
        nll, eval_tokens = heldout_nll(model, eval_set)
        log(f"held-out: loss {nll:.4f}, perplexity {math.exp(nll):.2f} over {eval_windows} windows of {eval_length}")
        tail = losses[-log_every:]
        record = {
            "model": "small Llama 3-architecture model trained by calibration/train_small.py (real weights)",
            "command": command, "seed": seed, "steps": steps, "batch_size": batch_size, "seq_len": seq_len,
            "tokens_seen": steps * batch_size * seq_len, "epochs_started": epochs,
            "train_wall_s": round(train_s, 1), "total_wall_s": None,
            "optimizer": {"name": "AdamW", "lr": lr, "betas": [0.9, 0.95], "weight_decay": weight_decay,
                          "warmup_steps": warmup, "schedule": "linear warmup, cosine decay",
                          "min_lr_ratio": min_lr_ratio, "grad_clip": 1.0},
            "first_train_loss": losses[0], "final_train_loss": sum(tail) / len(tail),
            "final_train_loss_def": f"mean over the last {len(tail)} steps",
            "train_loss_log": [[s + 1, round(v, 4)] for s, v in enumerate(losses) if (s + 1) % log_every == 0],
            "heldout": {"loss": nll, "perplexity": math.exp(nll), "windows": eval_windows, "length": eval_length,
                        "window_seed": 0, "predicted_tokens": eval_tokens,
                        "definition": "mean NLL of tokens 2..L of each window given the tokens before it, in-window",
                        "recompute": "llama3_deploy.calibration.train_small.heldout_token_windows(dir, count, length, seed)"},
            "corpus": {"source": f"Python {platform.python_version()} standard library sources and docs",
                       "split": f"by file: sha256(relative path) % 1000 < {HELDOUT_PERMILLE} is held out",
                       "train_files_total": len(train_files), "heldout_files_total": len(heldout_files),
                       "train_files_used": len(texts), "train_chars": sum(map(len, texts)),
                       "train_tokens": len(stream), "train_windows": len(data), "max_corpus_chars": max_corpus_chars},
            "tokenizer": {**tok_info, "note": "demo tokenizer (export/demo_tokenizer.py), trained on the first "
                          "chars of the whole corpus, held-out files included"},
            "parameters": params, "threads": threads,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        }
        with atomic_directory(output, overwrite=overwrite) as tmp:
            copy_tokenizer_files(scratch / "tokenizer", tmp)
            model.save_pretrained(tmp, safe_serialization=True)
            load_config(tmp)  # the project's config reader and strict weight table must accept it
            SafetensorsCheckpoint(tmp)
            record["total_wall_s"] = round(time.perf_counter() - started, 1)
            (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        return record
    finally:
        torch.set_num_threads(old_threads)
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from llama3_deploy.errors import DeployError
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="checkpoint directory to write")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of 8 x 256 tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "llama3_deploy.calibration.train_small", *argv])
    try:
        rec = train(args.output, steps=args.steps, seed=args.seed, overwrite=args.overwrite, command=command,
                    log=lambda m: print(m, flush=True))
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {rec['tokens_seen']} tokens in {rec['train_wall_s']} s, final train loss "
          f"{rec['final_train_loss']:.3f}, held-out perplexity {rec['heldout']['perplexity']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
