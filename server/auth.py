"""Optional bearer-token auth as an ASGI middleware in front of the whole app.

Deny by default: every request needs `Authorization: Bearer <key>` unless its path is exactly one of the
public paths (GET /health, for load balancers and probes). The decision uses only the path the router
itself routes on (scope["path"]) and the raw bytes of the request target, both compared for equality, so no
Host header, query string, `//`, `..` or percent-encoding turns a protected route into a public one
(vLLM GHSA-94f4-hr76-p5j6 derived the path from the Host header). /metrics is protected too: it reveals
traffic, and Prometheus can send a bearer token (`authorization` in its scrape config).
"""
from __future__ import annotations

import hmac

from .errors import APIError, error_response

PUBLIC_PATHS = frozenset({"/health"})


class APIKeyMiddleware:
    def __init__(self, app, api_key: str | None, public_paths=PUBLIC_PATHS):
        self.app = app
        self._key = api_key.encode("utf-8") if api_key else None
        self._public = frozenset(public_paths)

    def _is_public(self, scope) -> bool:
        path = scope.get("path", "")
        raw = scope.get("raw_path")
        return (scope.get("method") in ("GET", "HEAD") and path in self._public and not scope.get("root_path")
                and (raw is None or raw.split(b"?", 1)[0] == path.encode("latin-1")))

    def _authorized(self, scope) -> bool:
        values = [v for k, v in scope.get("headers", ()) if k.lower() == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, token = values[0].partition(b" ")
        # compare_digest takes constant time whatever the token, so timing reveals nothing about the key.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self._key is None or self._is_public(scope) or self._authorized(scope):
            return await self.app(scope, receive, send)
        err = APIError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                       headers={"WWW-Authenticate": "Bearer"})
        await error_response(err)(scope, receive, send)
