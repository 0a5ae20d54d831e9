"""OpenAI-compatible routes on the shared worker: /v1/chat/completions, /v1/responses and /v1/models.

The same engine, limits and image intake as the page. Every failure under /v1 answers with one
envelope, {"error": {"message", "type", "param", "code"}}, raised as `ApiError` and rendered in
one place. Reading and checking a request is `chat/openai_parse.py` (with the pydantic models of
`chat/api_models.py`); running it is `chat/api_run.py`; the Responses API's shapes are
`chat/responses.py`; tool calls in answers are `chat/tools.py`. This module is the routes, the
owner of a request (the key check comes before anything else, unknown routes included), and the
chat completion shapes.

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
import time
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from chat import json_mode
from chat.api_run import Generation, clamp_headers, engine_error, failed_error, read_body, trim_headers, usage_of
from chat.config import Settings
from chat.engine.sampling_defaults import defaults_of
from chat.engine.types import Delta, Done, Failed
from chat.grounding import for_api, request_image_size  # issue 14 (grounding)
from chat.openai_parse import ApiError, bad, parse_json, parse_request
from chat.ratelimit_gate import api_ticket, limit_headers
from chat.tools import ToolCallStream, content_and_calls

__all__ = ["ApiError", "ApiState", "bad", "engine_error", "failed_error", "owner_of_key", "router"]

ANONYMOUS = "api:anonymous"


@dataclass
class ApiState:
    """What the routes need; `engine` is swapped in when the model is ready."""

    settings: Settings
    engine: object
    model_name: str
    keys: tuple[str, ...] = ()
    open: bool = True
    closed_reason: str = ""
    limits: object = None  # chat.ratelimit_gate.Gate (--rate-limit, --token-limit), set by app.py

    def model_names(self) -> tuple[str, ...]:
        """Every name a request may ask for: the served model's, the alias 'vlchat', the configured --model, then
        the LoRA adapters the engine serves (issue 14)."""
        names = [self.model_name, "vlchat"]
        if not self.settings.engine_urls:
            names.append(self.settings.model)
        return tuple(dict.fromkeys([*names, *self.adapters()]))

    def adapters(self) -> tuple[str, ...]:
        return tuple(getattr(self.engine, "adapters", ()) or ())


def owner_of_key(key: str | None) -> str:
    """The owner an API request's cached state belongs to: a short hash of its key, never the key itself."""
    if not key:
        return ANONYMOUS
    return "api:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def check_key(state: ApiState, request: Request) -> str:
    """The request's owner, or an ApiError (API off, missing or wrong key); 401s say how to authenticate."""
    if not state.open:
        raise ApiError(403, state.closed_reason, "permission_error", code="api_disabled")
    if not state.keys:
        return ANONYMOUS
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    matched = [k for k in state.keys if hmac.compare_digest(token.encode(), k.encode())]
    if not matched:
        raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                       "authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return owner_of_key(matched[0])


async def parsed(state: ApiState, request: Request, owner: str, convert=None):
    """(ChatRequest, meta) of a request's body, parsed in a thread; `convert` maps another API's body to chat's."""
    raw = await read_body(request, state.settings.max_body_bytes)
    engine = state.engine

    def parse():
        # JSON decoding, text checks and image decoding are CPU work: never on the event loop.
        body = parse_json(raw)
        extra = {}
        if convert is not None:
            body, extra = convert(body)
        chat_request, meta = parse_request(state.settings, body, model_names=state.model_names(), owner=owner,
                                           max_prompt_chars=getattr(engine, "max_prompt_chars", None),
                                           adapters=state.adapters(),
                                           defaults=defaults_of(engine))  # issue 14: sampling defaults
        return chat_request, {**meta, **extra}

    return await asyncio.to_thread(parse)


def _model_card(state: ApiState, name: str, created: int) -> dict:
    card = {"id": name, "object": "model", "created": created, "owned_by": "vlchat", "root": state.model_name,
            "max_model_len": state.settings.context_tokens}
    if name in state.adapters():  # a LoRA adapter: its base is the served model (vLLM lists them the same way)
        card["parent"] = state.model_name
    return card


def _finish(done: Done, calls: bool, legacy: bool = False) -> str:
    if calls:
        return "function_call" if legacy else "tool_calls"
    return done.finish_reason if done.finish_reason in ("length", "content_filter") else "stop"


def _message(done: Done, meta: dict) -> tuple[dict, str]:
    """The answer's message (with tool calls read from it when tools were offered) and its finish_reason."""
    if not meta.get("tools"):
        return {"role": "assistant", "content": done.text}, _finish(done, False)
    content, calls = content_and_calls(done.text)
    message = {"role": "assistant", "content": content}
    if calls and meta.get("legacy_functions"):
        message["function_call"] = {"name": calls[0].name, "arguments": calls[0].arguments}
    elif calls:
        message["tool_calls"] = [c.as_tool_call() for c in calls]
    return message, _finish(done, bool(calls), meta.get("legacy_functions", False))


