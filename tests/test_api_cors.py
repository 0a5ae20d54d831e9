"""CORS (--cors-origins) and the /v1 headers every answer carries (issue 13).

A real `app.py` with the tiny model and a key, allowing one origin; two small pages on other ports
of loopback (so other origins) are opened in Debian's chromium through Playwright: the allowed one
calls the API with its key (the browser sends a preflight first, as Authorization and a JSON body
are not "simple"), the other is blocked by the browser. The middleware is also checked directly
with CORS off (the default).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from chat.config import Settings, SettingsError, load_settings
from chat.cors import ApiHeaders
from tests.servers import Server, data_dir, free_port, metric

KEY = "ck1"
PAGE = b"<!doctype html><html lang=en><title>app</title><h1>A browser app on another origin</h1></html>"


class _Page(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def pages():
    """Two static pages: (allowed origin, other origin)."""
    servers = [ThreadingHTTPServer(("127.0.0.1", free_port()), _Page) for _ in range(2)]
    for srv in servers:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield tuple(f"http://127.0.0.1:{srv.server_address[1]}" for srv in servers)
    for srv in servers:
        srv.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir, pages):
    srv = Server(data_dir(tmp_path_factory, model_dir, "api-cors"), "--cors-origins", f"{pages[0]}, https://x.example",
                 env={"VLCHAT_API_KEY": KEY})
    try:
        yield srv.start()
    finally:
        srv.stop()


CALL = """async ([base, key]) => {
  try {
    const r = await fetch(base + "/v1/chat/completions", {method: "POST",
      headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json", "X-Request-Id": "page-1"},
      body: JSON.stringify({model: "vlchat", max_tokens: 3, messages: [{role: "user", content: "hi"}]})});
    return {status: r.status, body: await r.json(), requestId: r.headers.get("x-request-id"),
            clamped: r.headers.get("x-vlchat-max-tokens-clamped")};
  } catch (e) { return {error: String(e)}; }
}"""


def test_a_page_on_an_allowed_origin_calls_the_api_and_another_is_blocked(server, pages, browser):
    allowed, other = pages
    page = browser.new_page()
    try:
        page.goto(allowed + "/")
        result = page.evaluate(CALL, [server.base, KEY])
        assert result.get("status") == 200, result
        assert result["body"]["object"] == "chat.completion" and result["body"]["usage"]["completion_tokens"] == 3
        assert result["requestId"] == "page-1"  # exposed to the page, and the page's own id echoed
        # A stream, read by the page as it arrives.
        streamed = page.evaluate("""async ([base, key]) => {
          const r = await fetch(base + "/v1/chat/completions", {method: "POST",
            headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json"},
            body: JSON.stringify({model: "vlchat", max_tokens: 4, stream: true,
                                  messages: [{role: "user", content: "hi"}]})});
          return await r.text();
        }""", [server.base, KEY])
        assert streamed.rstrip().endswith("data: [DONE]")

        requests = metric(server.base, 'vlchat_requests_total{outcome="length"}')
        page.goto(other + "/")
        blocked = page.evaluate(CALL, [server.base, KEY])
        assert "error" in blocked and "Failed to fetch" in blocked["error"], blocked
        # The browser stopped at the refused preflight: the request itself never reached the engine.
        assert metric(server.base, 'vlchat_requests_total{outcome="length"}') == requests
    finally:
        page.close()


def test_preflight_and_cors_headers_over_http(server, pages):
    allowed, other = pages
    url = server.base + "/v1/chat/completions"
    ask = {"Origin": allowed, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    r = httpx.options(url, headers=ask)  # no key: a preflight never carries one
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == allowed
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "authorization, content-type, x-stainless-os"
    assert r.headers["vary"] == "Origin" and int(r.headers["access-control-max-age"]) > 0
    refused = httpx.options(url, headers={**ask, "Origin": other})
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
    assert refused.json()["error"]["code"] == "cors_origin_not_allowed"
    # Ordinary answers to a listed origin carry the headers, errors included; others' carry none.
    key = {"Authorization": f"Bearer {KEY}"}
    ok = httpx.get(server.base + "/v1/models", headers={**key, "Origin": "https://x.example"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://x.example"
    assert "x-request-id" in ok.headers["access-control-expose-headers"]
    no_key = httpx.get(server.base + "/v1/models", headers={"Origin": allowed})
    assert no_key.status_code == 401 and no_key.headers["access-control-allow-origin"] == allowed
    stranger = httpx.get(server.base + "/v1/models", headers={**key, "Origin": other})
    assert stranger.status_code == 200 and "access-control-allow-origin" not in stranger.headers
    # An OPTIONS that is no preflight (no Origin) goes through the key check like any request.
    assert httpx.options(url).status_code == 401
    # The page itself is not opened to the API's origins (Gradio answers its own CORS for loopback pages).
    page = httpx.get(server.base + "/", headers={"Origin": "https://x.example"})
    assert page.status_code == 200 and "access-control-allow-origin" not in page.headers


def test_every_v1_answer_has_a_request_id(server):
    key = {"Authorization": f"Bearer {KEY}"}
    url = server.base + "/v1/chat/completions"
    ok = {"model": "vlchat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    seen = set()
    for r in (httpx.post(url, json=ok, headers=key, timeout=30), httpx.post(url, json={**ok, "n": 2}, headers=key),
              httpx.post(url, json=ok), httpx.get(server.base + "/v1/nothing", headers=key),
              httpx.post(url, content=b"{", headers={**key, "Content-Type": "application/json"}),
              httpx.post(server.base + "/v1/responses", json={"model": "vlchat", "input": "hi",
                                                              "max_output_tokens": 2}, headers=key, timeout=30)):
        assert r.headers["x-request-id"].startswith("req_"), (r.status_code, r.headers)
        seen.add(r.headers["x-request-id"])
    assert len(seen) == 6
    echoed = httpx.post(url, json=ok, headers={**key, "X-Request-Id": "trace-42"}, timeout=30)
    assert echoed.headers["x-request-id"] == "trace-42"
    with httpx.stream("POST", url, json={**ok, "stream": True}, headers={**key, "X-Request-Id": "s-1"}) as r:
        assert r.headers["x-request-id"] == "s-1"
    for bad in ("x" * 200, "a b"):  # too long or not printable: replaced, never echoed
        r = httpx.get(server.base + "/v1/models", headers={**key, "X-Request-Id": bad})
        assert r.headers["x-request-id"].startswith("req_")
    assert "x-request-id" not in httpx.get(server.base + "/health").headers  # /v1 only


def test_cors_is_off_by_default_and_the_setting_is_checked():
    assert Settings().cors_origins == ""
    assert load_settings(["--cors-origins", "http://a.example:3000, https://b.example"],
                         environ={}).cors_origins
    assert load_settings([], environ={"VLCHAT_CORS_ORIGINS": "*"}).cors_origins == "*"
    for wrong in ("a.example", "http://a.example/path", "ftp://a.example"):
        with pytest.raises(SettingsError, match="--cors-origins"):
            load_settings(["--cors-origins", wrong], environ={}, exit_on_error=False)

    async def answer(origins: tuple[str, ...], method: str, headers: list) -> tuple[int, dict]:
        sent = []

        async def app(scope, receive, send):  # stands in for the API: 405 to an OPTIONS
            await send({"type": "http.response.start", "status": 405, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        async def receive():
            return {"type": "http.request", "body": b""}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": method, "path": "/v1/chat/completions", "headers": headers}
        await ApiHeaders(app, origins)(scope, receive, send)
        start = sent[0]
        return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}

    def run(*args) -> tuple[int, dict]:  # in a thread of its own: Playwright's loop may run in this one
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, answer(*args)).result()

    preflight = [(b"origin", b"http://a.example"), (b"access-control-request-method", b"POST")]
    status, headers = run((), "OPTIONS", preflight)
    assert status == 405 and not any(k.startswith("access-control") for k in headers)  # off: the API answers
    assert headers["x-request-id"].startswith("req_")
    status, headers = run(("http://a.example",), "OPTIONS", preflight)
    assert status == 204 and headers["access-control-allow-origin"] == "http://a.example"
    status, headers = run(("*",), "OPTIONS", preflight)
    assert status == 204 and headers["access-control-allow-origin"] == "http://a.example"
    status, headers = run(("http://b.example",), "OPTIONS", preflight)
    assert status == 403 and "access-control-allow-origin" not in headers
