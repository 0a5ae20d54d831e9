"""Reading an OpenAI chat request: bytes -> JSON -> a checked ChatRequest, cheapest checks first.

Parsed by hand (not pydantic) so each problem names its parameter in plain words and no
framework-shaped 422 ever leaks out. Every refusal is an `ApiError` in one envelope,
{"error": {"message", "type", "param", "code"}}.

The order matters, because a hostile body should cost as little as possible:

1. JSON: too deep, numbers past Python's int-string limit, NaN/Infinity -> 400, not 500;
2. shapes and parameters; the messages are walked once without touching image data;
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

from chat.config import Settings
from chat.engine.types import ChatRequest
from chat.images import ImageError, check_header, check_size, sanitize

UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "logprobs", "top_logprobs",
               "audio", "modalities", "prediction", "logit_bias", "web_search_options", "parallel_tool_calls")
ROLES = ("system", "developer", "user", "assistant")
MAX_CACHE_SALT = 256
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


def _data_url(part: dict, where: str) -> tuple[str, str]:
    """(base64 payload, detail) of an image_url part, refusing anything but an inline data URL."""
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise bad("image_url.url must be a string.", f"{where}.image_url.url")
    detail = spec.get("detail", "auto") if isinstance(spec, dict) else "auto"
    if detail not in ("auto", "low", "high"):
        raise bad("image_url.detail must be 'low', 'high' or 'auto'.", f"{where}.image_url.detail")
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0].lower() if ":" in url else "?"
        kind = "Remote image URLs" if scheme in ("http", "https") else f"{_shown(scheme + ':')} URLs"
        raise bad(f"{kind} are not fetched by this server; send the image inline as a data URL "
                  "(data:image/png;base64,...).", f"{where}.image_url.url", "image_url_not_allowed")
    header, _, payload = url.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise bad("A data URL must look like data:image/<type>;base64,<data>.", f"{where}.image_url.url",
                  "invalid_image_url")
    return payload, detail


def _read_messages(settings: Settings, raw) -> tuple[list[dict], list[_Image], list[tuple[str, str]]]:
    """Pass 1: shapes only. Returns (messages with image placeholders, images, (where, text) pairs)."""
    if not isinstance(raw, list) or not raw:
        raise bad("messages must be a non-empty list.", "messages")
    out, images, texts = [], [], []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad("Each message must be an object.", where)
        role = msg.get("role")
        if role not in ROLES:
            raise bad(f"Unsupported role {_shown(role)}; use system, user or assistant.", f"{where}.role")
        content = msg.get("content")
        parts: list[dict] = []
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
            texts.append((f"{where}.content", content))
        elif isinstance(content, list):
            in_msg = 0
            for j, part in enumerate(content):
                pwhere = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                    texts.append((f"{pwhere}.text", part["text"]))
                elif kind == "image_url" and role == "user":
                    in_msg += 1
                    if in_msg > settings.max_images_per_message:
                        raise bad(f"A message may carry {settings.max_images_per_message} images.", pwhere)
                    payload, detail = _data_url(part, pwhere)
                    images.append(_Image(pwhere, payload, detail))
                    parts.append({"type": "image", "image": images[-1],
                                  "detail": detail if detail in ("low", "high") else "auto"})
                else:
                    raise bad(f"Unsupported content part {_shown(kind)} for role {role}; use text (and image_url "
                              "in user messages).", f"{pwhere}.type")
        elif content is None and role == "assistant":
            parts.append({"type": "text", "text": ""})
        else:
            raise bad("content must be a string or a list of content parts.", f"{where}.content")
        if role in ("system", "developer", "assistant"):
            out.append({"role": "system" if role == "developer" else role,
                        "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": "user", "content": parts})
        if len(images) > settings.max_images_per_conversation:
            raise bad(f"The conversation holds more than {settings.max_images_per_conversation} images, the "
                      "limit.", "messages")
    if out[-1]["role"] != "user":
        raise bad("The last message must be from the user.", "messages")
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


def parse_messages(settings: Settings, raw, inline: dict, max_chars: int) -> list[dict]:
    """OpenAI messages -> engine messages (images replaced by their content hash, their bytes put in `inline`)."""
    messages, images, texts = _read_messages(settings, raw)
    _check_texts(texts, max_chars)
    _check_images(settings, images)
    _decode_images(settings, messages, inline)
    return messages


# -- the whole request ----------------------------------------------------------------------------


def _number(body: dict, name: str, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise bad(f"{name} must be a {'whole number' if integer else 'number'}.", name)
    if not lo <= value <= hi:
        raise bad(f"{name} must be between {lo} and {hi}; got {_shown(value)}.", name)
    return value


def _string(body: dict, name: str, limit: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise bad(f"{name} must be a string of at most {limit} characters.", name)
    _check_text(value, name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(x, str) and len(x) <= 1000 for x in stop)):
        raise bad("stop must be a string or a list of up to 4 strings.", "stop")
    for x in stop:
        _check_text(x, "stop")
    return tuple(stop)


def parse_request(settings: Settings, body, *, model_names: tuple[str, ...], owner: str,
                  max_prompt_chars: int | None = None) -> tuple[ChatRequest, dict]:
    """The whole request: (engine request, {"stream", "include_usage", "model", "id", "created"})."""
    if not isinstance(body, dict):
        raise bad("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required.", "model")
    if model not in model_names:
        raise ApiError(404, f"The model {_shown(model, 200)} does not exist; this server serves "
                       f"'{model_names[0]}' (alias 'vlchat').", param="model", code="model_not_found")
    unsupported = [k for k in UNSUPPORTED if body.get(k) not in (None, False, [], {})]
    if body.get("response_format") in ({"type": "text"},):
        unsupported = [k for k in unsupported if k != "response_format"]
    if unsupported:
        raise bad(f"Not supported by this server: {', '.join(unsupported)}.", unsupported[0], "unsupported_parameter")
    if _number(body, "n", 1, 1, integer=True) not in (None, 1):
        raise bad("Only n=1 is supported.", "n")
    limit = settings.max_new_tokens_limit
    max_tokens = _number(body, "max_completion_tokens", 1, limit, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, limit, integer=True)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    seed = _number(body, "seed", -(2**63), 2**63 - 1, integer=True)
    top_k = _number(body, "top_k", -1, 1_000_000, integer=True)  # vLLM's extension; -1 or 0: off
    presence = _number(body, "presence_penalty", -2.0, 2.0)
    stop = _stop(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false.", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options must be an object.", "stream_options")
    salt = _string(body, "cache_salt", MAX_CACHE_SALT)
    max_chars = max_prompt_chars or settings.context_tokens * FALLBACK_CHARS_PER_TOKEN
    inline: dict[str, bytes] = {}
    messages = parse_messages(settings, body.get("messages"), inline, max_chars)
    params = settings.clamp_params(temperature, top_p, max_tokens, seed=seed, stop=stop,
                                   fit_to_context=max_tokens is None, top_k=max(0, top_k or 0),
                                   presence_penalty=float(presence or 0.0))
    meta = {"stream": stream, "include_usage": bool(options.get("include_usage")), "model": model,
            "id": "chatcmpl-" + uuid.uuid4().hex, "created": int(time.time())}
    cache_salt = f"{owner}|{salt}" if salt else owner
    return ChatRequest(messages, params, images=inline, cache_salt=cache_salt), meta
