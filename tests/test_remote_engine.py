"""--engine-url: vlchat's page and API in front of other model servers, as real processes on loopback.

- `front` answers with a second vlchat (`upstream`, tiny-random) through `--engine-url`. The front is
  started with a model folder that does not exist and `--device cuda`, so it could not serve at all if
  it tried to load a model.
- `fake_front` answers with two fake vLLM servers (tests/fake_upstream.py), which record what they are
  sent: what vLLM would receive, conversation affinity, failover, and the error mapping.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import sqlite3
import time

import httpx
import openai
import pytest
from PIL import Image

from tests.fake_upstream import FakeUpstream
from tests.servers import Server, data_dir, metric, running

CANCELLED = 'vlchat_requests_total{outcome="cancelled"}'
KEY1, KEY2 = "client-key-one", "client-key-two"


def png(width: int = 320) -> bytes:
    """A picture (another width: another image, not in any cache yet)."""
    buf = io.BytesIO()
    Image.effect_mandelbrot((width, 200), (-2, -1, 1, 1), 60).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def image_message(text: str, data: bytes) -> dict:
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


def wait_for(check, timeout: float = 15, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# -- servers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fakes():
    pair = [FakeUpstream("alpha").start(), FakeUpstream("beta").start()]
    yield pair
    for fake in pair:
        fake.stop()


@pytest.fixture(scope="module")
def servers(tmp_path_factory, model_dir, fakes):
    """The upstream vlchat, the front before it, and the front before the two fakes, started side by side."""
    def data(name: str):
        return data_dir(tmp_path_factory, model_dir, name)

    upstream = Server(data("remote-upstream"))
    front_dir = data("remote-front")
    front = Server(front_dir, "--engine-url", upstream.base + "/v1", "--model", str(front_dir / "no-such-model"),
                   "--device", "cuda")
    fake_front = Server(data("remote-fake-front"), "--engine-url", ",".join(f.base for f in fakes),
                        "--engine-key", "upstream-key", "--engine-first-token-seconds", "3",
                        env={"VLCHAT_API_KEY": f"{KEY1},{KEY2}"})
    group = {"upstream": upstream, "front": front, "fake_front": fake_front}
    with running(group):
        yield group


@pytest.fixture(scope="module")
def upstream(servers) -> Server:
    return servers["upstream"]


@pytest.fixture(scope="module")
def front(servers) -> Server:
    return servers["front"]


@pytest.fixture(scope="module")
def fake_front(servers) -> Server:
    return servers["fake_front"]


def client(srv: Server, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base + "/v1", api_key=key, max_retries=0, timeout=60)


# -- in front of another vlchat ---------------------------------------------------------------------


def test_front_loads_no_model_and_reports_the_upstream(front, upstream):
    health = httpx.get(front.base + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-random"
    assert health["upstreams"] == [{"url": upstream.base + "/v1", "up": True}]
    assert "loading model weights" not in front.log.read_text()
    assert "tiny-random" in [m.id for m in client(front).models.list().data]
    assert f'vlchat_upstream_up{{upstream="{upstream.base}/v1"}} 1.0' in httpx.get(front.base + "/metrics").text


def test_api_two_turns_encode_the_image_once_and_pass_cached_tokens(front, upstream):
    # The front sends each image with vLLM's `uuid`, which the upstream vlchat accepts (and ignores).
    encoded = metric(upstream.base, "vlchat_images_encoded_total")
    api = client(front)
    messages = [image_message("What is in this picture?", png())]
    first = api.chat.completions.create(model="vlchat", messages=messages, max_tokens=12)
    assert first.choices[0].message.content and first.usage.prompt_tokens > 0
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And the colours?"}]
    chunks = list(api.chat.completions.create(model="tiny-random", messages=messages, max_tokens=12, stream=True,
                                              stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert usage.prompt_tokens > first.usage.prompt_tokens
    assert usage.prompt_tokens_details.cached_tokens > 0  # the upstream's prefix cache, passed through
    assert metric(upstream.base, "vlchat_images_encoded_total") - encoded == 1  # turn 2 reused its features
    assert metric(front.base, "vlchat_cached_prompt_tokens_total") >= usage.prompt_tokens_details.cached_tokens


def test_owners_stay_apart_on_the_upstream(front):
    """The front's per-owner cache_salt reaches the upstream: another owner's identical prompt finds nothing."""
    api = client(front)
    text = "Please list the planets of the solar system in order, with one fact about each. " * 4

    def cached(salt: str) -> int:
        reply = api.chat.completions.create(model="vlchat", messages=[{"role": "user", "content": text}],
                                            max_tokens=2, extra_body={"cache_salt": salt})
        return reply.usage.prompt_tokens_details.cached_tokens

    assert cached("owner-a") == 0
    assert cached("owner-a") > 0  # the same owner reuses its prefix upstream
    assert cached("owner-b") == 0  # another owner (here: another client salt) does not


def test_closing_an_api_stream_cancels_the_upstream_request(front, upstream):
    cancelled = metric(upstream.base, CANCELLED)
    stream = client(front).chat.completions.create(
        model="vlchat", messages=[{"role": "user", "content": "Write forever."}], max_tokens=4000, stream=True)
    for n, _ in enumerate(stream):
        if n == 5:
            break
    stream.close()
    wait_for(lambda: metric(upstream.base, CANCELLED) > cancelled, 10, "the upstream to count a cancel")
    wait_for(lambda: metric(upstream.base, "vlchat_requests_running") == 0, 10, "the upstream to be idle")


# -- the page through the front -------------------------------------------------------------------


def page_send(page, text: str, image=None) -> None:
    if image is not None:
        page.set_input_files("#input input[type=file]", str(image))
        page.locator("#input .thumbnails img").first.wait_for(timeout=10_000)
    page.locator("#input textarea").fill(text)
    page.locator("#input textarea").press("Enter")


def wait_answers(page, srv: Server, count: int) -> None:
    """Until the page shows `count` answers and the last one is saved as finished (this front's only
    conversation is the page test's)."""
    page.wait_for_function(f"() => document.querySelectorAll('#chat .bot-row').length >= {count}", timeout=30_000)
    wait_for(lambda: len(rows := stored_answers(srv)) >= count and rows[-1]["status"] != "pending", 60,
             "the answer to finish")


def stored_answers(srv: Server) -> list[dict]:
    db = sqlite3.connect(srv.data_dir / "vlchat.db")
    try:
        rows = db.execute("SELECT status, usage FROM messages WHERE role = 'assistant' ORDER BY id").fetchall()
    finally:
        db.close()
    return [{"status": s, "usage": json.loads(u) if u else {}} for s, u in rows]


def test_page_chat_stop_and_an_upstream_that_dies_and_comes_back(front, upstream, browser, tmp_path):
    photo = tmp_path / "fractal.png"
    photo.write_bytes(png(288))
    encoded = metric(upstream.base, "vlchat_images_encoded_total")
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        page.goto(front.base + "/")
        page_send(page, "Describe this picture.", photo)
        wait_answers(page, front, 1)
        page_send(page, "Tell me more.")
        wait_answers(page, front, 2)
        answers = stored_answers(front)[-2:]
        assert [a["status"] for a in answers] == ["complete", "complete"]
        assert answers[1]["usage"]["cached_tokens"] > 0 and answers[1]["usage"]["prompt_tokens"] > 0
        assert metric(upstream.base, "vlchat_images_encoded_total") - encoded == 1

        # Stop: the upstream request is cancelled (its own metrics say so), what came is kept.
        cancelled = metric(upstream.base, CANCELLED)
        page.locator("#settings button, #settings .label-wrap").first.click()
        field = page.locator("#max-new-tokens input[type=number]")
        field.fill("4000")
        field.press("Enter")
        page_send(page, "Write forever.")
        page.wait_for_function("() => { const b = document.querySelectorAll('#chat .bot-row');"
                               " return b.length >= 3 && b[b.length-1].innerText.length > 40; }", timeout=30_000)
        # The page keeps watching the model server every 3 s; that leaves the status line alone.
        time.sleep(3.2)
        seen = []
        for _ in range(6):
            seen.append(page.locator("#status").inner_text())
            time.sleep(0.25)
        if stored_answers(front)[-1]["status"] == "pending":  # still streaming (it is, unless the CPU flew)
            assert any("Answering" in line for line in seen), seen
        page.locator("#stop").click()
        page.locator("#chat").get_by_text("Stopped.").first.wait_for(timeout=15_000)
        wait_for(lambda: metric(upstream.base, CANCELLED) > cancelled, 10, "the upstream to count the Stop")
        wait_for(lambda: stored_answers(front)[-1]["status"] == "stopped", 10, "the stopped answer to be saved")

        # The model server dies: the page says so and turns the box off; the API answers 503.
        upstream.proc.kill()
        upstream.proc.wait(10)
        page.locator("#status").get_by_text("not reachable").wait_for(timeout=15_000)
        assert page.locator("#input textarea").is_disabled()
        with pytest.raises(openai.APIStatusError) as refused:
            client(front).chat.completions.create(model="vlchat", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=5)
        assert refused.value.status_code == 503 and "not reachable" in refused.value.message
        assert refused.value.response.headers.get("retry-after")
        down = httpx.get(front.base + "/health")
        assert down.status_code == 503 and down.json()["upstreams"][0]["up"] is False

        # It comes back: the page turns on by itself and answers; the front was never restarted. While
        # the upstream still loads its model (its /v1/models already answers), the front does not say ok.
        upstream.launch()
        while True:
            front_ok = httpx.get(front.base + "/health").status_code == 200
            try:
                upstream_ok = httpx.get(upstream.base + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                upstream_ok = False
            assert upstream_ok or not front_ok, "the front served while its upstream was still loading"
            if upstream_ok:
                break
            assert upstream.proc.poll() is None, upstream.log.read_text()[-3000:]
            time.sleep(0.2)
        wait_for(lambda: page.locator("#input textarea").is_enabled(), 20, "the box to turn on again")
        wait_for(lambda: "not reachable" not in page.locator("#status").inner_text(), 10, "the line to clear")
        page_send(page, "Are you back?")
        wait_answers(page, front, 4)
        assert stored_answers(front)[-1]["status"] == "complete"
        assert httpx.get(front.base + "/health").status_code == 200
    finally:
        context.close()


# -- what vLLM would receive --------------------------------------------------------------------------


def all_requests(fakes) -> list[dict]:
    """Every request the fakes received, oldest first."""
    return sorted((r for f in fakes for r in f.requests), key=lambda r: r["at"])


def test_what_a_vllm_upstream_receives(fake_front, fakes):
    data = png()
    api = client(fake_front, KEY1)
    messages = [image_message("What is this?", data)]
    before = len(all_requests(fakes))
    first = api.chat.completions.create(model="vlchat", messages=messages, max_tokens=7, temperature=0.1)
    assert first.choices[0].message.content.startswith("answer from ")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    sent = all_requests(fakes)[before:]
    assert len(sent) == 1
    headers, body = sent[0]["headers"], sent[0]["body"]
    assert headers["authorization"] == "Bearer upstream-key"  # --engine-key, never the client's key
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-session-id"])
    assert body["model"] == "fake-vl" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 7 and body["temperature"] == 0.1
    image = body["messages"][0]["content"][0]
    assert image["type"] == "image_url"
    header, payload = image["image_url"]["url"].split(",", 1)
    assert header == "data:image/png;base64"
    assert image["uuid"] == hashlib.sha256(base64.b64decode(payload)).hexdigest()  # the stored clean bytes' id
    salt = body["cache_salt"]
    assert re.fullmatch(r"[0-9a-f]{64}", salt)
    owner = hashlib.sha256(KEY1.encode()).hexdigest()
    assert KEY1 not in json.dumps(body) and owner[:16] not in json.dumps(body) and salt != owner

    # Turn 2 of the same conversation: same session id and salt; the fake's cached tokens come through.
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "More."}]
    second = api.chat.completions.create(model="vlchat", messages=messages, max_tokens=7)
    assert second.usage.prompt_tokens_details.cached_tokens == 32 and second.usage.prompt_tokens == 50
    again = all_requests(fakes)[-1]
    assert again["headers"]["x-session-id"] == headers["x-session-id"] and again["body"]["cache_salt"] == salt
    assert again["body"]["messages"][0]["content"][0]["uuid"] == image["uuid"]

    # Another API key is another owner: another salt, another session id for the same text.
    client(fake_front, KEY2).chat.completions.create(model="vlchat", messages=messages[:1], max_tokens=7)
    other = all_requests(fakes)[-1]
    assert other["body"]["cache_salt"] != salt and other["headers"]["x-session-id"] != headers["x-session-id"]


