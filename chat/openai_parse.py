"""Reading an OpenAI chat request: bytes -> JSON -> a checked ChatRequest, cheapest checks first.

Shapes, types and ranges are checked by the pydantic models in `chat/api_models.py` (one per
request type); their errors, and every other refusal, are an `ApiError` in one envelope,
{"error": {"message", "type", "param", "code"}}, naming the parameter in plain words (no
framework-shaped 422 ever leaks out). The Responses API (`chat/responses.py`) converts its input
to a chat request and comes through here too, so both routes follow one set of rules.

The order matters, because a hostile body should cost as little as possible:

1. JSON: too deep, numbers past Python's int-string limit, NaN/Infinity -> 400, not 500;
2. shapes and parameters (the pydantic model); then the messages are walked once without touching
   image data;
3. the text's total length against what the context could hold (`max_prompt_chars`): a 49 MB
   prompt is refused here, before anything is tokenized or checked character by character;
4. text validity (a lone surrogate such as "\\ud800" would otherwise reach the tokenizer);
5. images, for ALL of them before any is decoded: counts per message and per conversation,
   each one's byte size from its base64 length, then its declared pixels from its header
   (Pillow's lazy open); only then are they decoded and sanitized (`images.sanitize`), which
   is the expensive step.

Images are then known by the sha256 of their clean bytes, and those bytes travel with the request.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from dataclasses import dataclass

from fastapi.responses import Response

from chat.api_models import ChatCompletionRequest, Message, validate
from chat.config import Settings
from chat.engine.types import ChatRequest
from chat.images import ImageError, check_header, check_size, sanitize

# Fields (known to OpenAI or vLLM) that would change what the answer is, and which this server cannot honour.
UNSUPPORTED_EXTRA = ("audio", "prediction", "web_search_options", "structured_outputs", "guided_json",
                     "guided_regex", "guided_choice", "guided_grammar", "echo", "prompt_logprobs", "use_beam_search",
                     "min_tokens")
MAX_TOOLS = 256  # OpenAI takes 128
MAX_TOOL_DEPTH = 64  # JSON schemas nest a few levels; the chat template renders them recursively
# Used only before the engine is loaded (it then knows its tokenizer's longest token).
FALLBACK_CHARS_PER_TOKEN = 64


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

    def response(self) -> Response:
        """As an HTTP response (ASCII JSON, so even a message quoting broken Unicode can be sent)."""
        return Response(json.dumps(self.body()), status_code=self.status, headers=self.headers,
                        media_type="application/json")


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 invalid_request_error."""
    return ApiError(400, message, param=param, code=code)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number in JSON")


def parse_json(raw: bytes):
    """The body as JSON; anything the decoder chokes on is a 400 that says what."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise bad("The body is not valid JSON for a chat request: it is nested too deeply.") from None
    except UnicodeDecodeError:
        raise bad("The body is not valid JSON (it is not UTF-8 text).") from None
    except json.JSONDecodeError as exc:
        raise bad(f"The body is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}).") from None
    except ValueError as exc:  # an integer past Python's int-string limit, NaN, Infinity
        reason = "a number with too many digits" if "digits" in str(exc) else str(exc)
        raise bad(f"The body is not valid JSON for a chat request ({reason}).") from None


def _shown(value, limit: int = 40) -> str:
    text = repr(value)  # repr escapes lone surrogates and control characters
    return text if len(text) <= limit else text[:limit] + "..."


# -- messages -----------------------------------------------------------------------------------


@dataclass
class _Image:
    """An image part found in the first pass: where it is and its data URL, not yet decoded."""

    where: str
    payload: str
    detail: str
    data: bytes = b""


def _data_url(url: str, where: str) -> str:
    """The base64 payload of an image URL, refusing anything but an inline data URL."""
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0].lower() if ":" in url else "?"
        kind = "Remote image URLs" if scheme in ("http", "https") else f"{_shown(scheme + ':')} URLs"
        raise bad(f"{kind} are not fetched by this server; send the image inline as a data URL "
                  "(data:image/png;base64,...).", f"{where}.image_url.url", "image_url_not_allowed")
    header, _, payload = url.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise bad("A data URL must look like data:image/<type>;base64,<data>.", f"{where}.image_url.url",
                  "invalid_image_url")
    return payload


def _tool_calls(msg: Message) -> list[dict]:
    """An assistant message's earlier calls, as the chat template renders them (with their ids, for upstreams)."""
    calls = [(c.id, c.function) for c in msg.tool_calls or ()]
    if msg.function_call is not None:
        calls.append((None, msg.function_call))
    # Arguments as a JSON string (the template prints strings as they are; no deep object reaches it).
    return [{**({"id": i} if i else {}), "type": "function", "function": {
        "name": f.name, "arguments": f.arguments if isinstance(f.arguments, str) else json.dumps(
            f.arguments, ensure_ascii=False)}} for i, f in calls]


