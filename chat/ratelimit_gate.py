"""Where the rate limits (`chat.ratelimit`) meet requests: the API's 429 and headers, the page's notice, metrics.

Who is limited (each request counts against one subject):
- an API request: its key (with --api-key; each key has its own buckets), or, on a server without
  keys (where every caller is the one anonymous owner), the client's address as the ASGI server
  reports it (`request.client.host`; behind a reverse proxy that is the proxy's);
- a page message (send, describe, regenerate, an edited question): its owner, the logged-in user
  with --auth, else the browser.
With --address-rate-limit / --address-token-limit, every page message and API call also counts against
its client address, whoever sent it (a script that drops its cookie, or many keys from one machine); the
headers then show whichever of the two limits is closer to running out.

A refused API request is a 429 in the OpenAI envelope (code `rate_limit_exceeded`) with
`Retry-After`; every answer of a limited route carries `x-ratelimit-limit/remaining/reset-requests`
(and `-tokens` with --token-limit), as OpenAI's API does. A refused page message is a Notice that
says when to try again; nothing is stored. Refusals are counted in /metrics as
`vlchat_rate_limited_total{kind="key|address|browser|user", limit="requests|tokens"}`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, generate_latest

from chat.notices import Notice
from chat.openai_parse import ApiError
from chat.ratelimit import RateLimiter, Refusal, Status, Ticket, parse_rates

NO_LIMITS = RateLimiter()


def duration(seconds: float) -> str:
    """OpenAI's reset format: '20ms', '1s', '29.5s', '6m0s', '1h0m0s'."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours >= 1:
        return f"{int(hours)}h{int(minutes)}m{text}"
    return f"{int(minutes)}m{text}" if minutes >= 1 else text


def in_words(seconds: int) -> str:
    """'1 second', '12 seconds', '3 minutes', '2 hours' (rounded up)."""
    if seconds < 120:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    if seconds < 7200:
        return f"{math.ceil(seconds / 60)} minutes"
    return f"{math.ceil(seconds / 3600)} hours"


def _trio(status: Status | None, what: str) -> dict:
    if status is None:
        return {}
    return {f"x-ratelimit-limit-{what}": str(status.limit), f"x-ratelimit-remaining-{what}": str(status.remaining),
            f"x-ratelimit-reset-{what}": duration(status.reset_seconds)}


def limit_headers(ticket: Ticket) -> dict:
    """The x-ratelimit-* headers of an admission (and Retry-After when it was refused); none without limits."""
    out = {**_trio(ticket.requests, "requests"), **_trio(ticket.tokens, "tokens")}
    if ticket.refusal is not None:
        out["Retry-After"] = str(ticket.refusal.retry_after_seconds)
        out["retry-after-ms"] = str(math.ceil(ticket.refusal.retry_after * 1000))
    return out


