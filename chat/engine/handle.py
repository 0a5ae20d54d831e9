"""One submitted request as its caller sees it: an event stream, a result and `cancel()`.

The worker thread emits Delta events and finishes the handle with Done or Failed. An optional
`on_finish` callback runs with the final event before the caller sees it, so a result is
recorded even when nobody reads the stream any more (a closed tab). Cancelling a queued
request finishes it at once and frees its queue slot; a running one ends within a step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

from chat.engine.types import ChatRequest, Delta, Done, Event, Failed, ShuttingDown, Usage

log = logging.getLogger(__name__)


class Handle:
    """One submitted request, as seen by its caller."""

    def __init__(
        self, request: ChatRequest, on_finish: Callable[[Event], None] | None, release: Callable[[], None] = None
    ) -> None:
        self.request = request
        self.on_finish = on_finish
        self._release = release or (lambda: None)  # frees the queue slot when it stops waiting
        self.enqueued = time.monotonic()
        self.result: Done | Failed | None = None
        self.prompt = None  # the rendered Prompt, made by submit() in the caller's thread
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._state = "queued"  # -> running -> finished, or queued -> finished on cancel
        self._waker: Callable[[], None] | None = None
        self._emitted = False
        self._text = ""  # what was streamed, kept for a Failed that ends it
        self.shutting_down = False  # cancelled because the server stops: ends as Failed, not Done
        self.ahead: int | None = None  # while it waits for a place in the batch: requests before it

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the rendered prompt (0 before it is rendered)."""
        return len(self.prompt.ids) if self.prompt is not None else 0

    def cancel(self, shutting_down: bool = False) -> None:
        """Stop this request: at once if it is still queued, else within a decode step."""
        with self._lock:
            self.shutting_down = self.shutting_down or shutting_down
            self._cancel.set()
            queued = self._state == "queued"
            if queued:
                self._state = "finished"
        if queued:
            self._release()
            if self.shutting_down:
                self._finish(Failed(str(ShuttingDown()), ShuttingDown.code, ""))
            else:
                self._finish(Done("cancelled", "", Usage(self.prompt_tokens, 0, 0, 0)))

    def _claim(self) -> bool:
        """Worker side: mark running; False if it was cancelled while queued."""
        with self._lock:
            if self._state != "queued":
                return False
            self._state = "running"
        self._release()
        return True

    @property
    def cancelled(self) -> bool:
        """Whether cancel() was called."""
        return self._cancel.is_set()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Yield events until the final Done or Failed (raises queue.Empty after `timeout` idle seconds)."""
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if isinstance(event, (Done, Failed)):
                return

    async def aevents(self) -> AsyncIterator[Event]:
        """The same events for an asyncio caller, without parking a thread per waiting request."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        self._waker = lambda: loop.call_soon_threadsafe(wake.set)
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                wake.clear()
                if self._events.empty():  # an event put after the check above sets `wake` again
                    await wake.wait()
                continue
            yield event
            if isinstance(event, (Done, Failed)):
                return

    def wait(self, timeout: float | None = None) -> Done | Failed | None:
        """Block until the request ends; the final event."""
        self._done.wait(timeout)
        return self.result

    def _emit(self, event: Event) -> None:
        self._emitted = True
        self._text += event.text
        self._events.put(event)
        self._wake()

    def _emit_text(self, text: str) -> None:
        self._emit(Delta(text))

    def _wake(self) -> None:
        waker = self._waker
        if waker is not None:
            try:
                waker()
            except RuntimeError:  # the caller's event loop is gone
                pass

    def _finish(self, event: Done | Failed) -> None:
        self.result = event
        # The callback (which records the result) runs before the caller sees the final event, so
        # whatever the caller does next already finds the answer saved.
        if self.on_finish is not None:
            try:
                self.on_finish(event)
            except Exception:  # a broken callback must not take the worker down
                log.exception("on_finish callback failed")
        self._events.put(event)
        self._wake()
        self._done.set()
