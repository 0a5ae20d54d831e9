"""JSON mode on the API (issue 14): `response_format` {"type": "json_object"} or {"type": "json_schema",
"json_schema": {"name", "schema", "strict"}} on /v1/chat/completions (and `text.format` on /v1/responses).

How it works:
- `prepare` (while the request is parsed): the schema must itself be a valid JSON Schema (400 otherwise);
  a system instruction tells the model to answer with JSON only (and the schema, when there is one).
- `validated` (after the answer): the answer must parse (`json.loads`; one Markdown code fence around it is
  taken off) and be an object (json_object) or match the schema (the `jsonschema` library, whichever draft
  the schema names; `strict` or not, it is checked). An invalid answer is generated ONCE more, with the
  invalid answer and what is wrong with it in the conversation and a temperature of at most 0.3. If the
  second answer is invalid too, the request fails with HTTP 422, code `invalid_json_output`, saying why;
  nothing of the invalid answers is sent.
- `stream: true`: the answer is held back until it has been validated, then sent as one content chunk
  (then the finish chunk, usage when asked, [DONE]); a failure is the same 422 before any chunk.

The usage reported is both generations' together. The answer's content is the clean JSON text. When tools
were offered and the model calls one, the call is the answer (it is not checked as JSON).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace

import jsonschema
from jsonschema.exceptions import SchemaError

from chat.engine.types import ChatRequest, Delta, Done, Usage
from chat.openai_parse import ApiError, bad, json_depth
from chat.tools import content_and_calls

log = logging.getLogger("vlchat.api")

MAX_SCHEMA_CHARS = 100_000
MAX_SCHEMA_DEPTH = 64
RETRY_TEMPERATURE = 0.3
SHOWN_ERROR_CHARS = 300
CODE = "invalid_json_output"


@dataclass(frozen=True)
class JsonFormat:
    """What a request asked for: any JSON object, or JSON matching `schema`."""

    kind: str  # "json_object" or "json_schema"
    schema: dict | None = None
    name: str = ""

    def instruction(self) -> str:
        """The system prompt's addition."""
        text = ("Answer with JSON only: a single JSON value and nothing else, with no Markdown, no code fences and "
                "no text before or after it.")
        if self.schema is None:
            return text + " The value must be a JSON object."
        named = f" (named {self.name!r})" if self.name else ""
        return (f"{text} The JSON must conform to this JSON Schema{named}:\n"
                f"{json.dumps(self.schema, ensure_ascii=False)}")

    def problem(self, text: str) -> tuple[object, str | None]:
        """(the parsed value, None) or (None, what is wrong with `text`)."""
        try:
            value = json.loads(_unfenced(text))
        except (json.JSONDecodeError, RecursionError, ValueError) as exc:
            reason = f"{exc.msg} at line {exc.lineno}, column {exc.colno}" if isinstance(
                exc, json.JSONDecodeError) else exc.__class__.__name__
            return None, f"the answer is not valid JSON ({reason})"
        if self.schema is None:
            if not isinstance(value, dict):
                return None, f"the answer is JSON but not an object (it is {type(value).__name__})"
            return value, None
        validator = jsonschema.validators.validator_for(self.schema)(self.schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "the top level"
            return None, f"the JSON does not match the schema at {where}: {error.message[:SHOWN_ERROR_CHARS]}"
        return value, None


def _unfenced(text: str) -> str:
    """The text without one surrounding Markdown code fence (```json ... ```), as models often add."""
    body = text.strip()
    if body.startswith("```") and body.endswith("```") and body.count("```") == 2:
        body = body[3:-3]
        first, _, rest = body.partition("\n")
        body = rest if first.strip().lower() in ("json", "") else body
    return body.strip()


def read_format(response_format, param: str = "response_format") -> JsonFormat | None:
    """The request's `response_format` (the pydantic model) as a JsonFormat; None for text; 400 if unusable."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return JsonFormat("json_object")
    spec = response_format.json_schema
    if spec is None:
        raise bad("response_format of type json_schema needs json_schema: {\"name\": ..., \"schema\": {...}}.",
                  f"{param}.json_schema")
    where = f"{param}.json_schema.schema"
    if spec.schema_ is None:
        raise bad("A json_schema response format needs its schema (a JSON Schema object).", where)
    schema = spec.schema_
    if json_depth(schema) > MAX_SCHEMA_DEPTH or len(json.dumps(schema, ensure_ascii=False)) > MAX_SCHEMA_CHARS:
        raise bad(f"The JSON schema is too large (at most {MAX_SCHEMA_CHARS:,} characters and {MAX_SCHEMA_DEPTH} "
                  "levels).", where)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise bad(f"The JSON schema is not valid: {exc.message[:SHOWN_ERROR_CHARS]}.", where,
                  "invalid_json_schema") from None
    return JsonFormat("json_schema", schema, spec.name or "")


def with_instruction(request: ChatRequest, fmt: JsonFormat) -> ChatRequest:
    """The request with the JSON instruction added to its system prompt (a system message first if none)."""
    messages = list(request.messages)
    first = messages[0] if messages else None
    if first is not None and first["role"] == "system" and isinstance(first.get("content"), str):
        body = first["content"].rstrip()
        messages[0] = {**first, "content": f"{body}\n\n{fmt.instruction()}" if body else fmt.instruction()}
    else:
        messages.insert(0, {"role": "system", "content": fmt.instruction()})
    return replace(request, messages=messages)


def prepare(response_format, request: ChatRequest, meta: dict, param: str = "response_format") -> ChatRequest:
    """While parsing: remember the format in `meta["json_format"]` and return the request with its instruction."""
    fmt = read_format(response_format, param)
    meta["json_format"] = fmt
    return request if fmt is None else with_instruction(request, fmt)


def _retry_request(request: ChatRequest, text: str, reason: str) -> ChatRequest:
    """The second attempt: the invalid answer and what is wrong with it, then a cooler temperature."""
    p = request.params
    params = replace(p, temperature=min(p.temperature, RETRY_TEMPERATURE),
                     seed=None if p.seed is None else p.seed + 1)
    fix = (f"That answer cannot be used: {reason}. Reply again with only the corrected JSON, nothing else.")
    messages = [*request.messages, {"role": "assistant", "content": text}, {"role": "user", "content": fix}]
    return replace(request, messages=messages, params=params, continue_final=False)


def _total(a: Usage, b: Usage) -> Usage:
    return Usage(prompt_tokens=a.prompt_tokens + b.prompt_tokens, cached_tokens=a.cached_tokens + b.cached_tokens,
                 completion_tokens=a.completion_tokens + b.completion_tokens,
                 images_encoded=a.images_encoded + b.images_encoded)


def failure(reason: str) -> ApiError:
    """The error when both answers were invalid."""
    return ApiError(422, f"The model did not produce valid JSON in 2 attempts: {reason}. Try a clearer instruction, "
                    "a simpler schema or a larger max_tokens.", "invalid_response_error", "response_format", CODE)


class _Ended:
    """The handle of an answer that has ended: nothing to cancel."""

    def __init__(self, done: Done) -> None:
        self.result = done

    def cancel(self) -> None:
        """Nothing runs any more."""


class Replay:
    """A validated answer in the shape of `chat.api_run.Generation` (handle, first, events, result(), stream()),
    so a route answers it, plain or streamed, as it answers a generation."""

    def __init__(self, done: Done) -> None:
        self.done = done
        self.handle = _Ended(done)
        self.first = Delta(done.text)
        self.events = self._events()

    async def _events(self):
        yield self.done

    async def result(self) -> Done:
        """The answer."""
        return self.done

    def stream(self) -> None:
        """A stream takes over (nothing to hand over)."""

    def close(self) -> None:
        """Nothing to close."""


async def validated(request, engine, chat_request: ChatRequest, gen, meta: dict, start=None) -> Replay:
    """Wait for the answer, check it, generate once more if it is invalid: a Replay of the valid answer (its text
    the JSON without any code fence), or ApiError 422 `invalid_json_output`. `start(request, engine,
    chat_request)` starts the second generation (default: chat.api_run.Generation.start)."""
    fmt: JsonFormat = meta["json_format"]
    done = await gen.result()
    if done.finish_reason == "cancelled":  # the client went away (or the server is stopping): no second try
        return Replay(done)
    if meta.get("tools") and content_and_calls(done.text)[1]:  # a tool call is an answer too (as OpenAI's)
        return Replay(done)
    _, reason = fmt.problem(done.text)
    if reason is not None:
        log.info("JSON mode: the first answer is unusable (%s); generating once more", reason)
        if start is None:
            from chat.api_run import Generation

            start = Generation.start
        second = await start(request, engine, _retry_request(chat_request, done.text, reason))
        again = await second.result()
        _, reason = fmt.problem(again.text)
        if reason is not None:
            log.warning("JSON mode: the second answer is unusable too (%s); answering 422 %s", reason, CODE)
            raise failure(reason)
        done = replace(again, usage=_total(done.usage, again.usage))
    return Replay(replace(done, text=_unfenced(done.text)))
