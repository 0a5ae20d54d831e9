"""Content filters around any engine (issue 14): the same protocol, with input refused and answers cut.

`FilteredEngine` wraps a local or remote engine and speaks the same protocol
(chat/engine/types.py), so the page and the API need no filter code of their own:
- `submit` asks the moderator about the request's text (every user and system message, and the
  answer's start when a final assistant message is continued). A match raises `ContentFiltered`
  (code `content_filter`) before the inner engine sees the request; the page shows it as a
  notice with the message still in the box, the API as a 400, and nothing is stored.
- The answer's events pass through a `FilteredHandle`. A thread per request reads the inner
  handle's events and asks the moderator about the answer so far: text that could be the start
  of a match is held back until the next text clears it, and once a match is found the inner
  request is cancelled (the GPU stops working on it) and the handle ends with
  `Done(finish_reason="content_filter")` whose text is the kept part, the text before the match.
  Nothing of the match is ever emitted, stored or returned.

`vlchat_content_filtered_total{where="input"|"output"}` counts both kinds, on the inner engine's
metrics registry (so /metrics shows it). The moderator is any object with the two methods of
`chat.moderation.Moderator`; the blocklist is the first.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter

from chat.engine.handle import Handle
from chat.engine.types import ChatRequest, Delta, Done, EngineError, Event, Failed, GenerationFailed, Usage

log = logging.getLogger("vlchat.filter")
FILTERED = "content_filter"
BROKEN = "The content filter failed, so the answer was stopped; the details are in the server log."


class ContentFiltered(EngineError):
    """The request's text holds something the content filter blocks; nothing was sent to the model."""

    code = FILTERED

    def __init__(self) -> None:
        super().__init__("The message contains a word or phrase this server's content filter blocks, so it was "
                         "not sent.")


def texts_of(request: ChatRequest) -> list[str]:
    """The text a person wrote into a request: user and system messages, and a continued answer's start."""
    out = []
    last = len(request.messages) - 1
    for n, message in enumerate(request.messages):
        role = message.get("role")
        if role not in ("user", "system") and not (role == "assistant" and request.continue_final and n == last):
            continue
        content = message.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            parts = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
            out.append("\n".join(p.get("text") or "" for p in parts))
    return [t for t in out if t]


class FilteredEngine:
    """An engine whose requests and answers pass a moderator; everything else is the inner engine's."""

    def __init__(self, engine, moderator) -> None:
        self.engine = engine
        self.moderator = moderator
        metrics = getattr(engine, "metrics", None)
        registry = metrics.registry if metrics is not None else CollectorRegistry()
        self.filtered = Counter("vlchat_content_filtered", "Requests refused (input) or answers cut (output) by "
                                "the content filter.", ["where"], registry=registry)
        for where in ("input", "output"):
            self.filtered.labels(where)

    def __getattr__(self, name: str):
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    def submit(self, request: ChatRequest, on_finish: Callable[[Event], None] | None = None) -> FilteredHandle:
        """Check the request's text, then submit it with its answer filtered; raises ContentFiltered."""
        try:
            found = next((r for r in map(self.moderator.check_input, texts_of(request)) if r is not None), None)
        except Exception:
            log.exception("the content filter failed on a request")
            raise GenerationFailed("The content filter failed, so nothing was sent; try again later.") from None
        if found is not None:
            self.filtered.labels("input").inc()
            log.info("content filter: a request was refused (matched %r)", found)
            raise ContentFiltered()
        inner = self.engine.submit(request)
        handle = FilteredHandle(request, on_finish, inner, self)
        if inner.result is not None:  # refused inside submit (a prompt that cannot fit): ends here, now
            handle.pump()
        else:
            threading.Thread(target=handle.pump, name="vlchat-filter", daemon=True).start()
        return handle


class FilteredHandle(Handle):
    """The caller's handle: the inner handle's events with anything the moderator blocks left out."""

    def __init__(self, request: ChatRequest, on_finish, inner, owner: FilteredEngine) -> None:
        self.inner = inner
        super().__init__(request, on_finish)
        self._owner = owner
        self._raw = ""  # everything the inner engine answered so far
        self._sent = 0  # characters of it emitted (cleared by the moderator)
        self._cut: int | None = None  # where the kept text ends, once a match was found

    def __getattr__(self, name: str):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def ahead(self) -> int | None:
        """Requests before it in the queue (the inner engine's count)."""
        return getattr(self.inner, "ahead", None)

    @ahead.setter
    def ahead(self, value) -> None:  # Handle.__init__ sets it; the inner handle's is the one that counts
        pass

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the rendered prompt."""
        return getattr(self.inner, "prompt_tokens", 0)

    def cancel(self, shutting_down: bool = False) -> None:
        """Stop the inner request; the end comes through the event stream as usual."""
        self._cancel.set()
        if shutting_down:
            self.inner.cancel(shutting_down=True)
        else:
            self.inner.cancel()

    # -- the pump: inner events in, filtered events out ------------------------------------------

    def pump(self) -> None:
        """Read the inner handle's events to its end, passing on what the moderator clears."""
        for event in self.inner.events():
            if self.result is not None:
                continue  # ended early (the filter failed): the inner request winds down unseen
            try:
                self._take(event)
            except Exception:
                log.exception("the content filter failed on an answer")
                self.inner.cancel()
                self._finish(Failed(BROKEN, GenerationFailed.code, self._raw[: self._sent]))

    def _send(self, upto: int) -> None:
        if upto > self._sent:
            self._emit(Delta(self._raw[self._sent:upto]))
            self._sent = upto

    def _blocked(self, cut: int, reason: str) -> None:
        self._send(cut)
        self._cut = cut
        self._owner.filtered.labels("output").inc()
        log.info("content filter: an answer was cut after %d characters (matched %r)", cut, reason)

    def _take(self, event: Event) -> None:
        moderator = self._owner.moderator
        if isinstance(event, Delta):
            if self._cut is not None:
                return  # cut already: the inner request is being cancelled
            self._raw += event.text
            check = moderator.check_output(self._raw, False, self._sent)
            if check.cut is not None:
                self._blocked(check.cut, check.reason)
                self.inner.cancel()  # the GPU stops working on it
            else:
                self._send(check.safe)
            return
        if self._cut is not None:
            usage = event.usage if isinstance(event, Done) else Usage(self.prompt_tokens, 0, 0, 0)
            notice = event.notice if isinstance(event, Done) else ""
            self._finish(Done(FILTERED, self._raw[: self._cut], usage, notice))
            return
        # The end: the whole answer is known, so the tail held back is decided now.
        self._raw = event.text
        check = moderator.check_output(self._raw, True, min(self._sent, len(self._raw)))
        if check.cut is not None:
            self._blocked(check.cut, check.reason)
        else:
            self._send(len(self._raw))
        if isinstance(event, Done):
            if check.cut is not None:
                event = Done(FILTERED, self._raw[: check.cut], event.usage, event.notice)
        elif check.cut is not None:
            event = dataclasses.replace(event, text=self._raw[: check.cut])
        self._finish(event)
