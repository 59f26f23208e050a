"""Request bodies (pydantic, which also gives the OpenAPI schema) and OpenAI's response shapes."""
from __future__ import annotations

import secrets
import time
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

MAX_N = 8                     # choices per request (vLLM GHSA-3mwp-wvh9-7528: n was unbounded)
MAX_MESSAGES = 512            # messages per chat request
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20
SEED_MIN, SEED_END = -(1 << 63), 1 << 64  # OpenAI seeds are int64; negative ones map into [0, 2**64)

Text = Annotated[str, Field(max_length=1 << 22)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Body(BaseModel):
    # Strict ints and bools: "yes" is not true and 2.5 is not a count (floats still take ints).
    # Unknown fields are ignored (clients send e.g. `metadata`); known unsupported ones are refused below.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)]]
    name: Annotated[str, Field(max_length=256)] | None = None  # accepted, not rendered (Llama 3 has no names)


class ResponseFormat(_Body):
    type: Literal["text"]


class _Sampling(_Body):
    """Fields shared by chat and completions, OpenAI's plus vLLM-style extensions."""

    model: Annotated[str, Field(max_length=512)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stop: Union[Annotated[str, Field(max_length=256)], Annotated[list[str], Field(max_length=16)], None] = None
    seed: Annotated[StrictInt, Field(ge=SEED_MIN, lt=SEED_END)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    # extensions
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    stop_token_ids: Annotated[list[Annotated[StrictInt, Field(ge=0)]],
                              Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: Literal["none", "auto"] | None = None


TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
Prompt = Union[Text, Annotated[list[Text], Field(min_length=1, max_length=MAX_N)], TokenIds,
               Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_N)]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: StrictBool = False
    suffix: str | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = None


# ---- responses ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str, max_context: int) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llama3-deploy", "root": name,
            "max_model_len": max_context}
