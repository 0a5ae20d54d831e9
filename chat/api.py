"""OpenAI-compatible routes on the shared worker: /v1/chat/completions and /v1/models.

The same engine, limits and image intake as the page. Every failure under /v1 answers with one
envelope, {"error": {"message", "type", "param", "code"}}, raised as `ApiError` and rendered in
one place. Reading and checking a request is `chat/openai_parse.py`; this module is the routes,
the owner of a request, and the responses.

Owners: reused KV state only ever serves the owner that built it (a shared prefix cache would
let one client read another's text through `cached_tokens`). An API request's owner is its key,
as "api:" + sha256(key)[:16]; with no key configured all API callers are one owner,
"api:anonymous", apart from every browser. A client may split its owner further with vLLM's
`cache_salt` field. The owner goes to the engine as `ChatRequest.cache_salt`, part of every
prefix-cache key.

Nothing slow runs on the event loop: the body is parsed and its images decoded in a thread, and
`engine.submit` (which renders and tokenizes the prompt) is called in a thread too, so one huge
or hostile request never stalls other clients' streams.

Images arrive as data URLs and are then known by the sha256 of their clean bytes: a client that
resends the same picture every turn (as OpenAI clients do) hits the engine's prefix and feature
caches, so the vision tower runs once. Remote URLs are refused without opening a socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from chat.config import Settings
from chat.engine.types import Busy, ContextTooLong, Delta, Done, EngineError, Failed, NotReady, ShuttingDown
from chat.openai_parse import ApiError, bad, parse_json, parse_request

__all__ = ["ApiError", "ApiState", "bad", "owner_of_key", "router"]

log = logging.getLogger("vlchat.api")
ANONYMOUS = "api:anonymous"
RETRY = {"Retry-After": "2"}


@dataclass
class ApiState:
    """What the routes need; `engine` is swapped in when the model is ready."""

    settings: Settings
    engine: object
    model_name: str
    keys: tuple[str, ...] = ()
    open: bool = True
    closed_reason: str = ""


def owner_of_key(key: str | None) -> str:
    """The owner an API request's cached state belongs to: a short hash of its key, never the key itself."""
    if not key:
        return ANONYMOUS
    return "api:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# -- responses ----------------------------------------------------------------------------------


def _usage(done: Done) -> dict:
    u = done.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def engine_error(exc: EngineError) -> ApiError:
    """Map what `submit` raises to statuses the OpenAI clients understand (503s carry Retry-After)."""
    if isinstance(exc, ContextTooLong):
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


def router(state: ApiState) -> APIRouter:
    """The /v1 routes."""
    api = APIRouter(prefix="/v1")

    def check_key(request: Request) -> str:
        """The request's owner, or an ApiError (API off, missing or wrong key)."""
        if not state.open:
            raise ApiError(403, state.closed_reason, "permission_error", code="api_disabled")
        if not state.keys:
            return ANONYMOUS
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        matched = [k for k in state.keys if hmac.compare_digest(token.encode(), k.encode())]
        if not matched:
            raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                           "authentication_error", code="invalid_api_key")
        return owner_of_key(matched[0])

    @api.get("/models")
    async def models(request: Request):
        check_key(request)
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "vlchat"}
            for name in dict.fromkeys([state.model_name, "vlchat"])
        ]}

    @api.post("/chat/completions")
    async def chat_completions(request: Request):
        owner = check_key(request)
        raw = await read_body(request, state.settings.max_body_bytes)
        names = (state.model_name, "vlchat", state.settings.model)
        engine = state.engine

        def parse():
            # JSON decoding, text checks and image decoding are CPU work: never on the event loop.
            return parse_request(state.settings, parse_json(raw), model_names=names, owner=owner,
                                 max_prompt_chars=getattr(engine, "max_prompt_chars", None))

        chat_request, meta = await asyncio.to_thread(parse)
        try:
            # submit renders and tokenizes the prompt in the calling thread.
            handle = await asyncio.to_thread(engine.submit, chat_request)
        except EngineError as exc:
            raise engine_error(exc) from None
        events = handle.aevents()
        # Until the SSE stream takes over (it notices a closed connection itself), a client that
        # goes away while its request waits or generates must not keep the one worker busy.
        watcher = asyncio.create_task(cancel_on_disconnect(request, handle))
        handed_over = False
        try:
            first = await anext(events)
            if isinstance(first, Failed):
                raise failed_error(first)
            if meta["stream"]:
                handed_over = True
                return StreamingResponse(stream(handle, events, first, meta), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            done = first
            while not isinstance(done, (Done, Failed)):
                done = await anext(events)
        finally:
            watcher.cancel()
            if handle.result is None and not handed_over:
                handle.cancel()
        if isinstance(done, Failed):
            raise failed_error(done)
        return {"id": meta["id"], "object": "chat.completion", "created": meta["created"], "model": meta["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                             "finish_reason": "length" if done.finish_reason == "length" else "stop"}],
                "usage": _usage(done)}

    @api.get("/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        check_key(request)
        if model_id not in (state.model_name, "vlchat"):
            raise ApiError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "vlchat"}

    known = {"/v1/models": "GET", "/v1/chat/completions": "POST"}

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

    @api.api_route("", methods=methods, include_in_schema=False)
    @api.api_route("/{rest:path}", methods=methods, include_in_schema=False)
    async def elsewhere(request: Request, rest: str = ""):
        # Without this, anything else under /v1 would fall through to the page's app and its 404.
        path = request.url.path
        if path in known and request.method != known[path]:
            raise ApiError(405, f"{path} takes {known[path]}, not {request.method}.", code="method_not_allowed")
        hint = f" (without the trailing slash: {path.rstrip('/')})" if path.rstrip("/") in known else ""
        raise ApiError(404, f"Unknown route {path}{hint}; this server has POST /v1/chat/completions and GET "
                       "/v1/models.", code="not_found")

    return api


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


async def stream(handle, events, first, meta: dict):
    """SSE chunks; a client that goes away cancels the generation (the finally below)."""
    completion_id, created = meta["id"], meta["created"]

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": meta["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        event = first
        while True:
            if isinstance(event, Delta):
                yield chunk({"content": event.text})
            elif isinstance(event, Done):
                yield chunk({}, "length" if event.finish_reason == "length" else "stop")
                if meta["include_usage"]:
                    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                            "model": meta["model"], "choices": [], "usage": _usage(event)}
                    yield f"data: {json.dumps(body)}\n\n"
                break
            elif isinstance(event, Failed):
                yield f"data: {json.dumps(failed_error(event).body())}\n\n"
                break
            event = await anext(events)
        yield "data: [DONE]\n\n"
    finally:
        if handle.result is None:
            handle.cancel()


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