def router(state: ApiState) -> APIRouter:
    """The /v1 routes."""
    from chat import responses

    api = APIRouter(prefix="/v1")

    @api.get("/models")
    async def models(request: Request):
        check_key(state, request)
        created = int(time.time())
        return {"object": "list", "data": [_model_card(state, name, created) for name in state.model_names()]}

    @api.post("/chat/completions")
    async def chat_completions(request: Request):
        owner = check_key(state, request)
        ticket = api_ticket(state, request, owner)  # over the rate limit: 429 before the body is read
        chat_request, meta = await parsed(state, request, owner)
        if meta.get("grounding"):  # issue 14: the answer's boxes in pixels of the newest image, asked for
            meta["grounding_size"] = request_image_size(chat_request)
        gen = await Generation.start(request, state.engine, chat_request, ticket.on_finish(), ticket.refund,
                                     trim=state.settings.trim_history_api)  # issue 14: chat/trim.py, opt-in
        left_out = trim_headers(gen.trimmed)
        if meta.get("json_format") is not None:  # issue 14: checked (and generated once more) before it is sent
            gen = await json_mode.validated(request, state.engine, chat_request, gen, meta)
        headers = {**clamp_headers(meta), **limit_headers(ticket), **left_out}
        if meta["stream"]:
            gen.stream()
            return StreamingResponse(stream(gen.handle, gen.events, gen.first, meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **headers})
        done = await gen.result()
        message, finish = _message(done, meta)
        if meta.get("grounding"):  # issue 14 (grounding): the answer's boxes and points, parsed
            message["grounding"] = for_api(done.text, meta["grounding_size"])
        return JSONResponse({"id": meta["id"], "object": "chat.completion", "created": meta["created"],
                             "model": meta["model"],
                             "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                             "usage": usage_of(done)}, headers=headers)

    responses.add_routes(api, state)

    @api.get("/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        check_key(state, request)
        if model_id not in state.model_names():
            raise ApiError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return _model_card(state, model_id, int(time.time()))

    known = {"/v1/models": "GET", "/v1/chat/completions": "POST", "/v1/responses": "POST"}

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

    @api.api_route("", methods=methods, include_in_schema=False)
    @api.api_route("/{rest:path}", methods=methods, include_in_schema=False)
    async def elsewhere(request: Request, rest: str = ""):
        # Without this, anything else under /v1 would fall through to the page's app and its 404. The
        # key comes first: without one, nobody learns which routes exist.
        check_key(state, request)
        path = request.url.path
        if path in known and request.method != known[path]:
            raise ApiError(405, f"{path} takes {known[path]}, not {request.method}.", code="method_not_allowed")
        hint = f" (without the trailing slash: {path.rstrip('/')})" if path.rstrip("/") in known else ""
        raise ApiError(404, f"Unknown route {path}{hint}; this server has POST /v1/chat/completions, POST "
                       "/v1/responses and GET /v1/models.", code="not_found")

    return api


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def stream(handle, events, first, meta: dict):
    """SSE chunks; a client that goes away cancels the generation (the finally below)."""
    completion_id, created = meta["id"], meta["created"]
    legacy = meta.get("legacy_functions", False)
    calls = ToolCallStream() if meta.get("tools") else None

    def chunk(delta: dict, finish: str | None = None) -> str:
        return _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                     "model": meta["model"], "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    sent = [0]  # tool calls passed on so far (each one's index in the delta)

    def pieces(found) -> list[str]:
        out = []
        for kind, value in found:
            if kind == "text":
                out.append(chunk({"content": value}))
            elif legacy:
                out.append(chunk({"function_call": {"name": value.name, "arguments": value.arguments}}))
            else:
                out.append(chunk({"tool_calls": [value.as_tool_call(sent[0])]}))
                sent[0] += 1
        return out

    try:
        yield chunk({"role": "assistant", "content": ""})
        event = first
        while True:
            if isinstance(event, Delta):
                for line in pieces(calls.feed(event.text)) if calls else [chunk({"content": event.text})]:
                    yield line
            elif isinstance(event, Done):
                for line in pieces(calls.finish()) if calls else []:
                    yield line
                extra = {"grounding": for_api(event.text, meta["grounding_size"])} if meta.get("grounding") else {}
                yield chunk(extra, _finish(event, bool(calls and calls.calls), legacy))  # issue 14: + grounding
                if meta["include_usage"]:
                    yield _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                "model": meta["model"], "choices": [], "usage": usage_of(event)})
                break
            elif isinstance(event, Failed):
                yield _sse(failed_error(event).body())
                break
            event = await anext(events)
        yield "data: [DONE]\n\n"
    finally:
        if handle.result is None:
            handle.cancel()
