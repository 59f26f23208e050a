"""From a validated request body to engine jobs: prompt ids (rendered and counted) and SamplingParams."""
from __future__ import annotations

import dataclasses

from llama3_deploy.errors import DeployError
from llama3_deploy.runtime.sampling import SamplingParams

from .errors import APIError
from .limits import Limits
from .protocol import SEED_END, ChatCompletionRequest, CompletionRequest

_PARAM_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def _content(message) -> str:
    if isinstance(message.content, str):
        return message.content
    return "\n".join(part.text for part in message.content)


def chat_prompt(engine, body: ChatCompletionRequest, limits: Limits) -> list[int]:
    """The chat template rendered to ids; message content is always plain text, never control tokens."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _content(m)}
                for m in body.messages]
    if engine.chat is None:
        raise APIError(400, "this export ships no tokenizer: use /v1/completions with token-id prompts",
                       param="messages")
    chars = sum(len(m["content"]) for m in messages)
    if chars > limits.max_content_chars:
        raise APIError(400, f"messages hold {chars} characters; at most {limits.max_content_chars} are allowed",
                       param="messages")
    try:
        return engine.chat.encode_dialog(messages)
    except DeployError as e:
        raise APIError(400, str(e), param="messages") from None


def completion_prompts(engine, body: CompletionRequest, limits: Limits) -> list[list[int]]:
    """Prompt ids per prompt: text is encoded as plain text after BOS; token ids are taken as given."""
    prompt = body.prompt
    items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    if len(items) * body.n > limits.max_n:
        raise APIError(400, f"{len(items)} prompts x n={body.n} makes {len(items) * body.n} choices; at most "
                            f"{limits.max_n} are allowed", param="n")
    tok = engine.tokenizer
    texts = [p for p in items if isinstance(p, str)]
    chars = sum(map(len, texts))
    if chars > limits.max_content_chars:
        raise APIError(400, f"prompt holds {chars} characters; at most {limits.max_content_chars} are allowed",
                       param="prompt")
    out = []
    for p in items:
        if isinstance(p, str):
            if tok is None:
                raise APIError(400, "this export ships no tokenizer: send the prompt as token ids", param="prompt")
            try:
                ids = tok.encode(p, bos=tok.bos_id is not None)
            except DeployError as e:
                raise APIError(400, f"prompt: {e}", param="prompt") from None
        else:
            ids = list(p)
            vocab = engine.config.vocab_size
            bad = next((i for i in ids if not 0 <= i < vocab), None)
            if bad is not None:
                raise APIError(400, f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})",
                               param="prompt")
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt")
        out.append(ids)
    return out


def _check_unsupported(body) -> None:
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if isinstance(body, ChatCompletionRequest):
        if body.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    else:
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of must equal n (or be omitted)", param="best_of")


def sampling_jobs(engine, body, prompts: list[list[int]]) -> list[tuple[list[int], SamplingParams]]:
    """One (prompt ids, params) per choice: each prompt times n, seeds derived from `seed`."""
    _check_unsupported(body)
    max_context = engine.max_context
    if isinstance(body, ChatCompletionRequest):
        requested = body.max_completion_tokens or body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        requested, logprobs = body.max_tokens, body.logprobs
    kwargs = {}
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0:  # OpenAI accepts top_p=0: only the most likely token, which is greedy
        temperature, top_p = 0.0, 1.0
    kwargs.update(temperature=temperature, top_p=top_p)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    if stop:
        kwargs["stop"] = tuple(stop)
    for name in ("top_k", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        if getattr(body, name) is not None:
            kwargs[name] = getattr(body, name)
    if body.stop_token_ids:
        vocab = engine.config.vocab_size
        bad = next((i for i in body.stop_token_ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise APIError(400, f"stop_token_ids: {bad} is outside the vocabulary (0..{vocab - 1})",
                           param="stop_token_ids")
        kwargs["stop_token_ids"] = tuple(body.stop_token_ids)
    if logprobs is not None:
        kwargs["logprobs"] = logprobs
    unsupported = sorted(k for k in kwargs if k not in _PARAM_FIELDS)
    if unsupported:
        raise APIError(400, f"{unsupported[0]} is not supported by this engine", param=unsupported[0])
    jobs = []
    for p_index, ids in enumerate(prompts):
        if len(ids) >= max_context:
            raise _too_long(max_context, len(ids), requested or 1)
        max_new = requested if requested is not None else max_context - len(ids)
        if len(ids) + max_new > max_context:
            raise _too_long(max_context, len(ids), max_new)
        for i in range(body.n):
            seed = None if body.seed is None else (body.seed + p_index * body.n + i) % SEED_END
            try:
                params = SamplingParams(max_new_tokens=max_new, seed=seed, **kwargs)
            except DeployError as e:
                raise APIError(400, str(e)) from None
            jobs.append((ids, params))
    return jobs


def _too_long(max_context: int, prompt: int, completion: int) -> APIError:
    return APIError(400, f"This model's maximum context length is {max_context} tokens. However, you requested "
                         f"{prompt + completion} tokens ({prompt} in the prompt, {completion} in the completion). "
                         "Please reduce the length of the messages or completion.",
                    param="messages", code="context_length_exceeded")
