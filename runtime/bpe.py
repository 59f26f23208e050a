"""Meta's tiktoken-format `tokenizer.model` as a `tokenizers` byte-level BPE document (no tiktoken needed)."""
from __future__ import annotations

import base64
import binascii
from functools import lru_cache
from pathlib import Path
from typing import Any

from llama3_deploy.errors import DeployError

# The pre-tokenizer regex of Meta's llama3 tokenizer.py (and of the HF tokenizer.json).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (lines of `<base64 token> <rank>`) into {token bytes: rank}."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DeployError(f"cannot read tokenizer file {path}: {e}") from e
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            raise DeployError(f"corrupt tokenizer file {path}: line {lineno} is not '<base64 token> <rank>'") from None
        if not token or token in ranks:
            raise DeployError(f"corrupt tokenizer file {path}: line {lineno} has an empty or repeated token")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DeployError(f"corrupt tokenizer file {path}: ranks are not the unique integers 0..{len(ranks) - 1}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        # Without every single byte some text could not be encoded at all.
        raise DeployError(f"corrupt tokenizer file {path}: {len(missing)} of the 256 single-byte tokens are missing")
    return ranks


def tiktoken_to_tokenizer_json(ranks: dict[bytes, int], special_tokens: dict[int, str], *,
                               pattern: str = LLAMA3_PATTERN) -> dict[str, Any]:
    """Build a `tokenizers` JSON document equivalent to a tiktoken encoding.

    Merges are recovered as transformers' TikTokenConverter does: every split of a token into two
    vocabulary tokens is a merge, ranked by the merged token's rank (ties by the halves' ranks).
    That is exactly tiktoken's rule (merge the adjacent pair whose concatenation has the lowest
    rank); `ignore_merges` reproduces tiktoken's whole-piece lookup before merging.
    """
    table = bytes_to_unicode()  # one printable character per byte: slicing the text slices the bytes
    by_rank: list[bytes] = [b""] * len(ranks)
    for token, rank in ranks.items():
        by_rank[rank] = token
    get = ranks.get
    vocab: dict[str, int] = {}
    merges: list[list[str]] = []
    for rank, token in enumerate(by_rank):
        text = token.decode("latin-1").translate(table)
        vocab[text] = rank
        splits = []
        for i in range(1, len(token)):
            left = get(token[:i])
            if left is not None:
                right = get(token[i:])
                if right is not None:
                    splits.append((left, right, i))
        splits.sort()
        merges.extend([text[:i], text[i:]] for _, _, i in splits)
    added = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, name in sorted(special_tokens.items())]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }
