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


# -- in the browser ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    from tests.servers import Server, data_dir

    srv = Server(data_dir(tmp_path_factory, model_dir, "turns-data")).start()
    yield srv
    srv.stop()


def test_typing_while_an_answer_streams(server, browser):
    """In the page: a message typed and sent while the answer streams waits (the status says so), then goes
    once the answer ends; it is answered in the same conversation."""
    from tests.test_e2e_browser import open_settings, send, set_setting, wait_idle, wait_ready

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.goto(server.base + "/")
        wait_ready(page)
        open_settings(page)
        set_setting(page, "max-new-tokens", "4096")
        send(page, "Talk for a long time.")
        page.wait_for_function("() => document.querySelector('#status').innerText.startsWith('Answering')",
                               timeout=30_000)
        send(page, "The next question.")  # typed and sent while the first answer streams
        page.locator("#status").get_by_text("your next message is waiting").wait_for(timeout=15_000)
        assert "The next question." not in page.locator("#chat").inner_text()
        page.locator("#stop").click()
        page.locator("#chat").get_by_text("The next question.").wait_for(timeout=30_000)
        wait_idle(page)
        chat = page.locator("#chat").inner_text()
        assert chat.index("Talk for a long time.") < chat.index("The next question.")
        assert page.locator("#chat .bot-row").count() == 2
    finally:
        context.close()
