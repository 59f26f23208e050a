"""Build the project's own small Llama-3-style tokenizer for the embedded demo model.

Meta's tokenizer cannot ship with the project (license), so the demo gets a byte-level BPE trained
here, at build time, on text every Python installation has offline: the standard library's own
sources and docs. It uses Llama 3's pre-tokenizer regex and appends Llama 3's 256 special tokens,
with the same names and order, right after its base vocabulary, so every code path that relies on
<|begin_of_text|>, <|start_header_id|>, <|eot_id|>, ... works unchanged.
"""
from __future__ import annotations

import json
import os
import random
import sysconfig
from pathlib import Path
from typing import Any, Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llama3_deploy.errors import DeployError
from llama3_deploy.fsutil import atomic_directory, check_output_dir
from llama3_deploy.runtime.bpe import LLAMA3_PATTERN
from llama3_deploy.runtime.tokenizer import llama3_special_token_names

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|eot_id|>"
END_OF_TEXT = "<|end_of_text|>"
# Enough text for a few-thousand-token vocabulary while training in a few seconds on 2 cores.
MAX_CORPUS_CHARS = 3_000_000
MAX_FILE_CHARS = 200_000  # so no single file dominates the corpus

# Written for this project; renders the Llama 3 Instruct format (content trimmed, like Meta's reference).
DEMO_CHAT_TEMPLATE = "".join([
    r"{{- bos_token -}}",
    r"{%- for message in messages -%}",
    r"{%- if message['role'] is not string or message['content'] is not string -%}",
    r"{{- raise_exception('each message needs a text role and text content') -}}",
    r"{%- endif -%}",
    r"{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' -}}",
    r"{{- message['content'] | trim -}}",
    r"{{- '<|eot_id|>' -}}",
    r"{%- endfor -%}",
    r"{%- if add_generation_prompt -%}",
    r"{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}",
    r"{%- endif -%}",
])


def corpus_files(seed: int) -> list[Path]:
    """Stdlib docs first (pydoc's topic texts, .txt/.rst files), then .py sources in seeded order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DeployError(f"Python standard library not found at {root}; cannot train the demo tokenizer")
    docs, sources = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        # Installed third-party packages differ between machines; the stdlib does not. Pruning them
        # here also keeps the walk fast.
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.suffix in (".txt", ".rst") or (path.parent.name, name) == ("pydoc_data", "topics.py"):
                docs.append(path)
            elif path.suffix == ".py":
                sources.append(path)
    docs.sort()
    sources.sort()
    random.Random(seed).shuffle(sources)
    return docs + sources


def _corpus(seed: int, max_chars: int) -> Iterator[str]:
    return read_corpus(corpus_files(seed), max_chars=max_chars)


def read_corpus(files: list[Path], *, max_chars: int) -> Iterator[str]:
    """File texts in order, each capped at MAX_FILE_CHARS, until `max_chars` in total; unreadable files skipped."""
    total = 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")[:MAX_FILE_CHARS]
        except (OSError, UnicodeDecodeError):
            continue  # binary test data and legacy encodings are simply skipped
        text = text[: max_chars - total]
        if text:
            total += len(text)
            yield text
        if total >= max_chars:
            return


def build_demo_tokenizer(out_dir: str | Path, *, vocab_size: int = 4000, seed: int = 0,
                         overwrite: bool = False, max_corpus_chars: int = MAX_CORPUS_CHARS) -> dict[str, Any]:
    """Train the demo byte-level BPE and write tokenizer.json, tokenizer_config.json, special_tokens_map.json.

    `vocab_size` is the size of the base BPE vocabulary (at least 256 + 1); the 256 Llama 3 special
    tokens follow it. Returns {"vocab_size" (total, specials included), "base_vocab_size",
    "bos_token_id", "eos_token_ids"}. Deterministic for a given Python installation and seed.
    """
    if not isinstance(vocab_size, int) or vocab_size <= 256:
        raise DeployError(f"demo tokenizer vocab_size must be an integer above 256 (got {vocab_size!r})")
    check_output_dir(out_dir, overwrite=overwrite)  # refuse before spending seconds on training
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_corpus(seed, max_corpus_chars), trainer=trainer)
    base = tok.get_vocab_size(with_added_tokens=False)
    if base <= 256:
        raise DeployError("the demo tokenizer corpus was too small to learn any merges")

    names = llama3_special_token_names()
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    ids = {n: tok.token_to_id(n) for n in names}
    if [ids[n] for n in names] != list(range(base, base + len(names))):
        raise DeployError("special tokens did not land right after the base vocabulary")  # tokenizers changed?

    added = {str(ids[n]): {"content": n, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": True} for n in names}
    config = {
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "chat_template": DEMO_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        (tmp / "special_tokens_map.json").write_text(
            json.dumps({"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}, indent=2) + "\n", encoding="utf-8")
    return {
        "vocab_size": base + len(names),
        "base_vocab_size": base,
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_ids": [ids[END_OF_TEXT], ids[EOS_TOKEN]],
    }
