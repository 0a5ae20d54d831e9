"""OpenAI-compatible routes on the shared worker: /v1/chat/completions and /v1/models.

The same engine, limits and image intake as the page. Every failure under /v1 answers with one
envelope, {"error": {"message", "type", "param", "code"}}, raised as `ApiError` and rendered in
one place. Requests are parsed by hand (not pydantic) so each problem names its parameter in
plain words and no framework-shaped 422 ever leaks out.

Images arrive as data URLs, go through `images.sanitize`, and are then known by the sha256 of
their clean bytes: a client that resends the same picture every turn (as OpenAI clients do)
hits the engine's prefix and feature caches, so the vision tower runs once. Remote URLs are
refused without opening a socket.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from chat.config import Settings
from chat.engine.types import Busy, ChatRequest, Delta, Done, EngineError, Failed, NotReady
from chat.images import ImageError, sanitize

UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "logprobs", "top_logprobs",
               "audio", "modalities", "prediction", "logit_bias", "web_search_options", "parallel_tool_calls")
ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    """An error answered in the OpenAI envelope."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        """The envelope."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """As an HTTP response."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 invalid_request_error."""
    return ApiError(400, message, param=param, code=code)


@dataclass
class ApiState:
    """What the routes need; `engine` is swapped in when the model is ready."""

    settings: Settings
    engine: object
    model_name: str
    keys: tuple[str, ...] = ()
    open: bool = True
    closed_reason: str = ""


# -- parsing ------------------------------------------------------------------------------------


def _image_from_url(state: ApiState, part: dict, where: str, inline: dict) -> str:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise bad("image_url.url must be a string.", f"{where}.image_url.url")
    if isinstance(spec, dict) and spec.get("detail", "auto") not in ("auto", "low", "high"):
        raise bad("image_url.detail must be 'low', 'high' or 'auto'.", f"{where}.image_url.detail")
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0].lower() if ":" in url else "?"
        kind = "Remote image URLs" if scheme in ("http", "https") else f"'{scheme}:' URLs"
        raise bad(f"{kind} are not fetched by this server; send the image inline as a data URL "
                  "(data:image/png;base64,...).", f"{where}.image_url.url", "image_url_not_allowed")
    header, _, payload = url.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise bad("A data URL must look like data:image/<type>;base64,<data>.", f"{where}.image_url.url",
                  "invalid_image_url")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad("The image's base64 data is not valid.", f"{where}.image_url.url", "invalid_image_url") from None
    s = state.settings
    try:
        clean = sanitize(raw, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)
    except ImageError as exc:
        raise bad(str(exc), f"{where}.image_url.url", "invalid_image") from None
    inline[clean.sha256] = clean.data  # travels with the request to the worker
    return clean.sha256


def parse_messages(state: ApiState, raw, inline: dict) -> list[dict]:
    """OpenAI messages -> engine messages (images replaced by their content hash, their bytes put in `inline`)."""
    if not isinstance(raw, list) or not raw:
        raise bad("messages must be a non-empty list.", "messages")
    out, n_images = [], 0
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad("Each message must be an object.", where)
        role = msg.get("role")
        if role not in ROLES:
            raise bad(f"Unsupported role {role!r}; use system, user or assistant.", f"{where}.role")
        content = msg.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                pwhere = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url" and role == "user":
                    n_images += 1
                    in_msg = sum(p["type"] == "image" for p in parts) + 1
                    if in_msg > state.settings.max_images_per_message:
                        raise bad(f"A message may carry {state.settings.max_images_per_message} images.", pwhere)
                    spec = part.get("image_url")
                    detail = spec.get("detail") if isinstance(spec, dict) else None
                    parts.append({"type": "image", "image_id": _image_from_url(state, part, pwhere, inline),
                                  "detail": detail if detail in ("low", "high") else "auto"})
                else:
                    raise bad(f"Unsupported content part {kind!r} for role {role}; use text (and image_url in user "
                              "messages).", f"{pwhere}.type")
        elif content is None and role == "assistant":
            parts = [{"type": "text", "text": ""}]
        else:
            raise bad("content must be a string or a list of content parts.", f"{where}.content")
        if role in ("system", "developer", "assistant"):
            text = "".join(p["text"] for p in parts)
            out.append({"role": "system" if role == "developer" else role, "content": text})
        else:
            out.append({"role": "user", "content": parts})
    if n_images > state.settings.max_images_per_conversation:
        raise bad(f"The conversation holds {n_images} images; the limit is "
                  f"{state.settings.max_images_per_conversation}.", "messages")
    if out[-1]["role"] != "user":
        raise bad("The last message must be from the user.", "messages")
    return out


