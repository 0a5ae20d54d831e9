"""Who is asking: the signed browser-identity cookie, the /metrics key check, the login throttle.

A browser's identity is a random 128-bit id in an HttpOnly, SameSite=Strict cookie signed with
HMAC-SHA256 under a server secret (`cookie.key` in the data folder, mode 0600). Its owner key is
"browser:<32 hex>", the format the page used when the identity lived in Gradio's BrowserState
(sha256 of that secret, 32 hex), so a migrated browser keeps its history. `IdentityCookies`
(pure ASGI) checks the cookie on every request, puts the verified id into the request's state
for `browser_owner`, issues a cookie to a browser without a valid one, and serves the one-time
migration route for an identity still in localStorage.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from http.cookies import SimpleCookie
from pathlib import Path

log = logging.getLogger("vlchat")

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

COOKIE = "vlchat_id"
STATE_KEY = "vlchat_browser"
MIGRATE_PATH = "/identity/migrate"
COOKIE_MAX_AGE = 400 * 24 * 3600  # browsers cap cookie lifetimes at 400 days; each page load renews it
_ID = re.compile(r"[0-9a-f]{32}")
# Requests whose answers never carry the cookie: programs and probes.
_NO_COOKIE_PREFIXES = ("/v1/", "/health", "/metrics")


def secret_file(path: Path, nbytes: int = 32) -> bytes:
    """A random secret kept in `path` (created with mode 0600 on first use); its hex text as bytes."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(nbytes))
    return path.read_text().strip().encode()


def owner_key(browser_id: str) -> str:
    """The store's owner key for a browser id."""
    return "browser:" + browser_id


def legacy_browser_id(secret: str) -> str:
    """The browser id of an identity the old page kept in BrowserState (as `ui.owner_of` derived it)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:32]


def browser_owner(request) -> str | None:
    """The owner key "browser:<32 hex>" of the browser behind a gr.Request or starlette Request, or None."""
    if request is None:
        return None
    state = getattr(request, "state", None)
    if state is None:  # a gr.Request that was pickled keeps the state under this name
        state = getattr(request, "request_state", None)
    if isinstance(state, dict):
        browser_id = state.get(STATE_KEY)
    else:
        browser_id = getattr(state, STATE_KEY, None) if state is not None else None
    if isinstance(browser_id, str) and _ID.fullmatch(browser_id):
        return owner_key(browser_id)
    return None


class CookieSigner:
    """Signs and checks browser ids with HMAC-SHA256 under the server secret."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def _mac(self, browser_id: str) -> str:
        digest = hmac.new(self.key, b"vlchat-browser-id:" + browser_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def sign(self, browser_id: str) -> str:
        """The cookie value for `browser_id`."""
        return f"{browser_id}.{self._mac(browser_id)}"

    def verify(self, value: str | None) -> str | None:
        """The browser id in a cookie value, or None if it is missing, malformed or forged."""
        if not value or value.count(".") != 1:
            return None
        browser_id, mac = value.split(".")
        if not _ID.fullmatch(browser_id) or not hmac.compare_digest(mac, self._mac(browser_id)):
            return None
        return browser_id


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return ""


def _cookie(scope: Scope, name: str) -> str | None:
    raw = ";".join(v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"cookie")
    if not raw:
        return None
    jar = SimpleCookie()
    try:
        jar.load(raw)
    except Exception:  # a malformed Cookie header is the same as none
        return None
    morsel = jar.get(name)
    return morsel.value if morsel else None


async def _json(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"cache-control", b"no-store"), *headers]})
    await send({"type": "http.response.body", "body": data})


# Cross-site arrivals (a link on another site) do not carry a SameSite=Strict cookie; this page
# reloads itself from our own origin, which does, instead of handing out a second identity.
_RELOAD = (b"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" "
           b"content=\"0\"><title>vlchat</title></head><body>Loading vlchat\xe2\x80\xa6</body></html>")