class Gate:
    """The server's limits (from --rate-limit and --token-limit) and their refusal counter; built once by app.py."""

    def __init__(self, rate_limit: str = "", token_limit: str = "", address_rate_limit: str = "",
                 address_token_limit: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.limiter = RateLimiter(parse_rates(rate_limit), parse_rates(token_limit), clock=clock)
        self.by_address = RateLimiter(parse_rates(address_rate_limit), parse_rates(address_token_limit),
                                      clock=clock)
        self.registry = CollectorRegistry()
        self.refused = Counter("vlchat_rate_limited", "Requests and page messages refused by a rate limit.",
                               ["kind", "limit"], registry=self.registry)

    @classmethod
    def from_settings(cls, settings) -> Gate:
        """The gate for a Settings."""
        return cls(getattr(settings, "rate_limit", ""), getattr(settings, "token_limit", ""),
                   getattr(settings, "address_rate_limit", ""), getattr(settings, "address_token_limit", ""))

    @property
    def enabled(self) -> bool:
        """Whether any limit is set."""
        return self.limiter.enabled or self.by_address.enabled

    def render(self) -> bytes:
        """Prometheus text for /metrics (nothing when no limit is set)."""
        return generate_latest(self.registry) if self.enabled else b""

    def admit(self, subject: str, kind: str, address: str | None = None) -> Ticket:
        """An admission for `subject` (and, with address limits, for the client `address` too); a refusal is
        counted under `kind` (or 'all-address')."""
        ticket = self.limiter.admit(subject)
        if ticket.refusal is not None:
            self.refused.labels(kind=kind, limit=ticket.refusal.what).inc()
            return ticket
        if not self.by_address.enabled:
            return ticket
        both = Tickets(ticket, self.by_address.admit("address:" + (address or "unknown")))
        if both.refusal is not None:
            self.refused.labels(kind="all-address", limit=both.refusal.what).inc()
        return both

    # -- the API --

    def api(self, request, owner: str, keyed: bool) -> Ticket:
        """Admit an API request (by its key when keys are configured, else by address) or raise a 429 ApiError."""
        if not self.enabled:
            return NO_LIMITS.admit("")
        address = client_address(request)
        if keyed:
            subject, kind = owner, "key"
        else:
            subject, kind = "address:" + (address or "unknown"), "address"
        ticket = self.admit(subject, kind, address)
        if ticket.refusal is not None:
            # OpenAI's type is what ran out ("requests" or "tokens"); the code is always rate_limit_exceeded.
            raise ApiError(429, api_message(ticket.refusal), ticket.refusal.what, code="rate_limit_exceeded",
                           headers=limit_headers(ticket))
        return ticket

    # -- the page --

    def page(self, owner: str, address: str | None = None) -> Ticket:
        """Admit a page message of `owner` ('browser:...' or 'user:...') from client `address`, or raise a Notice
        saying when to retry."""
        if not self.enabled:
            return NO_LIMITS.admit("")
        ticket = self.admit(owner, owner.split(":", 1)[0], address)
        if ticket.refusal is not None:
            raise Notice(page_message(ticket.refusal))
        return ticket


def page_ticket(gate: Gate | None, owner: str, address: str | None = None) -> Ticket:
    """`gate.page(owner, address)`, or an admission that limits nothing when the page has no gate (tests, tools)."""
    return gate.page(owner, address) if gate is not None else NO_LIMITS.admit("")


def client_address(request) -> str | None:
    """The client's address as the ASGI server reports it (a gr.Request or a starlette Request)."""
    client = getattr(request, "client", None)
    return getattr(client, "host", None) if client is not None else None


class Tickets:
    """Two admissions as one (the subject's and its address's): refused if either is, charged and refunded
    together; the header numbers are the one with fewer requests (and tokens) left."""

    def __init__(self, own: Ticket, address: Ticket) -> None:
        self.parts = (own, address)
        self.refusal = own.refusal or address.refusal
        if self.refusal is not None:
            for part in self.parts:
                part.refund()  # neither counts: the request does not run
        self.requests = _tighter(own.requests, address.requests)
        self.tokens = _tighter(own.tokens, address.tokens)

    @property
    def admitted(self) -> bool:
        return self.refusal is None

    def charge(self, tokens: int) -> None:
        for part in self.parts:
            part.charge(tokens)

    def refund(self) -> None:
        for part in self.parts:
            part.refund()

    def on_finish(self, then: Callable | None = None) -> Callable:
        return self.parts[0].on_finish(self.parts[1].on_finish(then))


def _tighter(a, b):
    if a is None or b is None:
        return a or b
    return a if a.remaining <= b.remaining else b


def api_ticket(state, request, owner: str) -> Ticket:
    """Admit an API request of `owner` (a chat.api.ApiState's limits; by key when it has keys) or raise a 429."""
    gate = getattr(state, "limits", None)
    return gate.api(request, owner, keyed=bool(state.keys)) if gate is not None else NO_LIMITS.admit("")


def api_message(refusal: Refusal) -> str:
    """The 429's message."""
    what = "requests" if refusal.what == "requests" else "tokens (prompt plus answer)"
    return (f"Rate limit reached: too many {what} in a short time. Try again in "
            f"{in_words(refusal.retry_after_seconds)}.")


def page_message(refusal: Refusal) -> str:
    """The page's notice."""
    what = "Too many messages" if refusal.what == "requests" else "Too much text asked and answered"
    return f"{what}; try again in {in_words(refusal.retry_after_seconds)}. Your message is still in the box."
