"""POST /v1/responses: OpenAI's Responses API for text and images, plain or streamed.

Enough of it for the openai SDK's `client.responses.create` and the Vercel AI SDK's default OpenAI
provider: `input` as a string or a list of items (messages with `input_text`, `input_image` as a data
URL, earlier `output_text`; `function_call` and `function_call_output` items), `instructions`,
`max_output_tokens`, `temperature`, `top_p`, function `tools` and `tool_choice`, `stream`.

The body is converted to a chat completions body and goes through the same parser (one set of
rules: owners, limits, cheap refusals first, image intake, tools, clamping) and the same engine;
only the answer's shapes differ. Errors name the Responses parameter (`input[1].content[0]`).
Nothing is stored: `store` is answered false and `previous_response_id` is refused.

A stream is `event: <type>` / `data: {...}` pairs: response.created, response.in_progress, then per
output item output_item.added, content_part.added, output_text.delta..., output_text.done,
content_part.done, output_item.done (function calls: function_call_arguments.delta/.done), and
response.completed (or response.incomplete when max_output_tokens cut it; an error mid-way is an
`error` event, then response.failed). Every event has a sequence_number.
"""

from __future__ import annotations

import json
import re
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from chat.api_models import InputItem, ResponsesRequest, validate
from chat.api_run import Generation, clamp_headers, failed_error
from chat.engine.types import Delta, Done, Failed
from chat.openai_parse import ApiError, bad, check_counts
from chat.tools import Call, ToolCallStream, content_and_calls

REFUSED = {"previous_response_id": "Earlier responses are not stored here; send the conversation in input.",
           "background": "Background responses are not supported."}


def _part(part, where: str, role: str) -> dict:
    """A Responses content part as a chat content part."""
    if part.type in ("input_text", "output_text", "text") and part.text is not None:
        return {"type": "text", "text": part.text}
    if part.type == "refusal" and part.refusal is not None:
        return {"type": "text", "text": part.refusal}
    if part.type == "input_image" and role == "user":
        if part.image_url is None:
            raise bad("input_image needs image_url (a data URL); file_id is not supported.", f"{where}.image_url",
                      "unsupported_parameter" if part.file_id else None)
        return {"type": "image_url", "image_url": {"url": part.image_url, "detail": part.detail or "auto"}}
    raise bad(f"Unsupported content part {part.type!r:.40} for role {role}; use input_text (and input_image in "
              "user messages).", f"{where}.type")


def _items(items: list[InputItem], locs: list[str]) -> list[dict]:
    """Input items as chat messages; `locs` gets each message's place in the input (for error messages)."""
    out: list[dict] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if item.type == "message":
            if item.role is None:
                raise bad("A message item needs a role.", f"{where}.role")
            content = item.content
            if isinstance(content, list):
                content = [_part(p, f"{where}.content[{j}]", item.role) for j, p in enumerate(content)]
            out.append({"role": item.role, "content": content})
        elif item.type == "function_call":
            if not item.name:
                raise bad("A function_call item needs a name.", f"{where}.name")
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments or "{}"}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") and out[-1]["content"] is None:
                out[-1]["tool_calls"].append(call)
                continue
            out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif item.type == "function_call_output":
            output = item.output
            if isinstance(output, list):
                output = "".join(_part(p, f"{where}.output[{j}]", "tool")["text"] for j, p in enumerate(output))
            out.append({"role": "tool", "content": output or "", "tool_call_id": item.call_id})
        elif item.type == "reasoning":
            continue
        else:
            raise bad(f"Input items of type {item.type!r:.40} are not supported.", f"{where}.type",
                      "unsupported_parameter")
        locs.append(where)
    return out


