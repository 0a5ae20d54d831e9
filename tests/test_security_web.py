"""The web server's guards, through real HTTP against real servers (and a real browser where it matters).

Issue 9, items 3 (CSP and headers; nothing loads from another host), 4 (signed HttpOnly identity
cookie, migration from BrowserState, no secret in client-visible config, docs and monitoring
closed), 6 (SIGTERM ends the process in seconds; header and body read timeouts), 8 (uploads are
images only) and 9 (/metrics key, login throttle).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from PIL import Image

from chat.security import COOKIE, CookieSigner, IdentityCookies, LoginThrottle, browser_owner
from chat.webguard import is_image
from tests.servers import Server, data_dir

LEGACY_KEY = "legacy-browser-key-5f2a9c"
LEGACY_SECRET = "Xq9-legacy-identity-secret-0123456789abcdefghij"
API_KEY = "test-key-123"


def legacy_blob(secret: str = LEGACY_SECRET, key: str = LEGACY_KEY) -> str:
    """What Gradio's BrowserState kept in localStorage: base64(iv) + ':' + CryptoJS/OpenSSL AES text."""
    passphrase = hashlib.sha256(key.encode()).hexdigest()
    out = subprocess.run(["openssl", "enc", "-aes-256-cbc", "-md", "md5", "-salt", "-base64", "-A",
                          "-pass", "pass:" + passphrase], input=json.dumps(secret).encode(), capture_output=True,
                         check=True).stdout.decode()
    return "AAAAAAAAAAAAAAAAAAAAAA==:" + out


