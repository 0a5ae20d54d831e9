"""The OpenAI-compatible API as a client meets it: the real `openai` package against real `app.py` processes.

Three servers for the whole module, started together:

- `open_server`: loopback, no key, one request generating at a time and a one-slot queue, a 3 MB body cap
  and a 4096-token context;
- `keyed_server`: loopback with keys k1,k2,k5 given through VLCHAT_API_KEY (the environment path);
- `closed_server`: 0.0.0.0 without a key, so /v1 must refuse (it is reached through 127.0.0.1).

The tiny random model answers printable noise that practically never ends early, so every request
runs to its max_tokens; lengths are kept small except where length is the point.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
import zipfile
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image, ImageDraw

from chat.images import UNSUPPORTED
from tests.servers import Server, data_dir, metric, running

KEYS = ("k1", "k2", "k5")
BODY_LIMIT = 3_000_000
CONTEXT = 4096
LIMIT = 4096  # the default --max-new-tokens-limit
UNSET = object()


# -- servers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory, model_dir):
    """The three servers, launched side by side (their start-up is mostly imports)."""

    def data(name: str) -> Path:
        return data_dir(tmp_path_factory, model_dir, name)

    group = {
        "open": Server(data("api-open"), "--max-running", "1", "--max-waiting", "1",
                       "--max-body-bytes", str(BODY_LIMIT), "--context-tokens", str(CONTEXT)),
        "keyed": Server(data("api-keyed"), env={"VLCHAT_API_KEY": ",".join(KEYS)}),
        "closed": Server(data("api-closed"), host="0.0.0.0"),
    }
    with running(group):
        yield group


@pytest.fixture(scope="module")
def open_server(servers) -> Server:
    return servers["open"]


@pytest.fixture(scope="module")
def keyed_server(servers) -> Server:
    return servers["keyed"]


@pytest.fixture(scope="module")
def closed_server(servers) -> Server:
    return servers["closed"]


# -- helpers ------------------------------------------------------------------------------------


def client(base: str, key: str = "unused", **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60, **options)


ENCODED = "vlchat_images_encoded_total"
GENERATED = "vlchat_generated_tokens_total"
CANCELLED = 'vlchat_requests_total{outcome="cancelled"}'


def wait_idle(base: str, timeout: float = 90) -> None:
    """Until the worker runs nothing and nothing waits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(base, "vlchat_requests_running") == 0 and metric(base, "vlchat_requests_waiting") == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the worker did not become idle")


def picture(seed: int, size: tuple[int, int] = (64, 48), fmt: str = "PNG") -> bytes:
    """A small deterministic picture, different for every seed."""
    img = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    draw = ImageDraw.Draw(img)
    draw.rectangle((seed % 20, seed % 13, seed % 20 + 20, seed % 13 + 15), fill=(255 - seed % 256, 10, 200))
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(text: str, *urls: str) -> dict:
    """A user message: images first (so no long text prefix is shared before them), then the text."""
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def has_key(value, key: str) -> bool:
    if isinstance(value, dict):
        return key in value or any(has_key(v, key) for v in value.values())
    if isinstance(value, list):
        return any(has_key(v, key) for v in value)
    return False


