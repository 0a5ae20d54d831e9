"""The /v1 API's own headers, as one pure ASGI middleware: x-request-id on every answer, and CORS.

- `x-request-id`: every /v1 answer carries one; a client's own (printable, up to 128 characters)
  is echoed, otherwise a new one is made. It is also put in the log line of a refused preflight.
- CORS (`--cors-origins`, off by default): browser apps on the listed origins may call /v1. A
  preflight (OPTIONS with Origin and Access-Control-Request-Method) from a listed origin is
  answered here, 204, before the key check (browsers never send credentials on a preflight), with
  the methods and the headers it asked for; one from another origin gets 403 and no CORS headers,
  so the browser blocks the call. Answers to listed origins carry Access-Control-Allow-Origin
  (the origin itself, with Vary: Origin) and expose the headers a client may read (x-request-id,
  Retry-After, the max-tokens notice). `*` allows every origin (credentials are never allowed:
  the key travels in the Authorization header, which the app sets itself).

The page (everything outside /v1) is untouched: it is same-origin only.
"""

from __future__ import annotations

import json
import re
import uuid

from chat.security import ASGIApp, Receive, Scope, Send

PREFIX = "/v1"
METHODS = b"GET, POST, OPTIONS"
EXPOSED = b"x-request-id, retry-after, x-vlchat-max-tokens-clamped"
MAX_AGE = b"600"
_REQUEST_ID = re.compile(r"[!-~]{1,128}")
_HEADER_LIST = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")


def parse_origins(value: str) -> tuple[str, ...]:
    """'https://a.example, http://localhost:3000' -> the origins, without trailing slashes."""
    return tuple(o.strip().rstrip("/") for o in value.split(",") if o.strip())


def origin_ok(value: str) -> bool:
    """An origin list as --cors-origins takes it: empty, '*', or scheme://host[:port] entries."""
    return all(o == "*" or re.fullmatch(r"https?://[^\s/?#,]+", o) for o in parse_origins(value))


class ApiHeaders:
    """x-request-id on every /v1 answer; CORS for the listed origins (none: no CORS headers at all)."""

    def __init__(self, app: ASGIApp, origins: tuple[str, ...] = ()) -> None:
        self.app = app
        self.origins = frozenset(origins)
        self.any_origin = "*" in self.origins

    def allowed(self, origin: str) -> bool:
        """Whether a browser page on `origin` may call the API."""
        return bool(origin) and (self.any_origin or origin in self.origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = (given if _REQUEST_ID.fullmatch(given) else "req_" + uuid.uuid4().hex).encode()
        origin = headers.get(b"origin", b"").decode("latin-1")
        if self.origins and scope["method"] == "OPTIONS" and origin and b"access-control-request-method" in headers:
            await self.preflight(send, origin, headers, request_id)
            return
        cors = []
        if self.origins and self.allowed(origin):
            cors = [(b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"access-control-expose-headers", EXPOSED)]

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                out = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                out.append((b"x-request-id", request_id))
                out += cors
                if self.origins:
                    out.append((b"vary", b"Origin"))
                message = {**message, "headers": out}
            await send(message)

        await self.app(scope, receive, with_headers)

    async def preflight(self, send: Send, origin: str, headers: dict, request_id: bytes) -> None:
        """Answer a CORS preflight: 204 with what it may do, or 403 for an origin not on the list."""
        if not self.allowed(origin):
            body = json.dumps({"error": {"message": f"The origin {origin[:100]!r} may not call this API (see "
                                                    "--cors-origins).", "type": "invalid_request_error",
                                         "param": None, "code": "cors_origin_not_allowed"}}).encode()
            await send({"type": "http.response.start", "status": 403, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"x-request-id", request_id), (b"vary", b"Origin")]})
            await send({"type": "http.response.body", "body": body})
            return
        asked = headers.get(b"access-control-request-headers", b"").decode("latin-1").strip()
        allow_headers = asked.encode() if asked and _HEADER_LIST.fullmatch(asked) else b"authorization, content-type"
        await send({"type": "http.response.start", "status": 204, "headers": [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-methods", METHODS),
            (b"access-control-allow-headers", allow_headers),
            (b"access-control-max-age", MAX_AGE),
            (b"vary", b"Origin"), (b"x-request-id", request_id), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
