"""The model servers a remote engine answers with: which are up, and which one serves a conversation.

Each upstream is an OpenAI-compatible base URL (`http://gpu-box:8000/v1`). A probe (`GET {url}/models`,
then `GET /health` beside `/v1` where the server has one) runs every few seconds on the remote engine's
event loop and marks each one up or down; a request that cannot connect marks its upstream down at once,
without waiting for the next probe.

Affinity: a conversation goes to the upstream that rendezvous hashing (highest score of
sha256(url, conversation key)) picks among those that are up. While that upstream is up, every turn of
the conversation goes there (its prefix and encoder caches are there); when it is down, the conversation
moves to its next-highest upstream, and only the conversations of the dead one move. When it comes back,
they go back to it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("vlchat.upstreams")

PROBE_SECONDS = 2.0  # how often every upstream is asked for its models
PROBE_TIMEOUT = 5.0
SLOW_PROBES = 2  # a server busy enough to miss one probe's timeout is not down yet; a refused connection is


def public_url(url: str) -> str:
    """The URL without any user:password in it, for logs and /health."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass
class Upstream:
    """One model server and what the last probe or request learned about it."""

    url: str
    up: bool = False
    error: str = "not contacted yet"
    models: list[str] = field(default_factory=list)
    changed_at: float = field(default_factory=time.monotonic)
    slow: int = 0  # probes in a row that timed out

    def public(self) -> dict:
        """For /health: where it is (no credentials), whether it is up, and why not."""
        out = {"url": public_url(self.url), "up": self.up}
        if not self.up:
            out["error"] = self.error
        return out


def score(url: str, key: str) -> int:
    """Rendezvous-hashing weight of `url` for the conversation `key`."""
    return int.from_bytes(hashlib.sha256(f"{url}\n{key}".encode()).digest()[:8], "big")


class Pool:
    """The upstreams, their state, and the choice of one for a conversation."""

    def __init__(self, urls: tuple[str, ...], model: str = "",
                 on_change: Callable[[Upstream], None] | None = None) -> None:
        if not urls:
            raise ValueError("a remote engine needs at least one upstream URL")
        self.upstreams = [Upstream(u) for u in urls]
        self.wanted_model = model
        self.ready = threading.Event()  # set while at least one upstream is up
        self.changed_at = time.monotonic()  # the last time `ready` flipped
        self._on_change = on_change
        self._lock = threading.Lock()

    @property
    def model(self) -> str:
        """The model requests ask for: --engine-model, else the first one an upstream lists."""
        if self.wanted_model:
            return self.wanted_model
        for u in self.upstreams:
            if u.up and u.models:
                return u.models[0]
        return ""

    def others(self) -> tuple[str, ...]:
        """Every model a live upstream lists besides `model` (LoRA adapters served beside it)."""
        base = self.model
        names = [m for u in self.upstreams if u.up for m in u.models if m != base]
        return tuple(dict.fromkeys(names))

    def pick(self, key: str, exclude: tuple[Upstream, ...] = ()) -> Upstream | None:
        """The upstream for conversation `key`: the highest-scoring one that is up and not excluded."""
        live = [u for u in self.upstreams if u.up and u not in exclude]
        if not live:
            return None
        return max(live, key=lambda u: score(u.url, key))

    def mark(self, upstream: Upstream, up: bool, error: str = "", models: list[str] | None = None) -> None:
        """Record a probe's or a request's finding; log and report changes."""
        with self._lock:
            if models is not None:
                upstream.models = models
            changed = upstream.up != up
            upstream.up = up
            upstream.error = "" if up else (error or "not reachable")
            if changed:
                upstream.changed_at = time.monotonic()
            any_up = any(u.up for u in self.upstreams)
            if any_up != self.ready.is_set():
                self.changed_at = time.monotonic()
                (self.ready.set if any_up else self.ready.clear)()
        if changed:
            if up:
                log.info("model server %s is up (models: %s)", public_url(upstream.url),
                         ", ".join(upstream.models) or "none listed")
            else:
                log.warning("model server %s is down: %s", public_url(upstream.url), upstream.error)
            if self._on_change is not None:
                self._on_change(upstream)

    async def probe(self, client, upstream: Upstream, headers: dict) -> None:
        """Ask one upstream for its models and mark it up or down."""
        import httpx

        try:
            response = await client.get(upstream.url + "/models", headers=headers, timeout=PROBE_TIMEOUT)
        except httpx.TimeoutException as exc:
            upstream.slow += 1
            if upstream.slow >= SLOW_PROBES or not upstream.up:
                self.mark(upstream, False, f"not answering ({type(exc).__name__})")
            return
        except httpx.HTTPError as exc:
            self.mark(upstream, False, f"not reachable ({type(exc).__name__})")
            return
        upstream.slow = 0
        if response.status_code != 200:
            reason = "the API key was refused" if response.status_code in (401, 403) else "it answered"
            self.mark(upstream, False, f"{reason} (HTTP {response.status_code} on /models)")
            return
        try:
            models = [m["id"] for m in response.json()["data"] if isinstance(m.get("id"), str)]
        except (ValueError, KeyError, TypeError, AttributeError):
            self.mark(upstream, False, "its /models answer is not an OpenAI model list")
            return
        if self.wanted_model and self.wanted_model not in models:
            self.mark(upstream, False, f"it does not serve the model {self.wanted_model!r} (it has: "
                                       f"{', '.join(models) or 'none'})", models)
            return
        not_ready = await self._not_ready(client, upstream)
        self.mark(upstream, not not_ready, not_ready, models=models)

    async def _not_ready(self, client, upstream: Upstream) -> str:
        """Why a server that lists its models cannot answer yet ('' if it can).

        vLLM, SGLang and vlchat answer `GET /health` beside `/v1` (vlchat lists its models while its
        own model still loads, and says 503 there until it is ready). A server without that route
        (404, or no /v1 in its URL) is taken at its word.
        """
        import httpx

        if not upstream.url.endswith("/v1"):
            return ""
        try:
            response = await client.get(upstream.url[:-3] + "/health", timeout=PROBE_TIMEOUT)
        except httpx.TimeoutException:
            return ""  # it answered /models just now: busy, not down
        except httpx.HTTPError as exc:
            return f"not reachable ({type(exc).__name__} on /health)"
        if response.status_code < 500:
            return ""
        try:
            phase = response.json().get("status", "")
        except (ValueError, AttributeError):
            phase = ""
        if phase == "loading":
            return "it is still loading its model"
        return f"it is not ready (HTTP {response.status_code} on /health)"

    def describe(self) -> str:
        """One line for a person when no upstream is up."""
        if self.ready.is_set():
            return "Ready."
        if all(u.error == "not contacted yet" for u in self.upstreams):
            return "Connecting to the model server…"
        return "The model server is not reachable; vlchat keeps trying and answers again as soon as it is back."
