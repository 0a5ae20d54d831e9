"""What the remote engine sends to a model server and how it reads the answer: OpenAI chat completions.

- Request bodies: the engine's messages with each image as a data URL of its stored clean bytes plus
  vLLM's `uuid` (the image's sha256, so the server's encoder and prefix caches can reuse it), the
  sampling settings, `stream` with `stream_options.include_usage`, and `cache_salt`.
- Owner separation: `cache_salt` is an HMAC of the owner under a server secret, never the owner or an
  API key itself; requests share cached state upstream only when they would here (same owner, same salt).
- The conversation key (sent in `X-Session-Id`) is an HMAC of the owner and the conversation's first
  user message, so every turn of a conversation, the first one included (the page stores a new
  conversation only after the engine accepts it) and API clients that resend the history, carry the same.
- Errors: an upstream's error body (OpenAI's envelope, or vLLM's flat `{"object": "error", ...}`) as a
  Failed event with the HTTP status our API answers with.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
from collections.abc import Callable
from dataclasses import dataclass

from chat.engine.types import ChatRequest, ContextTooLong, Failed, Usage

UNREACHABLE = "The model server is not reachable; try again in a moment."
UNREACHABLE_CODE = "upstream_unavailable"
PASSED_5XX = ("busy", "not_ready", "shutting_down")  # a vlchat upstream's own 503s say more than "unreachable"


@dataclass(frozen=True)
class UpstreamFailed(Failed):
    """A Failed event with the HTTP status the API answers it with (503 for a server that is away)."""

    status: int = 503


def unreachable(text: str = "", message: str = UNREACHABLE, code: str = UNREACHABLE_CODE) -> UpstreamFailed:
    """The model server cannot be reached (or answered 5xx): 503, retry later."""
    return UpstreamFailed(message, code, text, status=503)


def _hmac(secret: bytes, label: str, value: str) -> str:
    return hmac.new(secret, f"{label}\n{value}".encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def owner_salt(secret: bytes, owner: str) -> str:
    """vLLM's `cache_salt` for an owner: the same owner always gets the same salt, nobody can reverse it."""
    return _hmac(secret, "vlchat cache_salt", owner)


def conversation_key(secret: bytes, request: ChatRequest) -> str:
    """A stable id of the request's conversation: its owner plus its first user message."""
    first = next((m for m in request.messages if m.get("role") == "user"), {})
    content = first.get("content")
    if isinstance(content, list):
        content = [p.get("text") if p.get("type") == "text" else p.get("image_id") for p in content]
    return _hmac(secret, "vlchat conversation", json.dumps([request.cache_salt, content]))[:32]


def _mime(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"GIF8"):
        return "image/gif"
    return "image/png"


