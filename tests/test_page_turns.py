"""A message sent while this page's answer still streams waits for it, then goes (issue 13: "the box stays
editable (the next message waits its turn)"); one message waits at most; nothing is lost on a refusal."""

from __future__ import annotations

import threading
import time

import pytest

from chat import stream, ui
from chat.notices import Notice
from tests.test_queue_position import _until
from tests.test_ui import OWNER, Req, real_ctx


@pytest.fixture
def ctx(tmp_path, loaded):
    yield from real_ctx(tmp_path, loaded)


def box(text):
    return {"text": text, "files": []}


def start(ctx, conv_id, text, max_new, out):
    """Consume a send on a thread (as Gradio's worker does), keeping its updates in `out`."""
    def run():
        try:
            for update in ui.send(ctx, conv_id, box(text), "general", 0.0, 0.9, max_new, "", "auto", Req()):
                out.append(update)
        except Notice as exc:
            out.append(exc)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_next_message_waits_for_the_answer_on_screen(ctx):
    first: list = []
    t1 = start(ctx, None, "Go on for a long time.", 4000, first)
    assert _until(lambda: ctx.active.get("s1") is not None)
    conv_id = first[0][0]
    second: list = []
    t2 = start(ctx, conv_id, "And then?", 8, second)
    assert _until(lambda: second and second[0][4] == stream.WAITING_LINE)
    # Still waiting: nothing of it stored yet, and its text is still in the box (the update leaves it alone).
    time.sleep(0.3)
    assert [r["role"] for r in ctx.store.messages(OWNER, conv_id)] == ["user", "assistant"]
    assert len(second) == 1 and second[0][2] == {"__type__": "update"}  # gr.skip(): the box untouched
    # A third one is refused while the second waits, in words.
    with pytest.raises(Notice, match="already waiting"):
        list(ui.send(ctx, conv_id, box("Third?"), "general", 0.0, 0.9, 8, "", "auto", Req()))
    ui.stop(ctx, Req())  # the first answer ends: the waiting message goes
    t1.join(60)
    t2.join(60)
    rows = ctx.store.messages(OWNER, conv_id)
    assert [(r["role"], r["text"] if r["role"] == "user" else r["status"]) for r in rows] == [
        ("user", "Go on for a long time."), ("assistant", "stopped"), ("user", "And then?"), ("assistant", "complete")]
    # Its engine prompt held the first answer (the history was read after the wait): 4 messages on screen.
    assert len(second[-1][1]) == 4


def test_no_wait_when_nothing_streams(ctx):
    updates = list(ui.send(ctx, None, box("Hello"), "general", 0.0, 0.9, 8, "", "auto", Req()))
    assert stream.WAITING_LINE not in [u[4] for u in updates]
    assert not ctx.queued
