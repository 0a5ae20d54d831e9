"""One answer on its way into the page: engine events -> Chatbot updates, and where the result is saved.

`Turn` records the result. The engine may finish a request before its rows exist (a prompt
that cannot fit is refused inside `submit`), so the final event waits in the Turn until the
rows are attached. It runs on the worker thread even when the page is gone, and a row that
vanished meanwhile (the conversation was deleted) is a quiet no-op, not an error.

`stream` shows the answer. Each Gradio session has a view token, bumped whenever the page
switches what it shows (another conversation, New chat, Delete). The loop polls the handle with
a short timeout and, once the token has moved on, ends at once without cancelling the engine:
the answer finishes and is saved in its own conversation, the page's send event is over (so the
next Enter works), and nothing more is drawn into the conversation now on screen.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import gradio as gr

from chat import trim
from chat.engine.types import Delta, Done, Failed
from chat.grounding_page import for_conversation  # issue 14 (grounding)
from chat.i18n_text import say, translate  # issue 13: status lines in the page's language
from chat.notices import Notice
from chat.render import FINISH_STATUS, answer_content
from chat.stats import timing, with_details
from chat.store import NotFound

if TYPE_CHECKING:
    from chat.ui import Ctx

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1  # how soon a stream notices that its view moved on
MIN_UPDATE_SECONDS = 0.05  # at most ~20 redraws a second: each one re-sends the message's HTML
PROGRESS_SAVE_SECONDS = 2.0
WAIT_NOTE_SECONDS = 1.0  # a request still waiting for the batch after this says its queue position


# -- views ----------------------------------------------------------------------------------


def view_token(ctx: Ctx, session: str) -> int:
    """What this session's page shows now, as a number that changes when it switches."""
    with ctx.lock:
        return ctx.views.get(session, 0)


def switch_view(ctx: Ctx, session: str, wait: float = 1.0) -> None:
    """The page shows something else: its stream stops drawing (the answer itself goes on).

    Waits (briefly) until that stream has seen it: Gradio sends a generator's output before it asks
    for the next one, so once the stream has moved past its last update, whatever the caller returns
    now reaches the page after it and is what stays on screen.
    """
    with ctx.lock:
        ctx.views[session] = ctx.views.get(session, 0) + 1
        ctx.active.pop(session, None)
        left = ctx.streams.get(session)
    if left is not None:
        left.wait(wait)


def forget_session(ctx: Ctx, session: str) -> None:
    """A closed page: drop its view token."""
    with ctx.lock:
        ctx.views.pop(session, None)


WAITING_LINE = "Answering… your next message is waiting for this answer."
TURN_WAIT_SECONDS = 600.0


def wait_turn(ctx: Ctx, session: str) -> Iterator[tuple]:
    """A message sent while this page's answer still streams waits for it (one message waits at most).

    The status says so (it starts with "Answering", as the answer is still coming); the message stays in
    the box until it is sent, so nothing is lost if it is refused then.
    """
    with ctx.lock:
        if ctx.active.get(session) is None:
            return
        if session in ctx.queued:
            raise Notice("A message is already waiting for the answer on screen. Press Stop to end that answer "
                         "sooner.")
        ctx.queued.add(session)
    try:
        yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), say(WAITING_LINE), gr.skip()
        deadline = time.monotonic() + TURN_WAIT_SECONDS
        while True:
            with ctx.lock:
                if ctx.active.get(session) is None:
                    return
            if time.monotonic() > deadline:
                raise Notice("The answer on screen is still going; press Stop, then send your message again.")
            time.sleep(0.05)
    finally:
        with ctx.lock:
            ctx.queued.discard(session)


# -- saving ---------------------------------------------------------------------------------


