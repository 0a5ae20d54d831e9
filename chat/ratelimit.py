"""Rate limits as token buckets: requests and tokens per second, minute or hour, per subject.

A subject is whoever is being limited: an API key, a browser (or logged-in user), a client
address. Each subject has one bucket per configured rate. A bucket holds up to `amount` and
refills continuously at `amount / seconds`, so `60/minute` allows a burst of 60 and then one a
second. Buckets are filled lazily when touched (no timers, no threads).

- Requests: a request is admitted when every request bucket holds at least 1; it takes 1 from each.
- Tokens: a request is admitted while every token bucket holds at least one token; the answer's
  real usage (prompt + completion tokens) is taken when it ends and may drive a bucket below zero,
  which delays the subject's next request until it has refilled (answers' sizes are not known
  before they are generated, so a bucket is a budget that one answer may overdraw).

A refusal says how long to wait (every bucket must allow it again). `Ticket.status()` gives the
numbers behind OpenAI's `x-ratelimit-*` headers: for requests and for tokens, the limit, what is
left and the time until the bucket is full again, of the most depleted bucket.

Memory stays bounded: a subject whose buckets are all full again is the same as a new one, so
such idle subjects are dropped in a sweep (at most once per `sweep_seconds`); beyond `max_subjects`
the least recently seen subject is forgotten (and so forgiven: the price of a hard memory bound).
Thread-safe (one lock; each call is a few float operations); the clock is injectable for tests.

Why not the `limits` package: it counts hits in windows and cannot charge a cost after the fact
(an answer's tokens are known only when it ends), which token limits need.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

UNITS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
_ALIASES = {"s": "second", "sec": "second", "seconds": "second", "m": "minute", "min": "minute",
            "minutes": "minute", "h": "hour", "hr": "hour", "hours": "hour", "d": "day", "days": "day"}
_RATE = re.compile(r"\s*(\d{1,12})\s*(?:/|per\s+)\s*([a-z]+)\s*", re.I)


@dataclass(frozen=True)
class Rate:
    """`amount` per `seconds` (from text such as '60/minute')."""

    amount: int
    seconds: float
    text: str

    @property
    def per_second(self) -> float:
        """The refill speed."""
        return self.amount / self.seconds


def parse_rates(text: str) -> tuple[Rate, ...]:
    """'10/second,60/minute' -> its rates; empty text: none. Raises ValueError saying what is wrong."""
    rates = []
    for part in re.split(r"[,;]", text or ""):
        if not part.strip():
            continue
        match = _RATE.fullmatch(part)
        unit = match and (_ALIASES.get(match.group(2).lower()) or match.group(2).lower())
        if not match or unit not in UNITS:
            raise ValueError(f"{part.strip()[:40]!r} is not a rate like 60/minute (per second, minute, hour or day)")
        amount = int(match.group(1))
        if amount < 1:
            raise ValueError(f"{part.strip()!r} allows nothing; use at least 1 (or no rate for no limit)")
        rates.append(Rate(amount, UNITS[unit], f"{amount}/{unit}"))
    return tuple(rates)


@dataclass(frozen=True)
class Status:
    """One kind's numbers for the x-ratelimit-* headers (of its most depleted bucket)."""

    limit: int
    remaining: int
    reset_seconds: float


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused: 'requests' or 'tokens', and the seconds until it would be admitted."""

    what: str
    retry_after: float

    @property
    def retry_after_seconds(self) -> int:
        """Whole seconds to wait (at least 1), as Retry-After says it."""
        return max(1, math.ceil(self.retry_after - 1e-9))


class _Entry:
    """One subject's bucket levels, as of `stamp`."""

    __slots__ = ("requests", "tokens", "stamp")

    def __init__(self, requests: list[float], tokens: list[float], stamp: float) -> None:
        self.requests, self.tokens, self.stamp = requests, tokens, stamp


