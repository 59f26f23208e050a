"""Llama 3 tokenizer for the runtime, on the `tokenizers` library (no torch, no transformers, no tiktoken).

Loads a Hugging Face `tokenizer.json`, or builds the same byte-level BPE from Meta's original
tiktoken-format `tokenizer.model`. Plain text is never parsed into control tokens: `encode` treats
`<|eot_id|>` typed by a user as ordinary characters; only `encode_with_specials` (for trusted
template text) turns special-token strings into their ids. Every added token counts as a control
token, whatever its `special` flag says: fine-tunes that register `<|eot_id|>` with `add_tokens()`
mark it `special: false`, and plain text must not reach it either.
"""
from __future__ import annotations

import codecs
import json
import numbers
import re
from pathlib import Path
from typing import Any, Iterable

import tokenizers
from tokenizers import decoders as _decoders

from llama3_deploy.config import read_json
from llama3_deploy.errors import DeployError

from .bpe import read_tiktoken_ranks, tiktoken_to_tokenizer_json, unicode_to_bytes

TOKENIZER_JSON = "tokenizer.json"
TIKTOKEN_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"

NUM_LLAMA3_SPECIAL_TOKENS = 256
BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
EOT = "<|eot_id|>"
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_unicode(text: str, what: str = "text") -> None:
    """Refuse text the tokenizer cannot encode: lone surrogates (from undecodable bytes, which Python
    turns into U+DC80..U+DCFF on the command line, or from JSON/API input such as "\\ud800")."""
    bad = _SURROGATE.search(text)
    if bad:
        raise DeployError(f"{what} is not valid Unicode: lone surrogate U+{ord(bad.group()):04X} at character "
                          f"{bad.start()} (invalid UTF-8 in the input?)")


