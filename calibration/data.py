"""Calibration data: token windows from a user's file, or from the project's own offline default corpus.

Sources
  * `.jsonl`: one JSON object per line, `{"messages": [{"role", "content"}, ...]}` (rendered with the
    checkpoint's chat template through ChatFormat, so message content never becomes control tokens) or
    `{"text": "..."}` (encoded as plain text); other keys are ignored, blank lines skipped.
  * `.txt`: the whole file is one plain-text record.
  * None: the default set, written by the project itself from the Python standard library's text (the
    train split of `calibration/train_small.py`, so the held-out text quality is measured on is never seen
    here); offline and deterministic for a given Python installation and seed.

The window rule
  Every window starts with <|begin_of_text|> at position 0, as every real prompt does: the first position
  carries a Llama model's largest activations, so windows without it would under-state the ranges.
  A record's tokens: a text's plain-text ids followed by <|end_of_text|>; a dialog's template rendering
  (add_generation_prompt false) with its own leading <|begin_of_text|> removed. A record of at least
  `seq_len - 1` tokens gives its own windows: consecutive, non-overlapping chunks of `seq_len - 1` tokens from
  its start (a shorter tail is dropped). Shorter records are concatenated, in file order, into one stream cut
  the same way. Each chunk is prefixed with <|begin_of_text|> (a tokenizer without one: chunks of `seq_len`,
  no prefix). `num_sequences` windows are then sampled without replacement by `seed` and kept in pool order;
  when the pool has fewer, all of them are used and the description says so.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np

from llama3_deploy.config import LlamaConfig, load_config
from llama3_deploy.errors import DeployError

MAX_FILE_BYTES = 1 << 30        # a calibration file larger than this is refused before it is read
MAX_SEQUENCES = 4096            # more windows than this buys nothing for per-tensor ranges
DEFAULT_NUM_SEQUENCES = 64
DEFAULT_SEQ_LEN = 512
DEFAULT_MIN_CHARS = 200_000     # the default corpus reads ~16 chars per needed token, within these bounds
DEFAULT_MAX_CHARS = 16_000_000
TEXT_PIECE_CHARS = 1 << 20      # plain text is encoded in pieces of about this size (see _encode_text)
HASH_DOMAIN = b"llama3-deploy calibration tokens v1\0"
# A newline followed by a non-space character is always a pre-token boundary under Llama 3's split regex
# (no alternative joins a newline to what follows it), so encoding the pieces separately gives the same ids.
_PIECE_BOUNDARY = re.compile(r"(?<=\n)(?=\S)")


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    """`len(sequences)` token windows of `seq_len` ids each; `sha256` identifies the ids (and only them)."""

    sequences: tuple[tuple[int, ...], ...]
    seq_len: int
    seed: int
    source: str          # the file's path, or "default"
    sha256: str
    description: str

    def as_array(self) -> np.ndarray:
        """[N, L] int64."""
        return np.asarray(self.sequences, dtype=np.int64).reshape(len(self.sequences), self.seq_len)

    @property
    def num_tokens(self) -> int:
        return len(self.sequences) * self.seq_len


def token_sha256(sequences: tuple[tuple[int, ...], ...], seq_len: int) -> str:
    """The data's identity: its shape and ids as little-endian int64."""
    h = hashlib.sha256(HASH_DOMAIN)
    h.update(f"{len(sequences)}x{seq_len}\0".encode())
    h.update(np.asarray(sequences, dtype="<i8").tobytes())
    return h.hexdigest()