class RateLimiter:
    """Request and token buckets for every subject; `admit` hands out Tickets."""

    def __init__(self, requests: tuple[Rate, ...] = (), tokens: tuple[Rate, ...] = (), *,
                 clock: Callable[[], float] = time.monotonic, max_subjects: int = 100_000,
                 sweep_seconds: float = 60.0) -> None:
        self.request_rates, self.token_rates = tuple(requests), tuple(tokens)
        self.clock, self.max_subjects, self.sweep_seconds = clock, max_subjects, sweep_seconds
        self._entries: dict[str, _Entry] = {}  # insertion order = least recently seen first
        self._lock = threading.Lock()
        self._swept = clock()

    @property
    def enabled(self) -> bool:
        """Whether any limit is set."""
        return bool(self.request_rates or self.token_rates)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # -- buckets (called with the lock held) --

    def _entry(self, subject: str, now: float) -> _Entry:
        """The subject's buckets filled up to `now` (a new subject starts full); it becomes the most recent."""
        entry = self._entries.pop(subject, None)
        if entry is None:
            self._sweep(now)
            entry = _Entry([float(r.amount) for r in self.request_rates],
                           [float(r.amount) for r in self.token_rates], now)
        else:
            elapsed = max(0.0, now - entry.stamp)
            for levels, rates in ((entry.requests, self.request_rates), (entry.tokens, self.token_rates)):
                for i, rate in enumerate(rates):
                    levels[i] = min(float(rate.amount), levels[i] + elapsed * rate.per_second)
            entry.stamp = now
        self._entries[subject] = entry
        return entry

    def _full(self, entry: _Entry, now: float) -> bool:
        elapsed = max(0.0, now - entry.stamp)
        return all(levels[i] + elapsed * rate.per_second >= rate.amount
                   for levels, rates in ((entry.requests, self.request_rates), (entry.tokens, self.token_rates))
                   for i, rate in enumerate(rates))

    def _sweep(self, now: float) -> None:
        """Drop idle subjects (all buckets full again); past max_subjects, the least recently seen.

        The full sweep runs at most once per sweep_seconds, so a flood of new subjects (fresh cookies,
        many addresses) costs one dictionary operation each, not a walk over every subject.
        """
        if now - self._swept >= self.sweep_seconds:
            self._swept = now
            for subject in [s for s, e in self._entries.items() if self._full(e, now)]:
                del self._entries[subject]
        while len(self._entries) >= self.max_subjects:
            del self._entries[next(iter(self._entries))]

    def _status(self, levels: list[float], rates: tuple[Rate, ...]) -> Status | None:
        if not rates:
            return None
        i = min(range(len(rates)), key=lambda k: levels[k] / rates[k].amount)
        rate, level = rates[i], levels[i]
        return Status(rate.amount, max(0, math.floor(level + 1e-9)), max(0.0, (rate.amount - level) / rate.per_second))

    # -- public --

    def admit(self, subject: str) -> Ticket:
        """Take one request from `subject`'s buckets, or refuse (the ticket's `refusal` says why and how long)."""
        if not self.enabled:
            return Ticket(self, subject, None, None, None)
        with self._lock:
            now = self.clock()
            entry = self._entry(subject, now)
            waits = [((1.0 - level) / rate.per_second, "requests")
                     for level, rate in zip(entry.requests, self.request_rates, strict=True) if level < 1.0]
            waits += [((1.0 - level) / rate.per_second, "tokens")
                      for level, rate in zip(entry.tokens, self.token_rates, strict=True) if level < 1.0]
            refusal = None
            if waits:
                wait, what = max(waits)
                refusal = Refusal(what, wait)
            else:
                for i in range(len(entry.requests)):
                    entry.requests[i] -= 1.0
            return Ticket(self, subject, refusal, self._status(entry.requests, self.request_rates),
                          self._status(entry.tokens, self.token_rates))

    def charge(self, subject: str, tokens: int) -> None:
        """Take `tokens` from the subject's token buckets (they may go below zero)."""
        if not self.token_rates or tokens <= 0:
            return
        with self._lock:
            entry = self._entry(subject, self.clock())
            for i in range(len(entry.tokens)):
                entry.tokens[i] -= tokens

    def refund(self, subject: str) -> None:
        """Give back an admitted request (the server, not the client, turned it away)."""
        if not self.request_rates:
            return
        with self._lock:
            entry = self._entry(subject, self.clock())
            for i, rate in enumerate(self.request_rates):
                entry.requests[i] = min(float(rate.amount), entry.requests[i] + 1.0)


class Ticket:
    """One admission: refused or not, the header numbers, and the charge for the answer's tokens."""

    def __init__(self, limiter: RateLimiter, subject: str, refusal: Refusal | None, requests: Status | None,
                 tokens: Status | None) -> None:
        self.limiter, self.subject, self.refusal = limiter, subject, refusal
        self.requests, self.tokens = requests, tokens
        self._settled = False

    @property
    def admitted(self) -> bool:
        """Whether the request may go ahead."""
        return self.refusal is None

    def charge(self, tokens: int) -> None:
        """Charge the answer's tokens (once)."""
        if self.admitted and not self._settled and tokens > 0:
            self._settled = True
            self.limiter.charge(self.subject, tokens)

    def refund(self) -> None:
        """The request did not run after all (the server was busy): it does not count."""
        if self.admitted and not self._settled:
            self._settled = True
            self.limiter.refund(self.subject)

    def on_finish(self, then: Callable | None = None) -> Callable:
        """An engine `on_finish` callback: charges the final event's prompt + completion tokens, then calls `then`."""

        def finished(event) -> None:
            try:
                usage = getattr(event, "usage", None)  # a Done's usage; a failure charges nothing
                self.charge((getattr(usage, "prompt_tokens", 0) or 0) + (getattr(usage, "completion_tokens", 0) or 0))
            finally:
                if then is not None:
                    then(event)

        return finished