def test_lora_adapters_the_upstreams_list_can_be_asked_for(fake_front, fakes):
    """Issue 14: vLLM lists its LoRA adapters beside the model; the front lists them and passes the name on."""
    api = client(fake_front, KEY1)
    for fake in fakes:
        fake.adapters = ["shop-lora"]
    try:
        wait_for(lambda: "shop-lora" in [m.id for m in api.models.list().data], what="the adapter listed")
        card = api.models.retrieve("shop-lora")
        assert card.model_extra.get("parent") == "fake-vl"
        before = [len(f.requests) for f in fakes]
        reply = api.chat.completions.create(model="shop-lora", messages=[{"role": "user", "content": "hi"}])
        assert reply.model == "shop-lora"
        sent = [r["body"] for f, n in zip(fakes, before, strict=True) for r in f.requests[n:]]
        assert [b["model"] for b in sent] == ["shop-lora"]
        with pytest.raises(openai.NotFoundError):
            api.chat.completions.create(model="other-lora", messages=[{"role": "user", "content": "hi"}])
    finally:
        for fake in fakes:
            fake.adapters = []


def test_tool_calls_go_upstream_and_come_back_as_qwen_blocks(fakes):
    """The engine alone, in this process: offered tools and earlier calls go up in OpenAI's shape, and a
    call the server parsed comes back as the `<tool_call>` text the local engine's answers hold."""
    from chat.engine.remote import RemoteEngine
    from chat.engine.types import ChatRequest, Done

    alpha = fakes[0]
    engine = RemoteEngine((alpha.base,), secret=b"test", load_image=lambda image_id: b"")
    engine.start()
    try:
        assert engine.ready.wait(10)
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
        request = ChatRequest([
            {"role": "user", "content": [{"type": "text", "text": "Weather in Rome, then Paris?"}]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
            {"role": "tool", "content": "sunny"},
            {"role": "user", "content": [{"type": "text", "text": "And Paris?"}]}])
        request.tools = tools  # set apart: ChatRequest gains its `tools` field with the API's tool support
        alpha.mode = "tools"
        done = engine.submit(request).wait(10)
        assert isinstance(done, Done) and done.finish_reason == "stop"
        block = re.fullmatch(r"<tool_call>\n(.*)\n</tool_call>", done.text, re.S)
        assert block and json.loads(block.group(1)) == {"name": "get_weather", "arguments": {"city": "Paris"}}
        body = alpha.requests[-1]["body"]
        assert body["tools"] == tools
        call = body["messages"][1]["tool_calls"][0]
        assert call["function"]["name"] == "get_weather" and body["messages"][2]["tool_call_id"] == call["id"]
    finally:
        alpha.mode = "ok"
        engine.shutdown()


def test_tool_calls_through_the_front(fake_front, fakes):
    """A client offers a tool through the front's API; the server's parsed call reaches it as tool_calls."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    set_mode(fakes, "tools")
    try:
        reply = client(fake_front, KEY1).chat.completions.create(
            model="vlchat", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools, max_tokens=50)
    finally:
        set_mode(fakes, "ok")
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert reply.choices[0].finish_reason == "tool_calls"
    assert all_requests(fakes)[-1]["body"]["tools"] == tools


def set_mode(fakes, mode, body: dict | None = None) -> None:
    for fake in fakes:
        fake.mode, fake.error_body = mode, body or {}


def test_upstream_errors_map_to_the_envelope(fake_front, fakes):
    api = client(fake_front, KEY1)
    ask = {"model": "vlchat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    try:
        set_mode(fakes, 400, {"object": "error", "message": "This image is not allowed here.", "code": 400})
        with pytest.raises(openai.BadRequestError) as bad:
            api.chat.completions.create(**ask)
        assert bad.value.status_code == 400 and "This image is not allowed here." in bad.value.message

        set_mode(fakes, 400, {"error": {"message": "This model's maximum context length is 4096 tokens.",
                                        "code": 400}})
        with pytest.raises(openai.BadRequestError) as long:
            api.chat.completions.create(**ask)
        assert long.value.code == "context_length_exceeded"

        set_mode(fakes, 500, {"error": {"message": "CUDA out of memory at 0x7f..."}})
        with pytest.raises(openai.InternalServerError) as down:
            api.chat.completions.create(**ask)
        assert down.value.status_code == 503 and "not reachable" in down.value.message
        assert down.value.response.headers["retry-after"] and "CUDA" not in down.value.message

        # No first token within --engine-first-token-seconds (3): 503, and the upstream request is closed.
        set_mode(fakes, "silent")
        for fake in fakes:
            fake.disconnected.clear()
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as slow:
            api.chat.completions.create(**ask)
        assert slow.value.status_code == 503 and slow.value.code == "upstream_timeout"
        assert 2.5 < time.monotonic() - started < 10
        wait_for(lambda: any(f.disconnected.is_set() for f in fakes), 5, "the upstream to see the stream closed")
    finally:
        set_mode(fakes, "ok")


def test_conversations_stay_on_their_upstream_and_move_when_it_dies(fake_front, fakes):
    api = client(fake_front, KEY1)
    alpha, beta = fakes

    def turn(n: int, text: str) -> str:
        """One turn of conversation n; which fake answered it."""
        messages = [{"role": "user", "content": f"Conversation {n} begins here."}]
        if text:
            messages += [{"role": "assistant", "content": "answer"}, {"role": "user", "content": text}]
        reply = api.chat.completions.create(model="vlchat", messages=messages, max_tokens=5)
        return reply.choices[0].message.content.rsplit(" ", 1)[-1]

    first = {n: turn(n, "") for n in range(12)}
    assert set(first.values()) == {"alpha", "beta"}  # 12 conversations spread over both
    assert all(turn(n, "Go on.") == first[n] for n in range(12))  # and each one stays where it began
    on_alpha = [n for n in first if first[n] == "alpha"]

    alpha.stop()
    try:
        # Alpha's conversations move to beta at once (the refused connection marks alpha down); beta's stay.
        assert all(turn(n, "Still there?") == "beta" for n in first)
        health = httpx.get(fake_front.base + "/health").json()
        assert health["status"] == "ok"
        assert [u["up"] for u in health["upstreams"]] == [False, True]
    finally:
        alpha.start()
    wait_for(lambda: httpx.get(fake_front.base + "/health").json()["upstreams"][0]["up"], 10, "alpha to be up")
    assert all(turn(n, "Back home?") == "alpha" for n in on_alpha)


# -- settings, recipes ----------------------------------------------------------------------------


def test_engine_settings_are_checked(tmp_path):
    from chat.config import SettingsError, load_settings

    ok = load_settings(["--engine-url", "http://a:8000/v1/, https://b/v1"], {"VLCHAT_ENGINE_KEY": "s3cret"})
    assert ok.engine_urls == ("http://a:8000/v1", "https://b/v1") and ok.engine_key == "s3cret"
    assert load_settings([], {}).engine_urls == ()
    for argv, named in ((["--engine-url", "gpu-box:8000"], "--engine-url"),
                        (["--engine-url", "file:///etc/passwd"], "--engine-url"),
                        (["--engine-session-header", "X Session"], "--engine-session-header"),
                        (["--engine-first-token-seconds", "0"], "--engine-first-token-seconds")):
        with pytest.raises(SettingsError, match=named):
            load_settings(argv, {}, exit_on_error=False)
    with pytest.raises(SettingsError) as bad_key:
        load_settings(["--engine-key", "has space"], {}, exit_on_error=False)
    assert "has space" not in str(bad_key.value)  # a key is never echoed


def test_readme_recipes_and_the_compose_file_use_real_settings():
    import shlex

    import yaml

    from chat.config import load_settings
    from tests.servers import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Serving from other GPUs (remote engine)", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"python app\.py((?: [^\n\\]+|\\\n)*)", section.replace("\\\n", " "))
    fronts = [load_settings(shlex.split(c, comments=True), {}, exit_on_error=False) for c in commands]
    assert len(fronts) >= 4 and sum(bool(f.engine_urls) for f in fronts) >= 3
    assert max(len(f.engine_urls) for f in fronts) == 4  # the one-server-per-GPU recipe

    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    env = compose["services"]["vlchat"]["environment"]
    settings = load_settings([], {k: v for k, v in env.items() if "${" not in v}, exit_on_error=False)
    (url,) = settings.engine_urls
    assert url == "http://vllm:8000/v1" and "vllm" in compose["services"]
    assert "--enable-prompt-tokens-details" in compose["services"]["vllm"]["command"]
    assert "gpu" not in json.dumps(compose["services"]["vlchat"])  # the front needs no GPU


def test_sigterm_ends_open_answers_and_closes_their_upstream_streams(fake_front, fakes):
    """Last in the module: it stops fake_front."""
    set_mode(fakes, "slow")
    for fake in fakes:
        fake.disconnected.clear()
    try:
        body = {"model": "vlchat", "messages": [{"role": "user", "content": "Talk."}], "stream": True}
        with httpx.stream("POST", fake_front.base + "/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {KEY1}"}) as response:
            lines = response.iter_lines()
            for line in lines:
                if '"la "' in line:
                    break
            fake_front.proc.terminate()
            rest = [line for line in lines if line.startswith("data: ")]
        errors = [json.loads(line[6:])["error"] for line in rest if line.startswith('data: {"error"')]
        assert [e["code"] for e in errors] == ["shutting_down"] and rest[-1] == "data: [DONE]"
        wait_for(lambda: any(f.disconnected.is_set() for f in fakes), 5, "the upstream stream to be closed")
        assert fake_front.proc.wait(10) == 0
    finally:
        set_mode(fakes, "ok")
