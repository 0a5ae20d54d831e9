"""Issue 14: JSON mode on the API (response_format json_object / json_schema, text.format on /v1/responses):
the instruction, validation, one retry, and the clear 422 `invalid_json_output` when both answers are invalid."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import pytest

from chat import json_mode
from chat.api_models import ChatCompletionRequest
from chat.engine.types import ChatRequest, Done, GenParams, Usage
from chat.openai_parse import ApiError
from tests.fake_upstream import FakeUpstream
from tests.servers import Server, data_dir, running

SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "points": {"type": "array",
          "items": {"type": "string"}, "minItems": 1}}, "required": ["title", "points"], "additionalProperties": False}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "listing", "schema": SCHEMA, "strict": True}}
MSGS = [{"role": "user", "content": "Describe the product as JSON."}]


def fmt_of(response_format: dict) -> json_mode.JsonFormat | None:
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": MSGS, "response_format": response_format})
    return json_mode.read_format(req.response_format)


# -- the checks -----------------------------------------------------------------------------------------


def test_what_counts_as_valid():
    obj = fmt_of({"type": "json_object"})
    assert obj.problem('{"a": 1}') == ({"a": 1}, None)
    assert obj.problem('```json\n{"a": 1}\n```')[1] is None  # one code fence around it is taken off
    assert "not valid JSON" in obj.problem('{"a": 1')[1]
    assert "not an object" in obj.problem("[1, 2]")[1]
    assert "not valid JSON" in obj.problem("Sure! Here it is: {}")[1]
    schema = fmt_of(JSON_SCHEMA)
    assert schema.problem('{"title": "Mug", "points": ["holds tea"]}')[1] is None
    assert "points" in schema.problem('{"title": "Mug", "points": []}')[1]
    assert "does not match the schema" in schema.problem('{"title": 3, "points": ["x"]}')[1]
    assert "does not match the schema" in schema.problem('{"title": "Mug", "points": ["x"], "price": 1}')[1]
    assert fmt_of({"type": "text"}) is None


def test_a_schema_that_is_not_one_is_refused():
    with pytest.raises(ApiError) as info:
        fmt_of({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "banana"}}})
    assert (info.value.status, info.value.code, info.value.param) == (400, "invalid_json_schema",
                                                                      "response_format.json_schema.schema")
    with pytest.raises(ApiError) as info:
        fmt_of({"type": "json_schema"})
    assert info.value.param == "response_format.json_schema"


def test_the_instruction_goes_into_the_system_prompt():
    fmt = fmt_of(JSON_SCHEMA)
    plain = json_mode.with_instruction(ChatRequest(list(MSGS)), fmt)
    assert plain.messages[0]["role"] == "system" and json.dumps(SCHEMA) in plain.messages[0]["content"]
    assert plain.messages[1:] == MSGS
    system = json_mode.with_instruction(ChatRequest([{"role": "system", "content": "Be brief."}, *MSGS]), fmt)
    assert system.messages[0]["content"].startswith("Be brief.\n\nAnswer with JSON only")
    assert len(system.messages) == 2


# -- validate, retry once, fail clearly (a fake engine) -------------------------------------------------


class FakeGeneration:
    def __init__(self, text: str) -> None:
        self.done = Done("stop", text, Usage(10, 0, 5, 0))

    async def result(self) -> Done:
        return self.done


def run_validated(first: str, second: str | None, **meta):
    started = []

    async def start(request, engine, chat_request):
        started.append(chat_request)
        return FakeGeneration(second)

    request = ChatRequest(list(MSGS), GenParams(temperature=0.9, seed=4))
    meta = {"json_format": fmt_of(JSON_SCHEMA), **meta}
    replay = asyncio.run(json_mode.validated(None, None, request, FakeGeneration(first), meta, start=start))
    return replay, started


def test_a_valid_first_answer_is_not_generated_again():
    replay, started = run_validated('```json\n{"title": "Mug", "points": ["a"]}\n```', None)
    assert started == []
    assert replay.done.text == '{"title": "Mug", "points": ["a"]}' and replay.handle.result is replay.done


def test_an_invalid_answer_is_generated_once_more_with_what_was_wrong():
    replay, started = run_validated('{"title": "Mug"}', '{"title": "Mug", "points": ["holds tea"]}')
    assert len(started) == 1
    retry = started[0]
    assert retry.params.temperature == json_mode.RETRY_TEMPERATURE and retry.params.seed == 5
    assert retry.messages[-2] == {"role": "assistant", "content": '{"title": "Mug"}'}
    assert "points" in retry.messages[-1]["content"] and retry.messages[-1]["role"] == "user"
    assert json.loads(replay.done.text)["points"] == ["holds tea"]
    assert replay.done.usage.completion_tokens == 10  # both generations counted


def test_a_tool_call_is_an_answer_when_tools_were_offered():
    call = '<tool_call>\n{"name": "lookup", "arguments": {"sku": "A1"}}\n</tool_call>'
    replay, started = run_validated(call, None, tools=True)
    assert started == [] and replay.done.text == call
    _, started = run_validated(call, '{"title": "Mug", "points": ["a"]}')  # no tools offered: checked as JSON
    assert len(started) == 1


def test_two_invalid_answers_are_a_clear_error():
    with pytest.raises(ApiError) as info:
        run_validated("not json", '{"title": 1}')
    err = info.value
    assert (err.status, err.code, err.param) == (422, "invalid_json_output", "response_format")
    assert "2 attempts" in err.message and "points" in err.message


# -- a real server with the tiny model: never valid JSON --------------------------------------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory, model_dir):
    fake = FakeUpstream("json").start()
    group = {"tiny": Server(data_dir(tmp_path_factory, model_dir, "json-tiny")),
             "remote": Server(data_dir(tmp_path_factory, model_dir, "json-remote"), "--engine-url", fake.base)}
    with running(group):
        yield group, fake
    fake.stop()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)


def generations(base: str) -> float:
    body = httpx.get(base + "/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(r"^vlchat_requests_total\{[^}]*\} (\S+)$", body, re.M))


def test_the_tiny_model_gets_the_clear_error_after_exactly_two_generations(servers):
    tiny = servers[0]["tiny"]
    sdk = client(tiny.base)
    for response_format in ({"type": "json_object"}, JSON_SCHEMA):
        for stream in (False, True):
            before = generations(tiny.base)
            with pytest.raises(openai.UnprocessableEntityError) as info:
                sdk.chat.completions.create(model="tiny-random", messages=MSGS, max_tokens=16, stream=stream,
                                            response_format=response_format)
            body = info.value.body
            assert (body["code"], body["param"]) == ("invalid_json_output", "response_format")
            assert generations(tiny.base) - before == 2
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="tiny-random", messages=MSGS, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}})
    assert info.value.body["code"] == "invalid_json_schema"
    # The Responses API's text.format does the same.
    before = generations(tiny.base)
    with pytest.raises(openai.UnprocessableEntityError):
        sdk.responses.create(model="tiny-random", input="Describe it as JSON.", max_output_tokens=16,
                             text={"format": {"type": "json_object"}})
    assert generations(tiny.base) - before == 2
    # The server goes on serving.
    assert sdk.chat.completions.create(model="tiny-random", messages=MSGS, max_tokens=4).choices[0].message.content


def test_an_answer_is_validated_retried_and_sent_clean(servers):
    group, fake = servers
    sdk = client(group["remote"].base)
    fake.requests.clear()
    fake.replies[:] = ['Here you go: {"title": "Mug"}', '```json\n{"title": "Mug", "points": ["holds tea"]}\n```']
    answer = sdk.chat.completions.create(model="fake-vl", messages=MSGS, temperature=0.8,
                                         response_format=JSON_SCHEMA)
    assert json.loads(answer.choices[0].message.content) == {"title": "Mug", "points": ["holds tea"]}
    assert answer.choices[0].message.content.startswith("{")  # the fence is gone
    first, second = (r["body"] for r in fake.requests)
    assert first["messages"][0]["role"] == "system" and '"required": ["title", "points"]' in first["messages"][0][
        "content"]
    assert second["temperature"] == 0.3 and second["messages"][-1]["role"] == "user"
    assert answer.usage.completion_tokens == 6  # both generations (3 each from the fake)
    # Streamed: held back until valid, then one content chunk.
    fake.requests.clear()
    fake.replies[:] = ['{"title": "Mug", "points": ["holds tea", "dishwasher safe"]}']
    chunks = list(sdk.chat.completions.create(model="fake-vl", messages=MSGS, stream=True,
                                              response_format={"type": "json_object"}))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) == 1 and json.loads(texts[0])["points"][1] == "dishwasher safe"
    assert len(fake.requests) == 1
    # The Responses API, json_schema in text.format.
    fake.replies[:] = ['{"title": "Mug", "points": ["a"]}']
    response = sdk.responses.create(model="fake-vl", input="As JSON.", text={"format": {
        "type": "json_schema", "name": "listing", "schema": SCHEMA, "strict": True}})
    assert json.loads(response.output_text) == {"title": "Mug", "points": ["a"]}
