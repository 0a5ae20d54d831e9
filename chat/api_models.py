"""The /v1 request bodies as pydantic models, one per request type, and their errors in our envelope.

The models check shapes, types and ranges only (strict: "high" is not a number, `true` is not an
integer, "1" is not a whole number); what is expensive or depends on the server (text length
against the context, Unicode validity, image caps and decoding, the model name) stays in
`chat/openai_parse.py`, which runs after them, cheapest first. Unknown fields are ignored (as
OpenAI's SDKs send new ones all the time); known fields with a wrong type or value are a 400 that
names the parameter as a client wrote it (`messages[0].content[1].image_url.url`).

The models hold the client's strings as they are (pydantic keeps the same objects): a 49 MB text
costs nothing here, and its length is checked next, before anything reads it character by character.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

INT64 = 2**63

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TopK = Annotated[int, Field(ge=-1, le=1_000_000)]  # vLLM's extension; -1 or 0: off
Seed = Annotated[int, Field(ge=-INT64, le=INT64 - 1)]
Tokens = Annotated[int, Field(ge=1)]  # above --max-new-tokens-limit is clamped, not refused
CacheSalt = Annotated[str, Field(max_length=256)]
Name = Annotated[str, Field(min_length=1, max_length=256)]


class _Model(BaseModel):
    """Strict types, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


# -- tools ----------------------------------------------------------------------------------------


class FunctionDef(_Model):
    """A function the model may call (chat's `tools[].function`, and the legacy `functions[]`)."""

    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    """One entry of `tools`."""

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Model):
    name: Name


