"""Request size limits as an ASGI middleware: header bytes (431) and body bytes (413).

The body is checked twice: on Content-Length before anything is read, and while the body streams in
(chunked uploads carry no length), so at most `max_body_bytes` plus one chunk is ever held in memory.
uvicorn's h11 parser caps the bytes of an incomplete request head before this runs (see cli.py).
"""
from __future__ import annotations

import dataclasses

from starlette.exceptions import HTTPException

from .errors import APIError, error_response
from .protocol import MAX_MESSAGES, MAX_N


@dataclasses.dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 4 << 20        # a 128k-token prompt is ~0.5 MB of text
    max_header_bytes: int = 16 << 10     # all header names and values together (431 above it)
    max_content_chars: int = 1 << 20     # all message / prompt text of one request
    max_messages: int = MAX_MESSAGES
    max_n: int = MAX_N


class BodyTooLarge(HTTPException):
    """Raised from receive(); an HTTPException so FastAPI's body parsing passes it through unchanged."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than {limit} bytes")


class LimitsMiddleware:
    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        lim = self.limits
        headers = scope.get("headers", ())
        if sum(len(k) + len(v) for k, v in headers) > lim.max_header_bytes:
            return await error_response(APIError(
                431, f"request headers are larger than {lim.max_header_bytes} bytes"))(scope, receive, send)
        lengths = [v for k, v in headers if k.lower() == b"content-length"]
        if lengths:
            try:
                declared = int(lengths[0])
            except ValueError:
                declared = -1
            if len(set(lengths)) != 1 or declared < 0:
                return await error_response(APIError(400, "invalid Content-Length header"))(scope, receive, send)
            if declared > lim.max_body_bytes:
                return await error_response(APIError(
                    413, f"request body is larger than {lim.max_body_bytes} bytes"))(scope, receive, send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > lim.max_body_bytes:
                    raise BodyTooLarge(lim.max_body_bytes)
            return message

        await self.app(scope, counting_receive, send)