def to_chat(body, locs: list[str], settings) -> tuple[dict, dict]:
    """A Responses body as a chat completions body, and what the answer needs to echo."""
    if not isinstance(body, dict):
        raise bad("The request body must be a JSON object.")
    check_counts(settings, body, "input")
    req, problem = validate(ResponsesRequest, body)
    if problem is not None:
        raise bad(*problem)
    for name, why in REFUSED.items():
        if getattr(req, name):
            raise bad(why, name, "unsupported_parameter")
    fmt = req.text.format if req.text and req.text.format else None
    if fmt is not None and fmt.type not in ("text", "json_object", "json_schema"):
        raise bad(f"text.format {fmt.type!r:.40} is not supported; use text, json_object or json_schema.",
                  "text.format", "unsupported_parameter")
    tools = []
    for k, tool in enumerate(req.tools or ()):
        if tool.type != "function" or not tool.name:
            raise bad(f"Only function tools are supported, not {tool.type!r:.40}.", f"tools[{k}]",
                      "unsupported_parameter")
        tools.append({"type": "function", "function": tool.model_dump(exclude_none=True, exclude={"type"})})
    messages = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
        locs.append("instructions")
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
        locs.append("input")
    else:
        messages.extend(_items(req.input, locs))
    chat = {"model": req.model, "messages": messages, "stream": bool(req.stream)}
    for name in ("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty", "seed", "cache_salt",
                 "parallel_tool_calls"):
        if getattr(req, name) is not None:
            chat[name] = getattr(req, name)
    if req.max_output_tokens is not None:
        chat["max_tokens"] = req.max_output_tokens
    if fmt is not None and fmt.type != "text":  # issue 14: JSON mode (chat/json_mode.py), in chat's shape
        spec = {"name": fmt.name, "description": fmt.description, "schema": fmt.schema_, "strict": fmt.strict}
        chat["response_format"] = {"type": fmt.type}
        if fmt.type == "json_schema":
            chat["response_format"]["json_schema"] = {k: v for k, v in spec.items() if v is not None}
    if tools:
        chat["tools"] = tools
    choice = req.tool_choice
    if choice is not None:
        chat["tool_choice"] = choice if isinstance(choice, str) else {"type": "function",
                                                                      "function": {"name": choice.name}}
    echo = {"instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "metadata": req.metadata or {},
            "tool_choice": choice if isinstance(choice, str) else (choice.model_dump() if choice else "auto"),
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or ()],
            "parallel_tool_calls": req.parallel_tool_calls is not False, "user": req.user}
    return chat, {"echo": echo}


_PLACE = re.compile(r"messages\[(\d+)\]")


def relocated(exc: ApiError, locs: list[str]) -> ApiError:
    """An error about the converted chat body, pointed back at the Responses body."""

    def place(match: re.Match) -> str:
        i = int(match.group(1))
        return locs[i] if i < len(locs) else "input"

    for attr in ("param", "message"):
        value = getattr(exc, attr)
        if isinstance(value, str):
            value = _PLACE.sub(place, value).replace("image_url.url", "image_url").replace("input.content", "input")
            setattr(exc, attr, value)
    if exc.param == "messages":
        exc.param = "input"
    return exc


# -- answers --------------------------------------------------------------------------------------


def _usage(done: Done | None) -> dict | None:
    if done is None:
        return None
    u = done.usage
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def _message_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status ==
            "completed" else []}


def _call_item(call: Call, status: str = "completed") -> dict:
    return {"id": "fc_" + uuid.uuid4().hex, "type": "function_call", "status": status, "call_id": call.id,
            "name": call.name, "arguments": call.arguments if status == "completed" else ""}


def response_object(meta: dict, status: str, output: list[dict], done: Done | None = None,
                    error: dict | None = None) -> dict:
    """The Response object in a given state."""
    cut = done is not None and done.finish_reason == "content_filter"  # issue 14: chat/engine/filtered.py
    incomplete = {"reason": "content_filter" if cut else "max_output_tokens"} if status == "incomplete" else None
    return {"id": meta["response_id"], "object": "response", "created_at": meta["created"], "status": status,
            "error": error, "incomplete_details": incomplete, "model": meta["model"], "output": output,
            "usage": _usage(done), "store": False, "previous_response_id": None, "reasoning": None,
            "text": {"format": {"type": "text"}}, "truncation": "disabled", **meta["echo"]}


def _status(done: Done) -> str:
    return "incomplete" if done.finish_reason in ("length", "content_filter") else "completed"


def answer(meta: dict, done: Done) -> dict:
    """A whole (non-streamed) Response."""
    content, calls = content_and_calls(done.text) if meta.get("tools") else (done.text, [])
    output = [_message_item("msg_" + uuid.uuid4().hex, content)] if content is not None else []
    output += [_call_item(c) for c in calls]
    return response_object(meta, _status(done), output, done)