def envelope(r: httpx.Response, status: int, code=UNSET, param=UNSET, type_=UNSET, says: str = "") -> dict:
    """Check an error response: the status and exactly OpenAI's envelope, never a framework 'detail'."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert not has_key(body, "detail"), body
    expected_type = {401: "authentication_error", 403: "permission_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error")
    assert err["type"] == (expected_type if type_ is UNSET else type_), err
    if code is not UNSET:
        assert err["code"] == code, err
    if param is not UNSET:
        assert err["param"] == param, err
    assert says.lower() in err["message"].lower(), err
    return err


def raises(exc_class: type[openai.APIStatusError], call, status: int, code=UNSET) -> openai.APIStatusError:
    """The openai client raises exactly `exc_class` (not merely a parent) with this status."""
    with pytest.raises(openai.APIStatusError) as info:
        call()
    exc = info.value
    assert type(exc) is exc_class, (type(exc), exc)
    assert exc.status_code == status
    if code is not UNSET:
        assert exc.code == code
    return exc


class LongStream:
    """A streaming request in a thread (the client's create() blocks until the first token)."""

    def __init__(self, sdk: openai.OpenAI, text: str = "Write forever.", max_tokens: int = 3000) -> None:
        self.sdk, self.text, self.max_tokens = sdk, text, max_tokens
        self.stream = None
        self.error: Exception | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.stream = self.sdk.chat.completions.create(
                model="vlchat", messages=[{"role": "user", "content": self.text}], max_tokens=self.max_tokens,
                stream=True)
            next(iter(self.stream))
        except Exception as exc:  # reported to the test through .error
            self.error = exc
        finally:
            self.started.set()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def wait_waiting(base: str, n: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(base + "/health", timeout=5).json()["waiting"] == n:
            return
        time.sleep(0.02)
    raise AssertionError(f"never saw {n} waiting")


# -- 1. a plain completion ----------------------------------------------------------------------


def test_completion_with_a_data_url_image(open_server):
    sdk = client(open_server.base)
    encoded = metric(open_server.base, ENCODED)
    jpeg = data_url(picture(1, fmt="JPEG"), "image/jpeg")
    r = sdk.chat.completions.create(model="tiny-random", max_tokens=12, messages=[user("What is this?", jpeg)])
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-") and r.model == "tiny-random"
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    u = r.usage
    assert u.completion_tokens == 12
    assert u.prompt_tokens > 10  # the chat template, the image's visual tokens and the question
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens == 0  # a picture this server has never seen
    assert metric(open_server.base, ENCODED) - encoded == 1


def test_top_k_and_presence_penalty_reach_the_sampler_and_bad_values_are_refused(open_server):
    sdk = client(open_server.base)
    msgs = [{"role": "user", "content": "Say something short."}]
    greedy = sdk.chat.completions.create(model="tiny-random", max_tokens=12, temperature=0, messages=msgs,
                                         presence_penalty=0)  # the model's default is 1.5 (issue 14)
    top1 = sdk.chat.completions.create(model="tiny-random", max_tokens=12, temperature=1.8, messages=msgs,
                                       presence_penalty=0, extra_body={"top_k": 1})
    assert top1.choices[0].message.content == greedy.choices[0].message.content  # k=1 leaves one choice
    penalized = sdk.chat.completions.create(model="tiny-random", max_tokens=12, temperature=0, messages=msgs,
                                            presence_penalty=2.0)
    assert penalized.choices[0].message.content != greedy.choices[0].message.content
    for wrong in ({"top_k": -5}, {"top_k": 1.5}, {"presence_penalty": "high"}, {"presence_penalty": 3}):
        with pytest.raises(openai.BadRequestError) as info:
            sdk.chat.completions.create(model="tiny-random", max_tokens=4, messages=msgs, extra_body=wrong)
        assert info.value.body["param"] == next(iter(wrong))


# -- 2. streaming -------------------------------------------------------------------------------


def test_streaming_matches_the_plain_answer(open_server):
    sdk = client(open_server.base)
    ask = {"model": "vlchat", "messages": [user("Describe it.", data_url(picture(2)))], "max_tokens": 40,
           "temperature": 0, "seed": 7}
    whole = sdk.chat.completions.create(**ask)

    chunks = list(sdk.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # temperature 0 is greedy: the same answer
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # it did arrive in pieces
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 40
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + 40

    plain = list(sdk.chat.completions.create(**ask, stream=True))  # no include_usage: no usage chunk
    assert all(c.choices and c.usage is None for c in plain)
    assert "".join(c.choices[0].delta.content or "" for c in plain) == text

    with httpx.stream("POST", open_server.base + "/v1/chat/completions", json={**ask, "stream": True},
                      timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in lines[:-1]) == text


# -- 3 and 4. caches across turns and conversations ---------------------------------------------


def test_three_turns_resending_the_image_encode_it_once(open_server):
    sdk = client(open_server.base)
    image = data_url(picture(3))
    encoded = metric(open_server.base, ENCODED)
    history, usages = [], []
    for question in ("What is in this picture?", "What colour is it?", "And the shape?"):
        # As OpenAI clients do: the whole history, the image again in the first message, every turn.
        history.append(user(question, image) if not history else {"role": "user", "content": question})
        r = sdk.chat.completions.create(model="vlchat", messages=history, max_tokens=16)
        history.append({"role": "assistant", "content": r.choices[0].message.content})
        usages.append(r.usage)
    assert usages[0].prompt_tokens_details.cached_tokens == 0
    assert usages[1].prompt_tokens_details.cached_tokens > 0
    assert usages[2].prompt_tokens_details.cached_tokens > 0
    assert usages[0].prompt_tokens < usages[1].prompt_tokens < usages[2].prompt_tokens
    assert metric(open_server.base, ENCODED) - encoded == 1


def test_the_same_picture_in_a_new_conversation_is_not_encoded_again(open_server):
    sdk = client(open_server.base)
    png = picture(4)
    encoded = metric(open_server.base, ENCODED)
    first = sdk.chat.completions.create(model="vlchat", max_tokens=4, messages=[user("What is this?", data_url(png))])
    assert metric(open_server.base, ENCODED) - encoded == 1

    # Another conversation: a different system prompt comes BEFORE the image, so the KV prefix cache
    # cannot cover the image; only the feature cache (keyed by the image's content hash) can spare it.
    second = sdk.chat.completions.create(model="vlchat", max_tokens=4, messages=[
        {"role": "system", "content": "You are a terse art critic who answers in one line."},
        user("Rate this picture.", data_url(bytes(png)))])
    assert second.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens // 2
    assert metric(open_server.base, ENCODED) - encoded == 1

    # One pixel different is another picture: encoded (so the metric above does see encodings).
    img = Image.open(io.BytesIO(png))
    img.putpixel((0, 0), (0, 0, 0) if img.getpixel((0, 0)) != (0, 0, 0) else (255, 255, 255))
    out = io.BytesIO()
    img.save(out, "PNG")
    sdk.chat.completions.create(model="vlchat", max_tokens=4,
                                messages=[user("What is this?", data_url(out.getvalue()))])
    assert metric(open_server.base, ENCODED) - encoded == 2


# -- 5. models ----------------------------------------------------------------------------------


def test_models_list_and_unknown_model(open_server):
    sdk = client(open_server.base)
    ids = [m.id for m in sdk.models.list()]
    assert "tiny-random" in ids and "vlchat" in ids
    for m in sdk.models.list():
        assert m.object == "model" and m.owned_by == "vlchat"
    exc = raises(openai.NotFoundError, lambda: sdk.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2), 404, "model_not_found")
    assert exc.param == "model" and "gpt-4o" in exc.message


# -- 6. keys ------------------------------------------------------------------------------------


def test_api_keys(keyed_server, open_server):
    base = keyed_server.base
    hi = {"model": "vlchat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    # No key at all (the Authorization header explicitly left out), then a wrong one.
    sent: list[httpx.Request] = []
    no_key = client(base, http_client=httpx.Client(event_hooks={"request": [sent.append]}))
    exc = raises(openai.AuthenticationError, lambda: no_key.chat.completions.create(
        **hi, extra_headers={"Authorization": openai.Omit()}), 401, "invalid_api_key")
    assert "authorization" not in sent[-1].headers
    assert set(exc.body) == {"message", "type", "param", "code"} and exc.type == "authentication_error"
    raises(openai.AuthenticationError, lambda: client(base, "k3").chat.completions.create(**hi), 401,
           "invalid_api_key")
    raises(openai.AuthenticationError, lambda: client(base, "k1,k2").models.list(), 401, "invalid_api_key")
    raises(openai.AuthenticationError, lambda: client(base, "wrong").models.list(), 401, "invalid_api_key")

    envelope(httpx.post(base + "/v1/chat/completions", json=hi), 401, "invalid_api_key", says="Bearer")
    envelope(httpx.get(base + "/v1/models"), 401, "invalid_api_key")
    envelope(httpx.get(base + "/v1/models", headers={"Authorization": "k1"}), 401, "invalid_api_key")  # no scheme
    envelope(httpx.get(base + "/v1/models", headers={"Authorization": "Bearer k"}), 401, "invalid_api_key")

    # Both keys from VLCHAT_API_KEY work, for both routes.
    for key in KEYS:
        sdk = client(base, key)
        assert "vlchat" in [m.id for m in sdk.models.list()]
        r = sdk.chat.completions.create(**hi)
        assert r.choices[0].message.content and r.usage.completion_tokens == 2
    assert httpx.get(base + "/v1/models", headers={"Authorization": "bearer k2"}).status_code == 200

    # On loopback without keys, nothing is asked for.
    assert httpx.get(open_server.base + "/v1/models").status_code == 200
    r = client(open_server.base).chat.completions.create(**hi, extra_headers={"Authorization": openai.Omit()})
    assert r.usage.completion_tokens == 2


# -- 7. every error path ------------------------------------------------------------------------


def test_every_error_path_answers_in_the_envelope(open_server, keyed_server):
    base = open_server.base
    url = base + "/v1/chat/completions"
    sdk = client(base)
    hi = [{"role": "user", "content": "hi"}]
    ok = {"model": "vlchat", "messages": hi, "max_tokens": 2}

    def post(**body) -> httpx.Response:
        return httpx.post(url, json={**ok, **body}, timeout=30)

    def create(**body):
        return lambda: sdk.chat.completions.create(**{**ok, **body})

    json_headers = {"Content-Type": "application/json"}

    # A body that is not JSON, not a JSON object, or not labelled as JSON.
    envelope(httpx.post(url, content=b"{not json", headers=json_headers), 400, says="not valid JSON")
    envelope(httpx.post(url, content=b"[1, 2]", headers=json_headers), 400, says="JSON object")
    envelope(httpx.post(url, content=json.dumps(ok), headers={"Content-Type": "text/plain"}), 400,
             says="Content-Type must be application/json")
    raises(openai.BadRequestError, lambda: sdk.post("/chat/completions", cast_to=object, content=b"{not json",
                                                    options={"headers": json_headers}), 400)
    raises(openai.BadRequestError, lambda: sdk.post("/chat/completions", cast_to=object,
                                                    content=json.dumps(ok).encode(),
                                                    options={"headers": {"Content-Type": "text/plain"}}), 400)

    # Messages.
    envelope(post(messages=[{"role": "robot", "content": "hi"}]), 400, param="messages[0].role", says="role")
    raises(openai.BadRequestError, create(messages=[{"role": "robot", "content": "hi"}]), 400)
    envelope(post(messages=[]), 400, param="messages")
    raises(openai.BadRequestError, create(messages=[]), 400)
    # (A conversation ending with an assistant message continues it: tests/test_api_tools.py.)
    ends_with_system = [*hi, {"role": "system", "content": "hello"}]
    envelope(post(messages=ends_with_system), 400, param="messages", says="last message")
    raises(openai.BadRequestError, create(messages=ends_with_system), 400)

    # Images: a malformed data URL, broken base64, bytes that are no image, remote and local URLs.
    not_image_url = data_url(b"hello", "text/plain")
    where = "messages[0].content[0].image_url.url"
    envelope(post(messages=[user("?", not_image_url)]), 400, "invalid_image_url", where)
    raises(openai.BadRequestError, create(messages=[user("?", not_image_url)]), 400, "invalid_image_url")
    bad_base64 = "data:image/png;base64,iVBORw0KGgo***not-base64***"
    envelope(post(messages=[user("?", bad_base64)]), 400, "invalid_image_url", says="base64")
    raises(openai.BadRequestError, create(messages=[user("?", bad_base64)]), 400, "invalid_image_url")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("cat.png", picture(5))
    zip_url = data_url(archive.getvalue())
    err = envelope(post(messages=[user("?", zip_url)]), 400, "invalid_image", where)
    assert err["message"] == UNSUPPORTED  # the image sanitizer's own sentence
    raises(openai.BadRequestError, create(messages=[user("?", zip_url)]), 400, "invalid_image")

    started = time.monotonic()
    envelope(post(messages=[user("?", "https://example.com/cat.png")]), 400, "image_url_not_allowed", where,
             says="data URL")
    raises(openai.BadRequestError, create(messages=[user("?", "https://example.com/cat.png")]), 400,
           "image_url_not_allowed")
    assert time.monotonic() - started < 2
    with socket.socket() as listener:  # a URL the server could reach: it must not even connect
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        local = f"http://127.0.0.1:{listener.getsockname()[1]}/cat.png"
        envelope(post(messages=[user("?", local)]), 400, "image_url_not_allowed")
        with pytest.raises(TimeoutError):
            listener.accept()
    envelope(post(messages=[user("?", "file:///etc/passwd")]), 400, "image_url_not_allowed", says="'file:'")
    raises(openai.BadRequestError, create(messages=[user("?", "file:///etc/passwd")]), 400, "image_url_not_allowed")

    # Parameters out of range or not supported.
    envelope(post(n=2), 400, param="n")
    raises(openai.BadRequestError, create(n=2), 400)
    envelope(post(temperature=3), 400, param="temperature", says="between")
    assert raises(openai.BadRequestError, create(temperature=3), 400).param == "temperature"
    envelope(post(max_tokens=0), 400, param="max_tokens")
    # Over --max-new-tokens-limit is clamped, not refused (tests/test_api_tools.py); tools are accepted.
    # (response_format json_object / json_schema is JSON mode: tests/test_json_mode.py.)
    for field, value in (("logprobs", True),):
        err = envelope(post(**{field: value}), 400, "unsupported_parameter", field)
        assert field in err["message"]
        exc = raises(openai.BadRequestError, create(**{field: value}), 400, "unsupported_parameter")
        assert exc.param == field

    # Harmless extras are ignored.
    for extra in ({"user": "x"}, {"metadata": {"team": "qa"}}, {"response_format": {"type": "text"}}):
        r = post(**extra)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2
    assert sdk.chat.completions.create(**ok, user="x", metadata={"team": "qa"}).usage.completion_tokens == 2

    # Unknown model; no key on the keyed server.
    envelope(post(model="gpt-4o"), 404, "model_not_found", "model")
    raises(openai.NotFoundError, create(model="gpt-4o"), 404, "model_not_found")
    envelope(httpx.post(keyed_server.base + "/v1/chat/completions", json=ok), 401, "invalid_api_key")
    raises(openai.AuthenticationError, lambda: client(keyed_server.base, "nope").chat.completions.create(**ok), 401,
           "invalid_api_key")

    # A prompt plus max_tokens over --context-tokens: refused before any token is generated.
    generated = metric(base, GENERATED)
    err = envelope(post(max_tokens=LIMIT), 400, "context_length_exceeded", "messages")
    assert str(CONTEXT) in err["message"]
    raises(openai.BadRequestError, create(max_tokens=LIMIT), 400, "context_length_exceeded")
    raises(openai.BadRequestError, create(max_tokens=LIMIT, stream=True), 400, "context_length_exceeded")
    assert metric(base, GENERATED) == generated

    # Bodies over --max-body-bytes: declared by Content-Length, or streamed chunked without one.
    huge = [{"role": "user", "content": "a" * (BODY_LIMIT + 1000)}]
    envelope(post(messages=huge), 413, "request_too_large", says="3,000,000 bytes")
    raises(openai.APIStatusError, create(messages=huge), 413, "request_too_large")
    with socket.create_connection(("127.0.0.1", open_server.port), timeout=5) as raw:
        # Only the header claims a big body: the refusal must come from it, before any body is read.
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n{" % (BODY_LIMIT + 1))
        assert raw.recv(65536).startswith(b"HTTP/1.1 413 ")

    def chunked():
        yield b'{"model": "vlchat", "max_tokens": 2, "messages": [{"role": "user", "content": "'
        for _ in range(BODY_LIMIT // 65536 + 4):
            yield b"a" * 65536
        yield b'"}]}'

    r = httpx.post(url, content=chunked(), headers=json_headers, timeout=30)
    assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
    envelope(r, 413, "request_too_large")
    raises(openai.APIStatusError, lambda: sdk.post("/chat/completions", cast_to=object, content=chunked(),
                                                   options={"headers": json_headers}), 413, "request_too_large")

    # Routes: the wrong method, an unknown path.
    envelope(httpx.get(url), 405, "method_not_allowed", says="POST")
    raises(openai.APIStatusError, lambda: sdk.get("/chat/completions", cast_to=object), 405, "method_not_allowed")
    envelope(httpx.post(base + "/v1/embeddings", json={"model": "vlchat", "input": "x"}), 404, "not_found")
    raises(openai.NotFoundError, lambda: sdk.embeddings.create(model="vlchat", input="x"), 404, "not_found")

    # A full queue (--max-waiting 1): one request running, one waiting, the third is turned away at once.
    wait_idle(base)
    running = LongStream(sdk)
    queued = None
    try:
        assert running.started.wait(30) and running.error is None, running.error
        queued = LongStream(sdk)
        wait_waiting(base, 1)
        started = time.monotonic()
        r = post()
        assert time.monotonic() - started < 2
        envelope(r, 503, "busy")
        assert r.headers["retry-after"] == "2"
        exc = raises(openai.InternalServerError, create(), 503, "busy")
        assert exc.response.headers["retry-after"] == "2"
        raises(openai.InternalServerError, create(stream=True), 503, "busy")
    finally:
        running.close()
        if queued is not None:
            assert queued.started.wait(30)
            queued.close()
    assert running.error is None and queued.error is None, (running.error, queued.error)
    wait_idle(base)
    assert sdk.chat.completions.create(**ok).usage.completion_tokens == 2  # serving again


def test_trailing_slash_routes_do_not_contradict_themselves(open_server):
    """GET /v1/models/ is answered '405: /v1/models takes GET, not GET.' (the method is never compared)."""
    r = httpx.get(open_server.base + "/v1/models/")
    assert r.status_code in (200, 404), r.text



# -- 8. a client that goes away -----------------------------------------------------------------


def test_closing_a_stream_cancels_the_generation(open_server):
    base = open_server.base
    sdk = client(base)
    wait_idle(base)
    generated, cancelled = metric(base, GENERATED), metric(base, CANCELLED)
    stream = sdk.chat.completions.create(model="vlchat", messages=[{"role": "user", "content": "Write forever."}],
                                         max_tokens=3000, stream=True)
    pieces = iter(stream)
    assert next(pieces).choices[0].delta.role == "assistant"
    for _ in range(5):  # five pieces of text: at least five tokens
        assert next(pieces).choices[0].delta.content
    stream.close()

    started = time.monotonic()
    follow_up = sdk.chat.completions.create(model="vlchat", messages=[{"role": "user", "content": "Short?"}],
                                            max_tokens=5, stream=True, stream_options={"include_usage": True})
    chunks = [next(iter(follow_up))]
    first_token_after = time.monotonic() - started
    chunks += list(follow_up)
    assert first_token_after < 5, f"the worker was still busy with the abandoned answer ({first_token_after:.1f} s)"
    assert chunks[-1].usage.completion_tokens == 5

    wait_idle(base)
    assert metric(base, CANCELLED) - cancelled == 1
    abandoned = metric(base, GENERATED) - generated - 5
    assert 5 <= abandoned < 3000


def test_abandoned_non_streaming_request_is_cancelled(open_server):
    """A plain (non-streaming) request whose client gives up (a timeout, Ctrl-C) keeps the worker to the end."""
    base = open_server.base
    wait_idle(base)
    generated, cancelled = metric(base, GENERATED), metric(base, CANCELLED)
    impatient = client(base).with_options(timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="vlchat", messages=[{"role": "user", "content": "Write forever."}],
                                          max_tokens=2000)
    wait_idle(base)
    assert metric(base, CANCELLED) - cancelled == 1
    assert metric(base, GENERATED) - generated < 2000



def test_a_queued_request_keeps_its_image_while_others_arrive(open_server):
    """Images sent while a request waits (even by requests that are refused) must not drop the waiting one's image."""
    base = open_server.base
    sdk = client(base)
    wait_idle(base)
    running = LongStream(sdk)
    outcome: dict = {}

    def queued_request():
        try:
            outcome["answer"] = sdk.chat.completions.create(model="vlchat", max_tokens=3,
                                                            messages=[user("What is this?", data_url(picture(500)))])
        except Exception as exc:
            outcome["error"] = exc

    waiter = threading.Thread(target=queued_request, daemon=True)
    try:
        assert running.started.wait(30) and running.error is None, running.error
        waiter.start()
        wait_waiting(base, 1)
        for batch in range(9):  # 72 other pictures, each request turned away as busy
            pictures = [data_url(picture(600 + batch * 8 + i)) for i in range(8)]
            r = httpx.post(base + "/v1/chat/completions", timeout=30,
                           json={"model": "vlchat", "max_tokens": 2, "messages": [user("?", *pictures)]})
            assert r.status_code == 503, r.text
    finally:
        running.close()
        waiter.join(60)
        wait_idle(base)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["answer"].choices[0].finish_reason == "length"



# -- 9. Gradio's direct-call routes -------------------------------------------------------------


def test_gradio_side_doors_are_closed(open_server):
    for path in ("/gradio_api/run/predict", "/gradio_api/call/send", "/gradio_api/call/send/x",
                 "/gradio_api/api/predict"):
        r = httpx.post(open_server.base + path, json={"data": ["hi"]})
        assert r.status_code == 404, (path, r.status_code, r.text)
        assert "/v1" in r.json()["error"]  # the guard answered, not some accident of routing
    assert httpx.get(open_server.base + "/gradio_api/call/send/abc").status_code == 404


# -- 10. a public address without a key ---------------------------------------------------------


def test_api_is_refused_on_a_public_address_without_a_key(closed_server):
    base = closed_server.base
    ask = {"model": "vlchat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for r in (httpx.post(base + "/v1/chat/completions", json=ask), httpx.get(base + "/v1/models")):
        err = envelope(r, 403, "api_disabled")
        assert "--api-key" in err["message"]
    sdk = client(base, "anything")
    raises(openai.PermissionDeniedError, lambda: sdk.chat.completions.create(**ask), 403, "api_disabled")
    raises(openai.PermissionDeniedError, lambda: sdk.models.list(), 403, "api_disabled")
    health = httpx.get(base + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


# -- 11. owners: the prefix cache serves only the owner that built it (issue 9, item 1) ----------


def cached(response) -> int:
    return response.usage.prompt_tokens_details.cached_tokens


def test_one_key_cannot_read_another_keys_text_through_cached_tokens(keyed_server):
    base = keyed_server.base
    alice, mallory, eve = (client(base, key) for key in KEYS)
    secret = "My locker code is 4417 and my cat is called Biscuit. " * 6
    wrong = "My locker code is 9023 and my dog is called Pumpkin. " * 6
    assert len(secret) == len(wrong)

    def ask(sdk: openai.OpenAI, messages: list[dict], **extra):
        return sdk.chat.completions.create(model="vlchat", messages=messages, max_tokens=4, temperature=0, **extra)

    first = ask(alice, [{"role": "user", "content": secret}])
    right_guess = ask(mallory, [{"role": "user", "content": secret}])
    wrong_guess = ask(eve, [{"role": "user", "content": wrong}])  # a fresh owner too: the same footing
    assert right_guess.usage.prompt_tokens == first.usage.prompt_tokens
    assert cached(right_guess) == cached(wrong_guess), "a matching guess is told apart from a wrong one"

    # The owner's own next turn still reuses its prefix.
    turn2 = ask(alice, [{"role": "user", "content": secret},
                        {"role": "assistant", "content": first.choices[0].message.content},
                        {"role": "user", "content": "And the cat's name again?"}])
    assert cached(turn2) > first.usage.prompt_tokens // 2

    # cache_salt splits one key further: a new salt reuses nothing of the same text, its own salt does.
    other = "Quarterly numbers: revenue 7.1, costs 5.3, headcount 212. " * 6
    salted = ask(alice, [{"role": "user", "content": other}], extra_body={"cache_salt": "team-a"})
    again_b = ask(alice, [{"role": "user", "content": other}], extra_body={"cache_salt": "team-b"})
    wrong_b = ask(alice, [{"role": "user", "content": other.replace("7.1", "9.9")}],
                  extra_body={"cache_salt": "team-b2"})
    assert cached(again_b) == cached(wrong_b) < salted.usage.prompt_tokens // 2
    again_a = ask(alice, [{"role": "user", "content": other},
                          {"role": "assistant", "content": salted.choices[0].message.content},
                          {"role": "user", "content": "Sum them."}], extra_body={"cache_salt": "team-a"})
    assert cached(again_a) > salted.usage.prompt_tokens // 2
    unsalted = ask(alice, [{"role": "user", "content": other}])  # the key alone is yet another owner
    assert cached(unsalted) < salted.usage.prompt_tokens // 2


def test_anonymous_callers_are_one_owner_and_cache_salt_is_checked(open_server):
    sdk = client(open_server.base)
    text = "Anonymous callers share one owner: this sentence is long enough to fill a few blocks. " * 4
    first = sdk.chat.completions.create(model="vlchat", messages=[{"role": "user", "content": text}], max_tokens=2)
    other = client(open_server.base, "another-anonymous-client")
    second = other.chat.completions.create(model="vlchat", messages=[{"role": "user", "content": text}],
                                           max_tokens=2)
    assert cached(second) > first.usage.prompt_tokens // 2
    url = open_server.base + "/v1/chat/completions"
    ask = {"model": "vlchat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for salt in (5, ["a"], "x" * 257, "\ud800"):
        r = httpx.post(url, content=json.dumps({**ask, "cache_salt": salt}).encode(), timeout=30,
                       headers={"Content-Type": "application/json"})
        envelope(r, 400, param="cache_salt")
    r = httpx.post(url, json={**ask, "cache_salt": "y" * 256}, timeout=30)
    assert r.status_code == 200, r.text


def test_owner_is_a_short_hash_of_the_key_never_the_key():
    import hashlib

    from chat.api import owner_of_key

    assert owner_of_key("sk-very-secret") == "api:" + hashlib.sha256(b"sk-very-secret").hexdigest()[:16]
    assert "sk-very-secret" not in owner_of_key("sk-very-secret")
    assert owner_of_key("") == owner_of_key(None) == "api:anonymous"
    assert owner_of_key("k1") != owner_of_key("k2")


# -- 12. a huge prompt is refused before it is tokenized; other streams keep flowing (item 2) ----


class TimedStream:
    """A streaming request in a thread that records when each chunk arrived."""

    def __init__(self, sdk: openai.OpenAI) -> None:
        self.times: list[float] = []
        self.error: Exception | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(sdk,), daemon=True)
        self.thread.start()

    def _run(self, sdk: openai.OpenAI) -> None:
        try:
            stream = sdk.chat.completions.create(model="vlchat", max_tokens=3000, stream=True,
                                                 messages=[{"role": "user", "content": "Write forever."}])
            with stream:
                for _ in stream:
                    self.times.append(time.monotonic())
                    if self.stop.is_set():
                        return
        except Exception as exc:  # reported to the test
            self.error = exc

    def largest_gap(self, start: float, end: float) -> float:
        stamps = [start] + [t for t in self.times if start < t < end] + [end]
        return max(b - a for a, b in zip(stamps, stamps[1:], strict=False))


def test_a_49_mb_prompt_is_refused_in_seconds_while_another_stream_flows(keyed_server):
    base = keyed_server.base
    wait_idle(base)
    flowing = TimedStream(client(base, KEYS[0]))
    try:
        deadline = time.monotonic() + 60
        while len(flowing.times) < 5 and time.monotonic() < deadline and flowing.error is None:
            time.sleep(0.05)
        assert len(flowing.times) >= 5, flowing.error
        body = json.dumps({"model": "vlchat", "messages": [{"role": "user", "content": "a" * 49_000_000}]}).encode()
        started = time.monotonic()
        r = httpx.post(base + "/v1/chat/completions", content=body, timeout=30,
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEYS[0]}"})
        took = time.monotonic() - started
        time.sleep(1.0)  # and the stream goes on after it
        ended = time.monotonic()
        err = envelope(r, 400, "context_length_exceeded", "messages")
        assert "49,000,000 characters" in err["message"]
        assert took < 5, f"the refusal took {took:.1f} s"
        gap = flowing.largest_gap(started, ended)
        assert gap < 2, f"the other stream stalled for {gap:.1f} s"
    finally:
        flowing.stop.set()
        flowing.thread.join(30)
    assert flowing.error is None, flowing.error


# -- 13. image caps are checked before any image is decoded (item 5) ----------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def big_picture(size: tuple[int, int] = (6000, 6000)) -> bytes:
    """A real, fully decodable 36-megapixel PNG (small on the wire: it is mostly one colour)."""
    img = Image.new("RGB", size, (200, 30, 30))
    ImageDraw.Draw(img).rectangle((100, 100, 900, 900), fill=(0, 0, 255))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def test_forty_big_images_are_refused_before_any_is_decoded(keyed_server):
    """40 images of 36 MP (each under the 40 MP cap): over the 32-per-conversation limit, refused at once."""
    base = keyed_server.base
    url = data_url(big_picture())
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    # Five messages of eight: each message is within its limit, the request is not.
    five_by_eight = [user(f"Picture set {i}.", *[url] * 8) for i in range(5)]
    # Seven good big ones, then one whose header alone says it is too big (50 MP).
    header_bomb = data_url(real_png_header(10_000, 5_000))
    seven_then_bomb = [user("Look.", *[url] * 7, header_bomb)]
    for messages, status_says, param in (
            (five_by_eight, "more than 32 images", "messages"),
            (seven_then_bomb, "10000x5000 pixels", "messages[0].content[7].image_url.url")):
        wait_idle(base)
        before = cpu_seconds(keyed_server.proc.pid)
        started = time.monotonic()
        r = httpx.post(base + "/v1/chat/completions", headers=headers, timeout=60,
                       json={"model": "vlchat", "max_tokens": 2, "messages": messages})
        took = time.monotonic() - started
        used = cpu_seconds(keyed_server.proc.pid) - before
        envelope(r, 400, param=param, says=status_says)
        assert used < 0.8, f"the server spent {used:.2f} s of CPU (it decoded images it was going to refuse)"
        assert took < 3, took


def real_png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and has one tiny (wrong) data chunk: only a header check is cheap."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# -- 14. malformed JSON shapes are 400s, never 500s; disconnects leave a quiet log (item 7) -----


def test_json_the_decoder_chokes_on_is_a_400(open_server):
    url = open_server.base + "/v1/chat/completions"
    json_headers = {"Content-Type": "application/json"}

    def post(raw: bytes) -> httpx.Response:
        return httpx.post(url, content=raw, headers=json_headers, timeout=30)

    envelope(post(b"[" * 10_000 + b"]" * 10_000), 400, says="nested too deeply")
    deep = b'{"model": "vlchat", "metadata": ' + b'{"a": ' * 10_000 + b"1" + b"}" * 10_000 + b"}"
    envelope(post(deep), 400, says="nested too deeply")
    envelope(post(b'{"model": "vlchat", "max_tokens": ' + b"9" * 5000 + b"}"), 400, says="too many digits")
    envelope(post(b'{"model": "vlchat", "seed": -' + b"1" * 5000 + b"}"), 400, says="too many digits")
    envelope(post(b'{"model": "vlchat", "temperature": NaN, "messages": []}'), 400, says="NaN")
    envelope(post(b'{"model": "vlchat", "temperature": Infinity, "messages": []}'), 400, says="Infinity")
    envelope(post(b'{"model": "vlchat", "messages": [{"role": "user", "content": "caf\xe9"}]}'), 400,
             says="UTF-8")

    # A lone surrogate ("\ud800" is valid JSON but not a character): refused before it reaches the tokenizer.
    def ask(messages: list[dict], **extra) -> httpx.Response:
        return post(json.dumps({"model": "vlchat", "max_tokens": 2, "messages": messages, **extra}).encode())

    generated = metric(open_server.base, GENERATED)
    envelope(ask([{"role": "user", "content": [{"type": "text", "text": "hi \ud800 there"}]}]), 400,
             param="messages[0].content[0].text", says="surrogate")
    envelope(ask([{"role": "user", "content": "\udfff"}]), 400, param="messages[0].content")
    envelope(ask([{"role": "system", "content": "be \ud83d"}, {"role": "user", "content": "hi"}]), 400,
             param="messages[0].content")
    envelope(ask([{"role": "user", "content": "hi"}], stop=["\ud800"]), 400, param="stop")
    envelope(ask([{"role": "user", "content": "hi"}], model="\ud800"), 404, "model_not_found")
    envelope(ask([{"role": "\ud800", "content": "hi"}]), 400, param="messages[0].role")
    assert metric(open_server.base, GENERATED) == generated
    # A real astral character (a surrogate pair in JSON) is fine.
    r = ask([{"role": "user", "content": "a cat \ud83d\udc31"}])
    assert r.status_code == 200, r.text


def test_clients_that_go_away_leave_no_tracebacks_in_the_log(open_server):
    base = open_server.base
    sdk = client(base)
    wait_idle(base)
    log_start = open_server.log.stat().st_size
    for _ in range(4):  # streams closed after a few chunks
        stream = sdk.chat.completions.create(model="vlchat", messages=[{"role": "user", "content": "Write."}],
                                             max_tokens=3000, stream=True)
        pieces = iter(stream)
        for _ in range(3):
            next(pieces)
        stream.close()
    with pytest.raises(openai.APITimeoutError):  # a plain request given up on
        sdk.with_options(timeout=0.5).chat.completions.create(
            model="vlchat", messages=[{"role": "user", "content": "Write forever."}], max_tokens=2000)
    with socket.create_connection(("127.0.0.1", open_server.port), timeout=5) as raw:  # a body cut off midway
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100000\r\n\r\n{\"model\": \"vlchat\", \"messages\": [")
    with socket.create_connection(("127.0.0.1", open_server.port), timeout=5) as raw:  # a stream dropped at once
        body = json.dumps({"model": "vlchat", "max_tokens": 500, "stream": True,
                           "messages": [{"role": "user", "content": "Hi"}]}).encode()
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        raw.recv(100)
    wait_idle(base)
    time.sleep(0.5)
    assert sdk.chat.completions.create(model="vlchat", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2).usage.completion_tokens == 2
    with open_server.log.open("rb") as f:
        f.seek(log_start)
        added = f.read().decode("utf-8", "replace")
    assert "Traceback" not in added, added[-3000:]
    assert added.count("\n") < 20, added[-3000:]


def test_engine_errors_map_to_statuses_clients_understand():
    from chat.api import engine_error, failed_error
    from chat.engine.types import Busy, ContextTooLong, Failed, NotReady, ShuttingDown

    for exc in (Busy(3), NotReady(), ShuttingDown()):
        err = engine_error(exc)
        assert (err.status, err.code, err.headers.get("Retry-After")) == (503, exc.code, "2")
    err = engine_error(ContextTooLong("too long"))
    assert (err.status, err.code, err.param) == (400, "context_length_exceeded", "messages")
    err = failed_error(Failed("The server is restarting.", "shutting_down"))
    assert (err.status, err.code, err.headers.get("Retry-After")) == (503, "shutting_down", "2")
    err = failed_error(Failed("too long", "context_length_exceeded"))
    assert (err.status, err.code) == (400, "context_length_exceeded")
    assert failed_error(Failed("boom", "generation_failed")).status == 500