def json_depth(value) -> int:
    """How deeply a parsed JSON value nests (without recursion)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            todo.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            todo.extend((v, depth + 1) for v in item)
    return deepest


def _read_messages(settings: Settings, raw: list[Message]) -> tuple[list[dict], list[_Image], list[tuple[str, str]]]:
    """Pass 1: the checked models' content, no image touched. Returns (messages with image placeholders,
    images, (where, text) pairs)."""
    out, images, texts = [], [], []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        role, content = msg.role, msg.content
        parts: list[dict] = []
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
            texts.append((f"{where}.content", content))
        elif isinstance(content, list):
            in_msg = 0
            for j, part in enumerate(content):
                pwhere = f"{where}.content[{j}]"
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                    texts.append((f"{pwhere}.text", part.text))
                elif part.type == "image_url" and role == "user":
                    in_msg += 1
                    if in_msg > settings.max_images_per_message:
                        raise bad(f"A message may carry {settings.max_images_per_message} images.", pwhere)
                    spec = part.image_url
                    images.append(_Image(pwhere, _data_url(spec.url, pwhere), spec.detail))
                    parts.append({"type": "image", "image": images[-1], "detail": spec.detail})
                else:
                    raise bad(f"Unsupported content part {_shown(part.type)} for role {role}; use text (and image_url "
                              "in user messages).", f"{pwhere}.type")
        elif content is None and role == "assistant":
            pass
        else:
            raise bad("content must be a string or a list of content parts.", f"{where}.content")
        if role == "user":
            out.append({"role": "user", "content": parts})
        else:
            entry = {"role": "system" if role == "developer" else role,
                     "content": "".join(p["text"] for p in parts)}
            if role == "tool" and msg.tool_call_id:
                entry["tool_call_id"] = msg.tool_call_id
            if role == "assistant" and (msg.tool_calls or msg.function_call):
                entry["tool_calls"] = _tool_calls(msg)
                for k, call in enumerate(entry["tool_calls"]):
                    texts.append((f"{where}.tool_calls[{k}].function.arguments", call["function"]["arguments"]))
            out.append(entry)
        if len(images) > settings.max_images_per_conversation:
            raise bad(f"The conversation holds more than {settings.max_images_per_conversation} images, the "
                      "limit.", "messages")
    if out[-1]["role"] not in ("user", "tool", "assistant"):
        raise bad("The last message must be from the user (or a tool's result, or an assistant message to "
                  "continue).", "messages")
    return out, images, texts


def _check_texts(texts: list[tuple[str, str]], max_chars: int) -> None:
    """Length against the context first (O(1) each), then valid Unicode (bounded by that length)."""
    total = sum(len(text) for _, text in texts)
    if total > max_chars:
        raise bad(f"The messages' text is {total:,} characters; the context cannot hold more than about "
                  f"{max_chars:,}. Send a shorter text or start a new conversation.", "messages",
                  "context_length_exceeded")
    for where, text in texts:
        _check_text(text, where)


def _check_text(text: str, where: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad(f"{where} is not valid Unicode: it holds a lone surrogate ({_shown(exc.object[exc.start])}) at "
                  f"character {exc.start}.", where) from None


def _check_images(settings: Settings, images: list[_Image]) -> None:
    """Bytes (from the base64 length) and declared pixels (from the header) of every image; no pixel decoded."""
    for img in images:
        param = f"{img.where}.image_url.url"
        n = len(img.payload)
        size = n // 4 * 3 - (img.payload[-2:].count("=") if n % 4 == 0 else 0)
        try:
            check_size(max(size, 1), settings.max_image_bytes)
        except ImageError as exc:
            raise bad(str(exc), param, "invalid_image") from None
    for img in images:
        param = f"{img.where}.image_url.url"
        try:
            img.data = base64.b64decode(img.payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad("The image's base64 data is not valid.", param, "invalid_image_url") from None
        img.payload = ""
        try:
            check_header(img.data, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        except ImageError as exc:
            raise bad(str(exc), param, "invalid_image") from None


def _decode_images(settings: Settings, messages: list[dict], inline: dict) -> None:
    """Pass 2: sanitize every image, replacing placeholders by the clean image's sha256."""
    for msg in messages:
        if msg["role"] != "user":
            continue
        for part in msg["content"]:
            if part["type"] != "image":
                continue
            img: _Image = part.pop("image")
            try:
                clean = sanitize(img.data, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
            except ImageError as exc:
                raise bad(str(exc), f"{img.where}.image_url.url", "invalid_image") from None
            inline[clean.sha256] = clean.data  # travels with the request to the worker
            part["image_id"] = clean.sha256


# -- the whole request ----------------------------------------------------------------------------


def check_counts(settings: Settings, body: dict, items: str) -> None:
    """Before any model is validated: no list longer than a context could use (O(messages), no parsing).

    pydantic checks every element and collects every error; millions of tiny messages (a 50 MB body
    holds four million) would cost it tens of seconds and gigabytes, so they are counted first.
    Every message costs at least a few tokens of the chat template, every part something.
    """
    limit_messages, limit_parts = max(16, settings.context_tokens // 4), max(64, settings.context_tokens)
    for name, limit in ((items, limit_messages), ("tools", MAX_TOOLS), ("functions", MAX_TOOLS)):
        value = body.get(name)
        if isinstance(value, list) and len(value) > limit:
            raise bad(f"{name} holds {len(value):,} entries; this server takes at most {limit:,}.", name)
    parts = 0
    for msg in body.get(items) if isinstance(body.get(items), list) else ():
        if isinstance(msg, dict):
            for key in ("content", "tool_calls", "output"):
                if isinstance(msg.get(key), list):
                    parts += len(msg[key])
    if parts > limit_parts:
        raise bad(f"The {items} hold {parts:,} content parts; this server takes at most {limit_parts:,}.", items)


def _unsupported(body: dict, req: ChatCompletionRequest) -> list[str]:
    """Fields given that would change the answer in ways this server cannot honour."""
    names = [k for k in UNSUPPORTED_EXTRA if body.get(k) not in (None, False, [], {})]
    if req.logprobs:
        names.append("logprobs")
    if req.top_logprobs is not None:
        names.append("top_logprobs")
    if req.logit_bias:
        names.append("logit_bias")
    modalities = body.get("modalities")
    if modalities not in (None, [], ["text"]):
        names.append("modalities")
    return names


def _tools(req: ChatCompletionRequest) -> tuple[list[dict] | None, bool]:
    """(tools for the prompt, whether the answer is read for tool calls); refuses forced calls."""
    legacy = not req.tools and bool(req.functions)
    choice = req.function_call if legacy else req.tool_choice
    param = "function_call" if legacy else "tool_choice"
    if choice is not None and not isinstance(choice, str) or choice == "required":
        raise bad(f"Forced tool calls ({param} {_shown(choice if isinstance(choice, str) else 'naming a function')}) "
                  "are not supported by this server; leave it out or use 'auto' (the model decides) or 'none'.",
                  param, "unsupported_parameter")
    if req.tools:
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
    elif req.functions:
        tools = [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in req.functions]
    else:
        return None, False
    if choice == "none":  # the model is not told about them (as vLLM does by default for 'none')
        return None, False
    for k, tool in enumerate(tools):
        if json_depth(tool) > MAX_TOOL_DEPTH:
            raise bad(f"A tool's definition may nest {MAX_TOOL_DEPTH} levels deep at most.", f"tools[{k}]")
    return tools, True


def parse_request(settings: Settings, body, *, model_names: tuple[str, ...], owner: str,
                  max_prompt_chars: int | None = None, adapters: tuple[str, ...] = (),
                  defaults=None) -> tuple[ChatRequest, dict]:
    """The whole request: (engine request, {"stream", "include_usage", "model", "id", "created", "tools",
    "legacy_functions", "clamped"})."""
    if not isinstance(body, dict):
        raise bad("The request body must be a JSON object.")
    check_counts(settings, body, "messages")
    req, problem = validate(ChatCompletionRequest, body)
    if problem is not None:
        raise bad(*problem)
    model = req.model
    if not model:
        raise bad("model is required.", "model")
    if model not in model_names:
        raise ApiError(404, f"The model {_shown(model, 200)} does not exist; this server serves "
                       f"'{model_names[0]}' (alias 'vlchat').", param="model", code="model_not_found")
    unsupported = _unsupported(body, req)
    if unsupported:
        raise bad(f"Not supported by this server: {', '.join(unsupported)}.", unsupported[0], "unsupported_parameter")
    if (req.n or 1) > 1:
        raise bad("Only n=1 is supported: ask again for another answer.", "n", "unsupported_parameter")
    tools, read_calls = _tools(req)
    limit = settings.max_new_tokens_limit
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = min(asked, limit) if asked is not None else None
    stream = bool(req.stream)
    if req.stream_options is not None and not stream:
        raise bad("stream_options is only allowed with stream: true.", "stream_options")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if any(len(x) > 1000 for x in stop):
        raise bad("stop must be a string or a list of up to 4 strings of at most 1000 characters.", "stop")
    for x in stop:
        _check_text(x, "stop")
    if req.cache_salt is not None:
        _check_text(req.cache_salt, "cache_salt")
    max_chars = max_prompt_chars or settings.context_tokens * FALLBACK_CHARS_PER_TOKEN
    messages, images, texts = _read_messages(settings, req.messages)
    if tools:
        texts.append(("tools", json.dumps(tools, ensure_ascii=False)))
    _check_texts(texts, max_chars)
    continue_final = False
    if messages[-1]["role"] == "assistant":
        last = messages[-1]
        if not last["content"] and not last.get("tool_calls") and len(messages) > 1:
            messages.pop()  # an empty assistant message to continue: the same as a new answer
        else:
            continue_final = req.continue_final_message is not False and not last.get("tool_calls")
    elif req.continue_final_message:
        raise bad("continue_final_message needs a conversation that ends with an assistant message.",
                  "continue_final_message")
    _check_images(settings, images)
    inline: dict[str, bytes] = {}
    _decode_images(settings, messages, inline)
    # A value left out takes the model's default (issue 14: its generation config, else the model card's).
    params = settings.clamp_params(req.temperature, req.top_p, max_tokens, seed=req.seed, stop=stop,
                                   # asked for more than the limit: as much as the context has room for, up to it
                                   fit_to_context=max_tokens is None or asked > limit, top_k=req.top_k,
                                   presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                   defaults=defaults)
    meta = {"stream": stream, "include_usage": bool(req.stream_options and req.stream_options.include_usage),
            "model": model, "id": "chatcmpl-" + uuid.uuid4().hex, "created": int(time.time()),
            "tools": read_calls, "legacy_functions": read_calls and not req.tools,
            "clamped": (asked, limit) if asked is not None and asked > limit else None}
    meta["grounding"] = bool(req.grounding)  # issue 14: the answer's boxes parsed into message.grounding
    cache_salt = f"{owner}|{req.cache_salt}" if req.cache_salt else owner
    request = ChatRequest(messages, params, images=inline, cache_salt=cache_salt, tools=tools,
                          continue_final=continue_final, adapter=model if model in adapters else "")
    from chat import json_mode  # issue 14: JSON mode (imports this module)

    return json_mode.prepare(req.response_format, request, meta), meta