class NamedToolChoice(_Model):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`."""

    type: Literal["function"]
    function: NamedFunction


class ToolCallFunction(_Model):
    name: Name
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Model):
    """An assistant message's earlier tool call, sent back with the history."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


# -- messages -------------------------------------------------------------------------------------


class ImageURL(_Model):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"


class Part(_Model):
    """One content part: text, or an image (user messages only; checked in openai_parse)."""

    type: str
    text: str | None = None
    image_url: ImageURL | None = None  # an object with url, as OpenAI's API (not a bare string)

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> Part:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs 'text' (a string)")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs 'image_url'")
        return self


class Message(_Model):
    """One chat message."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: ToolCallFunction | None = None  # legacy assistant history


class StreamOptions(_Model):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class JsonSchemaFormat(_Model):
    """`response_format.json_schema` (issue 14, chat/json_mode.py): the schema the answer must match."""

    name: Annotated[str, Field(max_length=64)] | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None  # issue 14: with type json_schema


class ChatCompletionRequest(_Model):
    """POST /v1/chat/completions."""

    model: str  # unconstrained: a lone surrogate in it is an unknown model (404), not a 400
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Tokens | None = None
    max_completion_tokens: Tokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    cache_salt: CacheSalt | None = None
    user: Any = None  # a string by OpenAI, an object from some clients; never used
    metadata: Any = None  # echoed or ignored, never walked
    store: bool | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDef] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    logit_bias: Any = None  # refused when given (not supported)
    # vLLM's extensions for continuing the last assistant message (Open WebUI's "Continue").
    continue_final_message: bool | None = None
    add_generation_prompt: bool | None = None
    # vlchat's extension (issue 14): the answer's Qwen3-VL boxes and points, parsed, in message.grounding.
    grounding: bool | None = None


# -- errors ---------------------------------------------------------------------------------------

_UNION_WORDS = {
    "content": "must be a string or a list of content parts",
    "stop": "must be a string or a list of up to 4 strings",
    "tool_choice": "must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}",
    "function_call": "must be 'none', 'auto' or {\"name\": ...}",
    "image_url": "must be an object with 'url' (a data URL) and optional 'detail'",
    "input": "must be a string or a list of input items",
}
_TYPE_WORDS = {"int_type": "a whole number", "float_type": "a number", "bool_type": "true or false",
               "string_type": "a string", "list_type": "a list", "dict_type": "an object",
               "model_type": "an object", "model_attributes_type": "an object"}


def _clean_loc(loc: tuple) -> list:
    """The error's location as the client wrote it: without pydantic's union member names."""
    out = []
    for item in loc:
        if isinstance(item, int):
            out.append(item)
        elif isinstance(item, str) and not item[:1].isupper() and not any(c in item for c in "[]()-") and item not in (
                "str", "int", "float", "bool", "none", "list", "dict"):
            out.append(item)
    return out


def param_of(loc: list) -> str | None:
    """('messages', 0, 'role') -> 'messages[0].role'."""
    text = ""
    for item in loc:
        text += f"[{item}]" if isinstance(item, int) else (f".{item}" if text else item)
    return text or None


BOUNDS = {"temperature": (0, 2), "top_p": (0, 1), "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2),
          "top_k": (-1, 1_000_000), "seed": (-INT64, INT64 - 1), "top_logprobs": (0, 20)}


def _shown(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def explain(model: type[BaseModel], exc: ValidationError) -> tuple[str, str | None]:
    """(message, param) for the most specific problem pydantic found, in plain words."""
    errors = exc.errors(include_url=False)
    best = max(errors, key=lambda e: len(_clean_loc(e["loc"])))
    loc = _clean_loc(best["loc"])
    param = param_of(loc)
    name = param or "The body"
    kind = best["type"]
    last = next((x for x in reversed(loc) if isinstance(x, str)), "")
    same_place = [e for e in errors if _clean_loc(e["loc"]) == loc]
    if len(same_place) > 1 and last in _UNION_WORDS and kind not in ("literal_error",):
        return f"{name} {_UNION_WORDS[last]}.", param
    if kind in ("greater_than_equal", "less_than_equal") and len(loc) == 1:
        if loc[0] in BOUNDS:
            lo, hi = BOUNDS[loc[0]]
            return f"{name} must be between {lo} and {hi}; got {_shown(best.get('input'))}.", param
    if kind in _TYPE_WORDS:
        return f"{name} must be {_TYPE_WORDS[kind]}, not {_shown(best.get('input'), 30)}.", param
    if kind == "missing":
        return f"{name} is required.", param
    if kind == "literal_error" and last == "role":
        return (f"Unsupported role {_shown(best.get('input'))} in {name}; use system, developer, user, assistant "
                "or tool.", param)
    message = best["msg"]
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
    return f"{name}: {message}.", param


def validate(model: type[BaseModel], body: Any):
    """`body` as `model`, or (message, param) of what is wrong with it."""
    try:
        return model.model_validate(body), None
    except ValidationError as exc:
        return None, explain(model, exc)


# -- the Responses API ----------------------------------------------------------------------------


class InputPart(_Model):
    """A Responses content part: input_text, input_image, output_text (earlier answers), refusal."""

    type: str
    text: str | None = None
    refusal: str | None = None
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high"] | None = None


class InputItem(_Model):
    """An input item: a message (with or without "type"), a function call or its output."""

    type: str = "message"
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: str | list[InputPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputPart] | None = None


class ResponseTool(_Model):
    """A Responses tool: function tools are flat ({"type": "function", "name", "parameters"})."""

    type: str
    name: Name | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseToolChoice(_Model):
    type: Literal["function"]
    name: Name


class TextFormat(_Model):
    type: str = "text"
    # issue 14: {"type": "json_schema", "name", "schema", "strict"} (flat, as the Responses API has it)
    name: Annotated[str, Field(max_length=64)] | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextOptions(_Model):
    format: TextFormat | None = None


class ResponsesRequest(_Model):
    """POST /v1/responses (what of it this server can honour; the rest is refused by name)."""

    model: str  # unconstrained: a lone surrogate in it is an unknown model (404), not a 400
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Tokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    stream: bool | None = None
    tools: list[ResponseTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponseToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    store: bool | None = None
    metadata: Any = None  # echoed or ignored, never walked
    user: Any = None  # a string by OpenAI, an object from some clients; never used
    cache_salt: CacheSalt | None = None
