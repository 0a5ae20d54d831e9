"""Queue position: a request waiting for a place in the batch knows how many are before it, and the
page's status line says so (issue 11: "queue position ... announced")."""

from __future__ import annotations

import time

from chat import stream, ui
from chat.engine.local.engine import Engine
from chat.engine.local.runner import Runner
from tests.engine_helpers import request, user
from tests.test_ui import Req, real_ctx


def _until(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_waiting_requests_know_their_place(loaded):
    engine = Engine(Runner(loaded.model, loaded.processor), lambda i: None, max_running=1)
    engine.start(warmup=False)
    try:
        first = engine.submit(request([user("Go on forever.")], max_new_tokens=4000))
        assert _until(lambda: first.ahead is None and first._state == "running")
        second = engine.submit(request([user("two")], max_new_tokens=4))
        third = engine.submit(request([user("three")], max_new_tokens=4))
        assert _until(lambda: second.ahead == 0 and third.ahead == 1), (second.ahead, third.ahead)
        first.cancel()
        assert second.wait(60) is not None and third.wait(60) is not None
        assert second.ahead is None and third.ahead is None  # they ran: no place in the queue any more
    finally:
        engine.shutdown()


def test_waiting_line():
    class H:
        ahead = None

    h = H()
    assert stream.waiting_line(h, since=0.0, now=5.0) == "Answering…"  # running: the plain line
    h.ahead = 2
    assert stream.waiting_line(h, since=0.0, now=0.5) == "Answering…"  # only after a second of waiting
    assert stream.waiting_line(h, since=0.0, now=5.0) == "Answering… waiting for the model: 2 ahead of you."
    h.ahead = 0
    assert stream.waiting_line(h, since=0.0, now=5.0) == "Answering… waiting for the model: you are next."


def test_the_page_says_the_queue_position_then_answers(tmp_path, loaded, monkeypatch):
    monkeypatch.setattr(stream, "WAIT_NOTE_SECONDS", 0.2)
    made = real_ctx(tmp_path, loaded, max_running=1)
    ctx = next(made)
    try:
        blocker = ctx.engine.submit(request([user("Go on forever.")], max_new_tokens=4000))
        assert _until(lambda: blocker._state == "running")
        waiting = "Answering… waiting for the model: you are next."
        statuses = []
        for update in ui.send(ctx, None, {"text": "hello", "files": []}, "general", 0.0, 0.9, 8, "", "auto", Req()):
            if isinstance(update[4], str):
                statuses.append(update[4])
            if update[4] == waiting:
                blocker.cancel()  # the place in the batch frees up: the answer starts
        assert waiting in statuses, statuses
        # Once tokens come, the line goes back to plain "Answering…", then the answer ends.
        after = statuses[statuses.index(waiting) + 1:]
        assert after and after[0] == "Answering…", statuses
    finally:
        next(made, None)