def _count(name: str, value: Any, cap: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DeployError(f"{name} must be a positive integer (got {value!r})")
    if cap is not None and value > cap:
        raise DeployError(f"{name} {value} is over the limit of {cap}")
    return value


def load_calibration_set(path: str | Path | None, *, model_dir: str | Path,
                         num_sequences: int = DEFAULT_NUM_SEQUENCES, seq_len: int = DEFAULT_SEQ_LEN,
                         seed: int = 0, config: LlamaConfig | None = None) -> CalibrationSet:
    """Tokenize and sample a calibration set (see the module doc for formats and the window rule).

    `model_dir` holds the tokenizer files (and config.json, unless `config` is given: it bounds `seq_len` by
    the model's context and the ids by its vocabulary). Every user-fixable problem is a DeployError.
    """
    from llama3_deploy.runtime.tokenizer import Tokenizer

    num_sequences = _count("num_sequences", num_sequences, MAX_SEQUENCES)
    seq_len = _count("seq_len", seq_len)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DeployError(f"seed must be an integer (got {seed!r})")
    if seq_len < 2:
        raise DeployError("seq_len must be at least 2 (a prefill token and one to decode)")
    config = config or load_config(Path(model_dir))
    if seq_len > config.max_position_embeddings:
        raise DeployError(f"seq_len {seq_len} is over the model's context of {config.max_position_embeddings} "
                          "tokens (max_position_embeddings)")
    try:
        tok = Tokenizer.from_dir(model_dir)
    except DeployError as e:
        raise DeployError(f"calibration needs the checkpoint's tokenizer: {e}") from None

    if path is None:
        records, what = _default_records(tok, num_sequences * seq_len, seed), "the default stdlib corpus"
        source = "default"
    else:
        path = Path(path)
        records, what = _file_records(tok, path), str(path)
        source = str(path)

    pool, short = _windows(records, seq_len, tok.bos_id)
    if not pool:
        total = sum(len(r) for r in records)
        raise DeployError(f"{what} has {total} tokens: not enough for one sequence of {seq_len} tokens "
                          "(use a smaller seq_len or more text)")
    chosen = sorted(random.Random(seed).sample(range(len(pool)), min(num_sequences, len(pool))))
    sequences = tuple(tuple(pool[i]) for i in chosen)
    top = max(max(s) for s in sequences)
    if top >= config.vocab_size:
        raise DeployError(f"the tokenizer in {model_dir} produces id {top}, outside the model's vocabulary "
                          f"of {config.vocab_size}: tokenizer and checkpoint do not match")
    note = "" if len(sequences) == num_sequences else f" (only {len(pool)} available of {num_sequences} requested)"
    description = (f"{len(sequences)} windows of {seq_len} tokens sampled with seed {seed} from {len(pool)} in "
                   f"{what} ({len(records)} records, {short} packed into one stream){note}")
    return CalibrationSet(sequences, seq_len, seed, source, token_sha256(sequences, seq_len), description)


def _windows(records: list[list[int]], seq_len: int, bos: int | None) -> tuple[list[list[int]], int]:
    """The window pool (module doc) and the number of records packed into the shared stream."""
    body = seq_len - 1 if bos is not None else seq_len
    prefix = [bos] if bos is not None else []
    pool: list[list[int]] = []
    stream: list[int] = []
    short = 0
    for ids in records:
        if len(ids) >= body:
            pool += [prefix + ids[i:i + body] for i in range(0, len(ids) - body + 1, body)]
        else:
            stream += ids
            short += 1
    pool += [prefix + stream[i:i + body] for i in range(0, len(stream) - body + 1, body)]
    return pool, short


def _encode_text(tok, text: str) -> list[int]:
    """Plain-text ids + <|end_of_text|>; long text in pieces cut where Llama 3's pre-tokenizer always splits."""
    if len(text) <= TEXT_PIECE_CHARS:
        ids = tok.encode(text)
    else:
        pieces, current, size = [], [], 0
        for part in _PIECE_BOUNDARY.split(text):
            current.append(part)
            size += len(part)
            if size >= TEXT_PIECE_CHARS:
                pieces.append("".join(current))
                current, size = [], 0
        pieces.append("".join(current))
        ids = [i for piece in pieces for i in tok.encode(piece)]
    return ids + ([tok.eos_id] if tok.eos_id is not None else [])


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DeployError(f"calibration file not found: {path}")
    if not path.is_file():
        raise DeployError(f"calibration data must be a file, not a directory or device: {path}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DeployError(f"calibration file {path} is {size} bytes, over the limit of {MAX_FILE_BYTES} "
                          "(MAX_FILE_BYTES); a few hundred sequences are enough")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DeployError(f"cannot read calibration file {path}: {e.strerror}") from None
    if not data.strip():
        raise DeployError(f"calibration file {path} is empty")
    return data


def _file_records(tok, path: Path) -> list[list[int]]:
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".txt"):
        raise DeployError(f"unsupported calibration file {path}: use .jsonl ({{\"messages\": [...]}} or "
                          "{\"text\": ...} per line) or .txt (plain UTF-8 text)")
    data = _read_bytes(path)
    if suffix == ".txt":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise DeployError(f"{path} is not UTF-8 text: invalid byte at line {line}") from None
        return [_encode_text(tok, text)]
    chat = None
    records = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise DeployError(f"{where}: not UTF-8") from None
        except json.JSONDecodeError as e:
            raise DeployError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or ("messages" in obj) == ("text" in obj):
            raise DeployError(f"{where}: each line must be an object with either \"messages\" or \"text\"")
        try:
            if "text" in obj:
                if not isinstance(obj["text"], str):
                    raise DeployError(f"\"text\" must be a string, not {type(obj['text']).__name__}")
                records.append(_encode_text(tok, obj["text"]))
            else:
                if chat is None:
                    from llama3_deploy.runtime.chat import ChatFormat
                    chat = ChatFormat(tok)
                ids = chat.encode_dialog(obj["messages"], add_generation_prompt=False)
                records.append(ids[1:] if ids and ids[0] == tok.bos_id else ids)
        except DeployError as e:
            raise DeployError(f"{where}: {e}") from None
    if not records:
        raise DeployError(f"calibration file {path} is empty (no records)")
    return records


def _default_records(tok, tokens_needed: int, seed: int) -> list[list[int]]:
    """Stdlib train-split files in seeded order, each one text record, read up to a size scaled to the need."""
    from llama3_deploy.calibration.demo_tokenizer import read_corpus
    from llama3_deploy.calibration.train_small import corpus_split

    files = corpus_split()[0]
    random.Random(seed).shuffle(files)
    max_chars = min(DEFAULT_MAX_CHARS, max(DEFAULT_MIN_CHARS, 16 * tokens_needed))
    return [_encode_text(tok, text) for text in read_corpus(files, max_chars=max_chars)]