def _number(body: dict, name: str, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise bad(f"{name} must be a {'whole number' if integer else 'number'}.", name)
    if not lo <= value <= hi:
        raise bad(f"{name} must be between {lo} and {hi}; got {value}.", name)
    return value


def parse_request(state: ApiState, body) -> tuple[ChatRequest, dict]:
    """The whole request: (engine request, {"stream", "include_usage", "model"})."""
    if not isinstance(body, dict):
        raise bad("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required.", "model")
    if model not in (state.model_name, "vlchat", state.settings.model):
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{state.model_name}' "
                       "(alias 'vlchat').", param="model", code="model_not_found")
    unsupported = [k for k in UNSUPPORTED if body.get(k) not in (None, False, [], {})]
    if body.get("response_format") in ({"type": "text"},):
        unsupported = [k for k in unsupported if k != "response_format"]
    if unsupported:
        raise bad(f"Not supported by this server: {', '.join(unsupported)}.", unsupported[0], "unsupported_parameter")
    if _number(body, "n", 1, 1, integer=True) not in (None, 1):
        raise bad("Only n=1 is supported.", "n")
    s = state.settings
    limit = s.max_new_tokens_limit
    max_tokens = _number(body, "max_completion_tokens", 1, limit, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, limit, integer=True)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    seed = _number(body, "seed", -(2**63), 2**63 - 1, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(x, str) for x in stop):
        stop = tuple(stop)
    else:
        raise bad("stop must be a string or a list of up to 4 strings.", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false.", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options must be an object.", "stream_options")
    inline: dict[str, bytes] = {}
    messages = parse_messages(state, body.get("messages"), inline)
    params = s.clamp_params(temperature, top_p, max_tokens, seed=seed, stop=stop,
                            fit_to_context=max_tokens is None)
    meta = {"stream": stream, "include_usage": bool(options.get("include_usage")), "model": model,
            "id": "chatcmpl-" + uuid.uuid4().hex, "created": int(time.time())}
    return ChatRequest(messages, params, images=inline), meta


# -- responses ----------------------------------------------------------------------------------


def _usage(done: Done) -> dict:
    u = done.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def engine_error(exc: EngineError) -> ApiError:
    """Map what `submit` raises (Busy, NotReady) to statuses the OpenAI clients understand.

    Everything that goes wrong later (a context that does not fit, a model failure) arrives as a
    Failed event instead, mapped by `failed_error`.
    """
    if isinstance(exc, (Busy, NotReady)):
        return ApiError(503, str(exc), "server_error", code=exc.code, headers={"Retry-After": "2"})
    return ApiError(500, str(exc), "server_error", code=exc.code)


def failed_error(event: Failed) -> ApiError:
    """A Failed event as an ApiError."""
    if event.code == "context_length_exceeded":
        return bad(event.message, "messages", event.code)
    return ApiError(500, event.message, "server_error", code=event.code)


def router(state: ApiState) -> APIRouter:
    """The /v1 routes."""
    api = APIRouter(prefix="/v1")

    def check_key(request: Request) -> None:
        if not state.open:
            raise ApiError(403, state.closed_reason, "permission_error", code="api_disabled")
        if not state.keys:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(token.encode(), k.encode()) for k in state.keys):
            raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                           "authentication_error", code="invalid_api_key")

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
        check_key(request)
        body = await read_json(request, state.settings.max_body_bytes)
        # Decoding and sanitizing images is CPU work of seconds for big ones: off the event loop.
        chat_request, meta = await asyncio.to_thread(parse_request, state, body)
        try:
            handle = state.engine.submit(chat_request)
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
    """Cancel `handle` as soon as the client's connection closes (polled; ends with the request)."""
    while handle.result is None:
        if await request.is_disconnected():
            handle.cancel()
            return
        await asyncio.sleep(0.25)


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


async def read_json(request: Request, limit: int):
    """The body as JSON, refusing bodies over `limit` bytes (by header, then while reading)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise bad(f"Content-Type must be application/json, not '{ctype or 'missing'}'.")
    too_big = ApiError(413, f"The request body is over the limit of {limit:,} bytes; send fewer or smaller images.",
                       code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise too_big
        chunks.append(piece)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"The body is not valid JSON ({exc.__class__.__name__}).") from None