class Turn:
    """Where one answer is saved; the final event may arrive before the rows are attached."""

    def __init__(self, ctx: Ctx, owner: str, conv_id: str | None = None) -> None:
        self.ctx, self.owner, self.conv_id = ctx, owner, conv_id
        self.question_id: int | None = None
        self.answer_id: int | None = None
        self.image_ids: list[str] = []
        self.final: Done | Failed | None = None
        self.handle = None
        self._lock = threading.Lock()
        # Per-answer details (chat.stats): the Turn is made just before the request is submitted; `stream`
        # stamps the first text it sees. The Done's usage is stored with these timings.
        self.started = time.monotonic()
        self.first_at: float | None = None
        self.usage: dict | None = None
        self.extra: dict = {}  # more to store with the usage (issue 14: chat.trim's "turns left out")

    def attach(self, conv_id: str, answer_id: int, question_id: int | None = None,
               image_ids: list[str] | None = None, handle=None) -> None:
        """The rows exist now: record a final event that already came, or track the running answer."""
        with self._lock:
            self.conv_id, self.answer_id, self.question_id = conv_id, answer_id, question_id
            self.image_ids, self.handle = list(image_ids or []), handle
            if self.final is not None:
                self._record(self.final)
            elif handle is not None:
                with self.ctx.lock:
                    self.ctx.running[conv_id] = handle

    def on_finish(self, event: Done | Failed) -> None:
        """The engine's callback (worker thread, or inside submit for a refused prompt)."""
        with self._lock:
            self.final = event
            if self.answer_id is not None:
                self._record(event)

    def save_progress(self, text: str) -> None:
        """Crash safety while streaming: a kill -9 keeps what came so far."""
        with self._lock:
            if self.final is None and self.answer_id is not None:
                try:
                    self.ctx.store.update_message(self.answer_id, text=text)
                except NotFound:
                    pass

    def seen_done(self, event: Done) -> dict:
        """The stream saw the Done: its timings (first text seen -> end seen) are the ones stored and shown."""
        with self._lock:
            usage = {**event.usage.as_dict(), **timing(self.started, self.first_at, time.monotonic(),
                                                       event.usage.completion_tokens), **self.extra}
            if usage != self.usage and self.answer_id is not None:
                try:
                    self.ctx.store.update_message(self.answer_id, usage=usage)
                except NotFound:
                    pass
            self.usage = usage
            return usage

    def _record(self, event: Done | Failed) -> None:
        store = self.ctx.store
        with self.ctx.lock:
            if self.handle is not None and self.ctx.running.get(self.conv_id) is self.handle:
                del self.ctx.running[self.conv_id]
        try:
            if isinstance(event, Done):
                status = FINISH_STATUS.get(event.finish_reason, "complete")
                self.usage = {**event.usage.as_dict(), **timing(self.started, self.first_at, time.monotonic(),
                                                                event.usage.completion_tokens), **self.extra}
                store.update_message(self.answer_id, text=event.text, status=status, usage=self.usage)
            elif event.code == "context_length_exceeded":  # refused: the question goes back to the box
                for message_id in (self.answer_id, self.question_id):
                    if message_id is not None:
                        try:
                            store.delete_message(self.owner, message_id)
                        except NotFound:
                            pass
                store.delete_unused_images(self.image_ids)
            elif event.code == "shutting_down":  # what streamed is kept, like a restart mid-answer
                store.update_message(self.answer_id, text=event.text, status="interrupted")
            else:
                store.update_message(self.answer_id, text=event.text, status="error", usage={"error": event.message})
        except NotFound:  # the conversation was deleted while it was answered
            log.info("answer %s not saved: its conversation was deleted", self.answer_id)


# -- showing --------------------------------------------------------------------------------


def _events(handle) -> Iterator[object]:
    """The handle's events, with None every POLL_SECONDS of silence."""
    while True:
        try:
            yield from handle.events(timeout=POLL_SECONDS)
            return
        except queue.Empty:
            yield None


def waiting_line(handle, since: float, now: float | None = None) -> str:
    """The status while a request waits for a place in the batch (after a second), else "Answering…".

    It starts with "Answering" like the plain line, so the page's announcer knows the answer is
    still on its way (and says the queue position as it changes). In the page's language (chat.i18n_text),
    it starts with that language's "Answering…" (assets/announce.js looks for vlchat.t("answering")).
    """
    ahead = getattr(handle, "ahead", None)
    if ahead is None or (now if now is not None else time.monotonic()) - since < WAIT_NOTE_SECONDS:
        return say("Answering…")
    if ahead == 0:
        return say("Answering… waiting for the model: you are next.")
    return say("Answering… waiting for the model: {ahead} ahead of you.", ahead=ahead)