def _image_bytes(value) -> bytes:
    """Clean bytes as stored, or a PIL image encoded as PNG."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    buf = io.BytesIO()
    value.save(buf, "PNG")
    return buf.getvalue()


def defuse(text: str) -> str:
    """A typed '<|im_start|>' must stay text upstream too (the local engine does the same)."""
    return text.replace("<|", "<\u200c|")


def defuse_all(value):
    """`defuse` on every string inside a JSON-like value (tool definitions, call arguments)."""
    if isinstance(value, str):
        return defuse(value)
    if isinstance(value, list):
        return [defuse_all(v) for v in value]
    if isinstance(value, dict):
        return {k: defuse_all(v) for k, v in value.items()}
    return value


def _with_calls(msg: dict, entry: dict, pending: list[str], made: list[str]) -> None:
    """An assistant's earlier tool calls (with ids, which OpenAI servers require) and the id a tool's
    result answers (the engine's messages keep neither: results pair with calls in order)."""
    if msg.get("tool_calls"):
        pending.clear()
        calls = []
        for call in msg["tool_calls"]:
            call_id = call.get("id") or f"call_{len(made)}"
            made.append(call_id)
            pending.append(call_id)
            calls.append({"id": call_id, "type": "function", "function": defuse_all(call.get("function", {}))})
        entry["tool_calls"] = calls
    if msg["role"] == "tool":
        entry["tool_call_id"] = msg.get("tool_call_id") or (pending.pop(0) if pending else "call_0")


def openai_messages(request: ChatRequest, load_image: Callable[[str], bytes]) -> list[dict]:
    """The engine's messages as OpenAI chat messages, images inline with their sha256 as `uuid`."""
    out: list[dict] = []
    pending: list[str] = []
    made: list[str] = []
    for msg in request.messages:
        content = msg["content"]
        if isinstance(content, str):
            out.append({"role": msg["role"], "content": defuse(content)})
            _with_calls(msg, out[-1], pending, made)
            continue
        parts = []
        for part in content:
            if part.get("type") == "image":
                image_id = part["image_id"]
                held = request.images.get(image_id)
                data = _image_bytes(held) if held is not None else load_image(image_id)
                url = f"data:{_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"
                parts.append({"type": "image_url", "image_url": {"url": url, "detail": part.get("detail", "auto")},
                              "uuid": image_id})
            else:
                parts.append({"type": "text", "text": defuse(part.get("text", ""))})
        out.append({"role": msg["role"], "content": parts})
    return out


def request_body(request: ChatRequest, model: str, salt: str, load_image: Callable[[str], bytes]) -> dict:
    """The whole chat-completions body for one request (always streamed, always with usage)."""
    p = request.params
    body = {"model": request.adapter or model, "messages": openai_messages(request, load_image), "stream": True,
            "stream_options": {"include_usage": True}, "temperature": p.temperature, "top_p": p.top_p,
            "cache_salt": salt}
    if not p.fit_to_context:  # else the server's own default applies, as the local engine fits the context
        body["max_tokens"] = p.max_new_tokens
    if p.top_k > 0:
        body["top_k"] = p.top_k
    if p.presence_penalty:
        body["presence_penalty"] = p.presence_penalty
    if getattr(p, "frequency_penalty", 0.0):
        body["frequency_penalty"] = p.frequency_penalty
    if p.seed is not None:
        body["seed"] = p.seed
    if p.stop:
        body["stop"] = list(p.stop)
    tools = getattr(request, "tools", None)
    if tools:  # the server's calls come back as `tool_calls` and are turned into Qwen's text blocks again
        body["tools"] = defuse_all(tools)
    if getattr(request, "continue_final", False):  # vLLM's names
        body["continue_final_message"], body["add_generation_prompt"] = True, False
    return body


def add_call_deltas(calls: dict[int, dict], deltas: object) -> None:
    """Gather a stream's `tool_calls` pieces by index (the name first, the arguments in fragments)."""
    for piece in deltas if isinstance(deltas, list) else ():
        if not isinstance(piece, dict):
            continue
        call = calls.setdefault(piece.get("index", len(calls)), {"name": "", "arguments": ""})
        function = piece.get("function") or {}
        if isinstance(function.get("name"), str):
            call["name"] += function["name"]
        if isinstance(function.get("arguments"), str):
            call["arguments"] += function["arguments"]


def calls_as_text(calls: dict[int, dict]) -> str:
    """The gathered calls as Qwen writes them, `<tool_call>{"name", "arguments"}</tool_call>`, which is what
    the local engine's answer holds and what the API reads calls from."""
    blocks = []
    for _, call in sorted(calls.items()):
        try:
            arguments = json.loads(call["arguments"]) if call["arguments"].strip() else {}
        except ValueError:
            arguments = call["arguments"]
        blocks.append("<tool_call>\n" + json.dumps({"name": call["name"], "arguments": arguments},
                                                   ensure_ascii=False) + "\n</tool_call>")
    return "\n".join(blocks)


def usage_of(raw: dict | None, chunks: int) -> Usage:
    """The upstream's usage (cached tokens from prompt_tokens_details); without one, the chunks counted."""
    if not isinstance(raw, dict):
        return Usage(0, 0, chunks, 0)
    details = raw.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0

    def whole(value) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    return Usage(whole(raw.get("prompt_tokens")), whole(cached), whole(raw.get("completion_tokens")) or chunks, 0)


def error_fields(body: object) -> tuple[str, str]:
    """(message, code) from an OpenAI error envelope or vLLM's flat error object ('' where absent)."""
    if not isinstance(body, dict):
        return "", ""
    err = body.get("error") if isinstance(body.get("error"), dict) else body
    message = err.get("message")
    code = err.get("code")
    return (message if isinstance(message, str) else ""), (code if isinstance(code, str) else "")


def http_failure(status: int, raw: bytes, text: str = "") -> UpstreamFailed:
    """An upstream's error answer as our event: 5xx -> 503 unreachable (a vlchat upstream's busy and
    not-ready pass as they are); a refused key or unknown model -> 503 naming our configuration; other
    4xx pass through with their message (a too-long prompt keeps our context_length_exceeded code)."""
    try:
        message, code = error_fields(json.loads(raw))
    except ValueError:
        message, code = "", ""
    message = message[:2000]
    if status >= 500 or status == 429:
        if code in PASSED_5XX and message:
            return unreachable(text, message, code)
        if status == 429:
            return unreachable(text, "The model server is busy; try again in a moment.", "busy")
        return unreachable(text)
    if status in (401, 403):
        return unreachable(text, "The model server refused vlchat's key (check --engine-key); try again later.",
                           "upstream_auth")
    if status == 404 and code != ContextTooLong.code:
        return unreachable(text, "The model server does not know the model vlchat asks for (check "
                                 "--engine-model).", "upstream_model")
    if code == ContextTooLong.code or "maximum context length" in message:
        return UpstreamFailed(message or "The conversation is too long for the model.", ContextTooLong.code, text,
                              status=400)
    return UpstreamFailed(message or f"The model server refused the request (HTTP {status}).", code, text,
                          status=status)


def stream_failure(chunk: dict, text: str) -> UpstreamFailed:
    """An error event inside a stream (`data: {"error": ...}`) as our event (503)."""
    message, code = error_fields(chunk)
    if code in PASSED_5XX and message:
        return unreachable(text, message, code)
    return unreachable(text, message[:2000] or UNREACHABLE, code or "upstream_error")
