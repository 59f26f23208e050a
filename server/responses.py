"""OpenAI response bodies and SSE chunks from engine events, for chat and legacy completions."""
from __future__ import annotations

from llama3_deploy.runtime.engine import FinishEvent, TokenEvent

from .errors import APIError, json_bytes
from .protocol import new_id, now, usage


def sse(obj) -> bytes:
    return b"data: " + json_bytes(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def sse_error(err: APIError) -> bytes:
    return sse(err.body())


class TokenText:
    """Token strings and bytes for logprobs (cached: the same ids recur)."""

    def __init__(self, tokenizer):
        self._tok, self._cache = tokenizer, {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._tok.token_bytes(token_id) if self._tok is not None else f"<token {token_id}>".encode()
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), raw)
            if len(self._cache) > 65536:
                self._cache.clear()
        return hit


class Formatter:
    """Builds one request's bodies and chunks; `chat` picks the chat or the legacy completions shape."""

    def __init__(self, *, chat: bool, model: str, tokenizer, n_choices: int, prompt_tokens: int):
        self.chat, self.model = chat, model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()
        self.token_text = TokenText(tokenizer)
        self.texts = [""] * n_choices
        self.logprobs: list[list] = [[] for _ in range(n_choices)]
        self.finish: list[str | None] = [None] * n_choices
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    # ---- logprobs ----
    def _chat_logprob(self, ev: TokenEvent) -> dict:
        text, raw = self.token_text(ev.token_id)
        tops = []
        for alt in ev.top_logprobs:
            t, b = self.token_text(alt.token_id)
            tops.append({"token": t, "logprob": alt.logprob, "bytes": list(b)})
        return {"token": text, "logprob": ev.logprob, "bytes": list(raw), "top_logprobs": tops}

    def _legacy_logprobs(self, items: list[tuple[TokenEvent, int]]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for ev, offset in items:
            out["tokens"].append(self.token_text(ev.token_id)[0])
            out["token_logprobs"].append(ev.logprob)
            out["top_logprobs"].append({self.token_text(a.token_id)[0]: a.logprob for a in ev.top_logprobs})
            out["text_offset"].append(offset)
        return out

    def _item(self, index: int, ev: TokenEvent):
        if ev.logprob is None:
            return None
        return self._chat_logprob(ev) if self.chat else (ev, len(self.texts[index]))

    # ---- events ----
    def add(self, index: int, ev) -> None:
        """Record an event for the non-streaming body."""
        if isinstance(ev, TokenEvent):
            item = self._item(index, ev)
            if item is not None:
                self.logprobs[index].append(item)
            self.texts[index] += ev.text
        elif isinstance(ev, FinishEvent):
            self.texts[index] += ev.text
            self.finish[index] = ev.finish_reason
            self.completion_tokens += ev.completion_tokens

    def _logprobs_field(self, index: int, items: list):
        if not items and not self._want_logprobs:
            return None
        return {"content": items} if self.chat else self._legacy_logprobs(items)

    _want_logprobs = False

    def want_logprobs(self, flag: bool) -> "Formatter":
        self._want_logprobs = flag
        return self

    def body(self) -> dict:
        choices = []
        for i, text in enumerate(self.texts):
            lp = self._logprobs_field(i, self.logprobs[i])
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                "finish_reason": self.finish[i]})
            else:
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": self.finish[i]})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": usage(self.prompt_tokens, self.completion_tokens), "system_fingerprint": None}

    # ---- streaming ----
    def chunk(self, choices: list[dict], with_usage: bool = False) -> bytes:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": choices, "system_fingerprint": None}
        if with_usage:
            obj["usage"] = None
        return sse(obj)

    def role_chunks(self, with_usage: bool) -> list[bytes]:
        if not self.chat:
            return []
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}], with_usage) for i in range(len(self.texts))]

    def _delta(self, index: int, text: str, items: list, finish: str | None) -> dict:
        lp = ({"content": items} if self.chat else self._legacy_logprobs(items)) if items else None
        if self.chat:
            delta = {"content": text} if (text or items or finish is None) else {}
            return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}

    def event_chunk(self, index: int, ev, with_usage: bool) -> bytes | None:
        """The chunk for one event (None when it carries nothing to send)."""
        if isinstance(ev, TokenEvent):
            item = self._item(index, ev)
            self.texts[index] += ev.text
            if not ev.text and item is None:
                return None
            return self.chunk([self._delta(index, ev.text, [item] if item else [], None)], with_usage)
        self.texts[index] += ev.text
        self.finish[index] = ev.finish_reason
        self.completion_tokens += ev.completion_tokens
        return self.chunk([self._delta(index, ev.text, [], ev.finish_reason)], with_usage)

    def usage_chunk(self) -> bytes:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": [],
               "usage": usage(self.prompt_tokens, self.completion_tokens), "system_fingerprint": None}
        return sse(obj)