def _done_note(event: Done) -> str:
    note = say("Stopped.") if event.finish_reason == "cancelled" else ""
    if event.finish_reason == "length":
        note = say("The answer reached the length limit (Settings → Max new tokens).")
    if event.finish_reason == "content_filter":
        note = "The answer was stopped by the content filter."
    return translate(f"{event.notice} {note}".strip())  # the engine's and the filter's notes too


def stream(ctx: Ctx, turn: Turn, handle, session: str, token: int, history: list[dict], first: tuple,
           give_back=None) -> Iterator[tuple]:
    """Show the answer; yields (conv_id, chat, box, list, status, title) while this view is on screen.

    `first` is the first update's (conv_id, box, list, title); `give_back` makes the input-box value
    for a question the engine refused after it was stored (None: not a new question).
    """
    skip = gr.skip()

    def in_view() -> bool:
        return view_token(ctx, session) == token

    # Leaving because the view moved on ends with an update that changes nothing: Gradio applies an
    # event's last output once more when it completes, which would redraw the old conversation.
    unchanged = (skip,) * 6
    left = threading.Event()  # set once this stream has stopped drawing (switch_view waits for it)
    with ctx.lock:
        ctx.streams[session] = left
    try:
        if not in_view():
            left.set()
            yield unchanged
            return
        with ctx.lock:
            ctx.active[session] = handle
        conv_id, box, choices, title = first
        history = [*history, {"role": "assistant", "content": answer_content("", "pending")}]
        answering = say("Answering…")  # in the page's language (issue 13)
        yield conv_id, history, box, choices, answering, title
        text, shown, drawn_at, saved_at = "", "", time.monotonic(), time.monotonic()
        said = answering
        for event in _events(handle):
            if not in_view():
                left.set()
                yield unchanged
                return
            if not text and event is None and (line := waiting_line(handle, saved_at)) != said:
                said = line
                yield skip, skip, skip, skip, line, skip
            if event is None or isinstance(event, Delta):
                if event is not None:
                    if said != answering and event.text:
                        said = answering
                        yield skip, skip, skip, skip, said, skip
                    if event.text and turn.first_at is None:
                        turn.first_at = time.monotonic()
                    text += event.text
                    if time.monotonic() - saved_at > PROGRESS_SAVE_SECONDS:
                        turn.save_progress(text)
                        saved_at = time.monotonic()
                if text != shown and (event is None or time.monotonic() - drawn_at >= MIN_UPDATE_SECONDS):
                    history[-1] = {"role": "assistant", "content": answer_content(text, "streaming")}
                    shown, drawn_at = text, time.monotonic()
                    yield skip, history, skip, skip, skip, skip
            elif isinstance(event, Done):
                status = FINISH_STATUS.get(event.finish_reason, "complete")
                usage = turn.seen_done(event)
                content = trim.with_note(answer_content(event.text, status), usage)  # issue 14: turns left out
                history[-1] = {"role": "assistant", "content": with_details(content, usage)}
                line = " ".join(filter(None, (_done_note(event), trim.note_text(usage))))
                history[-1]["content"] = for_conversation(ctx.store, turn.owner, turn.conv_id, history[-1]["content"],
                                                          event.text, status)  # issue 14: boxes drawn under it
                yield skip, history, skip, skip, line, skip
            elif event.code == "context_length_exceeded":
                # Refused after the question was stored (and shown): both are gone again.
                back = give_back() if give_back is not None else skip
                yield skip, history[:-2] if give_back is not None else history[:-1], back, skip, "", skip
                raise Notice(event.message)
            else:
                status = "interrupted" if event.code == "shutting_down" else "error"
                message = translate(event.message)
                history[-1] = {"role": "assistant", "content": answer_content(event.text, status, message)}
                yield skip, history, skip, skip, message, skip
    finally:
        left.set()
        with ctx.lock:
            if ctx.active.get(session) is handle:
                del ctx.active[session]
            if ctx.streams.get(session) is left:
                del ctx.streams[session]
        # The page went away mid-answer (not a view switch): the answer stops, what came is kept.
        if handle.result is None and in_view():
            handle.cancel()