def png_bytes(size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.txt", "not an image")
    return buf.getvalue()


def seeded(tmp_path_factory, model_dir, name: str) -> Path:
    """A data folder holding the tiny model and the browser.key older versions created."""
    data = data_dir(tmp_path_factory, model_dir, name)
    (data / "browser.key").write_text(LEGACY_KEY)
    return data


@pytest.fixture(scope="module")
def plain(tmp_path_factory, model_dir):
    srv = Server(seeded(tmp_path_factory, model_dir, "sec-plain")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def locked(tmp_path_factory, model_dir):
    srv = Server(data_dir(tmp_path_factory, model_dir, "sec-locked"), "--metrics-key-required", "--expose-docs",
                 "--login-failures-per-minute", "3", "--header-timeout-seconds", "2", "--body-timeout-seconds", "2",
                 "--max-image-bytes", "100000", "--max-images-per-message", "2",
                 env={"VLCHAT_API_KEY": API_KEY, "VLCHAT_AUTH": "alice:correct-horse"}).start()
    yield srv
    srv.stop()


def vlchat_cookie(context) -> str | None:
    values = [c["value"] for c in context.cookies() if c["name"] == COOKIE]
    return values[0] if values else None


# -- item 3: headers and the content security policy ----------------------------------------------


def test_page_sends_a_strict_csp_and_every_answer_nosniff(plain):
    page = httpx.get(plain.base + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = {d.split()[0]: d.split()[1:] for d in page.headers["content-security-policy"].split("; ")}
    for directive in ("default-src", "script-src", "style-src", "img-src", "connect-src", "font-src", "media-src"):
        sources = csp.get(directive, csp["default-src"])
        assert "'self'" in sources
        assert all(s in ("'self'", "'unsafe-inline'", "data:", "blob:") for s in sources), (directive, sources)
    assert "'unsafe-inline'" not in csp["img-src"] and "'unsafe-eval'" not in csp["script-src"]
    assert csp["frame-ancestors"] == ["'self'"] and csp["object-src"] == ["'none'"]
    assert csp["base-uri"] == ["'self'"] and csp["form-action"] == ["'self'"]
    answers = [page, httpx.get(plain.base + "/health"), httpx.get(plain.base + "/v1/models"),
               httpx.get(plain.base + "/no/such/route"), httpx.get(plain.base + "/config"),
               httpx.post(plain.base + "/gradio_api/upload", files={"files": ("a.zip", zip_bytes())})]
    for answer in answers:
        assert answer.headers["x-content-type-options"] == "nosniff", answer.url
        assert answer.headers["referrer-policy"] == "no-referrer", answer.url


def test_page_works_under_its_csp_and_loads_nothing_from_another_host(plain, browser):
    from tests.test_e2e_browser import assistant_texts, send, wait_idle

    context = browser.new_context()
    context.add_init_script("window.__csp = []; document.addEventListener('securitypolicyviolation',"
                            " e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));")
    page = context.new_page()
    elsewhere: list[str] = []
    own = (plain.base + "/", "data:", "blob:")
    page.on("request", lambda r: None if r.url.startswith(own) else elsewhere.append(r.url))
    first = page.goto(plain.base + "/")
    assert "content-security-policy" in first.headers
    page.locator("#input textarea").wait_for(timeout=30_000)
    send(page, "Hello under a strict policy")
    page.wait_for_function("() => document.querySelectorAll('#chat .bot-row').length >= 1", timeout=30_000)
    wait_idle(page)
    assert assistant_texts(page) and assistant_texts(page)[-1].strip()
    assert page.evaluate("window.__csp") == []
    assert elsewhere == []
    context.close()


# -- item 4: the identity cookie, its migration, closed docs --------------------------------------


def test_first_visit_gets_a_signed_httponly_strict_cookie(plain):
    first = httpx.get(plain.base + "/")
    set_cookie = first.headers["set-cookie"]
    assert set_cookie.startswith(COOKIE + "=")
    flags = [f.strip().lower() for f in set_cookie.split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags and "secure" not in flags
    value = first.cookies[COOKIE]
    key = (plain.data_dir / "cookie.key")
    assert key.stat().st_mode & 0o777 == 0o600
    assert CookieSigner(key.read_text().strip().encode()).verify(value) == value.split(".")[0]
    # A valid cookie is kept (a page load renews it), JSON answers leave it alone, probes get none.
    again = httpx.get(plain.base + "/", cookies={COOKIE: value})
    assert again.cookies.get(COOKIE) == value
    assert "set-cookie" not in httpx.get(plain.base + "/config", cookies={COOKIE: value}).headers
    assert "set-cookie" not in httpx.get(plain.base + "/health").headers
    # A forged or tampered cookie is replaced by a new identity.
    forged = value.split(".")[0] + ".AAAA"
    replaced = httpx.get(plain.base + "/", cookies={COOKIE: forged}).cookies[COOKIE]
    assert replaced.split(".")[0] != value.split(".")[0]


def test_browser_owner_reads_the_verified_id_from_starlette_and_gradio_requests():
    import gradio as gr
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    seen = {}

    def echo(request: Request):
        seen["starlette"] = browser_owner(request)
        seen["gradio"] = browser_owner(gr.Request(request=request))
        seen["pickled"] = browser_owner(pickle.loads(pickle.dumps(gr.Request(request=request))))
        return PlainTextResponse("ok")

    signer = CookieSigner(b"k" * 32)
    app = IdentityCookies(Starlette(routes=[Route("/", echo)]), signer, None, Path("/nonexistent"))
    with TestClient(app) as client:
        value = client.get("/").cookies[COOKIE]
        expected = "browser:" + value.split(".")[0]
        assert seen == {"starlette": expected, "gradio": expected, "pickled": expected}
        client.cookies.set(COOKIE, "0" * 32 + ".forged")
        client.get("/")
        assert seen["starlette"] != "browser:" + "0" * 32
    assert browser_owner(None) is None
    assert browser_owner(gr.Request(username="x", headers={}, cookies={COOKIE: value})) is None


def test_no_secret_in_the_page_or_its_config(plain):
    for path in ("/", "/config", "/gradio_api/info"):
        body = httpx.get(plain.base + path).text
        assert LEGACY_KEY not in body, path
        assert (plain.data_dir / "cookie.key").read_text().strip() not in body, path
    for path in ("/browser.key", "/cookie.key", "/gradio_api/file=" + str(plain.data_dir / "cookie.key")):
        assert httpx.get(plain.base + path).status_code in (403, 404), path


def test_docs_schemas_and_monitoring_are_closed_unless_exposed(plain, locked):
    for path in ("/openapi.json", "/gradio_api/openapi.json", "/docs", "/redoc", "/monitoring",
                 "/monitoring/summary"):
        assert httpx.get(plain.base + path).status_code == 404, path
    assert httpx.get(locked.base + "/openapi.json").status_code == 200
    docs = httpx.get(locked.base + "/docs")
    assert docs.status_code == 200 and "content-security-policy" not in docs.headers  # its viewer is on a CDN


def test_migration_route_adopts_an_old_identity_once_and_only_from_the_page(plain):
    blob = legacy_blob()
    url = plain.base + "/identity/migrate"
    body = {"value": blob}
    assert httpx.post(url, json=body).status_code == 403  # no Origin, no Sec-Fetch-Site
    assert httpx.post(url, json=body, headers={"sec-fetch-site": "cross-site", "origin": "http://evil.test"}
                      ).status_code == 403
    assert httpx.post(url, data={"value": blob}, headers={"origin": plain.base}).status_code == 403  # a form
    garbage = httpx.post(url, json={"value": "AAAA:bm90IGl0"}, headers={"sec-fetch-site": "same-origin"})
    assert garbage.json() == {"migrated": False, "forget": True} and COOKIE not in garbage.cookies
    moved = httpx.post(url, json=body, headers={"origin": plain.base})
    assert moved.status_code == 200 and moved.json() == {"migrated": True, "forget": True}
    legacy_id = hashlib.sha256(LEGACY_SECRET.encode()).hexdigest()[:32]
    assert moved.cookies[COOKIE].split(".")[0] == legacy_id
    replay = httpx.post(url, json=body, headers={"sec-fetch-site": "same-origin"})
    assert replay.status_code == 409 and COOKIE not in replay.cookies


LEGACY_APP = """
import sys
import gradio as gr

port, key, secret = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with gr.Blocks() as demo:
    state = gr.BrowserState(None, storage_key="vlchat-identity", secret=key)
    done = gr.Textbox(elem_id="done")
    demo.load(lambda old: (secret, "stored"), [state], [state, done])
demo.launch(server_name="127.0.0.1", server_port=port)
"""


def test_an_old_browser_keeps_its_history_through_the_move_to_a_cookie(tmp_path_factory, model_dir, browser):
    from chat.store import Store

    data = seeded(tmp_path_factory, model_dir, "sec-migrate")
    legacy_owner = "browser:" + hashlib.sha256(LEGACY_SECRET.encode()).hexdigest()[:32]
    store = Store(data)
    store.create_conversation(legacy_owner, title="Written before the upgrade")
    store.close()
    srv = Server(data)
    # The old page (Gradio's own BrowserState, its own CryptoJS) stores the identity on this origin.
    old = subprocess.Popen([sys.executable, "-c", LEGACY_APP, str(srv.port), LEGACY_KEY, LEGACY_SECRET],
                           env=srv.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    context = browser.new_context()
    page = context.new_page()
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                page.goto(srv.base + "/")
                break
            except Exception:
                assert time.monotonic() < deadline and old.poll() is None, "the old page did not start"
                time.sleep(0.5)
        page.wait_for_function("() => localStorage.getItem('vlchat-identity')", timeout=30_000)
    finally:
        old.terminate()
        old.wait(15)
    stored = page.evaluate("localStorage.getItem('vlchat-identity')")
    assert stored and stored.count(":") == 1
    srv.start()
    try:
        page.goto(srv.base + "/")
        page.locator("#conversation-list label", has_text="Written before the upgrade").first.wait_for(
            timeout=30_000)
        assert vlchat_cookie(context).split(".")[0] == legacy_owner.split(":")[1]
        assert page.evaluate("localStorage.getItem('vlchat-identity')") is None
        # The next visit is plain: same identity, nothing left to migrate.
        page.reload()
        page.locator("#conversation-list label", has_text="Written before the upgrade").first.wait_for(
            timeout=30_000)
    finally:
        context.close()
        srv.stop()


def test_arriving_from_a_link_on_another_site_keeps_the_identity(plain, browser):
    context = browser.new_context()
    page = context.new_page()
    page.goto(plain.base + "/")
    page.locator("#input textarea").wait_for(timeout=30_000)
    before = vlchat_cookie(context)
    assert before
    page.route("http://elsewhere.test/", lambda route: route.fulfill(
        status=200, content_type="text/html", body=f'<a id="go" href="{plain.base}/">vlchat</a>'))
    page.goto("http://elsewhere.test/")
    page.click("#go")  # a cross-site navigation: the SameSite=Strict cookie is not sent with it
    page.locator("#input textarea").wait_for(timeout=30_000)
    assert vlchat_cookie(context) == before
    context.close()


# -- item 6: SIGTERM and slow clients ----------------------------------------------------------------


def test_sigterm_ends_the_process_in_seconds_with_open_streams_and_tabs(tmp_path_factory, model_dir, browser):
    import sqlite3

    from tests.test_e2e_browser import open_settings, send, set_setting

    srv = Server(data_dir(tmp_path_factory, model_dir, "sec-term"), "--max-new-tokens-limit", "30000").start()
    events: list[str] = []

    def stream() -> None:
        body = {"model": "vlchat", "stream": True, "max_tokens": 30000,
                "messages": [{"role": "user", "content": "Write forever."}]}
        try:
            with httpx.stream("POST", srv.base + "/v1/chat/completions", json=body, timeout=60) as answer:
                for line in answer.iter_lines():
                    if line:
                        events.append(line)
        except httpx.HTTPError as exc:
            events.append(f"closed: {exc!r}")

    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(srv.base + "/")  # one tab answering, through Gradio's queue stream
        page.locator("#input textarea").wait_for(timeout=30_000)
        open_settings(page)
        set_setting(page, "max-new-tokens", "30000")
        send(page, "A page answer cut by a restart")
        page.wait_for_function("() => { const b = document.querySelectorAll('#chat .bot-row');"
                               " return b.length && b[b.length-1].innerText.length > 40; }", timeout=30_000)
        reader = threading.Thread(target=stream, daemon=True)  # and one API stream
        reader.start()
        deadline = time.monotonic() + 30
        while len(events) < 5:
            assert time.monotonic() < deadline, events
            time.sleep(0.1)
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(20)
        took = time.monotonic() - started
    finally:
        context.close()
        srv.stop()
    reader.join(10)
    assert code == 0 and took < 10, (code, took)
    assert [e for e in events if "restarting" in e or e.startswith("closed")], events[-3:]
    log = srv.log.read_text()
    assert "Exception in ASGI application" not in log and "Traceback" not in log
    # The page's answer was saved as cut short (not left pending) before the database closed.
    db = sqlite3.connect(srv.data_dir / "vlchat.db")
    statuses = [row[0] for row in db.execute("select status from messages where role = 'assistant'")]
    db.close()
    assert statuses and "pending" not in statuses, statuses


def test_a_client_that_never_finishes_its_headers_is_cut_off(locked):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", locked.port)) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # half a request, then silence
        conn.settimeout(15)
        assert conn.recv(1024) == b""  # closed by the server
    assert time.monotonic() - started < 8
    with socket.create_connection(("127.0.0.1", locked.port)) as idle:  # connects and says nothing
        idle.settimeout(15)
        assert idle.recv(1024) == b""
    assert httpx.get(locked.base + "/health").status_code == 200  # normal clients are unaffected


def test_a_body_that_stalls_gets_408(locked):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", locked.port)) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"model\": ")
        conn.settimeout(15)
        answer = conn.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < 8


def test_the_body_timeout_keeps_disconnect_peeking_working():
    """Starlette's (and Gradio's queue stream's) is_disconnected() peeks under a cancelled scope."""
    import asyncio

    from starlette.requests import Request

    from chat.webguard import BodyTimeout

    seen = {}

    async def app(scope, receive, send):
        seen["disconnected"] = await Request(scope, receive).is_disconnected()

    async def gone() -> dict:
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    worker = threading.Thread(target=lambda: asyncio.run(BodyTimeout(app, 5)(scope, gone, None)))
    worker.start()  # its own thread: the browser tests keep an event loop running in this one
    worker.join(10)
    assert seen == {"disconnected": True}


# -- item 8: uploads are images --------------------------------------------------------------------


def test_upload_accepts_images_and_refuses_other_files_by_content(plain, locked):
    url = plain.base + "/gradio_api/upload"
    ok = httpx.post(url, files=[("files", ("photo.png", png_bytes(), "image/png"))])
    assert ok.status_code == 200 and len(ok.json()) == 1
    for name, data in [("cat.png", zip_bytes()), ("page.png", b"<html><script>alert(1)</script></html>"),
                       ("empty.jpg", b"")]:
        refused = httpx.post(url, files=[("files", (name, data, "image/png"))])
        assert refused.status_code == 415, (name, refused.text)
        assert "not an image" in refused.json()["error"]
    mixed = httpx.post(url, files=[("files", ("a.png", png_bytes(), "image/png")),
                                   ("files", ("b.png", zip_bytes(), "image/png"))])
    assert mixed.status_code == 415
    assert list((plain.data_dir / "gradio").rglob("cat.png")) == []
    big = httpx.post(locked.base + "/gradio_api/upload",
                     files=[("files", ("big.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 1_500_000, "image/png"))])
    assert big.status_code == 413


def test_image_magic_bytes():
    assert is_image(png_bytes()) and is_image(b"\xff\xd8\xff\xe0") and is_image(b"GIF89a..") and is_image(b"BM..")
    assert is_image(b"RIFF\0\0\0\0WEBPVP8 ")
    assert not is_image(b"PK\x03\x04") and not is_image(b"") and not is_image(b"RIFF\0\0\0\0WAVE")


# -- item 9: /metrics key and the login throttle ----------------------------------------------------


def test_metrics_requires_the_api_key_when_asked(plain, locked):
    assert httpx.get(plain.base + "/metrics").status_code == 200
    assert httpx.get(locked.base + "/metrics").status_code == 401
    assert httpx.get(locked.base + "/metrics", headers={"authorization": "Bearer wrong"}).status_code == 401
    good = httpx.get(locked.base + "/metrics", headers={"authorization": f"Bearer {API_KEY}"})
    assert good.status_code == 200 and "vlchat_images_encoded_total" in good.text


def test_login_failures_are_throttled_per_address(locked):
    url = locked.base + "/login"

    def login(password: str, **headers) -> httpx.Response:
        return httpx.post(url, data={"username": "alice", "password": password}, headers=headers)

    assert login("wrong-1").status_code == 400
    assert login("correct-horse").status_code == 200  # a success does not clear earlier failures
    assert login("wrong-2").status_code == 400
    assert login("wrong-3").status_code == 400
    blocked = login("wrong-4")
    assert blocked.status_code == 429 and 1 <= int(blocked.headers["retry-after"]) <= 60
    assert login("correct-horse").status_code == 429  # until the minute has passed
    assert login("wrong-5", **{"x-forwarded-for": "203.0.113.9"}).status_code == 429  # not trusted


def test_login_throttle_window():
    now = [1000.0]
    throttle = LoginThrottle(None, per_minute=2, clock=lambda: now[0])
    throttle.attempt("a")
    now[0] += 10
    throttle.attempt("a")
    assert throttle.retry_after("a") == 50 and throttle.retry_after("b") == 0
    now[0] += 50
    assert throttle.retry_after("a") == 0  # the first failure left the window
    mark = throttle.attempt("a")
    throttle.succeeded("a", mark)
    assert throttle.retry_after("a") == 0


# -- /health -----------------------------------------------------------------------------------------


def test_health_reports_phase_and_failure(tmp_path):
    from types import SimpleNamespace

    from app import _NotLoaded, health_body
    from chat.engine.types import LoadStatus

    ctx = SimpleNamespace(engine=_NotLoaded(), status=LoadStatus(), model_name="m")
    ctx.status.set("loading", 0.4321)
    assert health_body(ctx) == ({"status": "loading", "model": "m", "waiting": 0, "phase": "loading",
                                 "progress": 0.432}, 503)
    ctx.status.fail("The model folder does not exist.")
    body, code = health_body(ctx)
    assert code == 503 and body["status"] == "failed" and body["error"] == "The model folder does not exist."