class IdentityCookies:
    """ASGI middleware: the signed browser-identity cookie, its renewal, and the one-time migration."""

    def __init__(self, app: ASGIApp, signer: CookieSigner, legacy_key: str | None, migrated_file: Path,
                 secure: bool = False) -> None:
        self.app = app
        self.signer = signer
        self.legacy_key = legacy_key
        self.migrated_file = migrated_file
        self.secure = secure
        self._lock = threading.Lock()

    def set_cookie(self, browser_id: str) -> tuple[bytes, bytes]:
        """The Set-Cookie header for `browser_id`."""
        flags = f"; Path=/; Max-Age={COOKIE_MAX_AGE}; HttpOnly; SameSite=Strict" + ("; Secure" if self.secure else "")
        return b"set-cookie", f"{COOKIE}={self.signer.sign(browser_id)}{flags}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        browser_id = self.signer.verify(_cookie(scope, COOKIE))
        cross_site = _header(scope, b"sec-fetch-site") == "cross-site"
        if path == MIGRATE_PATH:
            await self.migrate(scope, receive, send, browser_id)
            return
        if browser_id is None and cross_site and scope["method"] == "GET" \
                and _header(scope, b"sec-fetch-mode") == "navigate":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/html; charset=utf-8"), (b"cache-control", b"no-store"),
                                    (b"content-length", str(len(_RELOAD)).encode())]})
            await send({"type": "http.response.body", "body": _RELOAD})
            return
        quiet = path.startswith(_NO_COOKIE_PREFIXES) or cross_site
        issue = browser_id is None and not quiet
        if issue:
            browser_id = secrets.token_hex(16)
        if browser_id is not None:
            scope.setdefault("state", {})[STATE_KEY] = browser_id

        async def send_with_cookie(message: dict) -> None:
            if message["type"] == "http.response.start" and browser_id is not None and not quiet:
                headers = list(message.get("headers", ()))
                html = any(k.lower() == b"content-type" and v.startswith(b"text/html") for k, v in headers)
                if issue or html:  # a page load renews the cookie's lifetime
                    headers.append(self.set_cookie(browser_id))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    async def migrate(self, scope: Scope, receive: Receive, send: Send, current: str | None) -> None:
        """POST {"value": <the old localStorage entry>}: adopt that identity once, then forget it."""
        if scope["method"] != "POST":
            await _json(send, 405, {"error": "POST only."})
            return
        # Another site must not switch this browser to an identity of its choosing: browsers say
        # where a request comes from (Sec-Fetch-Site; older ones: Origin), and a JSON body cannot
        # be sent across sites without a CORS preflight, which this server never grants.
        fetch_site = _header(scope, b"sec-fetch-site")
        origin = _header(scope, b"origin")
        same_origin = fetch_site == "same-origin" or (
            not fetch_site and bool(origin) and origin.split("://", 1)[-1] == _header(scope, b"host"))
        if not same_origin or not _header(scope, b"content-type").startswith("application/json"):
            await _json(send, 403, {"error": "Only the page itself may call this."})
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            if len(body) > 8192:
                await _json(send, 413, {"error": "Too large."})
                return
            if not message.get("more_body"):
                break
        try:
            stored = json.loads(body).get("value")
        except (ValueError, AttributeError):
            stored = None
        legacy_id = None
        if isinstance(stored, str) and self.legacy_key:
            from chat.legacy_identity import decrypt_browser_state

            secret = await asyncio.to_thread(decrypt_browser_state, stored, self.legacy_key)
            if isinstance(secret, str) and len(secret) >= 32:
                legacy_id = legacy_browser_id(secret)
        if legacy_id is None:  # unreadable: nothing to keep; the page drops the entry
            await _json(send, 200, {"migrated": False, "forget": True})
            return
        if legacy_id == current:
            await _json(send, 200, {"migrated": False, "forget": True})
            return
        if not self._claim(legacy_id):
            log.warning("refused a second migration of browser identity %s…", legacy_id[:8])
            await _json(send, 409, {"migrated": False, "forget": True,
                                    "error": "This identity was already moved to a cookie."})
            return
        log.info("browser identity %s… moved from localStorage to its cookie", legacy_id[:8])
        await _json(send, 200, {"migrated": True, "forget": True}, [self.set_cookie(legacy_id)])

    def _claim(self, legacy_id: str) -> bool:
        """Record that `legacy_id` moved to a cookie; False if it already had (a replayed entry)."""
        with self._lock:
            done = self.migrated_file.read_text().split() if self.migrated_file.exists() else []
            if legacy_id in done:
                return False
            with self.migrated_file.open("a") as f:
                f.write(legacy_id + "\n")
            return True


def bearer_ok(headers, keys: tuple[str, ...]) -> bool:
    """Whether an `Authorization: Bearer KEY` header carries one of `keys` (constant-time compare)."""
    auth = headers.get("authorization", "")
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    return bool(token) and any(hmac.compare_digest(token.encode(), k.encode()) for k in keys)


class LoginThrottle:
    """ASGI middleware: after `per_minute` failed logins from one address within a minute, answer 429.

    A failure is an answer of Gradio's POST /login with a 4xx (or 5xx) status, or no answer; a
    success takes back only its own attempt, never earlier failures. The address is the
    connection's own (X-Forwarded-For is not trusted).
    """

    PATHS = ("/login", "/login/")
    WINDOW = 60.0
    MAX_ADDRESSES = 10_000

    def __init__(self, app: ASGIApp, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.per_minute = per_minute
        self.clock = clock
        self.failures: dict[str, deque[float]] = {}

    def retry_after(self, address: str) -> int:
        """Seconds until `address` may try again (0: now)."""
        now = self.clock()
        times = self.failures.get(address)
        if times is None:
            return 0
        while times and times[0] <= now - self.WINDOW:
            times.popleft()
        if not times:
            del self.failures[address]
            return 0
        if len(times) < self.per_minute:
            return 0
        return max(1, math.ceil(times[0] + self.WINDOW - now))

    def attempt(self, address: str) -> float:
        """Count an attempt from `address` as failed until its answer says otherwise; its mark."""
        if address not in self.failures and len(self.failures) >= self.MAX_ADDRESSES:
            stale = [a for a in list(self.failures) if self.retry_after(a) == 0]
            for a in stale or list(self.failures)[: self.MAX_ADDRESSES // 10]:
                self.failures.pop(a, None)
        mark = self.clock()
        self.failures.setdefault(address, deque()).append(mark)
        return mark

    def succeeded(self, address: str, mark: float) -> None:
        """Take back the mark of an attempt that did not fail (others' marks stay)."""
        times = self.failures.get(address)
        if times is not None and mark in times:
            times.remove(mark)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.PATHS \
                or self.per_minute <= 0:
            await self.app(scope, receive, send)
            return
        address = (scope.get("client") or ("unknown", 0))[0]
        wait = self.retry_after(address)
        if wait:
            await _json(send, 429, {"detail": f"Too many failed logins; try again in {wait} seconds."},
                        [(b"retry-after", str(wait).encode())])
            return
        # Counted before the answer, so parallel guesses cannot slip past the limit.
        mark = self.attempt(address)

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] < 400:
                self.succeeded(address, mark)
            await send(message)

        await self.app(scope, receive, watch)
