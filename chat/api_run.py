"""What both /v1 generation routes share: reading the body, running a request on the engine, errors.

`/v1/chat/completions` (chat/api.py) and `/v1/responses` (chat/responses.py) differ only in the
shapes they answer with; the body cap, parsing in a thread, submitting in a thread, cancelling when
the client goes away and mapping engine errors to statuses are here, once.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import Request
from starlette.requests import ClientDisconnect

from chat import trim as trim_history
from chat.engine.types import Busy, ContextTooLong, Done, EngineError, Failed, NotReady, ShuttingDown
from chat.openai_parse import ApiError, bad

log = logging.getLogger("vlchat.api")
RETRY = {"Retry-After": "2"}


def usage_of(done: Done) -> dict:
    """Chat completions' usage object."""
    u = done.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def engine_error(exc: EngineError) -> ApiError:
    """Map what `submit` raises to statuses the OpenAI clients understand (503s carry Retry-After)."""
    if isinstance(exc, ContextTooLong) or exc.code == "content_filter":  # content_filter: chat/engine/filtered.py
        return bad(str(exc), "messages", exc.code)
    if isinstance(exc, (Busy, NotReady, ShuttingDown)):
        return ApiError(503, str(exc), "server_error", code=exc.code, headers=RETRY)
    return ApiError(500, str(exc), "server_error", code=exc.code)


def failed_error(event: Failed) -> ApiError:
    """A Failed event as an ApiError (a remote engine's event may carry the HTTP status to answer with)."""
    status = getattr(event, "status", None)
    if isinstance(status, int) and 400 <= status < 600 and event.code != ContextTooLong.code:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return ApiError(status, event.message, kind, code=event.code or None, headers=RETRY if status == 503 else None)
    if event.code == ContextTooLong.code:
        return bad(event.message, "messages", event.code)
    if event.code in (ShuttingDown.code, Busy.code, NotReady.code):
        return ApiError(503, event.message, "server_error", code=event.code, headers=RETRY)
    return ApiError(500, event.message, "server_error", code=event.code)


def clamp_headers(meta: dict) -> dict:
    """Says so when max_tokens was over the limit and was lowered to it."""
    if not meta.get("clamped"):
        return {}
    asked, limit = meta["clamped"]
    return {"X-Vlchat-Max-Tokens-Clamped": f"{asked} -> {limit}"}


def trim_headers(trimmed) -> dict:
    """The response header that says how many of the oldest turns were left out (issue 14, chat.trim)."""
    return {"X-Vlchat-Left-Out-Turns": str(trimmed.turns)} if trimmed is not None else {}


class Generation:
    """One request on the engine: its handle, its events and the first of them, and its clean-up."""

    def __init__(self, handle, events, first, watcher) -> None:
        self.handle, self.events, self.first, self.watcher = handle, events, first, watcher
        self.handed_over = False
        self.trimmed = None  # issue 14 (--trim-history-api): what chat.trim left out, or None

    @classmethod
    async def start(cls, request: Request, engine, chat_request, on_finish=None, on_refused=None,
                    trim: bool = False) -> Generation:
        """Submit (in a thread: it renders and tokenizes) and wait for the first event; errors as ApiError.

        `on_finish`: the engine's callback with the final event (the rate limit charges the answer's tokens);
        `on_refused`: called when the server turns the request away (busy, loading, stopping: a 503).
        `trim` (issue 14, --trim-history-api): too long for the context -> the oldest turns left out (chat.trim).
        """
        trimmed = None
        try:
            if trim:
                handle, trimmed = await asyncio.to_thread(trim_history.submit, engine, chat_request, on_finish)
            else:
                args = (chat_request,) if on_finish is None else (chat_request, on_finish)
                handle = await asyncio.to_thread(engine.submit, *args)
        except EngineError as exc:
            if on_refused is not None and isinstance(exc, (Busy, NotReady, ShuttingDown)):
                on_refused()
            raise engine_error(exc) from None
        events = handle.aevents()
        # Until a stream takes over (it notices a closed connection itself), a client that goes away
        # while its request waits or generates must not keep the worker busy.
        gen = cls(handle, events, None, asyncio.create_task(cancel_on_disconnect(request, handle)))
        gen.trimmed = trimmed
        try:
            gen.first = await anext(events)
        except BaseException:
            gen.close()
            raise
        if isinstance(gen.first, Failed):
            gen.close()
            raise failed_error(gen.first)
        return gen

    async def result(self) -> Done:
        """Wait for the end (a plain answer); a failure as ApiError."""
        try:
            done = self.first
            while not isinstance(done, (Done, Failed)):
                done = await anext(self.events)
        finally:
            self.close()
        if isinstance(done, Failed):
            raise failed_error(done)
        return done

    def stream(self) -> None:
        """A stream takes over (its own finally cancels the handle)."""
        self.handed_over = True
        self.watcher.cancel()

    def close(self) -> None:
        """Stop watching; cancel the request unless it ended or a stream owns it."""
        self.watcher.cancel()
        if self.handle.result is None and not self.handed_over:
            self.handle.cancel()


async def cancel_on_disconnect(request: Request, handle) -> None:
    """Cancel `handle` as soon as the client's connection closes (runs until cancelled).

    The body has been read, so the next message on `receive` is the disconnect. Waiting for it
    (rather than polling `request.is_disconnected()`, which peeks with an already-cancelled scope
    and so never sees anything through ASGI middleware that wraps `receive` in a task) hears it at
    once, whatever middleware sits in between.
    """
    while handle.result is None:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body of a JSON request, refusing bodies over `limit` bytes (by header, then while reading)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise bad(f"Content-Type must be application/json, not {ctype[:60] or 'missing'!r}.")
    too_big = ApiError(413, f"The request body is over the limit of {limit:,} bytes; send fewer or smaller images.",
                       code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async for piece in request.stream():
            size += len(piece)
            if size > limit:
                raise too_big
            chunks.append(piece)
    except ClientDisconnect:
        # Nobody is left to answer; an ordinary event, not a server error with a traceback.
        log.info("client went away while sending its request body")
        raise ApiError(400, "The client closed the connection before the body was complete.",
                       code="client_disconnected") from None
    return b"".join(chunks)
