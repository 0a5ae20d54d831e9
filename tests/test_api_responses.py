"""POST /v1/responses (issue 13): the real `openai` client's `responses.create` against a real `app.py`
with the tiny model, the Vercel AI SDK's request shapes over plain HTTP, and the event stream's
shape; tool calls in a Response are checked on fixed text (the tiny model never writes one).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import openai
import pytest
from PIL import Image

from chat.engine.types import Delta, Done, Usage
from chat.responses import answer, stream
from tests.servers import Server, data_dir, metric

KEY = "rk1"
ENCODED = "vlchat_images_encoded_total"


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    srv = Server(data_dir(tmp_path_factory, model_dir, "api-responses"), env={"VLCHAT_API_KEY": KEY})
    try:
        yield srv.start()
    finally:
        srv.stop()


def sdk(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=60)


def png(seed: int) -> str:
    img = Image.new("RGB", (48, 40), (seed * 40 % 256, 90, 200 - seed))
    out = io.BytesIO()
    img.save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def test_text_input_with_the_openai_client(server):
    client = sdk(server)
    r = client.responses.create(model="vlchat", input="Say hello.", max_output_tokens=12, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "vlchat"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"  # it ran to the limit
    assert len(r.output) == 1 and r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.output[0].content[0].type == "output_text" and r.output_text == r.output[0].content[0].text
    assert r.output_text
    assert r.usage.output_tokens == 12 and r.usage.total_tokens == r.usage.input_tokens + 12
    assert r.usage.input_tokens_details.cached_tokens == 0
    # The same request as chat completions gives the same (greedy) answer: one engine, one parser.
    chat = client.chat.completions.create(model="vlchat", messages=[{"role": "user", "content": "Say hello."}],
                                          max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == r.output_text
    assert chat.usage.prompt_tokens == r.usage.input_tokens
    # instructions become the system message
    told = client.responses.create(model="vlchat", input="Say hello.", max_output_tokens=2,
                                   instructions="You are a pirate.")
    assert told.usage.input_tokens > r.usage.input_tokens and told.instructions == "You are a pirate."


def test_images_and_a_second_turn_encode_the_image_once(server):
    client = sdk(server)
    image = png(1)
    encoded = metric(server.base, ENCODED)
    first_turn = [{"role": "user", "content": [{"type": "input_image", "image_url": image, "detail": "low"},
                                               {"type": "input_text", "text": "What is this?"}]}]
    r1 = client.responses.create(model="vlchat", input=first_turn, max_output_tokens=8)
    assert r1.usage.input_tokens > 20  # the image's visual tokens are in the prompt
    second = [*first_turn, {"role": "assistant", "content": [{"type": "output_text", "text": r1.output_text}]},
              {"role": "user", "content": [{"type": "input_text", "text": "And its colour?"}]}]
    r2 = client.responses.create(model="vlchat", input=second, max_output_tokens=8)
    assert r2.usage.input_tokens_details.cached_tokens > 0
    assert metric(server.base, ENCODED) - encoded == 1


def test_streaming_with_the_openai_client_matches_the_plain_answer(server):
    client = sdk(server)
    ask = {"model": "vlchat", "input": [{"role": "user", "content": [{"type": "input_text", "text": "Count."}]}],
           "max_output_tokens": 16, "temperature": 0}
    whole = client.responses.create(**ask)
    events = list(client.responses.create(**ask, stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(e.delta for e in deltas) == whole.output_text
    item_id = events[2].item.id
    assert {e.item_id for e in deltas} == {item_id}
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == 16
    assert final.status == "incomplete" and final.id == events[0].response.id


def test_vercel_ai_sdk_request_shapes(server):
    """What @ai-sdk/openai's default provider sends: input items, flat function tools, streaming."""
    body = {"model": "vlchat", "max_output_tokens": 10, "stream": True, "tool_choice": "auto",
            "input": [{"role": "system", "content": "You are helpful."},
                      {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"},
                                                   {"type": "input_image", "image_url": png(2)}]},
                      {"type": "function_call", "call_id": "call_1", "name": "weather",
                       "arguments": '{"city":"Paris"}'},
                      {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"}],
            "tools": [{"type": "function", "name": "weather", "description": "Weather",
                       "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                       "strict": False}]}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server.base + "/v1/responses", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    pairs = list(zip(lines[::2], lines[1::2], strict=True))
    events = []
    for event_line, data_line in pairs:
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        data = json.loads(data_line[6:])
        assert data["type"] == event_line[7:]
        events.append(data)
    done = events[-1]["response"]
    assert done["usage"]["output_tokens"] == 10 and done["tools"][0]["name"] == "weather"
    assert done["output"][0]["content"][0]["annotations"] == []
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == done["output"][0]["content"][0]["text"]


def test_refusals_name_the_responses_parameter(server):
    url = server.base + "/v1/responses"
    headers = {"Authorization": f"Bearer {KEY}"}
    ok = {"model": "vlchat", "input": "hi", "max_output_tokens": 2}

    def error(status: int, **body) -> dict:
        r = httpx.post(url, content=json.dumps({**ok, **body}).encode(), timeout=30,
                       headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == status, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        return r.json()["error"]

    remote = error(400, input=[{"role": "user", "content": [{"type": "input_image",
                                                              "image_url": "https://example.com/a.png"}]}])
    assert (remote["param"], remote["code"]) == ("input[0].content[0].image_url", "image_url_not_allowed")
    assert error(400, input=[{"role": "user", "content": "a \ud800"}])["param"] == "input[0].content"
    assert error(400, previous_response_id="resp_1")["param"] == "previous_response_id"
    assert error(400, text={"format": {"type": "grammar"}})["code"] == "unsupported_parameter"
    assert "needs its schema" in error(400, text={"format": {"type": "json_schema"}})["message"]  # issue 14
    assert error(400, tools=[{"type": "web_search"}])["param"] == "tools[0]"
    forced = error(400, tools=[{"type": "function", "name": "f"}], tool_choice="required")
    assert forced["param"] == "tool_choice" and "not supported" in forced["message"]
    assert error(400, temperature=5)["param"] == "temperature"
    assert error(400, input=[])["param"] == "input"
    assert error(404, model="gpt-4o")["code"] == "model_not_found"
    assert error(400, input=[{"type": "item_reference", "id": "x"}])["param"] == "input[0].type"
    r = httpx.post(url, json=ok, timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    # tools offered, the model answers as text
    r = httpx.post(url, json={**ok, "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]},
                   headers=headers, timeout=30)
    assert r.status_code == 200 and r.json()["output"][0]["type"] == "message"


# -- tool calls in a Response (fixed text) --------------------------------------------------------


CALL = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
META = {"response_id": "resp_x", "created": 1, "model": "vlchat", "tools": True,
        "echo": {"instructions": None, "max_output_tokens": None, "temperature": None, "top_p": None, "metadata": {},
                 "tool_choice": "auto", "tools": [], "parallel_tool_calls": True, "user": None}}


def test_a_tool_call_in_the_answer_is_a_function_call_item():
    done = Done("stop", "Checking. " + CALL, Usage(10, 0, 5, 0))
    r = answer(META, done)
    assert r["status"] == "completed"
    assert [o["type"] for o in r["output"]] == ["message", "function_call"]
    call = r["output"][1]
    assert call["name"] == "weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    assert call["call_id"].startswith("call_") and call["status"] == "completed"
    assert [o["type"] for o in answer(META, Done("stop", CALL, Usage(1, 0, 1, 0)))["output"]] == ["function_call"]
    assert answer({**META, "tools": False}, done)["output"][0]["content"][0]["text"] == done.text


def test_a_streamed_tool_call_arrives_as_function_call_events():
    class Handle:
        result = None

        def cancel(self):
            self.result = "cancelled"

    class Gen:
        handle = Handle()
        first = Delta("Checking. <tool")

        def __init__(self):
            async def rest():
                for piece in ('_call>\n{"name": "weather", "arguments": {"city": ', '"Paris"}}\n</tool_call>'):
                    yield Delta(piece)
                yield Done("stop", "", Usage(10, 0, 5, 0))
            self.events = rest()

    async def collect():
        return [json.loads(chunk.split("data: ", 1)[1]) async for chunk in stream(Gen(), META)]

    events = asyncio.run(collect())
    types = [e["type"] for e in events]
    assert types.index("response.output_text.done") < types.index("response.function_call_arguments.done")
    args = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert json.loads(args["arguments"]) == {"city": "Paris"} and args["name"] == "weather"
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "Checking. "
    final = events[-1]
    assert final["type"] == "response.completed"
    assert [o["type"] for o in final["response"]["output"]] == ["message", "function_call"]