class _Events:
    """The stream's events with their sequence numbers, and the output items as they complete."""

    def __init__(self, meta: dict) -> None:
        self.meta, self.seq, self.output = meta, 0, []
        self.text_id: str | None = None
        self.text = ""

    def event(self, type_: str, **fields) -> str:
        body = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {type_}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

    def text_delta(self, delta: str) -> list[str]:
        out = []
        if self.text_id is None:
            self.text_id, self.text = "msg_" + uuid.uuid4().hex, ""
            out.append(self.event("response.output_item.added", output_index=len(self.output),
                                  item=_message_item(self.text_id, "", "in_progress")))
            out.append(self.event("response.content_part.added", item_id=self.text_id, output_index=len(self.output),
                                  content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        self.text += delta
        out.append(self.event("response.output_text.delta", item_id=self.text_id, output_index=len(self.output),
                              content_index=0, delta=delta, logprobs=[]))
        return out

    def close_text(self) -> list[str]:
        if self.text_id is None:
            return []
        item, index = _message_item(self.text_id, self.text), len(self.output)
        self.output.append(item)
        self.text_id = None
        return [self.event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                           text=self.text, logprobs=[]),
                self.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                           part=item["content"][0]),
                self.event("response.output_item.done", output_index=index, item=item)]

    def call(self, call: Call) -> list[str]:
        out = self.close_text()
        item, index = _call_item(call), len(self.output)
        self.output.append(item)
        out.append(self.event("response.output_item.added", output_index=index,
                              item={**item, "status": "in_progress", "arguments": ""}))
        out.append(self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                              delta=call.arguments))
        out.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                              name=call.name, arguments=call.arguments))
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        return out


async def stream(gen: Generation, meta: dict):
    """The Responses event stream of one generation."""
    ev = _Events(meta)
    calls = ToolCallStream() if meta.get("tools") else None

    def pieces(found) -> list[str]:
        out = []
        for kind, value in found:
            out += ev.text_delta(value) if kind == "text" else ev.call(value)
        return out

    try:
        yield ev.event("response.created", response=response_object(meta, "in_progress", []))
        yield ev.event("response.in_progress", response=response_object(meta, "in_progress", []))
        event = gen.first
        while True:
            if isinstance(event, Delta):
                for line in pieces(calls.feed(event.text)) if calls else ev.text_delta(event.text):
                    yield line
            elif isinstance(event, Done):
                for line in pieces(calls.finish()) if calls else []:
                    yield line
                if not ev.output and ev.text_id is None:
                    for line in ev.text_delta(""):
                        yield line
                for line in ev.close_text():
                    yield line
                status = _status(event)
                yield ev.event(f"response.{status}", response=response_object(meta, status, ev.output, event))
                break
            elif isinstance(event, Failed):
                err = failed_error(event)
                yield ev.event("error", code=err.code, message=err.message, param=err.param)
                yield ev.event("response.failed", response=response_object(
                    meta, "failed", ev.output, error={"code": err.code or "server_error", "message": err.message}))
                break
            event = await anext(gen.events)
    finally:
        if gen.handle.result is None:
            gen.handle.cancel()


def add_routes(api: APIRouter, state) -> None:
    """POST /v1/responses on the /v1 router."""
    from chat import json_mode
    from chat.api import check_key, parsed
    from chat.ratelimit_gate import api_ticket, limit_headers

    @api.post("/responses")
    async def create_response(request: Request):
        owner = check_key(state, request)
        ticket = api_ticket(state, request, owner)  # over the rate limit: 429 before the body is read
        locs: list[str] = []
        try:
            chat_request, meta = await parsed(state, request, owner,
                                              convert=lambda body: to_chat(body, locs, state.settings))
        except ApiError as exc:
            raise relocated(exc, locs) from None
        meta = {**meta, "response_id": "resp_" + uuid.uuid4().hex, "created": int(time.time())}
        try:
            gen = await Generation.start(request, state.engine, chat_request, ticket.on_finish(), ticket.refund)
            if meta.get("json_format") is not None:  # issue 14: checked (and generated once more) before it is sent
                gen = await json_mode.validated(request, state.engine, chat_request, gen, meta)
        except ApiError as exc:
            raise relocated(exc, locs) from None
        headers = {**clamp_headers(meta), **limit_headers(ticket)}
        if meta["stream"]:
            gen.stream()
            return StreamingResponse(stream(gen, meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **headers})
        done = await gen.result()
        return JSONResponse(answer(meta, done), headers=headers)
