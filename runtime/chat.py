"""Chat prompts as token ids, kept apart from the Tokenizer as in meta-llama/llama3.

The checkpoint's Jinja chat template is rendered the way transformers renders it (sandboxed,
trim_blocks/lstrip_blocks, raise_exception, tojson, strftime_now), under resource limits (template.py),
but message content is never tokenized together with the template: the template is rendered with a
unique sentinel in place of each content, the template text around the sentinels is encoded with
special-token parsing, and the content itself as plain text. A user typing `<|eot_id|>` therefore
gets the ids of those characters, and the ids match Meta's reference, which also encodes each
content separately.
"""
from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any, Sequence

from llama3_deploy.errors import DeployError

from .template import compile_chat_template, render_chat_template
from .tokenizer import Tokenizer, check_unicode

# Used when a checkpoint ships no chat_template: Meta's Llama 3 Instruct format
# (content stripped, as Meta's ChatFormat.encode_message does).
LLAMA3_INSTRUCT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] | trim }}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_LLAMA3_CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def select_chat_template(template: str | list | None, name: str | None = None) -> str | None:
    """Pick the template text from tokenizer_config's `chat_template` (a string or [{name, template}])."""
    if template is None or isinstance(template, str):
        if name not in (None, "default") and template is not None:
            raise DeployError(f"chat template {name!r} not found: this tokenizer has a single unnamed template")
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        want = name or "default"
        if isinstance(named.get(want), str):
            return named[want]
        raise DeployError(f"chat template {want!r} not found; available: {sorted(k for k in named if k)}")
    raise DeployError(f"chat_template must be a string or a list of {{name, template}}, not {type(template).__name__}")


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check a dialog: a non-empty list of {'role': str, 'content': str} dicts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DeployError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DeployError(f"message {i} must be a dict with 'role' and 'content', not {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise DeployError(f"message {i} has no {key!r}")
            if not isinstance(m[key], str):
                raise DeployError(f"message {i}: {key!r} must be a str, not {type(m[key]).__name__}")
            check_unicode(m[key], f"message {i}: {key!r}")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            # Other fields would be rendered as trusted template text, so they are refused, not dropped.
            raise DeployError(f"message {i} has unsupported field(s) {extra}; only 'role' and 'content' are accepted")
        if not m["role"].strip():
            raise DeployError(f"message {i} has an empty role")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _split_ws(text: str) -> tuple[str, str, str]:
    """(leading whitespace, core, trailing whitespace), with Python's (and Jinja trim's) whitespace."""
    core = text.strip()
    if not core:
        return text, "", ""
    lead = text[: len(text) - len(text.lstrip())]
    return lead, core, text[len(lead) + len(core):]


class ChatFormat:
    """Turn a dialog into prompt ids with the checkpoint's chat template (or the Llama 3 Instruct format)."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str | list | None = None, *,
                 template_name: str | None = None) -> None:
        self.tokenizer = tokenizer
        # A broken template is reported when a chat prompt is built, not here: loading an export must
        # not fail for uses that never render it (token-id or plain-text prompts). Compiling runs no
        # template code (see template.py), so it cannot hang.
        self._template: Any = None
        self._template_error: str | None = None
        try:
            source = select_chat_template(tokenizer.chat_template if chat_template is None else chat_template,
                                          template_name)
        except DeployError as e:  # e.g. a dict where a string or a list of {name, template} belongs
            if template_name is not None:  # the caller asked for that template by name: say so now
                raise
            self.template_source, self._template_error = None, str(e)
            source = None
        if source is None and self._template_error is None:
            missing = [t for t in _LLAMA3_CHAT_TOKENS if t not in tokenizer.special_tokens]
            if missing:
                raise DeployError(f"no chat template in {Path(tokenizer.source).parent / 'tokenizer_config.json'} and "
                                  f"the tokenizer lacks the Llama 3 chat tokens {missing} for the default format")
            source = LLAMA3_INSTRUCT_TEMPLATE
        if self._template_error is None:
            self.template_source = source
            try:
                self._template = compile_chat_template(source)
            except DeployError as e:
                self._template_error = str(e)
        cfg = tokenizer.config
        bos = cfg.get("bos_token")
        eos = cfg.get("eos_token")
        self._variables = {
            "bos_token": _content(bos) or ("" if tokenizer.bos_id is None else tokenizer.id_to_token(tokenizer.bos_id)),
            "eos_token": _content(eos) or ("" if tokenizer.eos_id is None else tokenizer.id_to_token(tokenizer.eos_id)),
        }

    @property
    def template_error(self) -> str | None:
        """Why the chat template cannot be used (it fails to compile), or None; chat prompts raise it."""
        return self._template_error

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, template_name: str | None = None) -> "ChatFormat":
        """Tokenizer and chat template of a checkpoint or tokenizer directory."""
        return cls(Tokenizer.from_dir(model_dir), template_name=template_name)

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if self._template_error is not None:
            raise DeployError(self._template_error)
        return render_chat_template(self._template, messages=messages, tools=None, documents=None,
                                    add_generation_prompt=bool(add_generation_prompt), **self._variables)

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt as text (for display; use `encode_dialog` to get ids)."""
        return self._render(validate_messages(messages), add_generation_prompt)

    def encode_dialog(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for `messages`; message content is always encoded as plain text."""
        ids: list[int] = []
        for text, is_content in self.segments(messages, add_generation_prompt=add_generation_prompt):
            if text:
                ids += self.tokenizer.encode(text) if is_content else self.tokenizer.encode_with_specials(text)
        return ids

    def segments(self, messages: Sequence[dict[str, str]], *,
                 add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
        """The rendered prompt as (text, is_message_content) pieces, in order."""
        msgs = validate_messages(messages)
        if self._template_error is not None:
            raise DeployError(self._template_error)
        for i, m in enumerate(msgs):
            if self.tokenizer.encode_with_specials(m["role"]) != self.tokenizer.encode(m["role"]):
                raise DeployError(f"message {i}: role {m['role']!r} contains a special token")
        nonce = secrets.token_hex(8)
        while nonce in self.template_source or any(nonce in m["role"] or nonce in m["content"] for m in msgs):
            nonce = secrets.token_hex(8)
        mark = re.compile(rf"\[\[{nonce}:(\d+)\]\]")
        parts = [_split_ws(m["content"]) for m in msgs]

        def with_content(make: Any) -> list[dict[str, str]]:
            return [{"role": m["role"], "content": make(i, parts[i])} for i, m in enumerate(msgs)]

        # A: bare sentinels give the template text. B: sentinels wrapped in the content's own edge
        # whitespace show whether the template keeps or trims that whitespace. C: the real prompt.
        rendered_a = self._render(with_content(lambda i, p: f"[[{nonce}:{i}]]"), add_generation_prompt)
        rendered_b = self._render(with_content(lambda i, p: f"{p[0]}[[{nonce}:{i}]]{p[2]}"), add_generation_prompt)
        rendered_c = self._render(msgs, add_generation_prompt)
        split_a, split_b = mark.split(rendered_a), mark.split(rendered_b)
        if split_a[1::2] != split_b[1::2]:
            raise self._unsafe("it renders differently depending on the whitespace around a message")
        occ = [int(i) for i in split_a[1::2]]
        texts_a, texts_b = split_a[0::2], split_b[0::2]
        keep_lead = [False] * len(occ)
        keep_trail = [False] * len(occ)
        for k, (a, b) in enumerate(zip(texts_a, texts_b)):
            trail = parts[occ[k - 1]][2] if k > 0 else ""
            lead = parts[occ[k]][0] if k < len(occ) else ""
            for kt, kl in ((True, True), (True, False), (False, True), (False, False)):
                if (trail if kt else "") + a + (lead if kl else "") == b:
                    if k > 0:
                        keep_trail[k - 1] = kt
                    if k < len(occ):
                        keep_lead[k] = kl
                    break
            else:
                raise self._unsafe("it changes message content beyond trimming whitespace")
        segments: list[tuple[str, bool]] = [(texts_a[0], False)]
        for k, i in enumerate(occ):
            lead, core, trail = parts[i]
            segments.append(((lead if keep_lead[k] else "") + core + (trail if keep_trail[k] else ""), True))
            segments.append((texts_a[k + 1], False))
        if "".join(text for text, _ in segments) != rendered_c:
            raise self._unsafe("it changes message content beyond trimming whitespace")
        return segments

    @staticmethod
    def _unsafe(why: str) -> DeployError:
        return DeployError(f"cannot tokenize this chat template safely: {why}, so message content could not "
                           "be kept apart from control tokens")


def _content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
