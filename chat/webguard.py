"""ASGI middlewares that guard the web server: security headers, closed routes, uploads, slow bodies.

All pure ASGI (not BaseHTTPMiddleware), so streaming answers and client-disconnect detection
pass through untouched.
"""

from __future__ import annotations

import asyncio
import json

from chat.security import ASGIApp, Receive, Scope, Send

# What Gradio's page needs, and nothing remote: its inline bootstrap scripts and styles need
# 'unsafe-inline'; previews and pasted images use data: and blob: URLs. No other host is allowed.
CSP = "; ".join([
    "default-src 'self'",
    "script-src 'self' 'unsafe-inline'",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data: blob:",
    "media-src 'self' data: blob:",
    "font-src 'self' data:",
    "connect-src 'self'",
    "worker-src 'self' blob:",
    "manifest-src 'self'",
    "frame-src 'self'",
    "object-src 'none'",
    "base-uri 'self'",
    "form-action 'self'",
    "frame-ancestors 'self'",
])


async def _answer(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """Adds nosniff and no-referrer to every answer, and the Content-Security-Policy to HTML ones.

    `csp_exempt` paths (FastAPI's /docs and /redoc, which load their viewers from a CDN, when an
    operator exposes them) get no CSP.
    """

    def __init__(self, app: ASGIApp, csp: str = CSP, csp_exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.csp = csp.encode()
        self.csp_exempt = csp_exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with_csp = scope["path"] not in self.csp_exempt

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {k.lower() for k, _ in headers}
                extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if with_csp and any(k.lower() == b"content-type" and v.lower().startswith(b"text/html")
                                    for k, v in headers):
                    extra.append((b"content-security-policy", self.csp))
                headers += [(k, v) for k, v in extra if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


class NoSideDoors:
    """Closes Gradio's direct-call routes, and (unless docs are exposed) the schemas, docs and monitoring.

    The page talks to Gradio through its queue (/gradio_api/queue/...; every page event is
    queued); programs use /v1, with its keys and limits.
    """

    CLOSED = ("/gradio_api/call/", "/gradio_api/run/", "/gradio_api/api/")
    DOCS = ("/openapi.json", "/docs", "/redoc", "/gradio_api/openapi.json", "/gradio_api/docs", "/monitoring")

    def __init__(self, app: ASGIApp, expose_docs: bool = False) -> None:
        self.app = app
        self.expose_docs = expose_docs

    def closed(self, path: str) -> bool:
        """Whether `path` answers 404 here."""
        if path.startswith(self.CLOSED):
            return True
        if self.expose_docs:
            return False
        return any(path == p or path.startswith(p + "/") for p in self.DOCS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.closed(scope["path"]):
            await _answer(send, 404, "Not available; use the page, or the /v1 API.")
            return
        await self.app(scope, receive, send)


# Magic bytes of the formats chat.images accepts.
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")


def is_image(head: bytes) -> bool:
    """Whether a file's first bytes are those of a PNG, JPEG, GIF, BMP or WebP."""
    return head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def is_json_object(name: str | None, head: bytes) -> bool:
    """A .json file that starts as a JSON object: "Import a conversation" (chat.history_io checks the rest)."""
    return (name or "").lower().endswith(".json") and head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{")


class UploadFilter:
    """Lets only images (and .json objects, for imports) into Gradio's upload cache: POST /gradio_api/upload is
    buffered, checked, replayed.

    Over `limit` bytes: 413. A part that is not a PNG, JPEG, WebP, GIF or BMP by its content (not
    its name): 415, and Gradio never sees the request.
    """

    PATHS = ("/gradio_api/upload", "/gradio_api/upload/")

    def __init__(self, app: ASGIApp, limit: int, max_files: int) -> None:
        self.app = app
        self.limit = limit
        self.max_files = max_files

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.PATHS:
            await self.app(scope, receive, send)
            return
        too_big = f"Upload too large: at most {self.limit // 1_000_000} MB at once."
        headers = dict(scope.get("headers", ()))
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.limit:
            await _answer(send, 413, too_big, [(b"connection", b"close")])
            return
        if not headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data"):
            await _answer(send, 415, "Upload images (PNG, JPEG, WebP, GIF or BMP) as a multipart form.")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await _answer(send, 413, too_big, [(b"connection", b"close")])
                return
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        problem = await self.check(scope, body)
        if problem:
            await _answer(send, 415, problem)
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def check(self, scope: Scope, body: bytes) -> str:
        """Why this multipart body is refused ('' when every file in it is an image)."""
        from starlette.requests import Request

        async def once() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(scope, once).form(max_files=self.max_files, max_fields=100)
        except Exception:  # malformed multipart, or too many parts
            return f"Upload at most {self.max_files} images (PNG, JPEG, WebP, GIF or BMP) as a multipart form."
        try:
            for _, value in form.multi_items():
                if isinstance(value, str):
                    continue
                head = await value.read(16)
                if not is_image(head) and not is_json_object(value.filename, head):
                    name = (value.filename or "file")[:80]
                    return f"{name} is not an image: only PNG, JPEG, WebP, GIF and BMP files can be attached."
        finally:
            await form.close()
        return ""


class BodyTimeout:
    """Answers 408 (and closes) when a request body stalls for `seconds` between chunks.

    Only reads of the body are timed; once it is complete, `receive` waits untimed again (a
    streaming answer listens on it for the client's disconnect).
    """

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = False
        started = False
        timed_out = False

        async def timed_receive() -> dict:
            nonlocal body_done, timed_out
            if body_done or timed_out:
                return await receive() if not timed_out else {"type": "http.disconnect"}
            try:
                # In this task, not a new one: a message that is ready comes back without a pause,
                # which Starlette's is_disconnected() (a peek under a cancelled scope) relies on.
                async with asyncio.timeout(self.seconds):
                    message = await receive()
            except TimeoutError:
                timed_out = True
                if not started:
                    await _answer(send, 408, f"The request body did not arrive within {self.seconds:g} seconds.",
                                  [(b"connection", b"close")])
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body"):
                body_done = True
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if timed_out:
                return  # the 408 went out in the app's place
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, timed_receive, guarded_send)