def llama3_special_token_names(count: int = NUM_LLAMA3_SPECIAL_TOKENS) -> list[str]:
    """The special tokens Meta's Llama 3 tokenizer appends after the BPE vocabulary, in id order."""
    names = [
        BEGIN_OF_TEXT, END_OF_TEXT,
        "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
        "<|start_header_id|>", "<|end_header_id|>",
        "<|reserved_special_token_4|>", EOT,
    ]
    names += [f"<|reserved_special_token_{i}|>" for i in range(5, count - 5)]
    return names


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json spells tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _all_added_special(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """The same tokenizer with every added token marked special. `encode_special_tokens` only stops
    the backend from matching *special* added tokens in text; non-special ones would still be cut
    out of user text as control ids."""
    doc = json.loads(backend.to_str())
    for token in doc.get("added_tokens") or []:
        token["special"] = True
    rebuilt = tokenizers.Tokenizer.from_str(json.dumps(doc, ensure_ascii=False))
    if any(not t.special for t in rebuilt.get_added_tokens_decoder().values()):
        raise DeployError("cannot mark this tokenizer's added tokens as control tokens")
    return rebuilt


class Tokenizer:
    """Encode/decode Llama 3 text. Build it with `Tokenizer.from_dir(model_dir)`."""

    def __init__(self, backend: tokenizers.Tokenizer, *, config: dict[str, Any] | None = None,
                 generation_config: dict[str, Any] | None = None, source: str = "") -> None:
        if any(not tok.special for tok in backend.get_added_tokens_decoder().values()):
            backend = _all_added_special(backend)
        self._backend = backend
        # Set once and never toggled: backend encodes never parse special tokens (thread-safe, injection-safe).
        backend.encode_special_tokens = True
        self.source = source
        self.config = dict(config or {})
        added = backend.get_added_tokens_decoder()
        self._special_ids = {i: tok.content for i, tok in added.items()}  # all added tokens: see the module doc
        self.special_tokens: dict[str, int] = {name: i for i, name in sorted(self._special_ids.items())}
        names = sorted(self.special_tokens, key=len, reverse=True)  # longest first: no prefix shadowing
        self._special_re = re.compile("|".join(map(re.escape, names))) if names else None
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._byte_level = isinstance(backend.decoder, _decoders.ByteLevel)
        self._search_index: list[tuple[int, str, str]] | None = None

        bos = _token_content(self.config.get("bos_token")) or BEGIN_OF_TEXT
        self.bos_id: int | None = self._lookup(bos)
        cfg_eos = self._lookup(_token_content(self.config.get("eos_token")))
        # Meta's encode(eos=True) appends <|end_of_text|> even for Instruct models, whose HF config
        # names <|eot_id|> as eos_token; keep that so ids match the reference.
        end = self._lookup(END_OF_TEXT)
        self.eos_id: int | None = end if end is not None else cfg_eos
        stops = {self.eos_id, self._lookup(EOT), cfg_eos}
        gen_eos = (generation_config or {}).get("eos_token_id")
        stops.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos_ids: tuple[int, ...] = tuple(sorted(i for i in stops if isinstance(i, int) and 0 <= i < self._vocab_size))
        template = self.config.get("chat_template")
        # Kept as found: ChatFormat refuses a value of the wrong type (a dict) when a chat prompt is built.
        self.chat_template: Any = template

    def _lookup(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` from `model_dir`, else convert Meta's tiktoken `tokenizer.model`.

        `tokenizer_config.json` (special tokens, bos/eos, chat template) and `generation_config.json`
        (stop ids) are read when present.
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise DeployError(f"tokenizer directory not found: {model_dir}")
        cfg_path, gen_path = model_dir / TOKENIZER_CONFIG, model_dir / GENERATION_CONFIG
        config = read_json(cfg_path, what=cfg_path.name) if cfg_path.is_file() else {}
        gen = read_json(gen_path, what=gen_path.name) if gen_path.is_file() else {}
        json_path = model_dir / TOKENIZER_JSON
        # HF copies of Meta's repos keep the tiktoken file under original/.
        model_paths = [model_dir / TIKTOKEN_MODEL, model_dir / "original" / TIKTOKEN_MODEL]
        if json_path.is_file():
            try:
                backend = tokenizers.Tokenizer.from_file(str(json_path))
            except Exception as e:  # the Rust side raises bare Exception subclasses
                raise DeployError(f"corrupt tokenizer file {json_path}: {e}") from e
            return cls(backend, config=config, generation_config=gen, source=str(json_path))
        for path in model_paths:
            if path.is_file():
                return cls.from_tiktoken_file(path, config=config, generation_config=gen)
        raise DeployError(f"no tokenizer in {model_dir}: expected {TOKENIZER_JSON} or {TIKTOKEN_MODEL}")

    @classmethod
    def from_tiktoken_file(cls, path: str | Path, *, config: dict[str, Any] | None = None,
                           generation_config: dict[str, Any] | None = None) -> "Tokenizer":
        """Build from a tiktoken-format BPE file; specials come from `config["added_tokens_decoder"]`
        when given, else Meta's 256 Llama 3 special tokens right after the BPE vocabulary."""
        ranks = read_tiktoken_ranks(path)
        specials: dict[int, str] = {}
        for key, value in (config or {}).get("added_tokens_decoder", {}).items():
            name = _token_content(value)
            if name is not None and str(key).isdigit():
                specials[int(key)] = name
        if not specials:
            specials = {len(ranks) + i: name for i, name in enumerate(llama3_special_token_names())}
        if min(specials) < len(ranks):
            raise DeployError(f"{TOKENIZER_CONFIG} places special tokens inside the BPE vocabulary of {path}")
        doc = tiktoken_to_tokenizer_json(ranks, specials)
        backend = tokenizers.Tokenizer.from_str(json.dumps(doc, ensure_ascii=False))
        return cls(backend, config=config, generation_config=generation_config, source=str(path))

    # ---- encoding / decoding ------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (128256 for Llama 3)."""
        return self._vocab_size

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (special-token parsing is switched off on it)."""
        return self._backend

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text` as plain text: special-token strings in it are encoded as characters."""
        if not isinstance(text, str):
            raise DeployError(f"text to encode must be a str, not {type(text).__name__}")
        check_unicode(text)
        ids = self._backend.encode(text, add_special_tokens=False).ids if text else []
        if not self._special_ids.keys().isdisjoint(ids):
            # Only a vocabulary that also lists a control token's text (at its id) gets here.
            bad = next(i for i in ids if i in self._special_ids)
            raise DeployError(f"plain text encodes to control token {self._special_ids[bad]!r} (id {bad}) with "
                              f"this tokenizer ({self.source or 'in memory'}); its vocabulary spells control tokens")
        return self._wrap(ids, bos, eos)

    def encode_with_specials(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of trusted text (chat-template output) where special-token strings become their ids."""
        if not isinstance(text, str):
            raise DeployError(f"text to encode must be a str, not {type(text).__name__}")
        check_unicode(text)
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text) if self._special_re else ():
            if m.start() > pos:
                ids += self._backend.encode(text[pos:m.start()], add_special_tokens=False).ids
            ids.append(self.special_tokens[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self._backend.encode(text[pos:], add_special_tokens=False).ids
        return self._wrap(ids, bos, eos)

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id is None:
                raise DeployError("this tokenizer has no beginning-of-text token; encode with bos=False")
            ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise DeployError("this tokenizer has no end-of-text token; encode with eos=False")
            ids = ids + [self.eos_id]
        return ids

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        if isinstance(ids, (str, bytes, dict)) or not isinstance(ids, Iterable):
            raise DeployError(f"token ids must be a sequence of integers, not {type(ids).__name__}")
        out = list(ids)
        for k, i in enumerate(out):
            # Exactly integers: int(9906.7) would truncate, int(True) would pass a flag off as id 1.
            if type(i) is not int and (isinstance(i, bool) or not isinstance(i, numbers.Integral)):
                raise DeployError(f"token ids must be integers: position {k} holds {i!r:.40} ({type(i).__name__})")
        if out and any(type(i) is not int for i in out):
            out = [int(i) for i in out]  # numpy integers
        if out and (min(out) < 0 or max(out) >= self._vocab_size):
            bad = next(i for i in out if not 0 <= i < self._vocab_size)
            raise DeployError(f"token id {bad} is outside the vocabulary (0..{self._vocab_size - 1})")
        return out

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens appear as their names unless `skip_special_tokens`.

        Bytes that do not form valid UTF-8 become U+FFFD. No "clean-up" of spaces is applied.
        """
        return self._backend.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes token `token_id` contributes to decoded text (byte-level vocabularies)."""
        (token_id,) = self._check_ids([token_id])
        if token_id in self._special_ids:
            return self._special_ids[token_id].encode("utf-8")
        token = self._backend.id_to_token(token_id)
        table = unicode_to_bytes()
        if self._byte_level and token is not None and all(c in table for c in token):
            return bytes(table[c] for c in token)
        return self._backend.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a special (control) token: any added token."""
        (token_id,) = self._check_ids([token_id])
        return token_id in self._special_ids

    def id_to_token(self, token_id: int) -> str:
        """Raw vocabulary string of `token_id` (e.g. 'Ġyes' for " yes")."""
        (token_id,) = self._check_ids([token_id])
        token = self._backend.id_to_token(token_id)
        if token is None:
            raise DeployError(f"token id {token_id} has no vocabulary entry")
        return token

    def token_to_id(self, token: str) -> int | None:
        """Id of a raw vocabulary string or special-token name, or None if it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    # ---- vocabulary search / streaming --------------------------------------------------------

    def search(self, query: str, *, case_sensitive: bool = False, limit: int | None = None) -> list[tuple[int, str]]:
        """Vocabulary entries `(id, raw token)` whose decoded text contains `query`, in id order."""
        if not isinstance(query, str) or not query:
            raise DeployError("vocabulary search needs a non-empty query string")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise DeployError(f"search limit must be a positive integer (got {limit!r})")
        if self._search_index is None:
            # Built on first use only: ~0.2 s for 128k tokens, not worth paying at load time.
            index = []
            for i in range(self._vocab_size):
                raw = self._backend.id_to_token(i)
                if raw is not None:
                    index.append((i, raw, self.token_bytes(i).decode("utf-8", errors="replace")))
            self._search_index = index
        needle = query if case_sensitive else query.casefold()
        out = []
        for i, raw, text in self._search_index:
            if needle in (text if case_sensitive else text.casefold()):
                out.append((i, raw))
                if limit is not None and len(out) >= limit:
                    break
        return out

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> "StreamDecoder":
        """A new incremental detokenizer for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self._vocab_size}, source={self.source!r})"


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns only newly completed text.

    For byte-level vocabularies each token's bytes go through an incremental UTF-8 decoder, so a
    character split across tokens (emoji, CJK) is held back until complete and the joined deltas
    equal `Tokenizer.decode(all_ids)` exactly, with O(1) work per token. Other vocabularies fall back
    to decoding a short window of recent ids (the approach of HF's TextStreamer / vLLM).
    """

    _WINDOW = 6  # ids of left context kept for the window fallback

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False, _force_window: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._bytes_mode = tokenizer._byte_level and not _force_window
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._prefix = 0  # window fallback: ids[_prefix:_read] were already emitted (context only)
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one token id; return the text it completes (possibly '')."""
        if self._skip and self._tok.is_special(token_id):  # (is_special validates the id)
            return ""
        if self._bytes_mode:
            return self._utf8.decode(self._tok.token_bytes(token_id))
        (token_id,) = self._tok._check_ids([token_id])
        self._ids.append(token_id)
        prefix = self._tok.decode(self._ids[self._prefix:self._read])
        full = self._tok.decode(self._ids[self._prefix:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self._prefix, self._read = max(0, len(self._ids) - self._WINDOW), len(self._ids)
            self._trim()
            return delta
        return ""

    def _trim(self) -> None:
        # Drop ids that no window can reach any more so memory stays constant.
        if self._prefix > 0:
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0

    def flush(self) -> str:
        """Return any held-back text (an incomplete character becomes U+FFFD) and reset."""
        if self._bytes_mode:
            out = self._utf8.decode(b"", final=True)
            self._utf8.reset()
            return out
        prefix = self._tok.decode(self._ids[self._prefix:self._read])
        full = self._tok.decode(self._ids[self._prefix:])
        self._ids, self._prefix, self._read = [], 0, 0
        return full[len(prefix):]
