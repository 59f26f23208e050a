"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with the matching HTTP status."""
from __future__ import annotations

import json
import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

log = logging.getLogger("llama3_deploy.server")

MAX_MESSAGE_CHARS = 1000  # error messages may quote user input: keep them short

# status -> (type, code) used when the raiser gives none
_DEFAULTS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", None),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    431: ("invalid_request_error", "request_header_fields_too_large"),
    500: ("server_error", None),
    503: ("server_error", "service_unavailable"),
}


class APIError(Exception):
    """An error to answer in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        default_type, default_code = _DEFAULTS.get(status, ("invalid_request_error" if status < 500 else
                                                            "server_error", None))
        self.status, self.message = status, message
        self.type, self.param, self.code = type or default_type, param, code or default_code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def json_bytes(obj) -> bytes:
    """JSON that always encodes: ASCII escapes (lone surrogates from hostile input survive) and no NaN."""
    return json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class JSON(Response):
    media_type = "application/json"

    def render(self, content) -> bytes:
        return json_bytes(content)


def error_response(err: APIError) -> JSON:
    return JSON(err.body(), status_code=err.status, headers=err.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    parts, param = [], None
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        param = param or (where or None)
        parts.append(f"{where}: {e.get('msg', 'invalid value')}" if where else str(e.get("msg", "invalid value")))
    more = f" (and {len(errors) - 5} more problems)" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more, param


def install_handlers(app: FastAPI) -> None:
    """Every error, FastAPI's own included (validation, 404, 405), leaves in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        # FastAPI turns an unparsable body into 400 "There was an error parsing the body".
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(APIError(exc.status_code, detail, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(APIError(500, "internal server error"))


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds if math.isfinite(seconds) else 1)))
